from dataclasses import dataclass
from typing import Any

import pytest

from sdft_utils.cli import arg, dataclass_groups, parse_args
from sdft_utils.errors import UserInputError


@dataclass
class Demo:
    learning_rate: float = arg(2e-5, "lr", "optimization")
    name: str | None = arg(None, "a name", "general")
    flag: bool = arg(True, "a flag", "general")
    mode: str = arg("full", "mode", "loss", ["full", "topk"])
    files: list[str] = arg([], "files", "data")


def test_defaults_come_from_the_dataclass():
    assert parse_args(Demo, []) == Demo()


def test_command_line_overrides_config_file_which_overrides_defaults(tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_text("learning_rate: 5.0e-5\nmode: topk\nflag: false\nfiles: [a.jsonl, b.jsonl]\n")
    args = parse_args(Demo, ["--config", str(config), "--mode", "full"])
    assert args.learning_rate == 5e-5 and args.flag is False and args.mode == "full"
    assert args.files == ["a.jsonl", "b.jsonl"]


def test_default_config_is_used_only_without_an_explicit_one(tmp_path):
    default, explicit = tmp_path / "default.yaml", tmp_path / "explicit.yaml"
    default.write_text("name: default\n")
    explicit.write_text("learning_rate: 1.0\n")
    assert parse_args(Demo, [], default_config=default).name == "default"
    args = parse_args(Demo, ["--config", str(explicit)], default_config=default)
    assert args.name is None and args.learning_rate == 1.0


def test_bool_and_none_parsing():
    args = parse_args(Demo, ["--flag", "no", "--name", "none"])
    assert args.flag is False and args.name is None


def test_unknown_config_key_names_the_file_and_suggests_the_right_one(tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_text("learning_rat: 1.0\n")
    with pytest.raises(UserInputError, match=r"recipe.yaml: unknown argument 'learning_rat'.*'learning_rate'"):
        parse_args(Demo, ["--config", str(config)])


@pytest.mark.parametrize("text, message", [
    ("learning_rate: fast\n", "'learning_rate'"),
    ("mode: bogus\n", "must be one of"),
    ("learning_rate: [1, 2]\n", "takes one value"),
    ("- a\n- b\n", "expected a mapping"),
])
def test_bad_config_values_are_user_errors(tmp_path, text, message):
    config = tmp_path / "recipe.yaml"
    config.write_text(text)
    with pytest.raises(UserInputError, match=message):
        parse_args(Demo, ["--config", str(config)])


def test_bad_command_line_value_exits_with_status_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(Demo, ["--mode", "bogus"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_groups_follow_declaration_order():
    groups = dataclass_groups(Demo)
    assert list(groups) == ["optimization", "general", "loss", "data"]
    assert [field.name for field in groups["general"]] == ["name", "flag"]


@dataclass
class WithMappings:
    template_kwargs: dict[str, Any] = arg({}, "a JSON object", "data")
    teacher_kwargs: dict[str, Any] | None = arg(None, "another, or none", "data")
    name: str = arg("x", "a plain string", "general")


def test_dict_flags_take_a_json_object_on_the_command_line_and_a_mapping_in_yaml(tmp_path):
    assert parse_args(WithMappings, []) == WithMappings() and WithMappings().template_kwargs == {}
    assert WithMappings().template_kwargs is not WithMappings().template_kwargs  # no shared mutable default
    args = parse_args(WithMappings, ["--template_kwargs", '{"enable_thinking": false, "depth": 2}',
                                     "--teacher_kwargs", "none"])
    assert args.template_kwargs == {"enable_thinking": False, "depth": 2} and args.teacher_kwargs is None
    config = tmp_path / "recipe.yaml"
    config.write_text("template_kwargs: {enable_thinking: false}\nteacher_kwargs: '{\"enable_thinking\": true}'\n")
    args = parse_args(WithMappings, ["--config", str(config)])
    assert args.template_kwargs == {"enable_thinking": False} and args.teacher_kwargs == {"enable_thinking": True}
    # the command line still overrides the file, with an empty object
    assert parse_args(WithMappings, ["--config", str(config), "--template_kwargs", "{}"]).template_kwargs == {}


@pytest.mark.parametrize("text, message", [
    ("{enable_thinking: false}", "expected a JSON object such as"),  # YAML-ish, not JSON
    ("{'enable_thinking': False}", "double quotes"),  # a Python dict
    ("[1, 2]", "got a list"),
    ("false", "got a bool"),
])
def test_malformed_json_flag_exits_with_status_2_and_says_what_is_expected(capsys, text, message):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(WithMappings, ["--template_kwargs", text])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--template_kwargs" in err and message in err


@pytest.mark.parametrize("text, message", [
    ("template_kwargs: '{oops'\n", "'template_kwargs': expected a JSON object"),
    ("template_kwargs: [a, b]\n", "takes one value, got a list"),
    ("name: {a: 1}\n", "'name' takes a single value, got a mapping"),
    ("template_kwargs: {1: true}\n", "keys must be names"),
])
def test_bad_mappings_in_yaml_are_user_errors(tmp_path, text, message):
    config = tmp_path / "recipe.yaml"
    config.write_text(text)
    with pytest.raises(UserInputError, match=message):
        parse_args(WithMappings, ["--config", str(config)])

from dataclasses import dataclass

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

"""Command-line and YAML arguments from one dataclass.

Each script declares its flags once, as a dataclass whose fields carry a default, a help string and a group.
`parse_args` builds argparse from it and lets `--config FILE.yaml` supply values; flags given on the command line
override the file, which overrides the dataclass defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import importlib.util
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from sdft_utils.errors import UserInputError

T = TypeVar("T")


def arg(default: Any, help: str, group: str = "general", choices: list | None = None) -> Any:
    """A dataclass field with its help text and the section it belongs to in `--help` and the README."""
    metadata = {"help": help, "group": group, "choices": choices}
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def override(group: type, name: str, default: Any) -> Any:
    """Field `name` of the dataclass `group` with another default (same help, group and choices): how a script
    changes a shared flag's default, e.g. SDPO's `alpha: float = override(LossArgs, "alpha", 0.5)`."""
    field = {field.name: field for field in dataclasses.fields(group)}[name]
    return arg(default, field.metadata["help"], field.metadata["group"], field.metadata["choices"])


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parse_json_object(text: str) -> dict:
    """A dict-valued flag: a JSON object on the command line (YAML recipes give a mapping directly)."""
    example = """'{"enable_thinking": false}'"""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(
            f"expected a JSON object such as {example}, got {text!r} ({error.msg} at character {error.pos}). "
            "Quote it for the shell and write JSON: double quotes, lower-case true/false/null") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as {example}, got a {type(value).__name__}: "
                                         f"{text!r}")
    return value


def _field_kind(annotation: Any) -> tuple[type, bool, bool]:
    """(scalar type, is_list, is_optional) of a field annotation such as `int`, `str | None`, `list[str]`,
    `dict[str, Any]` (scalar type dict: one JSON object)."""
    optional = False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [member for member in typing.get_args(annotation) if member is not type(None)]
        optional = len(members) < len(typing.get_args(annotation))
        annotation = members[0]
    if typing.get_origin(annotation) is list:
        return typing.get_args(annotation)[0], True, optional
    if typing.get_origin(annotation) is dict:
        return dict, False, optional
    return annotation, False, optional


def _converter(scalar: type, optional: bool):
    base = {bool: _parse_bool, dict: _parse_json_object}.get(scalar, scalar)

    def convert(text: str):
        if optional and text.lower() in ("none", "null"):
            return None
        return base(text)

    convert.__name__ = scalar.__name__  # argparse names the type in its error messages
    return convert


def build_parser(cls: type, description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML file of arguments; command-line flags override it")
    hints = typing.get_type_hints(cls)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for field in dataclasses.fields(cls):
        group_name = field.metadata.get("group", "general")
        group = groups.setdefault(group_name, parser.add_argument_group(group_name))
        scalar, is_list, optional = _field_kind(hints[field.name])
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        group.add_argument(
            f"--{field.name}", type=_converter(scalar, optional), nargs="*" if is_list else None,
            choices=field.metadata.get("choices"), default=argparse.SUPPRESS,
            metavar={bool: "BOOL", dict: "JSON"}.get(scalar),
            help=f"{field.metadata.get('help', '')} (default: {default})",
        )
    return parser


def load_config_file(path: str | Path, cls: type, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Read a YAML recipe and check every key and value against the dataclass, naming the file on any error."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"--config {path}: no such file.")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise UserInputError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(values, dict):
        raise UserInputError(f"{path}: expected a mapping of argument names to values, got {type(values).__name__}.")
    names = [field.name for field in dataclasses.fields(cls)]
    actions = {action.dest: action for action in parser._actions}
    checked = {}
    for key, value in values.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else " Run with --help to see the arguments."
            raise UserInputError(f"{path}: unknown argument '{key}'.{hint}")
        action = actions[key]
        takes_mapping = action.metavar == "JSON"
        if isinstance(value, dict):
            if not takes_mapping:
                raise UserInputError(f"{path}: '{key}' takes a single value, got a mapping {value!r}.")
            if not all(isinstance(name, str) for name in value):
                raise UserInputError(f"{path}: '{key}': the mapping's keys must be names (strings), got "
                                     f"{[name for name in value if not isinstance(name, str)]!r}.")
            checked[key] = value
            continue
        items = value if isinstance(value, list) else [value]
        if action.nargs != "*" and isinstance(value, list):
            raise UserInputError(f"{path}: '{key}' takes one value, got a list {value!r}.")
        try:
            converted = [None if item is None else action.type(str(item)) for item in items]
        except (ValueError, argparse.ArgumentTypeError) as error:
            raise UserInputError(f"{path}: '{key}': {error}") from None
        for item in converted:
            if action.choices is not None and item not in action.choices:
                raise UserInputError(f"{path}: '{key}' must be one of {list(action.choices)}, got {item!r}.")
        checked[key] = converted if action.nargs == "*" else converted[0]
    return checked


def parse_args(cls: type[T], argv: list[str] | None = None, description: str | None = None,
               default_config: str | Path | None = None) -> T:
    """Parse `argv` into an instance of the dataclass `cls`.

    Precedence: dataclass defaults < `default_config` (used only when no `--config` is given) < `--config` file <
    command-line flags. Bad values exit with argparse's message (status 2); bad YAML raises `UserInputError`.
    """
    parser = build_parser(cls, description)
    flags = vars(parser.parse_args(argv))
    config_path = flags.pop("config", None) or default_config
    values = load_config_file(config_path, cls, parser) if config_path else {}
    values.update(flags)
    return cls(**values)


def dataclass_groups(cls: type) -> dict[str, list[dataclasses.Field]]:
    """Fields of `cls` grouped by their `group` metadata, in declaration order (for documentation)."""
    groups: dict[str, list[dataclasses.Field]] = {}
    for field in dataclasses.fields(cls):
        groups.setdefault(field.metadata.get("group", "general"), []).append(field)
    return groups


def flag_reference(scripts: dict[str, type], heading: str = "##") -> str:
    """A Markdown reference of every flag of the scripts' dataclasses (`{"train_sdft.py": Args, ...}`): one table
    per group, one column of defaults per script ("-" where a script has no such flag)."""
    names = list(scripts)
    fields = {name: {field.name: field for field in dataclasses.fields(cls)} for name, cls in scripts.items()}
    groups: dict[str, list[str]] = {}
    for name in names:
        for field in fields[name].values():
            flags = groups.setdefault(field.metadata.get("group", "general"), [])
            if field.name not in flags:
                flags.append(field.name)
    lines = []
    for group, flags in groups.items():
        lines += [f"{heading} {group}", "", "| flag | " + " | ".join(f"`{name}`" for name in names) + " | meaning |",
                  "|---|" + "---|" * len(names) + "---|"]
        for flag in flags:
            defaults = [_default_text(fields[name][flag]) if flag in fields[name] else "-" for name in names]
            field = next(fields[name][flag] for name in names if flag in fields[name])
            choices = field.metadata.get("choices")
            meaning = field.metadata.get("help", "") + (f" (one of: {', '.join(map(str, choices))})" if choices else "")
            lines.append(f"| `--{flag}` | " + " | ".join(defaults) + f" | {meaning.replace('|', '/')} |")
        lines.append("")
    return "\n".join(lines)

def load_attribute(spec: str, flag: str) -> Any:
    """A flag naming code (`--reward_fn`, `--tool_environment`): `module:attribute` or `path/to/file.py:attribute`
    -> the object; UserInputError naming `flag` when it cannot be found."""
    module_name, _, attribute = spec.rpartition(":")
    if not module_name or not attribute:
        raise UserInputError(f"{flag} {spec!r}: expected 'module:attribute' or 'path/to/file.py:attribute'.")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise UserInputError(f"{flag} {spec!r}: no such file {path}.")
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[path.stem] = module
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as error:
        raise UserInputError(f"{flag} {spec!r}: cannot import {module_name!r} ({error}).") from None
    if not hasattr(module, attribute):
        raise UserInputError(f"{flag} {spec!r}: {module_name!r} has no attribute {attribute!r}.")
    return getattr(module, attribute)


FLAGS_HEADER = """# Flags

Generated from the scripts' argument dataclasses by `python -m sdft_utils.cli docs/flags.md`; a test fails when this
file is stale. Every flag also works as a key of a `--config` YAML recipe.

## Training scripts
"""


def flags_document(training: dict[str, type], evaluation: type) -> str:
    """docs/flags.md: the training scripts' flags side by side, then evaluate.py's."""
    return (FLAGS_HEADER + "\n" + flag_reference(training, "###") + "\n## evaluate.py\n\n"
            + flag_reference({"evaluate.py": evaluation}, "###"))


def _default_text(field: dataclasses.Field) -> str:
    default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    return f"`{' '.join(map(str, default)) if isinstance(default, list) else default}`"


def main(argv: list[str] | None = None) -> None:
    """`python -m sdft_utils.cli docs/flags.md`: write the flag reference of train_sdft.py, train_sdpo.py and
    evaluate.py."""
    argv = sys.argv[1:] if argv is None else argv
    root = Path(__file__).resolve().parents[1]
    scripts = {}
    for script in ("train_sdft.py", "train_sdpo.py", "evaluate.py"):
        spec = importlib.util.spec_from_file_location(script.removesuffix(".py"), root / script)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while building the class
        spec.loader.exec_module(module)
        scripts[script] = module.Args
    evaluation = scripts.pop("evaluate.py")
    text = flags_document(scripts, evaluation)
    if argv:
        Path(argv[0]).write_text(text)
    else:
        print(text)


if __name__ == "__main__":
    main()

"""BFCL v4 (the Berkeley Function Calling Leaderboard) from the PyPI package `bfcl-eval`: data, environments, checkers.

Install it without its dependencies: `pip install --no-deps bfcl-eval==2026.3.23` (its declared ones pull API
clients, faiss, sentence-transformers and numpy 1.26). What this module uses needs none of them:
- the data files (`bfcl_eval/data/*.json`, JSON lines) and the multi-turn function docs, read as files;
- the executable environments (`eval_checker/multi_turn_eval/func_source_code/*.py`: GorillaFileSystem, TradingBot,
  ...), which import only the standard library and `mpmath` (MathAPI), and the leaderboard's multi-turn checker
  (`multi_turn_checker.py`), which imports nothing else;
- the single-call AST checker (`ast_checker.py`). It imports `constants.model_config`, the registry of every model
  handler (and through them openai, anthropic, tree-sitter, ...), only to ask whether a model's API renamed dotted
  function names. Here names keep their dots, so it is imported with a one-entry stand-in for that registry: the
  checking code itself is the package's, unchanged.
`bfcl_eval.utils` is never imported: it creates folders inside site-packages when imported.

Rows this module builds (and `data/bfcl/make_data.py` writes):
- single call (`simple_python`): `prompt`, `tools` (OpenAI-shaped schemas: BFCL's `dict`/`float`/`tuple` types mapped
  as the leaderboard maps them for function-calling models), `demonstration` (the ground-truth call as an assistant
  message, for SDFT), `verifier: bfcl_ast`, `answer` (the possible answers) and `functions` (the original docs the
  AST checker reads);
- multi-turn (`multi_turn_base`): `prompt` (the first user turn), `tools` (the docs of the involved classes),
  `environment: sdft_utils.tools.bfcl:BFCLEnvironment`, `environment_state` (initial_config, involved_classes, the
  later user turns), `verifier: bfcl_multi_turn`, `answer` (the ground-truth calls per user turn).

The multi-turn checker re-runs the model's calls and the ground truth's on fresh instances with Python's `eval` of
call strings. The strings are built here from parsed calls, never taken from the model's text: a call is passed on
only when its name is one of the task's functions and every argument name is a Python identifier, and values are
`repr`s of JSON values, so `eval` sees nothing but a method call with literal arguments.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import importlib.util
import inspect
import json
import keyword
import sys
import types
import uuid
from pathlib import Path
from typing import Any

from sdft_utils.errors import UserInputError
from sdft_utils.sdpo.verifiers import FEEDBACK_CHARS, Verdict
from sdft_utils.tools.parsing import ToolCall

PACKAGE = "bfcl_eval"
INSTALL = "pip install --no-deps bfcl-eval==2026.3.23"
ENVIRONMENT = "sdft_utils.tools.bfcl:BFCLEnvironment"
CHECKER_MODEL_NAME = "sdft_utils"
# BFCL's own mapping of its type names to JSON schema types for function-calling models (GORILLA_TO_OPENAPI)
TYPE_MAP = {"dict": "object", "float": "number", "tuple": "array", "any": "string", "list": "array", "bool": "boolean"}
PYTHON_HINT = " Note that the provided function is in Python 3 syntax."  # the leaderboard appends it to every doc


def package_root() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserInputError(f"BFCL tasks need the PyPI package bfcl-eval (its data, environments and checkers). "
                             f"Install it with: {INSTALL}  (--no-deps matters: its declared dependencies pull API "
                             "clients and an old numpy that would break this environment).")
    return Path(spec.submodule_search_locations[0])


def read_json_lines(path: Path) -> list[dict]:
    if not path.is_file():
        raise UserInputError(f"{path} is missing: reinstall with {INSTALL} --force-reinstall")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_category(category: str) -> tuple[list[dict], dict[str, Any]]:
    """(entries, ground truth by id) of a BFCL v4 category such as `simple_python` or `multi_turn_base`."""
    data = package_root() / "data"
    entries = read_json_lines(data / f"BFCL_v4_{category}.json")
    answers = {row["id"]: row["ground_truth"] for row in read_json_lines(data / "possible_answer" /
                                                                         f"BFCL_v4_{category}.json")}
    return entries, answers


def class_docs(class_name: str) -> list[dict]:
    """The function docs of one multi-turn environment class."""
    from bfcl_eval.constants.executable_backend_config import MULTI_TURN_FUNC_DOC_FILE_MAPPING

    return read_json_lines(package_root() / "data" / "multi_turn_func_doc" /
                           MULTI_TURN_FUNC_DOC_FILE_MAPPING[class_name])


def _openai_types(schema: Any) -> Any:
    if isinstance(schema, dict):
        converted = {key: _openai_types(value) for key, value in schema.items()}
        if isinstance(converted.get("type"), str):
            converted["type"] = TYPE_MAP.get(converted["type"], converted["type"])
        return converted
    if isinstance(schema, list):
        return [_openai_types(item) for item in schema]
    return schema


def to_tool(function: dict) -> dict:
    """A BFCL function doc as an OpenAI-shaped tool schema (its `response` description left out: it is not part of
    a function schema and doubles the prompt)."""
    function = copy.deepcopy(function)
    function.pop("response", None)
    function["description"] = function.get("description", "") + PYTHON_HINT
    function["parameters"] = _openai_types(function.get("parameters", {"type": "dict", "properties": {}}))
    return {"type": "function", "function": function}


def in_heldout(row_id: str, fraction: float, seed: int = 0) -> bool:
    """A fixed pseudo-random split by id: the same rows are held out on every machine."""
    digest = hashlib.sha256(f"{seed}:{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64 < fraction


# ---------------------------------------------------------------------------------------------------- single call
def _concrete(value: Any) -> Any:
    """One concrete value out of a possible-answer value: nested dicts hold lists of allowed values per key."""
    if isinstance(value, dict):
        return {key: _concrete(_first(values)) for key, values in value.items() if _first(values) is not None}
    if isinstance(value, list):
        return [_concrete(item) if isinstance(item, dict) else item for item in value]
    return value


def _first(values: list) -> Any:
    """The first allowed value that is not "" (BFCL's mark for "may be omitted"), or None."""
    return next((value for value in values if value != ""), None)


def ground_truth_call(answer: list[dict], functions: list[dict]) -> list[ToolCall]:
    """One concrete call per possible-answer entry: an optional parameter that may be omitted ("" allowed) is left
    out; every other one takes its first allowed value."""
    required = {function["name"]: set(function.get("parameters", {}).get("required", [])) for function in functions}
    calls = []
    for entry in answer:
        (name, parameters), = entry.items()
        arguments = {key: _concrete(_first(values)) for key, values in parameters.items()
                     if _first(values) is not None and ("" not in values or key in required.get(name, ()))}
        calls.append(ToolCall(name, arguments))
    return calls


def simple_rows(category: str = "simple_python") -> list[dict]:
    entries, answers = load_category(category)
    rows = []
    for entry in entries:
        answer = answers[entry["id"]]
        calls = ground_truth_call(answer, entry["function"])
        rows.append({
            "id": entry["id"], "prompt": entry["question"][0], "tools": [to_tool(f) for f in entry["function"]],
            "demonstration": [{"role": "assistant", "content": "",
                               "tool_calls": [call.as_message_call() for call in calls]}],
            "verifier": "bfcl_ast", "answer": answer, "functions": entry["function"],
        })
    return rows


# ---------------------------------------------------------------------------------------------------- multi turn
def multi_turn_rows(category: str = "multi_turn_base", max_user_turns: int | None = None) -> list[dict]:
    """Rows with executable environments; `max_user_turns` keeps only the first user turns of each task (and the
    ground truth of those turns), so the checker scores that prefix of the task."""
    entries, answers = load_category(category)
    rows = []
    for entry in entries:
        turns, answer = entry["question"], answers[entry["id"]]
        if max_user_turns:
            turns, answer = turns[:max_user_turns], answer[:max_user_turns]
        tools = [to_tool(doc) for name in entry["involved_classes"] for doc in class_docs(name)]
        rows.append({
            "id": entry["id"], "prompt": turns[0], "tools": tools, "environment": ENVIRONMENT,
            "environment_state": {"id": entry["id"], "initial_config": entry["initial_config"],
                                  "involved_classes": entry["involved_classes"],
                                  "user_turns": ["\n".join(m["content"] for m in turn if m["role"] == "user")
                                                 for turn in turns[1:]]},
            "verifier": "bfcl_multi_turn", "answer": answer,
        })
    return rows


# The embedded multi-turn task: the subset a 135M model can plausibly learn (see data/bfcl/README.md)
EMBEDDED_MAX_CLASSES = 1  # tasks that involve one environment class: one tool set in the prompt, not two
EMBEDDED_MAX_USER_TURNS = 1  # the first user turn of each task (1-4 ground-truth calls), scored by the same checker
HELDOUT_FRACTION = 0.25


def embedded_multi_turn_rows(max_classes: int = EMBEDDED_MAX_CLASSES,
                             max_user_turns: int | None = EMBEDDED_MAX_USER_TURNS,
                             classes: list[str] | None = None) -> list[dict]:
    """multi_turn_base tasks with at most `max_classes` involved classes (optionally only `classes`), cut to their
    first `max_user_turns` user turns (None or 0: all)."""
    return [row for row in multi_turn_rows(max_user_turns=max_user_turns)
            if len(row["environment_state"]["involved_classes"]) <= max_classes
            and (classes is None or set(row["environment_state"]["involved_classes"]) <= set(classes))]


def split_rows(rows: list[dict], fraction: float = HELDOUT_FRACTION) -> tuple[list[dict], list[dict]]:
    """(train, held out): a fixed split by row id (`in_heldout`)."""
    heldout = [in_heldout(row["id"], fraction) for row in rows]
    return ([row for row, out in zip(rows, heldout, strict=True) if not out],
            [row for row, out in zip(rows, heldout, strict=True) if out])


class BFCLEnvironment:
    """The BFCL classes of one multi-turn task, built from its initial_config as the leaderboard builds them; the
    later user turns come out of `next_user_message`."""

    def reset(self, state: dict) -> None:
        from bfcl_eval.constants.executable_backend_config import CLASS_FILE_PATH_MAPPING, STATELESS_CLASSES

        self.instances: dict[str, Any] = {}
        self.methods: dict[str, Any] = {}
        for class_name in state["involved_classes"]:
            instance = getattr(importlib.import_module(CLASS_FILE_PATH_MAPPING[class_name]), class_name)()
            if class_name not in STATELESS_CLASSES:
                instance._load_scenario(copy.deepcopy(state["initial_config"].get(class_name, {})),
                                        long_context=False)
            self.instances[class_name] = instance
            for name, method in inspect.getmembers(instance, inspect.ismethod):
                if not name.startswith("_"):
                    self.methods[name] = method
        self.user_turns = list(state.get("user_turns", []))

    def call_tool(self, name: str, arguments: dict) -> Any:
        if name not in self.methods:
            raise KeyError(f"{name} is not a function of {', '.join(self.instances)}")
        return self.methods[name](**arguments)

    def next_user_message(self) -> str | None:
        return self.user_turns.pop(0) if self.user_turns else None

    def final_state(self) -> dict:
        return {name: {key: value for key, value in vars(instance).items() if not key.startswith("_")}
                for name, instance in self.instances.items()}


def ground_truth_calls(row: dict) -> list[list[ToolCall]]:
    """The ground truth of a multi-turn row as ToolCalls per user turn (positional arguments named through the
    environment methods' signatures)."""
    import ast

    environment = BFCLEnvironment()
    environment.reset(row["environment_state"])
    turns = []
    for turn in row["answer"]:
        calls = []
        for text in turn:
            node = ast.parse(text, mode="eval").body
            signature = inspect.signature(environment.methods[node.func.id])
            bound = signature.bind_partial(*(ast.literal_eval(arg) for arg in node.args),
                                           **{kw.arg: ast.literal_eval(kw.value) for kw in node.keywords})
            calls.append(ToolCall(node.func.id, dict(bound.arguments)))
        turns.append(calls)
    return turns


# ---------------------------------------------------------------------------------------------------- checkers
class _NoDottedNameConversion(dict):
    """Stand-in for bfcl_eval's model registry, read by the AST checker only for dotted function names: ours keep
    their dots."""

    def __missing__(self, key: str) -> types.SimpleNamespace:
        return types.SimpleNamespace(underscore_to_dot=False)


def ast_checker_module() -> types.ModuleType:
    """bfcl_eval's AST checker, imported with the registry stand-in (see the module docstring)."""
    name, registry = "bfcl_eval.constants.model_config", "bfcl_eval.eval_checker.ast_eval.ast_checker"
    if registry in sys.modules:
        return sys.modules[registry]
    package_root()
    saved = sys.modules.get(name)
    sys.modules[name] = types.ModuleType(name)
    sys.modules[name].MODEL_CONFIG_MAPPING = _NoDottedNameConversion()
    try:
        module = importlib.import_module(registry)
    finally:
        if saved is None:
            del sys.modules[name]
        else:
            sys.modules[name] = saved
    module.MODEL_CONFIG_MAPPING = _NoDottedNameConversion()
    return module


def check_single_call(calls: list[ToolCall], row: dict, category: str = "simple_python") -> dict:
    """The leaderboard's AST check of a single-turn answer: {"valid": bool, "error": [...], ...}."""
    from bfcl_eval.constants.enums import Language

    if not calls:
        return {"valid": False, "error": ["No function call in the answer."], "error_type": "no_call"}
    checker = ast_checker_module()
    model_output = [{call.name: copy.deepcopy(call.arguments)} for call in calls]
    return checker.ast_checker(copy.deepcopy(row["functions"]), model_output, copy.deepcopy(row["answer"]),
                               Language.PYTHON, category, CHECKER_MODEL_NAME)


def call_string(call: ToolCall, names: set[str]) -> str | None:
    """`name(key=repr(value), ...)` as BFCL writes decoded calls, or None when it would not be a plain method call
    with literal arguments (unknown name, argument names that are not identifiers)."""
    if call.name not in names:
        return None
    if not all(isinstance(key, str) and key.isidentifier() and not keyword.iskeyword(key) for key in call.arguments):
        return None
    return f"{call.name}({','.join(f'{key}={value!r}' for key, value in call.arguments.items())})"


def check_multi_turn(calls: list[list[list[ToolCall]]], row: dict) -> dict:
    """The leaderboard's multi-turn check: the model's calls and the ground truth's are run on fresh instances turn
    by turn; the final states and the results must match. {"valid": bool, "error_message": str, ...}."""
    from bfcl_eval.eval_checker.multi_turn_eval import multi_turn_checker as checker
    from bfcl_eval.eval_checker.multi_turn_eval import multi_turn_utils

    answer, state = row["answer"], row["environment_state"]
    if len(calls) != len(answer):  # the leaderboard's force-termination rule
        return {"valid": False, "error_type": "multi_turn:force_terminated",
                "error_message": f"The conversation covered {len(calls)} of the task's {len(answer)} user turns."}
    names = {tool["function"]["name"] for tool in row["tools"]}
    decoded = []  # per user turn, per calling step, the call strings (steps left empty are dropped, as BFCL does)
    for turn in calls:
        steps = [[string for call in step if (string := call_string(call, names)) is not None] for step in turn]
        decoded.append([step for step in steps if step])
    entry = {"id": state["id"], "initial_config": state["initial_config"],
             "involved_classes": state["involved_classes"]}
    # the checker caches instances in its module's globals under the model name: a fresh name per check, removed
    model_name = f"{CHECKER_MODEL_NAME}_{uuid.uuid4().hex}"
    try:
        result = checker.multi_turn_checker(decoded, copy.deepcopy(answer), entry, "multi_turn_base", model_name)
        if result["valid"] and any(not turn for turn in answer):
            result = checker.multi_turn_irrelevance_checker(decoded, answer)
    finally:
        for key in [key for key in vars(multi_turn_utils) if key.startswith(model_name)]:
            delattr(multi_turn_utils, key)
    return result


def verify_bfcl_ast(trajectory, row: dict) -> Verdict:
    """Score 1 when the first calling turn passes the AST check; feedback is the checker's error."""
    first = next((step for turn in trajectory.calls for step in turn), [])
    result = check_single_call(first, row)
    if result["valid"]:
        return Verdict(1.0, "")
    return Verdict(0.0, "\n".join([*trajectory.errors, *map(str, result.get("error", []))])[:FEEDBACK_CHARS])


def verify_bfcl_multi_turn(trajectory, row: dict) -> Verdict:
    """Score 1 when the leaderboard's multi-turn checker accepts the trajectory. Feedback: the environment's error
    messages (failed calls, malformed calls); when there were none, the checker's one-line verdict."""
    result = check_multi_turn(trajectory.calls, row)
    if result["valid"]:
        return Verdict(1.0, "")
    feedback = "\n".join(trajectory.errors) or str(result.get("error_message", "The task was not accomplished."))
    return Verdict(0.0, feedback[:FEEDBACK_CHARS])

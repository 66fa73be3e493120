"""Tools the model may call: Python callables or environment classes named `module:attribute`, run with a time limit.

What `module:attribute` (or `path/to/file.py:attribute`) may name:
- a function: one tool, its schema from its signature and Google-style docstring (transformers' `get_json_schema`)
  unless the data's `tools` column gives schemas;
- a list/tuple of functions, or a dict name -> function: several stateless tools;
- a class: an **environment**, one instance per rollout, built with no arguments. Its public methods are the tools
  (except the hooks below); it may define
    `reset(state)`: called first with the row's `environment_state` (the initial state, any JSON value);
    `call_tool(name, arguments)`: dispatch calls itself (instead of `getattr(env, name)(**arguments)`);
    `tool_schemas()` (a static or class method): the schemas, when the data has no `tools` column and the
      docstrings do not give them;
    `next_user_message()`: the next user turn once the model answers without a call (multi-turn tasks), or None;
    `final_state()`: what the trajectory reports as the environment's end state.

A call returns anything: strings go to the model as they are, other values as JSON (their `str` if not JSON-able).
A returned dict with an "error" key, an exception or a timeout counts as an *error*: the model sees it as the tool
message, and the trajectory keeps it as feedback. Every call has a wall-clock limit. In the main thread it is enforced
with SIGALRM, which interrupts Python code; elsewhere the call runs in a helper thread that is abandoned on timeout
(Python cannot kill a thread), and the environment is marked broken so no further call reaches it.

Tools run inside the training process: they must be trusted code. A tool that runs code the model wrote must do so
through the sandbox (`sdft_utils.sdpo.sandbox.run_python`), as `sdft_utils.tools.builtin.python` does.
"""

from __future__ import annotations

import inspect
import json
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sdft_utils.cli import load_attribute
from sdft_utils.errors import UserInputError

HOOKS = ("reset", "call_tool", "tool_schemas", "next_user_message", "final_state")


class ToolTimeout(BaseException):  # not an Exception: a tool's own `except Exception` cannot swallow it
    pass


@dataclass
class ToolResult:
    content: str  # what the model reads as the tool message
    error: str | None = None  # the error, when the call failed (also inside `content`)




def _functions(target: Any, spec: str, flag: str = "--tool_environment") -> dict[str, Callable]:
    if callable(target) and not inspect.isclass(target):
        return {target.__name__: target}
    if isinstance(target, dict) and all(callable(fn) for fn in target.values()):
        return dict(target)
    if isinstance(target, list | tuple) and target and all(callable(fn) for fn in target):
        return {fn.__name__: fn for fn in target}
    raise UserInputError(f"{flag} {spec!r}: expected a function, a list or dict of functions, or an environment "
                         f"class; got {type(target).__name__}.")


def public_methods(environment: Any) -> dict[str, Callable]:
    return {name: member for name, member in inspect.getmembers(environment, callable)
            if not name.startswith("_") and name not in HOOKS and not inspect.isclass(member)}


def function_schemas(functions: dict[str, Callable], where: str) -> list[dict]:
    """JSON schemas of functions from their signatures and docstrings (transformers' `get_json_schema`)."""
    from transformers.utils import get_json_schema

    schemas = []
    for name, fn in functions.items():
        try:
            schema = get_json_schema(fn)
        except Exception as error:  # transformers raises its own DocstringParsingException / TypeHintParsingException
            raise UserInputError(
                f"{where}: cannot build the schema of tool {name!r} from its docstring ({error}). Give it a "
                "Google-style docstring with an Args: section and type hints, or put the schemas in the data's "
                "'tools' column.") from None
        schema["function"]["name"] = name
        schemas.append(schema)
    return schemas


def describe(result: Any) -> str:
    if isinstance(result, str):
        return result
    try:
        return json.dumps(result)
    except (TypeError, ValueError):
        return str(result)


def _error_of(result: Any) -> str | None:
    if isinstance(result, dict) and result.get("error"):
        return str(result["error"])
    return None


def call_with_timeout(fn: Callable, arguments: dict, seconds: float) -> Any:
    """fn(**arguments), raising ToolTimeout after `seconds` (see the module docstring for how)."""
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):
        def expire(signum, frame):
            raise ToolTimeout()

        previous = signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            return fn(**arguments)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = fn(**arguments)
        except BaseException as error:  # handed back to the caller's thread
            outcome["error"] = error

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise ToolTimeout()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@dataclass
class Toolbox:
    """The tools of one rollout: stateless functions or one environment instance."""

    functions: dict[str, Callable] = field(default_factory=dict)
    environment: Any = None
    timeout: float = 10.0
    max_result_chars: int = 4000
    broken: str | None = None  # set after a timeout left a call running: no further call is made

    @property
    def executes(self) -> bool:
        return bool(self.functions) or self.environment is not None

    def names(self) -> list[str]:
        if self.environment is not None:
            return list(public_methods(self.environment))
        return list(self.functions)

    def call(self, name: str, arguments: dict, allowed: list[str] | None = None) -> ToolResult:
        """Run one call; never raises. `allowed`: the names the model was shown (others are refused)."""
        if self.broken:
            return self._failed(f"the environment stopped responding after an earlier call ({self.broken})")
        names = self.names() if allowed is None else allowed
        if name not in names or name.startswith("_") or name in HOOKS:
            return self._failed(f"no function named {name!r}; the functions are {', '.join(names)}")
        if self.environment is not None and hasattr(self.environment, "call_tool"):
            def target(**kwargs):
                return self.environment.call_tool(name, kwargs)
        elif self.environment is not None:
            target = public_methods(self.environment).get(name)
        else:
            target = self.functions.get(name)
        if target is None:
            return self._failed(f"{name} is listed as a tool but nothing implements it")
        try:
            result = call_with_timeout(target, arguments, self.timeout)
        except ToolTimeout:
            if threading.current_thread() is not threading.main_thread():
                self.broken = f"{name} timed out"
            return self._failed(f"{name} did not finish within {self.timeout:g} seconds")
        except Exception as error:  # the tool's own failure, shown to the model like any tool error
            return self._failed(f"{name} raised {type(error).__name__}: {error}")
        text = describe(result)
        if len(text) > self.max_result_chars:
            text = text[:self.max_result_chars] + f"... (cut at {self.max_result_chars} characters)"
        return ToolResult(text, _error_of(result))

    def _failed(self, message: str) -> ToolResult:
        return ToolResult(f"Error: {message}", message)

    def next_user_message(self) -> str | None:
        hook = getattr(self.environment, "next_user_message", None)
        return hook() if hook is not None else None

    def final_state(self) -> Any:
        hook = getattr(self.environment, "final_state", None)
        return hook() if hook is not None else None


def resolve_tools(spec: str | None, flag: str = "--tool_environment") -> Any:
    """The object `spec` names (checked: a function, functions or a class), or None."""
    if not spec:
        return None
    target = load_attribute(spec, flag)
    if not inspect.isclass(target):
        _functions(target, spec, flag)
    return target


def open_toolbox(target: Any, spec: str, state: Any = None, timeout: float = 10.0,
                 max_result_chars: int = 4000) -> Toolbox:
    """A fresh Toolbox for one rollout: an environment instance reset to `state`, or the functions."""
    if target is None:
        return Toolbox(timeout=timeout, max_result_chars=max_result_chars)
    if not inspect.isclass(target):
        return Toolbox(functions=_functions(target, spec), timeout=timeout, max_result_chars=max_result_chars)
    environment = target()
    if hasattr(environment, "reset"):
        environment.reset(state)
    return Toolbox(environment=environment, timeout=timeout, max_result_chars=max_result_chars)


def schemas_of(target: Any, spec: str) -> list[dict]:
    """The schemas a tools target offers: an environment's static `tool_schemas()`, else docstrings."""
    if target is None:
        return []
    if inspect.isclass(target):
        if hasattr(target, "tool_schemas"):
            return target.tool_schemas()
        return function_schemas(public_methods(target()), spec)
    return function_schemas(_functions(target, spec), spec)

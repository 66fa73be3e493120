"""`ToolConfig`: the flags of tool use, one dataclass for both scripts (and `evaluate.py`), checked before loading.

A script adds these fields to its arguments (or holds a `ToolConfig` built from them) and calls `check()` right
after parsing. Rows say which tools they use: a `tools` column (schemas the model sees), an `environment` column
(`module:attribute`, overriding `--tool_environment` for that row) and an `environment_state` column (the initial
state handed to the environment's `reset`).
"""

from __future__ import annotations

from dataclasses import dataclass

from sdft_utils.cli import arg
from sdft_utils.errors import UserInputError
from sdft_utils.tools.render import TOOL_FORMATS, TOOL_TEMPLATES


@dataclass
class ToolConfig:
    tool_environment: str | None = arg(
        None, "tools the model may call, as module:attribute or file.py:attribute: a function, a list of functions, "
              "or an environment class (one instance per rollout, public methods are the tools); rows may name "
              "their own in an `environment` column. Without any, calls are parsed but not executed (one turn)",
        "tools")
    max_turns: int = arg(8, "most model turns (generations) in one tool rollout; it also ends when the model answers "
                            "without a call or the completion-token budget is spent", "tools")
    max_turn_tokens: int | None = arg(None, "most new tokens in one model turn; None = what is left of the "
                                            "completion budget", "tools")
    tool_timeout: float = arg(10.0, "seconds one tool call may run; a slower call returns an error to the model",
                              "tools")
    max_tool_result_chars: int = arg(4000, "a tool result longer than this is cut (the model sees a note)", "tools")
    tool_template: str = arg("auto", "how tools enter the prompt: native = the chat template's tools section, "
                                      "fallback = schemas in the system turn (for templates without tools), auto = "
                                      "native when the template has one", "tools", TOOL_TEMPLATES)
    tool_format: str = arg("auto", "the call syntax to parse: auto = read off the chat template (fallback: hermes "
                                   "<tool_call> JSON); hermes, llama3, mistral or react", "tools", TOOL_FORMATS)

    def check(self) -> None:
        """Every problem at once, naming the flag; imports --tool_environment to fail before any model loads."""
        problems = []
        if self.max_turns < 1:
            problems.append(f"--max_turns must be at least 1, got {self.max_turns}")
        if self.max_turn_tokens is not None and self.max_turn_tokens < 1:
            problems.append(f"--max_turn_tokens must be at least 1 or None, got {self.max_turn_tokens}")
        if not self.tool_timeout > 0:
            problems.append(f"--tool_timeout must be positive (seconds), got {self.tool_timeout}")
        if self.max_tool_result_chars < 1:
            problems.append(f"--max_tool_result_chars must be at least 1, got {self.max_tool_result_chars}")
        if self.tool_template not in TOOL_TEMPLATES:
            problems.append(f"--tool_template must be one of {TOOL_TEMPLATES}, got {self.tool_template!r}")
        if self.tool_format not in TOOL_FORMATS:
            problems.append(f"--tool_format must be one of {TOOL_FORMATS}, got {self.tool_format!r}")
        if self.tool_environment:
            from sdft_utils.tools.execution import resolve_tools

            try:
                resolve_tools(self.tool_environment, "--tool_environment")
            except UserInputError as error:
                problems.append(str(error))
        if problems:
            raise UserInputError("invalid tool arguments:\n  " + "\n  ".join(problems))

"""Ready-made tools. `--tool_environment sdft_utils.tools.builtin:python` lets the model run code, always in the sandbox."""

from __future__ import annotations

from sdft_utils.sdpo.sandbox import run_python

OUTPUT_CHARS = 2000


def python(code: str) -> str | dict:
    """Run a Python program in an isolated sandbox and return what it printed.

    Args:
        code: The complete Python program; print every value you want to see.
    """
    # model-written code never runs in the trainer's process: the sandbox runs it in a limited child process
    result = run_python(code, "")
    if result.status == "ok":
        return result.stdout[-OUTPUT_CHARS:] or "(the program printed nothing)"
    if result.status == "timeout":
        return {"error": "the program ran out of time"}
    if result.status == "memory":
        return {"error": "the program ran out of memory"}
    return {"error": (result.stderr.strip().splitlines() or ["the program failed"])[-1][:OUTPUT_CHARS],
            "stdout": result.stdout[-OUTPUT_CHARS:]}

"""Tool execution: functions and environments named module:attribute, time limits, errors as tool messages."""

import threading
import time

import pytest

from sdft_utils.cli import load_attribute
from sdft_utils.errors import UserInputError
from sdft_utils.tools.config import ToolConfig
from sdft_utils.tools.execution import open_toolbox, resolve_tools, schemas_of


def toolbox(spec, state=None, timeout=10.0):
    return open_toolbox(resolve_tools(spec), spec, state, timeout)


def test_functions_run_and_results_become_text():
    box = toolbox("tool_fixtures:MATH_TOOLS")
    assert box.names() == ["add", "divide"] and box.executes
    assert box.call("add", {"a": 2, "b": 3}).content == "5"
    assert box.call("divide", {"a": 1, "b": 4}).content == "0.25"


def test_exceptions_unknown_names_and_bad_arguments_are_errors_not_crashes():
    box = toolbox("tool_fixtures:MATH_TOOLS")
    result = box.call("divide", {"a": 1, "b": 0})
    assert result.error == "divide raised ZeroDivisionError: division by zero"
    assert result.content == "Error: " + result.error
    assert "no function named 'subtract'; the functions are add, divide" in box.call("subtract", {}).error
    assert "add raised TypeError" in box.call("add", {"a": 1}).error  # a missing argument
    assert "no function named 'add'" in box.call("add", {"a": 1, "b": 2}, allowed=["divide"]).error


def test_a_slow_tool_times_out_in_the_main_thread_and_the_loop_goes_on():
    box = toolbox("tool_fixtures:slow", timeout=0.3)
    start = time.perf_counter()
    assert box.call("slow", {"seconds": 5}).error == "slow did not finish within 0.3 seconds"
    assert time.perf_counter() - start < 2
    assert box.call("slow", {"seconds": 0}).content == "done"  # interrupted, not left running: usable again


def test_the_timeout_interrupts_python_code_that_swallows_exceptions():
    box = toolbox("tool_fixtures:spin", timeout=0.3)
    assert box.call("spin", {}).error == "spin did not finish within 0.3 seconds"


def test_off_the_main_thread_a_timed_out_environment_is_not_called_again():
    box, results = toolbox("tool_fixtures:slow", timeout=0.3), []
    worker = threading.Thread(target=lambda: results.extend([box.call("slow", {"seconds": 3}),
                                                             box.call("slow", {"seconds": 0})]))
    worker.start()
    worker.join()
    assert results[0].error == "slow did not finish within 0.3 seconds"
    assert "stopped responding after an earlier call (slow timed out)" in results[1].error


def test_an_environment_is_fresh_per_rollout_and_reports_errors_and_state():
    first, second = toolbox("tool_fixtures:Counter", {"start": 10}), toolbox("tool_fixtures:Counter", {"start": 10})
    assert first.names() == ["increment"]  # hooks (reset, next_user_message, final_state) are not tools
    assert first.call("increment", {"by": 5}).content == '{"value": 15}'
    failed = first.call("increment", {"by": -1})
    assert failed.error == "by must be positive, got -1" and failed.content == '{"error": "by must be positive, got -1"}'
    assert first.final_state() == {"value": 15} and second.final_state() == {"value": 10}
    assert first.call("reset", {"state": {}}).error.startswith("no function named 'reset'")


def test_schemas_come_from_docstrings():
    (schema,) = schemas_of(resolve_tools("tool_fixtures:add"), "tool_fixtures:add")
    assert schema["function"]["name"] == "add"
    assert schema["function"]["parameters"]["properties"]["a"] == {"type": "integer", "description": "The first integer."}
    assert [s["function"]["name"] for s in schemas_of(resolve_tools("tool_fixtures:Counter"), "x")] == ["increment"]


def test_model_written_code_runs_in_the_sandbox():
    box = toolbox("sdft_utils.tools.builtin:python", timeout=60)
    assert box.call("python", {"code": "print(6 * 7)"}).content.strip() == "42"
    failed = box.call("python", {"code": "raise ValueError('bad input')"})
    assert failed.error == "ValueError: bad input"


@pytest.mark.parametrize("spec, message", [
    ("nocolon", "expected 'module:attribute'"),
    ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
    ("tool_fixtures:missing", "has no attribute 'missing'"),
    ("tool_fixtures:__doc__", "expected a function, a list or dict of functions, or an environment class"),
])
def test_bad_specs_are_user_errors(spec, message):
    with pytest.raises(UserInputError, match=message):
        resolve_tools(spec)


def test_tool_config_check_reports_every_problem_with_its_flag():
    ToolConfig(tool_environment="tool_fixtures:add").check()
    with pytest.raises(UserInputError) as error:
        ToolConfig(tool_environment="tool_fixtures:missing", max_turns=0, tool_timeout=0, tool_format="xml").check()
    message = str(error.value)
    for flag in ("--max_turns", "--tool_timeout", "--tool_format", "--tool_environment 'tool_fixtures:missing'"):
        assert flag in message
    assert load_attribute("tool_fixtures:add", "--tool_environment")(1, 2) == 3

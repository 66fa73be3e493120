"""Scoring one step's completions: code runs `sandbox_workers` programs at once, verdicts come back in order, and the
run's sandbox settings (fail closed, or the unsafe flag with its warning) reach every code verdict."""

import logging
import tempfile
import time
from pathlib import Path

import pytest

from sdft_utils.sdpo.sandbox import SandboxConfig, SandboxUnavailable
from sdft_utils.sdpo.tasks import Task, make_scorer, needs_sandbox, score_all


def task(verifier: str, **row) -> Task:
    return Task([{"role": "user", "content": "q"}], row, verifier)


def code(body: str) -> str:
    return f"```python\n{body}\n```"


SQUARE = task("code", tests=[{"input": "3\n", "output": "9"}])


def test_verdicts_come_back_in_order_whatever_the_verifier():
    tasks = [SQUARE, task("math", answer="4"), SQUARE, task("mcq", answer="B"), SQUARE]
    completions = [code("print(int(input()) ** 2)"), "\\boxed{4}", code("print(int(input()) * 2)"),
                   "<answer>A</answer>", "no code"]
    verdicts = score_all(tasks, completions, make_scorer(None), SandboxConfig(sandbox_workers=2))
    assert [verdict.score for verdict in verdicts] == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert verdicts[2].feedback.startswith("Wrong Answer") and verdicts[4].feedback.startswith("Incorrect Format")


def test_programs_of_one_step_run_in_parallel():
    """Four programs that each sleep 1.5 s: one after the other that is 6 s or more, side by side well under."""
    sleepy = [task("code", tests=[{"input": "", "output": "done"}], time_limit=4) for _ in range(4)]
    completions = [code("import time\ntime.sleep(1.5)\nprint('done')")] * 4
    start = time.perf_counter()
    verdicts = score_all(sleepy, completions, make_scorer(None), SandboxConfig(sandbox_workers=4))
    assert [verdict.score for verdict in verdicts] == [1.0] * 4
    assert time.perf_counter() - start < 4.5


def test_the_runs_sandbox_settings_reach_the_code_verifier():
    folder = Path(tempfile.mkdtemp(prefix="sandbox_scoring_"))
    folder.chmod(0o755)
    bwrap = folder / "bwrap"
    bwrap.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    bwrap.chmod(0o755)
    broken = SandboxConfig(sandbox_bwrap=str(bwrap))
    with pytest.raises(SandboxUnavailable, match="No permissions to create new namespace"):
        score_all([SQUARE], [code("print(9)")], make_scorer(None, broken), broken)
    bwrap.unlink()
    folder.rmdir()


def test_unsafe_code_execution_warns_at_every_step(caplog):
    unsafe = SandboxConfig(unsafe_code_execution=True)
    score = make_scorer(None, unsafe)
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            verdicts = score_all([SQUARE], [code("print(int(input()) ** 2)")], score, unsafe)
            assert verdicts[0].score == 1.0
    assert caplog.text.count("WITHOUT isolation") == 2


def test_only_runs_with_code_tasks_need_a_sandbox():
    assert needs_sandbox([task("math", answer="1"), SQUARE])
    assert not needs_sandbox([task("math", answer="1"), task("reward_fn")])

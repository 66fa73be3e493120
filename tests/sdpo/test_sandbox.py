"""The sandbox contains misbehaving programs: each one ends quickly with a status the verifier can explain."""

import os
import time
from pathlib import Path

import pytest

from sdft_utils.sdpo.sandbox import SandboxLimits, run_python

LIMITS = SandboxLimits(cpu_seconds=1, wall_seconds=3, memory_bytes=512 << 20)


def run(code: str, stdin: str = "") -> tuple:
    start = time.perf_counter()
    result = run_python(code, stdin, LIMITS)
    return result, time.perf_counter() - start


def test_a_normal_program_reads_stdin_and_writes_stdout():
    result, _ = run("print(input()[::-1])", "abc\n")
    assert (result.status, result.stdout) == ("ok", "cba\n")


def test_infinite_loop_is_stopped_by_the_cpu_limit():
    result, seconds = run("while True:\n    pass")
    assert result.status == "timeout" and result.timed_out and seconds < 10


def test_sleeping_forever_is_stopped_by_the_wall_clock():
    result, seconds = run("import time\ntime.sleep(1000)")
    assert result.status == "timeout" and seconds < 10


def test_fork_bomb_is_refused():
    result, seconds = run("import os\nwhile True:\n    os.fork()")
    assert result.status == "error" and "not allowed" in result.stderr and seconds < 10


def test_subprocess_is_refused():
    result, _ = run("import subprocess\nsubprocess.run(['ls', '/'])")
    assert result.status == "error" and "not allowed" in result.stderr


def test_memory_blow_up_is_contained():
    result, _ = run("x = bytearray(8 << 30)")
    assert result.status == "memory"


def test_writing_outside_its_folder_is_refused(tmp_path):
    target = tmp_path / "pwned.txt"
    result, _ = run(f"open({str(target)!r}, 'w').write('x')")
    assert result.status == "error" and "outside the working folder" in result.stderr
    assert not target.exists()


def test_writing_inside_its_folder_works_and_the_folder_is_removed():
    result, _ = run("import os\nopen('scratch.txt', 'w').write('hi')\nprint(os.getcwd())")
    assert result.status == "ok"
    assert not Path(result.stdout.strip()).exists()


def test_reading_the_training_files_is_refused():
    result, _ = run(f"print(open({os.path.abspath(__file__)!r}).read())")
    assert result.status == "error" and result.stdout == ""


def test_the_parents_environment_is_not_visible(monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN_FOR_TEST", "hunter2")
    result, _ = run("import os\nprint(dict(os.environ))\nprint(open(f'/proc/{os.getppid()}/environ').read())")
    assert "hunter2" not in result.stdout + result.stderr


def test_network_sockets_are_refused():
    result, _ = run("import socket\ns = socket.socket()\ns.connect(('127.0.0.1', 9))")
    assert result.status == "error" and "not allowed" in result.stderr


@pytest.mark.parametrize("code", ["import ctypes", "print('x' * 10**9)"])
def test_escape_hatches_and_output_floods_end_cleanly(code):
    result, seconds = run(code)
    assert result.status in ("error", "memory", "timeout") and seconds < 10
    assert len(result.stdout) <= LIMITS.output_chars

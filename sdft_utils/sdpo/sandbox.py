"""Run model-written Python in a separate, limited process (the code verifier's sandbox).

Layers, each one independent of the others:
- a child process in its own session, killed as a whole group on the wall-clock limit;
- `resource.setrlimit` in the child: CPU seconds, address space, file size, open files, processes;
- a fresh private temporary folder as the working directory, removed afterwards; an empty environment;
- when the trainer runs as root and `unshare`/`setpriv` exist: a new network namespace (no interfaces, so no
  network at all) and the program runs as user `nobody`, so it cannot read or write root's files (training
  outputs, /proc/<pid>/environ of the trainer) and the process limit counts against `nobody`;
- always, an audit hook installed before the program runs (`sys.addaudithook`): it refuses sockets, new
  processes (fork, exec, subprocess, os.system), ctypes, writing outside the working folder and reading outside
  it and the Python installation.

What this is not: a container. Without root the isolation is the audit hook alone, which a determined program can
get around (for instance through a C extension that is already installed). Run untrusted code at scale inside a
container or VM; this sandbox keeps an honest-but-buggy model from stalling or damaging the trainer.
"""

from __future__ import annotations

import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

NOBODY = 65534

# Installed in the child before the program; `solution.py` is the model's code, so tracebacks name its lines.
RUNNER = r'''
import os, sys
_cwd = os.path.realpath(os.getcwd())
_read_ok = tuple({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)} |
                 {"/usr", "/lib", "/lib64", "/etc", "/dev/null", "/dev/urandom"})
_blocked = {"socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "os.fork", "os.forkpty",
            "os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen", "pty.spawn", "ctypes.dlopen",
            "ctypes.cdata", "os.kill", "os.killpg"}

def _inside(path, roots):
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)

def _hook(event, args):
    if event in _blocked or (event == "import" and args and str(args[0]).split(".")[0] in ("ctypes", "_ctypes")):
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open" and args and isinstance(args[0], (str, bytes)):
        path = os.path.realpath(os.fsdecode(args[0]))
        mode, flags = args[1] or "r", args[2] or 0
        writing = any(c in str(mode) for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        if not _inside(path, (_cwd,)) and (writing or not _inside(path, _read_ok)):
            raise PermissionError(f"sandbox: access to {path} outside the working folder is not allowed")

sys.addaudithook(_hook)
_source = open("solution.py").read()
sys.argv = ["solution.py"]
exec(compile(_source, "solution.py", "exec"), {"__name__": "__main__", "__file__": "solution.py"})
'''


@dataclass
class SandboxLimits:
    cpu_seconds: float = 5.0
    wall_seconds: float = 10.0
    memory_bytes: int = 1 << 30  # address space
    file_bytes: int = 16 << 20  # largest file the program may write (stdout and stderr files included)
    max_processes: int = 64  # only enforced when the program runs as `nobody` (root ignores RLIMIT_NPROC)
    output_chars: int = 100_000  # of stdout/stderr read back


@dataclass
class SandboxResult:
    returncode: int | None  # None when killed on the wall clock
    stdout: str
    stderr: str
    timed_out: bool  # wall clock or CPU limit
    status: str  # "ok", "error" (nonzero exit), "timeout", "memory" (killed / MemoryError)


def _set_limits(limits: SandboxLimits) -> None:
    """Runs in the child between fork and exec."""
    cpu = max(1, int(limits.cpu_seconds + 0.999))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_bytes, limits.file_bytes))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NPROC, (limits.max_processes, limits.max_processes))


@functools.lru_cache(maxsize=1)
def isolation_prefix() -> tuple[list[str], str]:
    """(command prefix, interpreter) for the strongest isolation this machine allows, found once.

    As root with `unshare` and `setpriv`: a private network namespace and user `nobody`, with the first Python that
    `nobody` can execute (a Python under /root usually is not). Otherwise no prefix and this Python.
    """
    unshare, setpriv = shutil.which("unshare"), shutil.which("setpriv")
    if os.geteuid() != 0 or not unshare or not setpriv:
        return [], sys.executable
    prefix = [unshare, "--net", setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--"]
    for python in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        try:
            probe = subprocess.run([*prefix, python, "-I", "-c", "pass"], capture_output=True, timeout=20, env={},
                                   cwd="/")
        except (OSError, subprocess.SubprocessError):
            continue
        if probe.returncode == 0:
            return prefix, python
    return [], sys.executable


def run_python(code: str, stdin: str = "", limits: SandboxLimits | None = None) -> SandboxResult:
    """Run `code` as `solution.py` with `stdin`, in a fresh folder, under the limits; never raises for what the
    program does, and never waits longer than `limits.wall_seconds` (plus process start-up)."""
    limits = limits or SandboxLimits()
    prefix, python = isolation_prefix()
    with tempfile.TemporaryDirectory(prefix="sdpo_sandbox_") as folder:
        work = Path(folder)
        (work / "solution.py").write_text(code)
        (work / "runner.py").write_text(RUNNER)
        (work / "stdin.txt").write_text(stdin)
        if prefix:
            os.chown(work, NOBODY, NOBODY)
            for name in ("solution.py", "runner.py", "stdin.txt"):
                os.chown(work / name, NOBODY, NOBODY)
        out_path, err_path = work / "stdout.txt", work / "stderr.txt"
        # -I: ignore PYTHON* variables and the user site; -B: write no .pyc files
        with open(work / "stdin.txt") as stdin_file, open(out_path, "wb") as out, open(err_path, "wb") as err:
            process = subprocess.Popen([*prefix, python, "-I", "-B", "runner.py"], cwd=work, env={},
                                       stdin=stdin_file, stdout=out, stderr=err, start_new_session=True,
                                       preexec_fn=functools.partial(_set_limits, limits))
            try:
                returncode = process.wait(timeout=limits.wall_seconds)
                wall_timeout = False
            except subprocess.TimeoutExpired:
                returncode, wall_timeout = None, True
            _kill_group(process)
        stdout = _read_head(out_path, limits.output_chars)
        stderr = _read_head(err_path, limits.output_chars)
    cpu_timeout = returncode in (-signal.SIGXCPU, -signal.SIGKILL) and not wall_timeout
    if wall_timeout or cpu_timeout:
        status = "timeout"
    elif "MemoryError" in stderr:
        status = "memory"
    else:
        status = "ok" if returncode == 0 else "error"
    return SandboxResult(returncode, stdout, stderr, wall_timeout or cpu_timeout, status)


def _kill_group(process: subprocess.Popen) -> None:
    """Kill the program and anything it started (same session), then reap it."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def _read_head(path: Path, limit: int) -> str:
    try:
        with open(path, "rb") as handle:
            return handle.read(limit).decode("utf-8", errors="replace")
    except OSError:
        return ""

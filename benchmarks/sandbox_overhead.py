"""What the code verifier's sandbox costs: per-program overhead, then programs per second with 1 and 8 workers.

Per program: the median wall time of a trivial program (`pass`), run bare (the interpreter and flags the sandbox
uses, `-I -B -S`; and with `site`, which the old sandbox imported), under the sandbox this one replaced (commit
3ae09b8's `sandbox.py`, loaded from git: an audit hook, and as root `unshare --net` + `setpriv` to user nobody),
under this sandbox (bubblewrap) and in its `--unsafe_code_execution` mode. Overhead = median minus the bare median (and the same of the minimums, which a busy machine disturbs least).
The kinds take turns run by run, so a busy machine slows all of them alike.

Throughput: `score_all` (the training loop's call) on code tasks of one test each, a small program that reads its
input and sums a range, with `--sandbox_workers` 1 and 8; for the old sandbox, the same programs one after another
(the trainer called it that way) and in 8 threads.

    .venv/bin/python benchmarks/sandbox_overhead.py                # ~1 min on 2 CPU cores
    .venv/bin/python benchmarks/sandbox_overhead.py --runs 50 --programs 128
    .venv/bin/python benchmarks/sandbox_overhead.py --resident_gib 2   # the same from a 2 GiB process
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sdft_utils.sdpo.sandbox import SandboxConfig, _launcher, run_python  # noqa: E402
from sdft_utils.sdpo.tasks import Task, make_scorer, score_all  # noqa: E402

OLD_COMMIT = "3ae09b8"
PROGRAM = "n = int(input())\nprint(sum(range(n)))"
N = 100_000


def load_old_sandbox(folder: Path):
    """Commit 3ae09b8's sdft_utils/sdpo/sandbox.py as a module of its own (it imports only the standard library)."""
    source = subprocess.run(["git", "show", f"{OLD_COMMIT}:sdft_utils/sdpo/sandbox.py"], capture_output=True,
                            text=True, check=True, cwd=Path(__file__).resolve().parents[1]).stdout
    path = folder / "old_sandbox.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_sandbox", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def per_program(runs: int, kinds: dict) -> dict[str, list[float]]:
    for run in kinds.values():  # warm-up: probes, caches
        run()
    times: dict[str, list[float]] = {name: [] for name in kinds}
    for _ in range(runs):
        for name, run in kinds.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


def throughput(score, tasks, completions, config) -> float:
    start = time.perf_counter()
    verdicts = score_all(tasks, completions, score, config)
    seconds = time.perf_counter() - start
    assert all(verdict.score == 1.0 for verdict in verdicts), verdicts[0]
    return len(tasks) / seconds


def old_throughput(old, programs: int, workers: int) -> float:
    def one(_):
        result = old.run_python(PROGRAM, f"{N}\n", old.SandboxLimits())
        assert result.stdout.strip() == str(sum(range(N))), result

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(one, range(programs)))
    return programs / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=30, help="timed runs of each kind for the per-program table")
    parser.add_argument("--programs", type=int, default=64, help="programs per throughput measurement")
    parser.add_argument("--resident_gib", type=float, default=0.0, help="hold this much touched memory while "
                        "measuring, as a trainer does: starting a child costs more the bigger the parent is")
    options = parser.parse_args()
    resident = bytearray(int(options.resident_gib * (1 << 30)))
    resident[::4096] = b"x" * len(resident[::4096])  # touch every page, so it is resident and mapped

    launcher = _launcher(None, False)
    if isinstance(launcher, str):
        raise SystemExit(f"the sandbox cannot start here: {launcher}")
    unsafe = SandboxConfig(unsafe_code_execution=True)
    print(f"{datetime.date.today()}  uid {os.geteuid()}  {len(os.sched_getaffinity(0))} CPUs  load average "
          f"{os.getloadavg()[0]:.1f}  sandbox interpreter {launcher.interpreter}  resident "
          f"{options.resident_gib:g} GiB")

    with tempfile.TemporaryDirectory() as folder:
        old = load_old_sandbox(Path(folder))
        bare = [launcher.interpreter, "-I", "-B", "-S", "-c", "pass"]  # the sandbox's flags, no isolation
        kinds = {
            "bare interpreter": lambda: subprocess.run(bare, check=True),
            "bare, with site-packages": lambda: subprocess.run([a for a in bare if a != "-S"], check=True),
            f"old sandbox ({OLD_COMMIT})": lambda: old.run_python("pass"),
            "bubblewrap sandbox": lambda: run_python("pass"),
            "unsafe mode": lambda: run_python("pass", config=unsafe),
        }
        times = per_program(options.runs, kinds)
        bare, bare_min = statistics.median(times["bare interpreter"]), min(times["bare interpreter"])
        print(f"\nper program (`pass`), {options.runs} runs each, wall ms; overhead = minus the bare interpreter's")
        print(f"{'kind':28s} {'median':>8s} {'p90':>8s} {'min':>8s} {'overhead':>9s} {'(of min)':>9s}")
        print("-" * 76)
        for name, values in times.items():
            median, p90 = statistics.median(values), statistics.quantiles(values, n=10)[-1]
            print(f"{name:28s} {median * 1e3:8.1f} {p90 * 1e3:8.1f} {min(values) * 1e3:8.1f} "
                  f"{(median - bare) * 1e3:9.1f} {(min(values) - bare_min) * 1e3:9.1f}")

        tasks = [Task([], {"tests": [{"input": f"{N}\n", "output": str(sum(range(N)))}]}, "code")
                 for _ in range(options.programs)]
        completions = [f"```python\n{PROGRAM}\n```"] * options.programs
        print(f"\nthroughput, {options.programs} programs (one test each: sum(range({N:,})))")
        print(f"{'kind':28s} {'workers':>8s} {'programs/s':>11s}")
        print("-" * 49)
        for workers in (1, 8):
            print(f"{f'old sandbox ({OLD_COMMIT})':28s} {workers:8d} {old_throughput(old, options.programs, workers):11.1f}")
        for workers in (1, 8):
            config = SandboxConfig(sandbox_workers=workers)
            rate = throughput(make_scorer(None, config), tasks, completions, config)
            print(f"{'bubblewrap sandbox':28s} {workers:8d} {rate:11.1f}")


if __name__ == "__main__":
    main()

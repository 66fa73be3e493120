"""What the sweep benchmarks share (forgetting_frontier.py, sdpo_lambda.py): subprocesses, flags, the results file."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def as_flags(values: dict) -> list[str]:
    """{"learning_rate": 1e-4} -> ["--learning_rate", "0.0001"]: a script's flags, in the order given."""
    return [text for name, value in values.items() for text in (f"--{name}", str(value))]


def run_logged(command: list[str], log: Path) -> float:
    """Run one subprocess from the repository root on one thread, offline, its output in `log`; return its CPU
    seconds. A failure raises with the log's tail."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "TRL_EXPERIMENTAL_SILENCE": "1"}
    log.parent.mkdir(parents=True, exist_ok=True)
    before = os.times()
    with log.open("w") as handle:
        done = subprocess.run(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
    after = os.times()
    if done.returncode != 0:
        raise RuntimeError(f"exit {done.returncode}: {' '.join(command[:3])} ...; log {log}:\n{log.read_text()[-3000:]}")
    return (after.children_user - before.children_user) + (after.children_system - before.children_system)


def record_once(record_path: Path, make_record: Callable[[], dict]) -> dict:
    """The record a previous call wrote at `record_path`, else `make_record()`'s, written there: an interrupted sweep
    resumes at its first unrecorded run."""
    if record_path.exists():
        return json.loads(record_path.read_text())
    record = make_record()
    record_path.parent.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps(record, indent=1))
    return record


def train_then_evaluate(train_command: list[str], model_dir: Path, eval_command: list[str], run_dir: Path,
                        keep_checkpoint: bool) -> dict[str, float]:
    """Train (log in run_dir/train.log), evaluate the checkpoint (run_dir/eval.log), then delete the checkpoint unless
    kept; the CPU seconds of each and the wall time."""
    start = time.perf_counter()
    train_cpu = run_logged(train_command, run_dir / "train.log")
    eval_cpu = run_logged(eval_command, run_dir / "eval.log")
    if not keep_checkpoint:
        shutil.rmtree(model_dir, ignore_errors=True)
    return {"train_cpu_s": round(train_cpu, 1), "eval_cpu_s": round(eval_cpu, 1),
            "wall_s": round(time.perf_counter() - start, 1)}


def write_marked_block(md_path: Path, name: str, title: str, block: str) -> None:
    """Replace the block between `<!-- NAME: begin -->` and `<!-- NAME: end -->` in `md_path`, or append a section
    titled `title` holding it. Text outside the markers is never touched."""
    begin, end = f"<!-- {name}: begin (written by benchmarks/{name}.py) -->", f"<!-- {name}: end -->"
    text = md_path.read_text() if md_path.exists() else ""
    content = f"{begin}\n{block}{end}"
    if begin in text and end in text:
        text = text[:text.index(begin)] + content + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + f"\n\n## {title}\n\n{content}\n"
    md_path.write_text(text)


def recorded_runs(output_dir: Path) -> list[dict]:
    """Every run recorded in the folder, the base model's evaluation aside: runs added later (variants, seeds) join
    the summary."""
    return [json.loads(path.read_text()) for path in sorted(output_dir.glob("*/record.json"))
            if path.parent.name != "base"]


def publish(name: str, table: str, png: Path, records: list[dict], base: dict, args, argv: list[str] | None,
            started: float, title: str, note: str, caption: str) -> None:
    """Print the table; copy the PNG to --figure; with --results_md write the table, the command that made it and
    its cost between this sweep's markers there."""
    cpu_minutes = (sum(r["train_cpu_s"] + r["eval_cpu_s"] for r in records) + base["eval_cpu_s"]) / 60
    print(table)
    print(f"plot: {png}  ({len(records)} runs, {cpu_minutes:.0f} CPU minutes in runs; this call took "
          f"{(time.perf_counter() - started) / 60:.1f} min)")
    if args.figure:
        Path(args.figure).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png, args.figure)
        png = Path(args.figure)
    if args.results_md:
        command = f"python benchmarks/{name}.py " + " ".join(argv if argv is not None else sys.argv[1:])
        block = (f"{datetime.date.today()}, `{command.strip()}`, {len(records)} runs, {cpu_minutes:.0f} CPU minutes "
                 f"of training and evaluation on one thread. {note}\n\n{table}\n"
                 f"![{caption}]({os.path.relpath(png.resolve(), Path(args.results_md).resolve().parent)})\n")
        write_marked_block(Path(args.results_md), name, title, block)
        print(f"table written to {args.results_md}")

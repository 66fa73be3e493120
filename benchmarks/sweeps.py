"""What the sweep benchmarks share (forgetting_frontier.py, sdpo_lambda.py): subprocesses, flags, the results file."""

from __future__ import annotations

import os
import subprocess
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

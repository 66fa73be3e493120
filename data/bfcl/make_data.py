"""Write the embedded BFCL v4 tool task (train / held-out JSON lines) from the installed bfcl-eval package, offline.

    pip install --no-deps bfcl-eval==2026.3.23
    python data/bfcl/make_data.py                         # the files in this folder
    python data/bfcl/make_data.py --max_user_turns 0      # multi-turn tasks with all their user turns

Files:
- simple_train.jsonl / simple_heldout.jsonl: BFCL `simple_python` (one call per question), SDFT rows (prompt, tools,
  demonstration = the ground-truth call) that evaluate.py also scores with the leaderboard's AST checker;
- multi_turn_train.jsonl / multi_turn_heldout.jsonl: `multi_turn_base` tasks with an executable environment, SDPO
  rows scored by the leaderboard's multi-turn checker; the subset is chosen for a 135M model (README.md).
The split is fixed by a hash of each task id (`sdft_utils.tools.bfcl.in_heldout`), the same on every machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # run from anywhere: the repository's sdft_utils

from sdft_utils.tools import bfcl  # noqa: E402


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    print(f"{path}: {len(rows)} rows, {path.stat().st_size / 1024:.0f} KiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default=str(HERE))
    parser.add_argument("--heldout_fraction", type=float, default=bfcl.HELDOUT_FRACTION)
    parser.add_argument("--max_classes", type=int, default=bfcl.EMBEDDED_MAX_CLASSES,
                        help="keep multi-turn tasks with at most this many environment classes")
    parser.add_argument("--max_user_turns", type=int, default=bfcl.EMBEDDED_MAX_USER_TURNS,
                        help="keep the first N user turns of each multi-turn task (0 = all)")
    parser.add_argument("--classes", nargs="+", default=None, help="only tasks whose classes are all among these")
    args = parser.parse_args()
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    train, heldout = bfcl.split_rows(bfcl.simple_rows(), args.heldout_fraction)
    write(output / "simple_train.jsonl", train)
    write(output / "simple_heldout.jsonl", heldout)
    rows = bfcl.embedded_multi_turn_rows(args.max_classes, args.max_user_turns or None, args.classes)
    train, heldout = bfcl.split_rows(rows, args.heldout_fraction)
    write(output / "multi_turn_train.jsonl", train)
    write(output / "multi_turn_heldout.jsonl", heldout)


if __name__ == "__main__":
    main()

"""benchmarks/tool_rollout_throughput.py runs and prints its tables."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_tool_rollout_benchmark_prints_turns_per_second():
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tool_rollout_throughput.py"), "--engines", "hf",
                           "--prompts", "2", "--num_samples", "1", "--turns", "2", "--max_turn_tokens", "16"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = done.stdout.split("engine ")[1]
    row = next(line for line in table.splitlines() if line.startswith("hf (HFRollout)")).split()
    assert row[2] == "2" and 2 <= int(row[3]) <= 4  # 2 rollouts of 1 or 2 model turns
    assert float(row[-3]) > 0  # turns per second
    assert "BFCL multi-turn checker (per task)" in done.stdout

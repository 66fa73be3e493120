"""torchrun entry point for the CPU end-to-end tests of `--backend megatron`: apply the test-only megatron-core CPU
shims (tests/megatron_cpu.py), then run a training script as `__main__` with the remaining arguments.

  ACCELERATE_USE_CPU=1 torchrun --nproc-per-node 2 tests/megatron_cpu_launch.py train_sdft.py --backend megatron ...
"""

import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.megatron_cpu import apply_cpu_shims  # noqa: E402

if __name__ == "__main__":
    apply_cpu_shims()
    script, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_path(str(ROOT / script), run_name="__main__")

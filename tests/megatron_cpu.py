"""Test-only setup for megatron-core on a CPU machine (tests/megatron/ and benchmarks/gpu_check.py --smoke).

megatron-core 0.16 assumes CUDA in two places that a CPU run reaches: `torch.cuda.current_device()` (buffers in the
parallel linears' communication helpers and in RoPE) and the CUDA RNG tracker. The shim below redirects the first
to the CPU and replaces the tracker with megatron's inference tracker (fork/add are no-ops; the tests use no
dropout). It is applied inside the forked test ranks only, never in library code.
"""

from __future__ import annotations

import pytest
import torch

megatron_core = pytest.importorskip("megatron.core", reason="megatron-core is optional (extra megatron)")


def apply_cpu_shims() -> None:
    from megatron.core.tensor_parallel import random as megatron_random

    torch.cuda.current_device = lambda: torch.device("cpu")
    megatron_random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)


def init_megatron_cpu(tensor_parallel_size: int, seed: int = 0) -> None:
    """Inside a gloo rank: CPU shims, then megatron's parallel state with the given TP size."""
    from megatron.core import parallel_state

    apply_cpu_shims()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel_size)
    torch.manual_seed(seed)

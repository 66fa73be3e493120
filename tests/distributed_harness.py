"""Run a function on N real gloo processes on this CPU machine and collect what each rank returns.

Tests of tensor-parallel maths use real `torch.distributed` collectives (not mocks): the processes are forked from
the test process (so torch, and megatron-core when a test imported it, are not imported again: seconds, not tens of
seconds, on a 2-core machine) and rendezvous through a file. Each rank's return value comes back through torch.save.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, worker: Callable, world_size: int, out_dir: str, args: tuple) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world_size)
    try:
        result = worker(rank, world_size, *args)
    except BaseException:
        # mp.spawn reports only the first failing rank; keep every rank's traceback for the assertion message.
        Path(out_dir, f"error{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()
    torch.save(result, Path(out_dir, f"rank{rank}.pt"))


def run_ranks(worker: Callable[..., Any], world_size: int, out_dir: Path, *args: Any) -> list[Any]:
    """worker(rank, world_size, *args) on `world_size` gloo processes -> the list of their return values."""
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        mp.start_processes(_entry, args=(worker, world_size, str(out_dir), args), nprocs=world_size, join=True,
                           start_method="fork")
    except mp.ProcessRaisedException as error:
        details = "\n".join(p.read_text() for p in sorted(out_dir.glob("error*.txt")))
        raise AssertionError(f"a rank failed:\n{details or error}") from None
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]

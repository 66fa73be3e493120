"""Memory and time of `chunked_token_divergence` against a plain full-logits implementation.

The plain path computes hidden @ W.T for all completion tokens at once, then `token_divergence_from_logits`
(log_softmax + divergence under autograd). Both run forward + backward on the same random inputs; the teacher
shares the student's head (self-distillation) and sees perturbed hidden states.

Peak memory is the extra memory allocated during forward + backward (inputs excluded): on CUDA from
torch.cuda.max_memory_allocated, on CPU from a TorchDispatchMode that tracks live tensor storages (a separate,
untimed run, because the tracking slows every op down).

    .venv/bin/python benchmarks/loss_memory.py --vocab 32000 --lengths 256 512 1024   # ~1 min on 2 CPU cores
    .venv/bin/python benchmarks/loss_memory.py                                          # Qwen2.5-0.5B head, GPU
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sdft_utils.losses import TokenDivergence, chunked_token_divergence, token_divergence_from_logits  # noqa: E402
from sdft_utils.testing import LiveTensorBytes  # noqa: E402

MiB = 2**20


def make_inputs(n: int, vocab: int, hidden: int, dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    g = torch.Generator(device=device).manual_seed(seed)
    weight = torch.randn(vocab, hidden, generator=g, device=device) / hidden**0.5  # logits of std ~1
    student_hidden = torch.randn(n, hidden, generator=g, device=device)
    teacher_hidden = student_hidden + 0.3 * torch.randn(n, hidden, generator=g, device=device)
    return dict(
        student_hidden=student_hidden.to(dtype),
        weight=weight.to(dtype),
        teacher_hidden=teacher_hidden.to(dtype),
        ids=torch.randint(0, vocab, (n,), generator=g, device=device),
    )


def run_plain(inputs: dict, student_hidden: torch.Tensor, weight: torch.Tensor, **kwargs) -> TokenDivergence:
    student_logits = student_hidden.float() @ weight.float().T
    with torch.no_grad():
        teacher_logits = inputs["teacher_hidden"].float() @ weight.detach().float().T
    return token_divergence_from_logits(student_logits, teacher_logits, inputs["ids"], **kwargs)


def run_chunked(inputs: dict, student_hidden: torch.Tensor, weight: torch.Tensor, chunk_size: int, **kwargs) -> TokenDivergence:
    return chunked_token_divergence(
        student_hidden, weight, inputs["teacher_hidden"], weight.detach(), inputs["ids"], chunk_size=chunk_size, **kwargs
    )


def measure(fn: Callable[..., TokenDivergence], inputs: dict, device: str, repeats: int) -> tuple[float, float, torch.Tensor]:
    """-> (seconds per forward+backward, peak extra MiB, per-token loss)."""

    def step() -> torch.Tensor:
        student_hidden = inputs["student_hidden"].detach().requires_grad_()
        weight = inputs["weight"].detach().requires_grad_()
        out = fn(inputs, student_hidden, weight)
        out.loss.sum().backward()
        return out.loss.detach()

    if device == "cuda":
        step()  # warm-up (allocator, kernels)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        # The warm-up doubles as the memory run: tracking slows every op, so it must stay out of the timing.
        with LiveTensorBytes() as tracker:
            step()
    start = time.perf_counter()
    for _ in range(repeats):
        loss = step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / repeats
    peak = torch.cuda.max_memory_allocated() - base if device == "cuda" else tracker.peak
    return seconds, peak / MiB, loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--mode", choices=["full", "topk", "sampled"], default="full")
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--plain-max-gib", type=float, default=12.0,
        help="skip the plain path when its estimated need (about 12 float32 copies of N×V) exceeds this",
    )
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    kwargs = dict(alpha=args.alpha, mode=args.mode, top_k=args.top_k)

    print(
        f"device={args.device} vocab={args.vocab} hidden={args.hidden} dtype={args.dtype} mode={args.mode} "
        f"alpha={args.alpha} chunk_size={args.chunk_size} threads={torch.get_num_threads()}"
    )
    header = f"{'tokens':>7} | {'plain us/tok':>12} {'plain MiB':>10} | {'chunked us/tok':>14} {'chunked MiB':>11} | {'max|Δloss|':>10}"
    print(header)
    print("-" * len(header))
    for n in args.lengths:
        inputs = make_inputs(n, args.vocab, args.hidden, dtype, args.device)
        chunk_time, chunk_mib, chunk_loss = measure(
            lambda inp, h, w: run_chunked(inp, h, w, args.chunk_size, **kwargs), inputs, args.device, args.repeats
        )
        plain_cells, diff_cell = f"{'skipped':>12} {'':>10}", f"{'-':>10}"
        if 12 * n * args.vocab * 4 <= args.plain_max_gib * 2**30:
            try:
                plain_time, plain_mib, plain_loss = measure(
                    lambda inp, h, w: run_plain(inp, h, w, **kwargs), inputs, args.device, args.repeats
                )
                plain_cells = f"{plain_time / n * 1e6:>12.1f} {plain_mib:>10.0f}"
                diff_cell = f"{(plain_loss - chunk_loss).abs().max().item():>10.2e}"
            except torch.OutOfMemoryError:
                plain_cells = f"{'OOM':>12} {'':>10}"
                torch.cuda.empty_cache()
        print(f"{n:>7} | {plain_cells} | {chunk_time / n * 1e6:>14.1f} {chunk_mib:>11.0f} | {diff_cell}")


if __name__ == "__main__":
    main()

"""Memory and time of `chunked_token_divergence` against a plain full-logits implementation and TRL's own losses.

Four implementations run forward + backward on the same random inputs (the teacher shares the student's head,
as in self-distillation, and sees perturbed hidden states):
- `ours`: `chunked_token_divergence` on hidden states + lm_head, chunk by chunk over tokens, float32, with the
  logit gradients of up to `--grad-memory-mib` kept from forward (the scripts' default);
- `recompute`: the same with nothing kept, every chunk's logits recomputed in backward (flat memory at any length);
- `plain`: hidden @ W.T for all tokens at once, then `token_divergence_from_logits` (log_softmax + divergence
  under autograd);
- `trl` (when `trl` is importable): hidden @ W.T in the input dtype, as TRL's trainers get logits from the model,
  then `trl.experimental.sdft.loss_utils.compute_full_logit_self_distillation_loss` / `compute_topk_...` /
  `compute_sampled_token_...` (the functions TRL's SDFTTrainer and SDPOTrainer call; SDPO's loss_utils is the
  same file).
The agreement columns give the largest |per-token loss difference| of the others against `ours`.

Peak memory is the extra memory allocated during forward + backward (inputs excluded): on CUDA from
torch.cuda.max_memory_allocated, on CPU from a TorchDispatchMode that tracks live tensor storages (a separate,
untimed run, because the tracking slows every op down).

    OMP_NUM_THREADS=1 python benchmarks/loss_memory.py   # CPU: vocab 151,936, hidden 64, 512-2048 tokens, CPU time
    .venv/bin/python benchmarks/loss_memory.py --full     # 512 ... 8,192 tokens, hidden 896 (Qwen2.5-0.5B head)
    python benchmarks/loss_memory.py --mode topk --alpha 0.5 --dtype bfloat16   # GPU: the SDPO loss, bf16 inputs
On a GPU the defaults are the full sweep.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sdft_utils.losses.divergence import (  # noqa: E402
    TokenDivergence,
    chunked_token_divergence,
    token_divergence_from_logits,
)
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


def run_trl(inputs: dict, student_hidden: torch.Tensor, weight: torch.Tensor, alpha: float, mode: str, top_k: int,
            tail_bucket: bool = True) -> TokenDivergence:
    """TRL's loss functions on full logits (B=1, T=N) in the inputs' dtype, as its trainers call them."""
    from trl.experimental.sdft import loss_utils

    student_logits = (student_hidden @ weight.T)[None]
    with torch.no_grad():
        teacher_logits = (inputs["teacher_hidden"] @ weight.detach().T)[None]
    if mode == "full":
        loss = loss_utils.compute_full_logit_self_distillation_loss(student_logits, teacher_logits,
                                                                    distillation_alpha=alpha)
    elif mode == "topk":
        loss = loss_utils.compute_topk_self_distillation_loss(student_logits, teacher_logits, distillation_topk=top_k,
                                                              distillation_alpha=alpha,
                                                              distillation_add_tail=tail_bucket)
    else:
        loss = loss_utils.compute_sampled_token_self_distillation_loss(student_logits, teacher_logits,
                                                                       inputs["ids"][None], distillation_alpha=alpha)
    empty = loss.new_zeros(0)
    return TokenDivergence(loss[0].float(), empty, empty, empty)


def trl_available() -> bool:
    try:
        from trl.experimental.sdft import loss_utils  # noqa: F401
    except ImportError:
        return False
    return True


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
    # On a CPU: the process's CPU time, which other jobs on a shared machine do not inflate (with one thread it is
    # the wall time of an idle machine)
    clock = time.perf_counter if device == "cuda" else time.process_time
    start = clock()
    for _ in range(repeats):
        loss = step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (clock() - start) / repeats
    peak = torch.cuda.max_memory_allocated() - base if device == "cuda" else tracker.peak
    return seconds, peak / MiB, loss


def main() -> None:
    on_gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="the full sweep: 512 ... 8192 tokens, hidden 896 "
                                                            "(the default on a GPU)")
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--hidden", type=int, default=None, help="default: 896 with --full or on a GPU, else 64")
    parser.add_argument("--lengths", type=int, nargs="+", default=None,
                        help="default: 512 1024 2048 4096 8192 with --full or on a GPU, else 512 1024 2048")
    parser.add_argument("--alpha", type=float, default=0.0, help="0 = forward KL (the SDFT default)")
    parser.add_argument("--mode", choices=["full", "topk", "sampled"], default="full")
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--grad-memory-mib", type=float, default=1024.0,
                        help="ours: MiB of logit gradients kept from forward (the scripts' --loss_grad_memory_mib; "
                             "0 = recompute every chunk in backward)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--device", default="cuda" if on_gpu else "cpu")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--implementations", nargs="+", choices=["ours", "recompute", "plain", "trl"],
                        default=["ours", "recompute", "plain", "trl"],
                        help="recompute = ours with --grad-memory-mib 0 (every chunk's logits recomputed in backward)")
    parser.add_argument(
        "--plain-max-gib", type=float, default=40.0 if on_gpu else 4.0,
        help="skip the full-logits paths (plain, trl) when their estimated need (about 12 float32 copies of N x V) "
             "exceeds this",
    )
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    full = args.full or args.device == "cuda"
    hidden = args.hidden or (896 if full else 64)
    lengths = args.lengths or ([512, 1024, 2048, 4096, 8192] if full else [512, 1024, 2048])
    dtype = getattr(torch, args.dtype)
    kwargs = dict(alpha=args.alpha, mode=args.mode, top_k=args.top_k)
    implementations = [name for name in args.implementations if name != "trl" or trl_available()]
    runners = {
        "ours": lambda inp, h, w: run_chunked(inp, h, w, args.chunk_size, grad_memory_mib=args.grad_memory_mib,
                                              **kwargs),
        "recompute": lambda inp, h, w: run_chunked(inp, h, w, args.chunk_size, grad_memory_mib=0, **kwargs),
        "plain": lambda inp, h, w: run_plain(inp, h, w, **kwargs),
        "trl": lambda inp, h, w: run_trl(inp, h, w, **kwargs),
    }

    print(
        f"device={args.device} vocab={args.vocab} hidden={hidden} dtype={args.dtype} mode={args.mode} "
        f"alpha={args.alpha} chunk_size={args.chunk_size} grad_memory_mib={args.grad_memory_mib:g} threads={torch.get_num_threads()} torch={torch.__version__}"
        + ("" if "trl" in implementations or "trl" not in args.implementations else "  (trl not installed)")
    )
    header = f"{'tokens':>7} |" + "|".join(f" {name + ' us/tok':>13} {name + ' MiB':>10} " for name in implementations)
    header += "|" + "".join(f" {'max|Δ| ' + name:>13}" for name in implementations if name != "ours")
    print(header)
    print("-" * len(header))
    rows = []
    for n in lengths:
        inputs = make_inputs(n, args.vocab, hidden, dtype, args.device)
        results: dict[str, tuple[float, float, torch.Tensor] | str] = {}
        for name in implementations:
            if name in ("plain", "trl") and 12 * n * args.vocab * 4 > args.plain_max_gib * 2**30:
                results[name] = "skipped"  # over --plain-max-gib
                continue
            try:
                results[name] = measure(runners[name], inputs, args.device, args.repeats)
            except torch.OutOfMemoryError:
                results[name] = "OOM"
                torch.cuda.empty_cache()
        row = {"tokens": n}
        cells = []
        for name in implementations:
            result = results[name]
            if isinstance(result, str):
                cells.append(f" {result:>13} {'':>10} ")
                row[name] = result
            else:
                seconds, mib, _ = result
                cells.append(f" {seconds / n * 1e6:>13.2f} {mib:>10.0f} ")
                row[name] = {"us_per_token": seconds / n * 1e6, "peak_mib": mib}
        agreement = []
        for name in implementations:
            if name == "ours":
                continue
            ours, other = results.get("ours"), results[name]
            if isinstance(ours, tuple) and isinstance(other, tuple):
                difference = (other[2].double() - ours[2].double()).abs().max().item()
                agreement.append(f" {difference:>13.2e}")
                row[f"max_abs_diff_{name}"] = difference
            else:
                agreement.append(f" {'-':>13}")
        print(f"{n:>7} |" + "|".join(cells) + "|" + "".join(agreement), flush=True)
        rows.append(row)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

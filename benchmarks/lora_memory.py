"""Memory and step time of full fine-tuning against LoRA (`--use_peft`), with an EMA teacher, on the same batch.

Memory is counted, not sampled: bytes of every parameter held (student, teacher), of the gradients and of AdamW's
two moments, after one step. Step time is the median over the timed steps, as wall-clock seconds and as CPU
seconds of this process (`time.process_time`; on a shared machine the wall clock also counts other jobs). Full fine-tuning holds two models (student + EMA copy); LoRA holds one base model and
two small adapters (the student's and the EMA teacher's), with gradients and AdamW state for the student adapter only.
The step is the scripts' math: student forward + backward, teacher forward, chunked divergence, AdamW, EMA update.

    .venv/bin/python benchmarks/lora_memory.py                       # embedded SmolLM2-135M (~2 min on 2 CPU cores)
    .venv/bin/python benchmarks/lora_memory.py --model tiny          # the tiny random test Llama (seconds)
    python benchmarks/lora_memory.py --model Qwen/Qwen2.5-0.5B-Instruct --dtype bfloat16    # GPU
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sdft_utils.losses.divergence import chunked_token_divergence  # noqa: E402
from sdft_utils.losses.weighting import scatter_rows, sequence_mean_loss
from sdft_utils.training.batching import build_distill_batch  # noqa: E402
from sdft_utils.training.config import DEFAULT_LORA_TARGETS, LoraArgs  # noqa: E402
from sdft_utils.training.lora import add_lora  # noqa: E402
from sdft_utils.training.modeling import (  # noqa: E402
    completion_hidden_states,
    load_model,
    output_head,
    trainable_parameters,
)
from sdft_utils.training.teachers import ema_update_, make_teacher  # noqa: E402

MiB = 2**20


def tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for tensor in tensors:
        if tensor is not None and tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def run(model_path: str, dtype: torch.dtype, use_peft: bool, args) -> dict[str, float]:
    torch.manual_seed(0)
    model = load_model(model_path, dtype)
    if use_peft:
        model = add_lora(model, LoraArgs(use_peft=True, lora_r=args.lora_r, lora_alpha=2 * args.lora_r))
    teacher = make_teacher("ema", model, model_path, dtype)
    device = torch.device(args.device)
    model.to(device), teacher.to(device)
    model.train()
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-5)
    vocab = model.get_output_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(0)

    def ids(length):
        return torch.randint(3, vocab, (length,), generator=generator).tolist()

    batch = build_distill_batch([ids(args.prompt_tokens) for _ in range(args.batch)],
                                [ids(2 * args.prompt_tokens) for _ in range(args.batch)],
                                [ids(args.completion_tokens) for _ in range(args.batch)], None, 0).to(device)
    times, cpu_times = [], []
    for step in range(args.steps + 1):  # the first step warms up and is not timed
        start, cpu_start = time.perf_counter(), time.process_time()
        width, scored = batch.num_completion_tokens, batch.completion_mask.bool()
        student_hidden = completion_hidden_states(model, batch.student_input_ids, batch.student_attention_mask, width)
        with torch.no_grad():
            teacher_hidden = completion_hidden_states(teacher, batch.teacher_input_ids,
                                                      batch.teacher_attention_mask, width)
        (student_weight, student_bias), (teacher_weight, teacher_bias) = output_head(model), output_head(teacher)
        divergence = chunked_token_divergence(student_hidden[scored], student_weight, teacher_hidden[scored],
                                              teacher_weight, batch.completion_ids[scored],
                                              student_head_bias=student_bias, teacher_head_bias=teacher_bias)
        sequence_mean_loss(scatter_rows(divergence, scored)["loss"], batch.completion_mask.float()).backward()
        if step == 0:
            gradient_bytes = tensor_bytes(p.grad for p in model.parameters())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema_update_(teacher, model, 0.01)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    parameters = tensor_bytes([*model.parameters(), *teacher.parameters()])
    optimizer_bytes = tensor_bytes(value for state in optimizer.state.values() for value in state.values()
                                   if isinstance(value, torch.Tensor) and value.dim() > 0)
    trained = sum(p.numel() for p in trainable_parameters(model))
    return {"parameters": parameters / MiB, "gradients": gradient_bytes / MiB, "adam": optimizer_bytes / MiB,
            "total": (parameters + gradient_bytes + optimizer_bytes) / MiB, "trained": trained,
            "step": sorted(times)[len(times) // 2], "cpu": sorted(cpu_times)[len(cpu_times) // 2]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded", help="'embedded' (SmolLM2-135M), 'tiny', or a folder / hub id")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--lora_r", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt_tokens", type=int, default=64)
    parser.add_argument("--completion_tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (the median is reported)")
    parser.add_argument("--setups", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.model == "embedded":
        from sdft_utils.assets import embedded_model_path

        model_path = str(embedded_model_path())
    elif args.model == "tiny":
        from sdft_utils.testing import save_tiny_model

        model_path = str(save_tiny_model(Path(tempfile.mkdtemp()) / "tiny"))
    else:
        model_path = args.model
    dtype = getattr(torch, args.dtype)
    print(f"model {args.model}, {args.dtype}, EMA teacher, batch {args.batch} x ({args.prompt_tokens} prompt + "
          f"{args.completion_tokens} completion tokens; teacher prompts {2 * args.prompt_tokens}), LoRA r={args.lora_r} "
          f"on {', '.join(DEFAULT_LORA_TARGETS)}, device {args.device}, {torch.get_num_threads()} threads")
    print("| setup | trained params | parameters (MiB) | gradients (MiB) | AdamW state (MiB) | total (MiB) | "
          "step wall s | step CPU s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, use_peft in (("full fine-tuning + EMA copy", False), ("LoRA + EMA adapter", True)):
        if ("lora" if use_peft else "full") not in args.setups:
            continue
        result = run(model_path, dtype, use_peft, args)
        print(f"| {name} | {result['trained']:,} | {result['parameters']:.1f} | {result['gradients']:.1f} | "
              f"{result['adam']:.1f} | {result['total']:.1f} | {result['step']:.2f} | "
              f"{result['cpu']:.2f} |", flush=True)


if __name__ == "__main__":
    main()

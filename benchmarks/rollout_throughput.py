"""Rollout throughput on the same model and prompts: Hugging Face `generate` (what TRL's trainers call), our
`HFRollout` decode loop (`--rollout hf`) and vLLM colocate (`--rollout vllm`).

All sample at temperature 1 (HFRollout and vLLM with log-probs recorded, as in training); every engine is timed
after one warm-up call, and vLLM's weight sync (trainer -> engine, after every optimizer step) is timed too. On a
CPU the times are process CPU time with one thread (`--threads`), which a busy machine disturbs least.

    .venv/bin/python benchmarks/rollout_throughput.py                       # tiny random Llama, ~1 min on 2 CPU cores
    .venv/bin/python benchmarks/rollout_throughput.py --model tiny-49k --engines generate hfrollout  # no vLLM
    .venv/bin/python benchmarks/rollout_throughput.py --model embedded --prompts 8 --max_new_tokens 64  # SmolLM2-135M
    python benchmarks/rollout_throughput.py --model Qwen/Qwen2.5-0.5B-Instruct --prompts 64 --max_new_tokens 512  # GPU
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
from sdft_utils.rollout.hf import HFRollout  # noqa: E402
from sdft_utils.rollout.sampling import SamplingConfig


def timed(function, *args, clock=time.perf_counter) -> tuple[float, object]:
    start = clock()
    result = function(*args)
    return clock() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="'tiny' (random 2-layer Llama), 'tiny-49k' (the same with a "
                        "49,152-token vocabulary), 'embedded' (SmolLM2-135M) or a Hugging Face id/folder")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--prompt_length", type=int, default=32)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--gpu_memory_utilization", type=float, default=0.3)
    parser.add_argument("--engines", nargs="+", choices=["generate", "hfrollout", "vllm"],
                        default=["generate", "hfrollout", "vllm"])
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (CPU only)")
    options = parser.parse_args()
    on_cpu = not torch.cuda.is_available()
    if on_cpu:
        torch.set_num_threads(options.threads)

    from transformers import AutoModelForCausalLM

    workdir = tempfile.mkdtemp(prefix="rollout_bench_")
    if options.model in ("tiny", "tiny-49k"):
        from sdft_utils.testing import save_random_model

        # min_new_tokens: HF generate and HFRollout produce exactly --max_new_tokens tokens from the random model
        model_path = str(save_random_model(Path(workdir) / options.model, options.model,
                                           min_new_tokens=options.max_new_tokens))
    elif options.model == "embedded":
        from sdft_utils.assets import embedded_model_path

        model_path = str(embedded_model_path())
    else:
        model_path = options.model
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
    eos = [model.config.eos_token_id] if isinstance(model.config.eos_token_id, int) else model.config.eos_token_id
    generator = torch.Generator().manual_seed(0)
    # random prompts that avoid the special tokens, so sequences run to max_new_tokens unless the model ends them
    prompts = torch.randint(10, min(model.config.vocab_size, 250), (options.prompts, options.prompt_length),
                            generator=generator).tolist()
    sampling = SamplingConfig(max_new_tokens=options.max_new_tokens, temperature=1.0)

    clock = time.process_time if on_cpu else time.perf_counter
    rows = []
    if "generate" in options.engines:  # TRL's trainers: generate() with multinomial sampling, dynamic cache
        ids = torch.tensor(prompts, device=device)

        @torch.no_grad()
        def hf_generate(batch):
            output = model.generate(input_ids=batch, attention_mask=torch.ones_like(batch), do_sample=True, top_k=0,
                                    max_new_tokens=options.max_new_tokens, pad_token_id=eos[0])
            new = output[:, batch.shape[1]:].tolist()
            return [row[:row.index(eos[0]) + 1] if eos[0] in row else row for row in new]

        hf_generate(ids[:2])  # warm-up
        seconds, completions = timed(hf_generate, ids, clock=clock)
        rows.append(("hf generate", seconds, sum(map(len, completions))))
    if "hfrollout" in options.engines:
        hf = HFRollout(model, pad_token_id=eos[0], eos_token_ids=eos)
        hf.generate(prompts[:2], sampling)  # warm-up
        seconds, rollouts = timed(hf.generate, prompts, sampling, clock=clock)
        rows.append(("HFRollout loop", seconds, sum(map(len, rollouts.completion_ids))))
    init_seconds = sync_seconds = None
    if "vllm" in options.engines:
        from sdft_utils.rollout.vllm_colocate import VLLMColocateRollout, VLLMEngineConfig

        config = VLLMEngineConfig(model=model_path, dtype=dtype,
                                  gpu_memory_utilization=options.gpu_memory_utilization,
                                  max_model_len=options.prompt_length + options.max_new_tokens)
        init_seconds, engine = timed(VLLMColocateRollout, config, eos)
        engine.generate(prompts[:2], sampling)  # warm-up
        seconds, rollouts = timed(engine.generate, prompts, sampling)  # wall: vLLM works in other threads
        rows.append(("vllm colocate", seconds, sum(map(len, rollouts.completion_ids))))
        sync_seconds, _ = timed(engine.sync_weights, model)

    parameters = sum(p.numel() for p in model.parameters())
    print(f"\nmodel {options.model} ({parameters / 1e6:.1f}M parameters, {dtype}, {device}), {options.prompts} prompts "
          f"x {options.prompt_length} tokens, up to {options.max_new_tokens} new tokens, temperature 1")
    print(f"{'backend':<16}{'seconds':>10}{'new tokens':>12}{'tokens/s':>12}")
    for name, seconds, tokens in rows:
        print(f"{name:<16}{seconds:>10.2f}{tokens:>12d}{tokens / seconds:>12.1f}")
    if init_seconds is not None:
        print(f"vLLM engine start {init_seconds:.1f} s, weight sync {sync_seconds * 1000:.0f} ms (vLLM rows: wall "
              "time, it runs its own threads)")


if __name__ == "__main__":
    main()

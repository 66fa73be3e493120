"""How far the rollout engine's log-probs are from the trainer's under top-p, with and without the nucleus mass.

vLLM (CPU build here) samples a tiny random model at `--top_p`; for every sampled token the script compares the
engine's log-prob with the trainer's full-vocabulary one (what an uncorrected importance ratio uses) and with the
trainer's on its own top-p nucleus (`weight_sync.sequence_logprobs(..., top_p)`, what the loss's nucleus mass gives).
Prints one row per temperature.

  VLLM_CPU_KVCACHE_SPACE=1 OMP_NUM_THREADS=1 python benchmarks/top_p_logprobs.py --top_p 0.9
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--top_p", type=float, default=0.9)
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.7])
    parser.add_argument("--samples", type=int, default=4, help="completions per prompt (2 prompts)")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from transformers import AutoModelForCausalLM

    from sdft_utils.rollout.sampling import SamplingConfig
    from sdft_utils.rollout.vllm_colocate import VLLMColocateRollout, VLLMEngineConfig
    from sdft_utils.rollout.weight_sync import sequence_logprobs
    from sdft_utils.testing import save_tiny_model

    path = save_tiny_model(tempfile.mkdtemp())
    engine = VLLMColocateRollout(VLLMEngineConfig(str(path), gpu_memory_utilization=0.05, max_model_len=128), [2])
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = [[1, 40, 41, 42, 43], [1, 50, 51]]
    rows = []
    for temperature in args.temperatures:
        out = engine.generate(prompts, SamplingConfig(max_new_tokens=12, temperature=temperature, top_p=args.top_p,
                                                      num_samples=args.samples))
        to_full, to_nucleus = [], []
        for index, (tokens, logprobs) in enumerate(zip(out.completion_ids, out.logprobs, strict=True)):
            prompt, reported = prompts[index // args.samples], torch.tensor(logprobs)
            to_full.append(reported - sequence_logprobs(model, prompt, tokens, temperature))
            to_nucleus.append(reported - sequence_logprobs(model, prompt, tokens, temperature, args.top_p))
        full, nucleus = torch.cat(to_full), torch.cat(to_nucleus)
        rows.append((temperature, full.numel(), (-full).exp().mean().item(), full.mean().item(),
                     nucleus.abs().max().item(), (-nucleus).exp().mean().item()))
    print(f"top_p {args.top_p}, tiny random Llama (259 tokens), vLLM CPU float32")
    print("| temperature | tokens | IS ratio, uncorrected (mean) | engine - trainer, full vocab (mean) | "
          "max abs(engine - trainer on nucleus) | IS ratio, corrected (mean) |")
    print("|---|---|---|---|---|---|")
    for temperature, count, raw_ratio, bias, worst, ratio in rows:
        print(f"| {temperature} | {count} | {raw_ratio:.4f} | {bias:.4f} | {worst:.1e} | {ratio:.6f} |")


if __name__ == "__main__":
    main()

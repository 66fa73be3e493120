"""Tool rollout throughput: model turns per second of `generate_with_tools` with the HF and vLLM engines.

Every trajectory starts from a real tool prompt (BFCL simple_python held-out rows from data/bfcl, their function
schemas rendered natively or through the system-turn fallback) and talks with an environment for `--turns` model
turns: each answer is parsed for calls, any call is executed (it returns a short result), and a plain answer gets the
next user turn. So every round does what training does: one batched `engine.generate` over all open trajectories,
then per trajectory parse, execute, render the continuation and tokenise it. Reported: model turns per second,
model tokens per second, and the share of the wall time spent outside `engine.generate` (the loop's own work).
A second table times the BFCL side alone: environment calls (the ground truth of all multi_turn_base tasks through
the executor) and the leaderboard's multi-turn checker per task (SDPO's reward).

    .venv/bin/python benchmarks/tool_rollout_throughput.py                                    # tiny Llama, HF + vLLM
    .venv/bin/python benchmarks/tool_rollout_throughput.py --model embedded --prompts 4 --engines hf   # SmolLM2-135M
    python benchmarks/tool_rollout_throughput.py --model Qwen/Qwen2.5-0.5B-Instruct --prompts 64     # GPU

Times are wall clock (vLLM runs its own threads); torch uses `--threads` threads on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from sdft_utils.rollout.sampling import SamplingConfig  # noqa: E402
from sdft_utils.tools.config import ToolConfig  # noqa: E402
from sdft_utils.tools.render import ToolChat  # noqa: E402
from sdft_utils.tools.rollout import ToolPrompt, generate_with_tools, render_tool_prompts  # noqa: E402


class Chatter:
    """The benchmark's environment: every call succeeds with a short result; a plain answer gets "Continue." until
    the trajectory has had its user turns."""

    def reset(self, state):
        self.user_turns = state["user_turns"]

    def call_tool(self, name, arguments):
        return {"result": "ok", "function": name}

    def next_user_message(self):
        if self.user_turns <= 0:
            return None
        self.user_turns -= 1
        return "Continue."


class TimedEngine:
    """The real engine, with the time spent inside its generate() summed."""

    def __init__(self, engine):
        self.engine, self.seconds, self.eos_token_ids = engine, 0.0, engine.eos_token_ids

    def generate(self, prompt_ids, sampling, seeds=None):
        start = time.perf_counter()
        try:
            return self.engine.generate(prompt_ids, sampling, seeds)
        finally:
            self.seconds += time.perf_counter() - start


def load_model(name: str, workdir: str, logit_gap: float) -> str:
    if name == "tiny":
        from sdft_utils.testing import byte_level_tokenizer, favour_token, tiny_llama

        path = Path(workdir) / "tiny"
        favour_token(tiny_llama(), 2, logit_gap).save_pretrained(path)  # turns end with EOS after a few tokens
        byte_level_tokenizer().save_pretrained(path)
        return str(path)
    if name == "embedded":
        from sdft_utils.assets import embedded_model_path

        return str(embedded_model_path())
    return name


def run_engine(engine, chat, prompts, prompt_ids, sampling, config) -> dict:
    timed = TimedEngine(engine)
    start = time.perf_counter()
    seeds = list(range(len(prompts)))
    rollouts = generate_with_tools(timed, chat, prompts, prompt_ids, sampling, seeds, config)
    wall = time.perf_counter() - start
    turns = sum(t.model_turns for t in rollouts.trajectories)
    model_tokens = sum(map(sum, rollouts.model_token_masks))
    context_tokens = sum(map(len, rollouts.completion_ids)) - model_tokens
    calls = sum(len(t.all_calls) for t in rollouts.trajectories)
    return {"trajectories": len(rollouts.trajectories), "turns": turns, "calls": calls, "model_tokens": model_tokens,
            "context_tokens": context_tokens, "wall": wall, "generate": timed.seconds}


def bfcl_side() -> list[tuple[str, int, float]]:
    """(what, count, seconds): BFCL environment calls through the executor, and the multi-turn checker per task."""
    try:
        from sdft_utils.tools import bfcl
    except ImportError:
        return []
    from sdft_utils.tools.execution import open_toolbox, resolve_tools

    rows = bfcl.multi_turn_rows()
    truths = [bfcl.ground_truth_calls(row) for row in rows]
    target = resolve_tools(bfcl.ENVIRONMENT)
    start, count = time.perf_counter(), 0
    for row, turns in zip(rows, truths, strict=True):
        box = open_toolbox(target, bfcl.ENVIRONMENT, row["environment_state"])
        for call in (call for turn in turns for call in turn):
            box.call(call.name, call.arguments)
            count += 1
    calls_seconds = time.perf_counter() - start
    start = time.perf_counter()
    for row, turns in zip(rows, truths, strict=True):
        bfcl.check_multi_turn([[turn] if turn else [] for turn in turns], row)
    return [("BFCL environment calls (executor, in process)", count, calls_seconds),
            ("BFCL multi-turn checker (per task)", len(rows), time.perf_counter() - start)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="'tiny' (random 2-layer Llama that ends turns early), "
                        "'embedded' (SmolLM2-135M-Instruct) or a Hugging Face id/folder")
    parser.add_argument("--engines", nargs="+", choices=["hf", "vllm"], default=["hf", "vllm"])
    parser.add_argument("--prompts", type=int, default=8, help="BFCL simple_python held-out rows")
    parser.add_argument("--num_samples", type=int, default=2, help="rollouts per prompt")
    parser.add_argument("--turns", type=int, default=4, help="model turns per trajectory (user turns supplied)")
    parser.add_argument("--max_turn_tokens", type=int, default=64)
    parser.add_argument("--max_new_tokens", type=int, default=400, help="completion budget per trajectory")
    parser.add_argument("--logit_gap", type=float, default=3.0, help="tiny model: EOS logit advantage (turn length)")
    parser.add_argument("--gpu_memory_utilization", type=float, default=0.3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    options = parser.parse_args()
    if not torch.cuda.is_available():
        torch.set_num_threads(options.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    workdir = tempfile.mkdtemp(prefix="tool_bench_")
    model_path = load_model(options.model, workdir, options.logit_gap)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    eos = [tokenizer.eos_token_id]
    chat = ToolChat.from_tokenizer(tokenizer, eos)
    rows = [json.loads(line) for line in (ROOT / "data/bfcl/simple_heldout.jsonl").read_text().splitlines()]
    config = ToolConfig(tool_environment="__main__:Chatter", max_turns=options.turns,
                        max_turn_tokens=options.max_turn_tokens)

    def prompts():  # fresh prompts per run (the loop fills in tools)
        return [ToolPrompt(row["prompt"], row["tools"], state={"user_turns": options.turns - 1})
                for row in rows[:options.prompts]]

    prompt_ids, _ = render_tool_prompts(chat, prompts(), config, 8192)
    sampling = SamplingConfig(max_new_tokens=options.max_new_tokens, temperature=1.0,
                              num_samples=options.num_samples)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    results = []
    if "hf" in options.engines:
        from sdft_utils.rollout.hf import HFRollout

        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
        engine = HFRollout(model, tokenizer.pad_token_id or eos[0], eos)
        run_engine(engine, chat, prompts()[:1], prompt_ids[:1], sampling, config)  # warm-up
        results.append(("hf (HFRollout)", run_engine(engine, chat, prompts(), prompt_ids, sampling, config)))
        del model, engine
    if "vllm" in options.engines:
        from sdft_utils.rollout.vllm_colocate import VLLMColocateRollout, VLLMEngineConfig

        engine = VLLMColocateRollout(VLLMEngineConfig(
            model=model_path, dtype=dtype, gpu_memory_utilization=options.gpu_memory_utilization,
            max_model_len=max(map(len, prompt_ids)) + options.max_new_tokens), eos)
        run_engine(engine, chat, prompts()[:1], prompt_ids[:1], sampling, config)  # warm-up
        results.append(("vllm colocate", run_engine(engine, chat, prompts(), prompt_ids, sampling, config)))

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nmodel {options.model}, {device}, {options.prompts} BFCL prompts ({min(map(len, prompt_ids))}-"
          f"{max(map(len, prompt_ids))} tokens, {'native' if chat.native else 'fallback'} tools) x "
          f"{options.num_samples} samples, {options.turns} turns each (<= {options.max_turn_tokens} tokens), "
          f"temperature 1, load {load:.1f}")
    print(f"{'engine':<16}{'rollouts':>9}{'turns':>7}{'calls':>7}{'model tok':>10}{'ctx tok':>9}{'wall s':>8}"
          f"{'turns/s':>9}{'model tok/s':>12}{'loop %':>8}")
    for name, r in results:
        print(f"{name:<16}{r['trajectories']:>9}{r['turns']:>7}{r['calls']:>7}{r['model_tokens']:>10}"
              f"{r['context_tokens']:>9}{r['wall']:>8.2f}{r['turns'] / r['wall']:>9.2f}"
              f"{r['model_tokens'] / r['wall']:>12.1f}{100 * (1 - r['generate'] / r['wall']):>8.1f}")
    side = bfcl_side()
    if side:
        print(f"\n{'BFCL, CPU':<48}{'count':>8}{'seconds':>9}{'per second':>12}")
        for name, count, seconds in side:
            print(f"{name:<48}{count:>8}{seconds:>9.2f}{count / seconds:>12.1f}")


if __name__ == "__main__":
    main()

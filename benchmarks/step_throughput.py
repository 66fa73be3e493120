"""One full training step of our scripts against TRL's trainers: same model, batch, lengths and machine, one run.

A step is what each side does per optimizer step: generate (TRL: HF `generate`; ours: `HFRollout`'s decode loop),
teacher forward, student forward, divergence, backward, optimizer step, EMA teacher update. Ours is `train_sdft.main()` / `train_sdpo.main()` itself,
run in-process with command-line flags (not a re-implementation): its per-step wall time comes from the
`step_seconds` the script writes to metrics.jsonl. TRL's is `trl.experimental.sdft.SDFTTrainer` /
`trl.experimental.sdpo.SDPOTrainer`, timed from `on_step_begin` to `on_step_end` (after its EMA callback). Each
side runs in its own subprocess, so imports, compiled graphs and allocator state never leak from one to the other.

Equal settings: the model folder's generation_config.json sets `min_new_tokens = --completion_length`, so both
sides generate exactly that many tokens per completion from the random model; the same prompts (and SDFT
demonstrations), batch, divergence (SDFT: forward KL, full vocabulary, first 3 tokens skipped, EMA 0.01; SDPO:
JSD alpha 0.5 on the student's top-100 + tail, EMA 0.05, reward = `parity_reward` below), gradient checkpointing,
dtype and seed. TRL keeps its own generation path (HF `generate`, dynamic cache, `disable_compile=True`); ours
uses `--rollout_compile` (auto = static cache + compiled decode on a GPU, its eager dynamic-cache loop on a CPU).

Peak memory: on a GPU `torch.cuda.max_memory_allocated` over the whole run (weights, teacher, optimizer, step); on
a CPU the peak of live tensor bytes (`sdft_utils.testing.LiveTensorBytes`) over a separate 2-step run, because
tracking slows every op.

    python benchmarks/step_throughput.py                  # tiny Llama, SDFT and SDPO, ~3 min on 2 CPU cores
    python benchmarks/step_throughput.py --model qwen2-0.4b --batch 8 --prompt_length 128 --completion_length 256
                                                          # the H200 probe's shape (RESULTS.md), on a GPU (gpu_check.sh runs it)
Needs `pip install -e '.[bench]'` (trl). Without trl only our side runs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MiB = 2**20


def parity_reward(completion: str, row: dict) -> float:
    """The SDPO benchmark's verifier for both sides: about half the random completions succeed, so reprompts with a
    sibling's solution exist in every group (a random model would otherwise never succeed)."""
    return float(len(completion) % 2 == 0)


@dataclass
class Settings:
    method: str  # sdft | sdpo
    side: str  # ours | trl
    model_dir: str
    data_file: str
    output_dir: str
    batch: int  # prompts per step (SDPO: questions per step)
    generations: int  # completions per prompt (1 for SDFT)
    prompt_length: int
    completion_length: int
    steps: int
    dtype: str
    gradient_checkpointing: bool
    rollout_compile: str
    seed: int
    threads: int | None = None  # CPU threads per side (None = torch's default)
    clock: str = "wall"  # wall | cpu (process time)
    track_memory: bool = False


# ---------------------------------------------------------------------------------------------------- inputs


def prepare_inputs(workdir: Path, model: str, completion_length: int, batch: int, prompt_length: int,
                   steps: int, seed: int) -> tuple[str, str, str]:
    """-> (model folder, SDFT jsonl, SDPO jsonl). Prompts/demonstrations are random words of about
    `prompt_length` byte-level tokens; enough rows that no step repeats a prompt."""
    from sdft_utils.testing import save_random_model

    if model in ("tiny", "tiny-49k", "qwen2-0.4b"):
        model_dir = save_random_model(workdir / model, model, min_new_tokens=completion_length, seed=seed)
    else:
        model_dir = Path(model)  # a user folder: lengths are then whatever its EOS gives
    rng = random.Random(seed)

    def text(length: int) -> str:
        words = []
        while sum(len(word) + 1 for word in words) < length:
            words.append("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8))))
        return " ".join(words)[:length]

    rows = batch * (steps + 2)
    sdft_file, sdpo_file = workdir / "sdft.jsonl", workdir / "sdpo.jsonl"
    with sdft_file.open("w") as sdft, sdpo_file.open("w") as sdpo:
        for _ in range(rows):
            prompt = text(prompt_length)
            sdft.write(json.dumps({"prompt": prompt, "demonstration": text(prompt_length)}) + "\n")
            sdpo.write(json.dumps({"prompt": prompt}) + "\n")
    return str(model_dir), str(sdft_file), str(sdpo_file)


def read_rows(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------------- our side


def our_flags(s: Settings) -> list[str]:
    common = ["--model", s.model_dir, "--dataset", s.data_file, "--output_dir", s.output_dir,
              "--max_steps", str(s.steps), "--max_completion_length", str(s.completion_length),
              "--max_prompt_length", str(4 * s.prompt_length + 256), "--dtype", s.dtype,
              "--gradient_checkpointing", str(s.gradient_checkpointing).lower(), "--rollout_compile", s.rollout_compile,
              "--save_steps", "1000000", "--save_total_limit", "1", "--seed", str(s.seed), "--report_to", "none"]
    if s.method == "sdft":
        return common + ["--prompts_per_step", str(s.batch), "--per_device_batch_size", str(s.batch)]
    return common + ["--prompts_per_step", str(s.batch), "--num_generations", str(s.generations),
                     "--per_device_batch_size", str(s.batch * s.generations),
                     "--reward_fn", f"{Path(__file__).resolve()}:parity_reward",
                     "--include_environment_feedback", "false", "--max_reprompt_length", "10240"]


def run_ours(s: Settings) -> dict:
    """Runs the training script's own main(); -> per-step seconds, generation seconds and completion lengths from
    its metrics.jsonl. Checkpoint writing is switched off (TRL's side runs with save_strategy="no")."""
    script = __import__("train_sdft" if s.method == "sdft" else "train_sdpo")
    script.save_checkpoint = lambda *args, **kwargs: Path(s.output_dir)  # the script saves after its last step
    sys.argv = [script.__file__, *our_flags(s)]
    script.main()
    metrics = [json.loads(line) for line in (Path(s.output_dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in metrics if "step_seconds" in row]
    return {"step_seconds": [row["step_seconds"] for row in steps],
            "rollout_seconds": [row["rollout_seconds"] for row in steps],
            "completion_length": [row["completion_length"] for row in steps]}


# ---------------------------------------------------------------------------------------------------- TRL's side


def run_trl(s: Settings) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback

    from sdft_utils.data.prompts import AUTHORS_TEMPLATE

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.seconds: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            _synchronize(torch)
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):  # registered last: after TRL's EMA callback
            _synchronize(torch)
            self.seconds.append(time.perf_counter() - self.start)

    dtype = _dtype(s.dtype)
    rows = read_rows(s.data_file)
    tokenizer = AutoTokenizer.from_pretrained(s.model_dir)
    common = dict(
        output_dir=s.output_dir, max_steps=s.steps, per_device_train_batch_size=s.batch * s.generations,
        gradient_accumulation_steps=1, num_generations=s.generations, max_prompt_length=4 * s.prompt_length + 256,
        max_completion_length=s.completion_length, gradient_checkpointing=s.gradient_checkpointing,
        bf16=dtype == torch.bfloat16, use_cpu=not torch.cuda.is_available(), model_init_kwargs={"dtype": dtype},
        report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, seed=s.seed,
        max_grad_norm=1.0, teacher_model_kind="ema", teacher_sync_steps=1,
    )
    timer = StepTimer()
    if s.method == "sdft":
        from trl.experimental.sdft import SDFTConfig, SDFTTrainer

        # our teacher prompt: the authors' template with TRL's placeholder name
        template = AUTHORS_TEMPLATE.replace("{demonstration}", "{privileged_context}")
        dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": row["prompt"]}],
                                      "privileged_context": row["demonstration"]} for row in rows])
        config = SDFTConfig(**common, learning_rate=2e-5, lr_scheduler_type="cosine", warmup_steps=0.1,
                            weight_decay=0.0, teacher_update_rate=0.01, distillation_mode="full_logits",
                            distillation_alpha=0.0, num_loss_tokens_to_skip=3, teacher_prompt_template=template)
        trainer = SDFTTrainer(model=s.model_dir, args=config, train_dataset=dataset, processing_class=tokenizer,
                              callbacks=[timer])
    else:
        from trl.experimental.sdpo import SDPOConfig, SDPOTrainer

        from sdft_utils.sdpo.reprompt import FEEDBACK_TEMPLATE, REPROMPT_TEMPLATE, SOLUTION_TEMPLATE

        def reward(prompts, completions, completion_ids, **kwargs) -> list[float]:
            return [parity_reward(_text(completion), {}) for completion in completions]

        dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": row["prompt"]}]} for row in rows])
        config = SDPOConfig(**common, learning_rate=1e-5, lr_scheduler_type="constant_with_warmup", warmup_steps=10,
                            weight_decay=0.01, teacher_update_rate=0.05, distillation_mode="topk_logits",
                            distillation_alpha=0.5, distillation_topk=100, distillation_add_tail=True,
                            distillation_weight=1.0, success_reward_threshold=0.5, max_reprompt_len=10240,
                            # the texts the release ran, as ours (TRL's defaults end in extra newlines)
                            reprompt_template=REPROMPT_TEMPLATE, solution_template=SOLUTION_TEMPLATE,
                            feedback_template=FEEDBACK_TEMPLATE)
        trainer = SDPOTrainer(model=s.model_dir, reward_funcs=[reward], args=config, train_dataset=dataset,
                              processing_class=tokenizer, callbacks=[timer])
    generation_seconds = []
    generate = trainer._generate  # time TRL's generation inside its step (HF generate on the training model)

    def timed_generate(*args, **kwargs):
        _synchronize(torch)
        start = time.perf_counter()
        out = generate(*args, **kwargs)
        _synchronize(torch)
        generation_seconds.append(time.perf_counter() - start)
        return out

    trainer._generate = timed_generate
    trainer.train()
    lengths = [row["completions/mean_length"] for row in trainer.state.log_history
               if "completions/mean_length" in row]
    return {"step_seconds": timer.seconds, "rollout_seconds": generation_seconds, "completion_length": lengths}


def _text(completion) -> str:
    return completion if isinstance(completion, str) else completion[-1]["content"]


def _dtype(name: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, name)


def _synchronize(torch) -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------- worker


def worker(s: Settings) -> dict:
    """Run one side in this process; -> step seconds and peak memory (MiB)."""
    import torch

    from sdft_utils.testing import LiveTensorBytes

    if s.threads:
        torch.set_num_threads(s.threads)
    if s.clock == "cpu":
        # both sides time their steps with time.perf_counter (ours in the script, TRL's in StepTimer): make it the
        # process's CPU time, which a busy shared machine does not inflate the way it inflates wall time
        time.perf_counter = time.process_time
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    run = run_ours if s.side == "ours" else run_trl
    if s.track_memory:
        with LiveTensorBytes() as tracker:
            result = run(s)
        peak = tracker.peak
    else:
        result = run(s)
        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    return {**result, "peak_mib": None if peak is None else peak / MiB}


def launch(s: Settings, timeout: float) -> dict:
    """The worker in a fresh interpreter; -> its result, or {"error": ...}."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled",
           "TRL_EXPERIMENTAL_SILENCE": "1"}
    if s.threads:
        env["OMP_NUM_THREADS"] = str(s.threads)
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(asdict(s))]
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"error": f"exit {done.returncode}: {(done.stderr or done.stdout).strip().splitlines()[-1:]}",
            "log": done.stderr[-4000:]}


def summarize(result: dict, warmup: int, sequences_per_step: int) -> dict:
    """Means over the steps after `warmup`; tokens/s from the completion lengths each side logged."""
    seconds = result.get("step_seconds") or []
    timed = slice(warmup, None) if len(seconds) > warmup else slice(None)
    if not seconds:
        return {}
    step = statistics.mean(seconds[timed])
    out = {"step_s": step, "steps_per_s": 1 / step, "first_step_s": seconds[0]}
    rollout = result.get("rollout_seconds") or []
    if len(rollout) == len(seconds):
        out["rollout_s"] = statistics.mean(rollout[timed])
    lengths = result.get("completion_length") or []
    if len(lengths) == len(seconds):
        out["completion_length"] = statistics.mean(lengths[timed])
        out["tokens_per_s"] = sequences_per_step * out["completion_length"] / step
    return out


def compare(options, workdir: Path) -> list[dict]:
    """Run every (method, side) pair; -> one row per pair with time, memory and the ratio to TRL."""
    try:
        import trl  # noqa: F401

        sides = ["ours", "trl"]
    except ImportError:
        print("trl is not installed (pip install -e '.[bench]'): timing our side only")
        sides = ["ours"]
    model_dir, sdft_file, sdpo_file = prepare_inputs(workdir, options.model, options.completion_length,
                                                     options.batch, options.prompt_length, options.steps, options.seed)
    rows = []
    for method in options.methods:
        generations = 1 if method == "sdft" else options.generations
        for side in sides:
            settings = Settings(method=method, side=side, model_dir=model_dir,
                                data_file=sdft_file if method == "sdft" else sdpo_file,
                                output_dir=str(workdir / f"{method}-{side}"), batch=options.batch,
                                generations=generations, prompt_length=options.prompt_length,
                                completion_length=options.completion_length, steps=options.steps,
                                dtype=options.dtype, gradient_checkpointing=options.gradient_checkpointing,
                                rollout_compile=options.rollout_compile, seed=options.seed, threads=options.threads,
                                clock=options.clock)
            start = time.perf_counter()
            result = launch(settings, options.timeout)
            row = {"method": method, "side": side, **summarize(result, options.warmup, options.batch * generations),
                   "peak_mib": result.get("peak_mib"), "error": result.get("error")}
            if options.memory_run and "error" not in result and result.get("peak_mib") is None:
                memory = launch(Settings(**{**asdict(settings), "steps": 2, "track_memory": True,
                                            "output_dir": settings.output_dir + "-memory"}), options.timeout)
                row["peak_mib"] = memory.get("peak_mib")
            print(f"  {method} {side}: {time.perf_counter() - start:.0f} s wall"
                  + (f"  ERROR {row['error']}\n{result.get('log', '')[-1500:]}" if row["error"] else ""), flush=True)
            rows.append(row)
    for row in rows:
        trl_row = next((r for r in rows if r["method"] == row["method"] and r["side"] == "trl"), None)
        if row["side"] == "ours" and trl_row and trl_row.get("step_s") and row.get("step_s"):
            row["speedup"] = trl_row["step_s"] / row["step_s"]
            if row.get("peak_mib") and trl_row.get("peak_mib"):
                row["memory_ratio"] = row["peak_mib"] / trl_row["peak_mib"]
    return rows


def print_table(rows: list[dict]) -> None:
    header = (f"{'method':<6} {'side':<5} {'s/step':>8} {'gen s':>7} {'steps/s':>8} {'gen tok/s':>10} {'length':>7} "
              f"{'1st step s':>10} {'peak MiB':>9} {'ours/TRL speed':>15} {'ours/TRL memory':>16}")
    print(header)
    print("-" * len(header))
    for row in rows:
        if row.get("error"):
            print(f"{row['method']:<6} {row['side']:<5} failed: {row['error']}")
            continue
        print(f"{row['method']:<6} {row['side']:<5} {_cell(row, 'step_s', '.3f', 8)} {_cell(row, 'rollout_s', '.3f', 7)} "
              f"{_cell(row, 'steps_per_s', '.2f', 8)} {_cell(row, 'tokens_per_s', '.0f', 10)} "
              f"{_cell(row, 'completion_length', '.1f', 7)} {_cell(row, 'first_step_s', '.2f', 10)} "
              f"{_cell(row, 'peak_mib', '.1f', 9)} {_cell(row, 'speedup', '.2f', 14)}x "
              f"{_cell(row, 'memory_ratio', '.2f', 15)}x")


def _cell(row: dict, key: str, fmt: str, width: int) -> str:
    value = row.get(key)
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{fmt}}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--methods", nargs="+", choices=["sdft", "sdpo"], default=["sdft", "sdpo"])
    parser.add_argument("--model", default="tiny", help="tiny (2-layer Llama, 259 tokens), tiny-49k (the same with a "
                                                       "49,152-token vocabulary), qwen2-0.4b (random, the shape of "
                                                       "the H200 probe in RESULTS.md) or a model folder")
    parser.add_argument("--batch", type=int, default=4, help="prompts per step (SDPO: questions per step)")
    parser.add_argument("--generations", type=int, default=4, help="SDPO completions per question")
    parser.add_argument("--prompt_length", type=int, default=64, help="characters (= byte-level tokens) per prompt")
    parser.add_argument("--completion_length", type=int, default=64, help="generated tokens per completion (forced)")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per side")
    parser.add_argument("--warmup", type=int, default=1, help="first steps left out of the mean (compilation)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--gradient_checkpointing", type=lambda v: v.lower() in ("1", "true", "yes"), default=True,
                        help="both sides (on by default in both projects)")
    parser.add_argument("--rollout_compile", default="auto", choices=["auto", "on", "off"], help="ours only")
    parser.add_argument("--memory_run", type=lambda v: v.lower() in ("1", "true", "yes"), default=True,
                        help="CPU: a separate tracked 2-step run per side for peak tensor memory")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads per side; default 1 without a GPU: on a shared 2-core machine two OpenMP "
                             "threads wait on each other and make small matmuls ~100x slower")
    parser.add_argument("--clock", choices=["wall", "cpu"], default=None,
                        help="what a step's seconds are: wall time, or the process's CPU time (default without a "
                             "GPU, where other jobs on a shared machine inflate wall time by 2x or more)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per side")
    parser.add_argument("--json", help="also write the rows to this file")
    options = parser.parse_args()
    if options.worker:
        result = worker(Settings(**json.loads(options.worker)))
        print("RESULT " + json.dumps(result), flush=True)
        return

    import torch

    if options.threads is None and not torch.cuda.is_available():
        options.threads = 1
    if options.clock is None:
        options.clock = "wall" if torch.cuda.is_available() else "cpu"

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {options.threads} thread(s) per side"
    print(f"step throughput: model {options.model}, {options.batch} prompts/step (SDPO x {options.generations}), "
          f"prompt ~{options.prompt_length} + {options.completion_length} generated tokens, {options.steps} steps "
          f"(first {options.warmup} not timed), dtype {options.dtype}, gradient checkpointing "
          f"{options.gradient_checkpointing}, {device}, {options.clock} clock, torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory(prefix="step_bench_") as workdir:
        rows = compare(options, Path(workdir))
    print_table(rows)
    if options.json:
        Path(options.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

"""Every GPU check of the project in one short run, for a single-GPU machine (one H100/H200, no network).

Runs, within a time budget (default 450 s, so the whole script stays under 8 minutes), and prints one table at the
end; a check that cannot run prints why instead of stopping the others:
  1. environment: versions, device;
  2. the bf16 matmul ceiling (8192^3, median of several), the denominator of every MFU below;
  3. one SDFT step of `train_sdft.py` and of TRL's `SDFTTrainer`, one SDPO step of `train_sdpo.py` and of TRL's
     `SDPOTrainer`, side by side on a ~0.4B Qwen2-shaped random model in bf16 (`benchmarks/step_throughput.py`):
     generated tokens/s, seconds per step and in generation, peak memory, and model FLOP utilisation of the whole
     step and of its training part (teacher forward + student forward/backward = 2N + 6N FLOPs per token);
  4. the loss alone at 8,192 completion tokens and a 151,936 vocabulary (`benchmarks/loss_memory.py`): peak memory
     and time of ours, the plain full-logits path and TRL's loss function;
  5. a ZeRO-3 single-GPU SDFT step (accelerate + DeepSpeed), only if deepspeed imports;
  6. with megatron.core: one `train_sdft.py --backend megatron --tensor_model_parallel_size 1` step under torchrun
     (GPU only), and a Megatron-core TP=1 forward/backward of the same model shape (GPTModel, local layer spec), which
     checks the library and gives the ceiling it reaches here.

    bash benchmarks/gpu_check.sh            # on the GPU machine: installs benchmarks/wheels/*.whl if present
    python benchmarks/gpu_check.py --smoke  # any machine, CPU is fine: tiny sizes, proves every part executes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))
GiB = 2**30


@dataclass
class Sizes:
    model: str
    batch: int  # prompts per step (SDPO: questions)
    generations: int  # SDPO completions per question
    prompt_length: int
    completion_length: int
    steps: int
    warmup: int
    matmul: int
    loss_tokens: int
    loss_vocab: int
    loss_hidden: int
    megatron_tokens: tuple[int, int]  # (batch, sequence)


# 3 steps, the first (which compiles our decode step: 35-55 s on an H200) left out of the means
FULL = Sizes(model="qwen2-0.4b", batch=8, generations=4, prompt_length=128, completion_length=256, steps=3,
             warmup=1, matmul=8192, loss_tokens=8192, loss_vocab=151_936, loss_hidden=896, megatron_tokens=(8, 512))
SMOKE = Sizes(model="tiny", batch=2, generations=2, prompt_length=16, completion_length=8, steps=2, warmup=1,
              matmul=256, loss_tokens=256, loss_vocab=2000, loss_hidden=32, megatron_tokens=(2, 32))


@dataclass
class Report:
    rows: list[tuple[str, str, str]] = field(default_factory=list)  # (check, value, note)

    def add(self, check: str, value: str, note: str = "") -> None:
        self.rows.append((check, value, note))
        print(f"  {check}: {value}  {note}", flush=True)

    def table(self) -> str:
        width = max(len(check) for check, _, _ in self.rows)
        value_width = max(len(value) for _, value, _ in self.rows)
        lines = [f"{'check':<{width}}  {'value':<{value_width}}  note", "-" * (width + value_width + 40)]
        lines += [f"{check:<{width}}  {value:<{value_width}}  {note}" for check, value, note in self.rows]
        return "\n".join(lines)


class Budget:
    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------- checks


def check_environment(report: Report) -> None:
    import accelerate
    import transformers

    report.add("python / torch", f"{platform.python_version()} / {torch.__version__}",
               f"CUDA {torch.version.cuda}" if torch.cuda.is_available() else "no GPU")
    report.add("transformers / accelerate", f"{transformers.__version__} / {accelerate.__version__}")
    for name, module in (("trl", "trl"), ("deepspeed", "deepspeed"), ("megatron-core", "megatron.core"),
                         ("datasets", "datasets")):
        try:
            imported = __import__(module, fromlist=["__version__"])
            report.add(name, getattr(imported, "__version__", "imported"))
        except Exception as error:  # noqa: BLE001 - any import failure means "not usable here"
            report.add(name, "missing", f"{type(error).__name__}: {str(error)[:80]}")
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        report.add("device", properties.name, f"{properties.total_memory / GiB:.0f} GiB")


def check_matmul_peak(report: Report, size: int) -> float:
    """Median FLOP/s of a size^3 matmul in bf16 on the GPU (float32 on a CPU): the MFU denominator."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        _synchronize()
        start = time.perf_counter()
        a @ b
        _synchronize()
        times.append(time.perf_counter() - start)
    flops = 2 * size**3 / sorted(times)[len(times) // 2]
    report.add(f"matmul peak {size}^3 {str(dtype).removeprefix('torch.')}", f"{flops / 1e12:.3g} TFLOP/s",
               "median of 10")
    return flops


def step_flops(parameters: int, sizes: Sizes, method: str) -> tuple[float, float]:
    """-> (model FLOPs of the whole step, of its training part), from the 2N-forward / 6N-train rule.

    Tokens: generated = sequences x completion; student = sequences x (prompt + completion); teacher = sequences x
    (teacher prompt + completion), with the teacher prompt about twice the prompt (SDFT: prompt + demonstration;
    SDPO: question + a sibling's solution). Chat-template tokens are left out, so the MFU is a slight underestimate.
    """
    sequences = sizes.batch * (1 if method == "sdft" else sizes.generations)
    generated = sequences * sizes.completion_length
    student = sequences * (sizes.prompt_length + sizes.completion_length)
    teacher = sequences * (2 * sizes.prompt_length + sizes.completion_length)
    training = 6 * parameters * student + 2 * parameters * teacher
    return 2 * parameters * generated + training, training


def check_steps(report: Report, sizes: Sizes, peak: float, budget: Budget, workdir: Path) -> None:
    import step_throughput
    from transformers import AutoConfig, AutoModelForCausalLM

    options = SimpleNamespace(methods=["sdft", "sdpo"], model=sizes.model, batch=sizes.batch,
                              generations=sizes.generations, prompt_length=sizes.prompt_length,
                              completion_length=sizes.completion_length, steps=sizes.steps, warmup=sizes.warmup,
                              dtype="auto", gradient_checkpointing=False, rollout_compile="auto",
                              memory_run=not torch.cuda.is_available(), seed=0,
                              threads=None if torch.cuda.is_available() else 1,
                              clock="wall" if torch.cuda.is_available() else "cpu",
                              timeout=max(60.0, budget.left() / 4 - 10))  # 4 runs: SDFT and SDPO, each side
    rows = step_throughput.compare(options, workdir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(workdir / sizes.model))
    parameters = sum(p.numel() for p in model.parameters())
    report.add("step model", f"{sizes.model}", f"{parameters / 1e6:.1f}M parameters, {sizes.batch} prompts, "
               f"{sizes.prompt_length}+{sizes.completion_length} tokens, SDPO x{sizes.generations}, no grad ckpt")
    for row in rows:
        name = f"{row['method']} step, {'ours' if row['side'] == 'ours' else 'TRL'}"
        if row.get("error") or not row.get("step_s"):
            report.add(name, "failed", str(row.get("error"))[:200])
            continue
        total, training = step_flops(parameters, sizes, row["method"])
        train_seconds = row["step_s"] - (row.get("rollout_s") or 0.0)
        train_mfu = f"{training / train_seconds / peak:.1%}" if row.get("rollout_s") is not None and \
            train_seconds > 0 else "-"
        peak_memory = "-" if row.get("peak_mib") is None else f"{row['peak_mib'] / 1024:.2f} GiB"
        rollout = "-" if row.get("rollout_s") is None else f"{row['rollout_s']:.2f}"
        tokens = "-" if row.get("tokens_per_s") is None else f"{row['tokens_per_s']:.0f}"
        report.add(name, f"{tokens} gen tok/s",
                   f"{row['step_s']:.2f} s/step (generate {rollout} s, first step {row['first_step_s']:.1f} s), "
                   f"MFU step {total / row['step_s'] / peak:.2%}, training part {train_mfu}, peak {peak_memory}"
                   + (f", {row['speedup']:.2f}x TRL's speed" if row.get("speedup") else "")
                   + (f", {row['memory_ratio']:.2f}x TRL's memory" if row.get("memory_ratio") else ""))


def check_loss_memory(report: Report, sizes: Sizes) -> None:
    import loss_memory

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    n = sizes.loss_tokens
    inputs = loss_memory.make_inputs(n, sizes.loss_vocab, sizes.loss_hidden, dtype, device)
    runners = {
        "ours (chunked)": lambda inp, h, w: loss_memory.run_chunked(inp, h, w, 512, alpha=0.0, mode="full", top_k=100),
        "plain full logits": lambda inp, h, w: loss_memory.run_plain(inp, h, w, alpha=0.0, mode="full", top_k=100),
    }
    if loss_memory.trl_available():
        runners["TRL loss_utils"] = lambda inp, h, w: loss_memory.run_trl(inp, h, w, alpha=0.0, mode="full", top_k=100)
    else:
        report.add("loss, TRL", "skipped", "trl not importable")
    reference = None
    for name, runner in runners.items():
        try:
            seconds, mib, loss = loss_memory.measure(runner, inputs, device, repeats=2)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            report.add(f"loss {n} tok, {name}", "OOM")
            continue
        reference = loss if reference is None else reference
        difference = (loss.double() - reference.double()).abs().max().item()
        report.add(f"loss {n} tok, {name}", f"{mib / 1024:.2f} GiB peak",
                   f"{seconds * 1e3:.0f} ms fwd+bwd, vocab {sizes.loss_vocab}, hidden {sizes.loss_hidden}, "
                   f"{str(dtype).removeprefix('torch.')} inputs, forward KL; max |loss - ours| {difference:.1e}")


def _last_error_line(text: str) -> str:
    """The line of a failed run's output that says what went wrong (a traceback's last 'Error' line)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    errors = [line for line in lines if ("Error" in line or "error:" in line) and "ChildFailedError" not in line
              and "elastic" not in line]
    return (errors or lines or ["no output"])[-1][:200]


def check_zero3(report: Report, sizes: Sizes, budget: Budget, workdir: Path) -> None:
    try:
        import deepspeed  # noqa: F401
    except Exception as error:  # noqa: BLE001
        report.add("ZeRO-3 1-GPU SDFT step", "skipped", f"deepspeed not importable ({type(error).__name__})")
        return
    import step_throughput

    model_dir = workdir / sizes.model
    data = workdir / "sdft.jsonl"
    if not model_dir.exists() or not data.exists():
        step_throughput.prepare_inputs(workdir, sizes.model, sizes.completion_length, sizes.batch,
                                       sizes.prompt_length, sizes.steps, seed=0)
    output = workdir / "zero3"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--use_deepspeed",
               "--zero_stage", "3", "--mixed_precision", "bf16" if torch.cuda.is_available() else "no",
               str(ROOT / "train_sdft.py"), "--model", str(model_dir), "--dataset", str(data), "--output_dir",
               str(output), "--max_steps", "2", "--prompts_per_step", str(sizes.batch), "--per_device_batch_size",
               str(sizes.batch), "--max_completion_length", str(sizes.completion_length), "--save_steps", "1000000",
               "--gradient_checkpointing", "false"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "1"
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=max(30.0, budget.left() - 60))
    except subprocess.TimeoutExpired:
        report.add("ZeRO-3 1-GPU SDFT step", "timed out")
        return
    metrics_file = output / "metrics.jsonl"
    if done.returncode != 0 or not metrics_file.exists():
        report.add("ZeRO-3 1-GPU SDFT step", "failed", _last_error_line(done.stderr + done.stdout))
        return
    seconds = [json.loads(line)["step_seconds"] for line in metrics_file.read_text().splitlines()]
    report.add("ZeRO-3 1-GPU SDFT step", f"{seconds[-1]:.2f} s/step", f"train_sdft.py under accelerate + "
               f"DeepSpeed ZeRO-3, steps {', '.join(f'{s:.2f}' for s in seconds)} s (HF rollout gathers the "
               "parameters every forward)")


def check_megatron_sdft_step(report: Report, sizes: Sizes, budget: Budget, workdir: Path) -> None:
    """One `train_sdft.py --backend megatron --tensor_model_parallel_size 1` step under torchrun (GPU only: on a CPU
    megatron-core needs the test shims, and tests/megatron/test_train_megatron.py runs this path there)."""
    name = "Megatron TP=1 SDFT step"
    if not torch.cuda.is_available():
        report.add(name, "skipped", "needs CUDA (CPU: tests/megatron/test_train_megatron.py runs it with the shims)")
        return
    import step_throughput

    model_dir, data = workdir / sizes.model, workdir / "sdft.jsonl"
    if not model_dir.exists() or not data.exists():
        step_throughput.prepare_inputs(workdir, sizes.model, sizes.completion_length, sizes.batch,
                                       sizes.prompt_length, sizes.steps, seed=0)
    output = workdir / "megatron"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", str(ROOT / "train_sdft.py"),
               "--backend", "megatron", "--tensor_model_parallel_size", "1", "--model", str(model_dir), "--dataset",
               str(data), "--output_dir", str(output), "--max_steps", "2", "--prompts_per_step", str(sizes.batch),
               "--per_device_batch_size", str(sizes.batch), "--max_completion_length", str(sizes.completion_length),
               "--save_steps", "1000000"]
    try:
        done = subprocess.run(command, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True,
                              text=True, timeout=max(30.0, budget.left() - 20))
    except subprocess.TimeoutExpired:
        report.add(name, "timed out")
        return
    metrics_file = output / "metrics.jsonl"
    if done.returncode != 0 or not metrics_file.exists():
        report.add(name, "failed", _last_error_line(done.stderr + done.stdout))
        return
    seconds = [json.loads(line)["step_seconds"] for line in metrics_file.read_text().splitlines()
               if "step_seconds" in line]
    report.add(name, f"{seconds[-1]:.2f} s/step", "train_sdft.py --backend megatron under torchrun, steps "
               f"{', '.join(f'{s:.2f}' for s in seconds)} s (HF rollout from a gathered copy)")


def check_megatron(report: Report, sizes: Sizes, peak: float, budget: Budget, workdir: Path) -> None:
    try:
        import megatron.core  # noqa: F401
    except Exception as error:  # noqa: BLE001
        report.add("Megatron TP=1 step", "skipped", f"megatron.core not importable ({type(error).__name__})")
        return
    check_megatron_sdft_step(report, sizes, budget, workdir)
    command = [sys.executable, str(Path(__file__).resolve()), "--megatron_worker",
               json.dumps({"model": sizes.model, "batch": sizes.megatron_tokens[0],
                           "sequence": sizes.megatron_tokens[1], "peak": peak})]
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=max(30.0, budget.left() - 20))
    except subprocess.TimeoutExpired:
        report.add("Megatron TP=1 step", "timed out")
        return
    line = next((line for line in done.stdout.splitlines() if line.startswith("RESULT ")), None)
    if line is None:
        report.add("Megatron TP=1 step", "failed", _last_error_line(done.stderr + done.stdout))
        return
    result = json.loads(line[len("RESULT "):])
    report.add("Megatron TP=1 step", f"{result['seconds'] * 1e3:.0f} ms fwd+bwd",
               f"GPTModel (local spec) {result['parameters'] / 1e6:.0f}M, {sizes.megatron_tokens[0]}x"
               f"{sizes.megatron_tokens[1]} tokens, MFU {result['mfu']:.1%}, chunked divergence on its output")


def megatron_worker(spec: dict) -> None:
    """A TP=1 megatron-core GPTModel of the step model's shape: forward, our chunked divergence against a detached
    second forward (as a self-distillation teacher would give), backward. Prints RESULT {json}."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig

    from sdft_utils.losses.divergence import chunked_token_divergence
    from sdft_utils.testing import QWEN2_0P4B

    cuda = torch.cuda.is_available()
    if not cuda:  # --smoke on a CPU: megatron-core calls CUDA in two places (tests/megatron_cpu.py)
        from megatron.core.tensor_parallel import random as megatron_random

        torch.cuda.current_device = lambda: torch.device("cpu")
        megatron_random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    if cuda:
        model_parallel_cuda_manual_seed(0)
    shape = QWEN2_0P4B if spec["model"] == "qwen2-0.4b" else dict(
        vocab_size=259, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1)
    config = TransformerConfig(
        num_layers=shape["num_hidden_layers"], hidden_size=shape["hidden_size"],
        num_attention_heads=shape["num_attention_heads"], num_query_groups=shape["num_key_value_heads"],
        ffn_hidden_size=shape["intermediate_size"], normalization="RMSNorm", gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, add_bias_linear=False, bf16=cuda, params_dtype=torch.bfloat16
        if cuda else torch.float32, use_cpu_initialization=not cuda, hidden_dropout=0.0, attention_dropout=0.0,
        # the fused kernels need apex / Transformer Engine, which the GPU machine does not have
        gradient_accumulation_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False,
        masked_softmax_fusion=False)
    batch, sequence = spec["batch"], spec["sequence"]
    model = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(),
                     vocab_size=shape["vocab_size"], max_sequence_length=sequence, position_embedding_type="rope",
                     share_embeddings_and_output_weights=True)
    device = torch.device("cuda" if cuda else "cpu")
    model.to(device)
    parameters = sum(p.numel() for p in model.parameters())
    ids = torch.randint(3, shape["vocab_size"], (batch, sequence), device=device)
    positions = torch.arange(sequence, device=device).expand(batch, -1)
    causal = torch.ones(sequence, sequence, dtype=torch.bool, device=device).triu(1)[None, None]  # True = hidden
    hidden = {}
    model.decoder.register_forward_hook(lambda module, args, output: hidden.__setitem__("h", output))

    def step() -> None:
        with torch.no_grad():
            model(ids, positions, causal)
            teacher_hidden = hidden["h"].detach()
        model(ids, positions, causal)
        student_hidden = hidden["h"]  # (sequence, batch, hidden)
        weight = model.shared_embedding_or_output_weight()
        divergence = chunked_token_divergence(student_hidden.flatten(0, 1), weight, teacher_hidden.flatten(0, 1),
                                              weight, ids.T.flatten(), chunk_size=1024)
        divergence.loss.mean().backward()

    step()
    _synchronize()
    start = time.perf_counter()
    repeats = 3
    for _ in range(repeats):
        step()
    _synchronize()
    seconds = (time.perf_counter() - start) / repeats
    flops = 8 * parameters * batch * sequence  # teacher forward 2N + student forward/backward 6N per token
    print("RESULT " + json.dumps({"seconds": seconds, "parameters": parameters, "mfu": flops / seconds / spec["peak"]}),
          flush=True)
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; runs anywhere (CPU) in about a minute")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for all checks together")
    parser.add_argument("--skip", nargs="*", default=[], choices=["steps", "loss", "zero3", "megatron"])
    parser.add_argument("--megatron_worker", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.megatron_worker:
        megatron_worker(json.loads(options.megatron_worker))
        return
    sizes = SMOKE if options.smoke else FULL
    if not options.smoke and not torch.cuda.is_available():
        print("no GPU found: running the --smoke sizes instead")
        sizes = SMOKE
    budget = Budget(options.budget)
    report = Report()
    started = time.monotonic()
    print(f"gpu_check: {'smoke' if sizes is SMOKE else 'full'} sizes, budget {options.budget:.0f} s", flush=True)
    check_environment(report)
    peak = check_matmul_peak(report, sizes.matmul)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as workdir:
        checks = [("steps", lambda: check_steps(report, sizes, peak, budget, Path(workdir))),
                  ("loss", lambda: check_loss_memory(report, sizes)),
                  ("zero3", lambda: check_zero3(report, sizes, budget, Path(workdir))),
                  ("megatron", lambda: check_megatron(report, sizes, peak, budget, Path(workdir)))]
        for name, check in checks:
            if name in options.skip:
                report.add(name, "skipped", "--skip")
            elif budget.left() < 20:
                report.add(name, "skipped", "out of time budget")
            else:
                try:
                    check()
                except Exception as error:  # noqa: BLE001 - report and go on with the other checks
                    report.add(name, "failed", f"{type(error).__name__}: {str(error)[:200]}")
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
    print(f"\n==== gpu_check summary ({time.monotonic() - started:.0f} s) ====")
    print(report.table())


if __name__ == "__main__":
    main()

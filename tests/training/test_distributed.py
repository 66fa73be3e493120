"""Both scripts under two real gloo processes for every accelerate config, against one process.

`accelerate launch --config_file accelerate_configs/X.yaml --num_processes 2` runs the same code users run on GPUs
(DDP, DeepSpeed ZeRO-2/3, FSDP2). With the same global batch, losses, trained weights and the EMA teacher must match
a single-process run, across a checkpoint and resume, and a run killed with SIGKILL must resume exactly. The first DeepSpeed start compiles a
communication op (about 50 s, cached afterwards).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdft_utils.testing import run_training_script

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ["multi_gpu", "zero2", "zero3", "fsdp2"]
STEPS = 6  # the reference length; the killed run needs steps left to kill


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_command(script: str, config: str, *args) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "accelerate_configs" /
            f"{config}.yaml"), "--num_processes", "2", "--mixed_precision", "no", "--main_process_port",
            str(free_port()), str(ROOT / script), *map(str, args)]


def launch_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def launch(script: str, config: str, *args) -> None:
    result = subprocess.run(launch_command(script, config, *args), cwd=ROOT, env=launch_env(), capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"


def sdft_flags(model_dir: Path, data_dir: Path) -> list:
    rows = [{"prompt": f"What is the code word number {i}?", "demonstration": f"The code word is w{i}x."}
            for i in range(8)]
    data = data_dir / "sdft.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return ["--model", model_dir, "--dataset", data, "--prompts_per_step", 4, "--per_device_batch_size", 1,
            "--max_completion_length", 8, "--max_prompt_length", 48, "--learning_rate", 1e-3, "--teacher_update_rate", 0.1,
            "--gradient_checkpointing", "true", "--lr_scheduler", "constant_with_warmup", "--warmup_ratio", 0.0,
            "--num_loss_tokens_to_skip", 1, "--save_steps", 1, "--save_total_limit", "none"]


def sdpo_flags(model_dir: Path, data_dir: Path) -> list:
    rows = [{"prompt": f"What is {a} + 1?", "answer": str(a + 1)} for a in range(6)]
    data = data_dir / "sdpo.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    # two mini-batches and the GRPO hybrid: the data split and both loss terms are exercised
    return ["--model", model_dir, "--dataset", data, "--prompts_per_step", 4, "--num_generations", 2,
            "--per_device_batch_size", 2, "--max_completion_length", 8, "--top_k", 5, "--mini_batches", 2,
            "--grpo_lambda", 0.5, "--gradient_checkpointing", "false", "--learning_rate", 1e-3,
            "--lr_scheduler", "constant_with_warmup", "--warmup_steps", 0, "--save_steps", 1,
            "--save_total_limit", "none"]


FLAGS = {"train_sdft.py": sdft_flags, "train_sdpo.py": sdpo_flags}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_model_dir):
    return tmp_path_factory.mktemp("distributed"), tiny_model_dir


@pytest.fixture(scope="module")
def references(workdir):
    """One process, STEPS steps, a checkpoint every step: what every launch config must reproduce."""
    root, model_dir = workdir
    runs = {}
    for script, flags in FLAGS.items():
        out = root / f"reference_{script}"
        run_training_script(script, *flags(model_dir, root), "--max_steps", STEPS, "--output_dir", out)
        runs[script] = out
    return runs


def train_losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def model_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    weights = {}
    for file in sorted(checkpoint.glob("*.safetensors")):
        weights.update(load_file(file))
    return weights


def teacher_weights(checkpoint: Path, config: str, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The full teacher from the per-process files: ZeRO-3 keeps flat padded partitions, FSDP2 row shards."""
    files = sorted((checkpoint / "teacher").glob("rank*.pt"))
    parts = [torch.load(file, weights_only=True) for file in files]
    if len(parts) == 1:
        return parts[0]
    full = {}
    for name, reference in like.items():
        pieces = [part[name] for part in parts]
        if config == "zero3":
            full[name] = torch.cat([piece.flatten() for piece in pieces])[:reference.numel()].view(reference.shape)
        else:
            full[name] = torch.cat(pieces, dim=0)
    return full


def assert_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert actual.keys() == expected.keys(), what
    for name, value in expected.items():
        torch.testing.assert_close(actual[name].float(), value.float(), atol=2e-5, rtol=1e-4,
                                   msg=lambda message, name=name: f"{what} {name}: {message}")


CASES = [(script, config) for script in ("train_sdft.py", "train_sdpo.py") for config in CONFIGS]


@pytest.mark.parametrize("script,config", CASES)
def test_two_processes_match_one_process_and_resume(workdir, references, script, config):
    """Step 1 in one launch, step 2 resumed from its checkpoint in a second: both equal the one-process run."""
    root, model_dir = workdir
    out = root / f"{config}_{script}"
    launch(script, config, *FLAGS[script](model_dir, root), "--max_steps", 1, "--output_dir", out)
    launch(script, config, *FLAGS[script](model_dir, root), "--max_steps", 2, "--output_dir", out,
           "--resume_from_checkpoint", "latest")

    reference = references[script]
    expected_losses = train_losses(reference)
    losses = train_losses(out)
    assert list(losses) == [1, 2]
    for step, loss in losses.items():
        assert loss == pytest.approx(expected_losses[step], rel=1e-4, abs=1e-7), f"step {step}"
    expected_model = model_weights(reference / "checkpoint-2")
    assert_close(model_weights(out / "checkpoint-2"), expected_model, "student")
    assert not all(torch.equal(expected_model[n], model_weights(reference / "checkpoint-1")[n]) for n in expected_model)

    expected_teacher = torch.load(reference / "checkpoint-2" / "teacher" / "rank0.pt", weights_only=True)
    teacher_files = sorted((out / "checkpoint-2" / "teacher").glob("rank*.pt"))
    sharded = config in ("zero3", "fsdp2")
    assert len(teacher_files) == (2 if sharded else 1)
    if sharded:  # each process saved only its half of the teacher
        held = sum(t.numel() for t in torch.load(teacher_files[0], weights_only=True).values())
        assert held < 0.6 * sum(t.numel() for t in expected_teacher.values())
    assert_close(teacher_weights(out / "checkpoint-2", config, expected_teacher), expected_teacher, "teacher")


def test_killed_run_resumes_exactly(workdir, references):
    """SIGKILL a 2-process ZeRO-3 run after its first checkpoint, resume from `latest`, compare with one process."""
    root, model_dir = workdir
    out = root / "killed_zero3"
    flags = [*sdft_flags(model_dir, root), "--max_steps", STEPS, "--output_dir", out]
    process = subprocess.Popen(launch_command("train_sdft.py", "zero3", *flags), cwd=ROOT, env=launch_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while not (out / "checkpoint-1" / "progress.json").exists():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)  # mid-step or mid-save, wherever it is
    process.wait()
    assert not (out / f"checkpoint-{STEPS}").exists(), "the run finished before it was killed"

    launch("train_sdft.py", "zero3", *flags, "--resume_from_checkpoint", "latest")
    reference = references["train_sdft.py"]
    expected_losses = train_losses(reference)
    losses = train_losses(out)
    assert sorted(losses) == list(range(1, STEPS + 1))  # no step logged twice, none missing
    for step, loss in losses.items():
        assert loss == pytest.approx(expected_losses[step], rel=1e-4, abs=1e-7), f"step {step}"
    final = f"checkpoint-{STEPS}"
    assert_close(model_weights(out / final), model_weights(reference / final), "student")
    expected_teacher = torch.load(reference / final / "teacher" / "rank0.pt", weights_only=True)
    assert_close(teacher_weights(out / final, "zero3", expected_teacher), expected_teacher, "teacher")


def test_two_processes_skip_nonfinite_steps_together_and_stop_without_saving(tmp_path, tiny_model_dir):
    """One process's NaN is every process's NaN: the gradient all-reduce spreads it, and the skip decision is
    reduced too, so both skip the same steps and stop together (exit 1, no checkpoint)."""
    import shutil

    from tests.training.test_run import poison_head

    model_dir = tmp_path / "nan_model"
    shutil.copytree(tiny_model_dir, model_dir)
    poison_head(model_dir)
    out = tmp_path / "out"
    result = subprocess.run(launch_command("train_sdft.py", "multi_gpu", *sdft_flags(model_dir, tmp_path),
                                           "--output_dir", out, "--max_steps", 5, "--max_nonfinite_steps", 2, "--save_steps", 100),
                            cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode != 0 and result.stderr.count("2 steps in a row had a non-finite loss") == 2
    assert 'train_sdft.py", line' not in result.stderr  # each process stops with a message, not a traceback
    assert not list(out.glob("checkpoint-*"))
    assert [json.loads(line)["nonfinite_steps"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]

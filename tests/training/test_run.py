"""The shared run set-up: non-finite steps never train silently, the default GPU precision keeps a float32 EMA teacher
that moves, a user's model never trains on the toy recipe, and the accelerate path never touches Megatron."""

import ast
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdft_utils.errors import UserInputError
from sdft_utils.testing import run_training_script
from sdft_utils.training.backend import accumulation_steps, resolve_precision
from sdft_utils.training.config import RunArgs, require_dataset, runs_embedded_default
from tests.scripts.test_train_sdft import common_flags, read_metrics, write_dataset

ROOT = Path(__file__).resolve().parents[2]


def poison_head(model_dir: Path) -> None:
    """One NaN in the output head: every loss from then on is NaN."""
    path = model_dir / "model.safetensors"
    weights = load_file(path)
    weights["lm_head.weight"][0, 0] = float("nan")
    save_file(weights, path, metadata={"format": "pt"})


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run_without_saving(tmp_path, tiny_model_dir):
    model_dir = tmp_path / "nan_model"
    shutil.copytree(tiny_model_dir, model_dir)
    poison_head(model_dir)
    out = tmp_path / "out"
    flags = common_flags(model_dir, write_dataset(tmp_path / "d.jsonl"), out)
    result = run_training_script("train_sdft.py", *flags, "--max_steps", 5, "--max_nonfinite_steps", 3, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "3 steps in a row had a non-finite loss" in result.stderr
    assert "no checkpoint was written by this run" in result.stderr
    assert (result.stdout + result.stderr).count("step skipped") == 3
    assert [m["nonfinite_steps"] for m in read_metrics(out)] == [1, 2]  # the third stopped the run
    assert not list(out.glob("checkpoint-*"))
    # a save that falls due while the weights are not finite is refused, never written
    result = run_training_script("train_sdft.py", *flags, "--max_steps", 2, "--max_nonfinite_steps", 10,
                                 check=False)
    assert result.returncode == 1 and "non-finite weights; not saving them" in result.stderr
    assert not list(out.glob("checkpoint-*"))


def test_a_run_that_goes_nonfinite_names_the_last_good_checkpoint(tmp_path, tiny_model_dir):
    dataset = write_dataset(tmp_path / "d.jsonl")
    out = tmp_path / "out"
    flags = common_flags(tiny_model_dir, dataset, out)
    run_training_script("train_sdft.py", *flags, "--max_steps", 1, "--save_steps", 1)
    good = out / "checkpoint-1"
    # the resumed weights (accelerate's trainer state) turn non-finite from step 2 on
    poison = good / "trainer_state" / "model.safetensors"
    weights = load_file(poison)
    weights["lm_head.weight"][0, 0] = float("nan")
    save_file(weights, poison, metadata={"format": "pt"})
    result = run_training_script("train_sdft.py", *flags, "--max_steps", 6, "--max_nonfinite_steps", 2,
                                 "--resume_from_checkpoint", "latest", check=False)
    assert result.returncode == 1 and f"the last good checkpoint is {good}" in result.stderr
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]  # no step saved NaN weights
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2]  # it stopped inside step 3, at the second skip in a row
    assert metrics[1]["loss"] is None and metrics[1]["nonfinite_steps"] == 1  # NaN is written as null
    lines = [line for line in (result.stdout + result.stderr).splitlines() if "step skipped" in line]
    assert len(lines) == 2


def test_default_gpu_precision_keeps_a_float32_teacher_that_moves_by_the_ema_rule(tmp_path, tiny_model_dir):
    """`--dtype mixed` (auto on a GPU): float32 weights and teacher, bf16 autocast compute (here on a CPU)."""
    out = tmp_path / "out"
    rate = 0.02
    flags = [*common_flags(tiny_model_dir, write_dataset(tmp_path / "d.jsonl"), out), "--teacher_update_rate", rate]
    run_training_script("train_sdft.py", *flags, "--dtype", "mixed", "--max_steps", 2, "--save_steps", 1)
    teacher_1 = torch.load(out / "checkpoint-1" / "teacher" / "rank0.pt", weights_only=True)
    teacher_2 = torch.load(out / "checkpoint-2" / "teacher" / "rank0.pt", weights_only=True)
    student_2 = load_file(out / "checkpoint-2" / "model.safetensors")
    moved = 0
    for name, value in teacher_2.items():
        assert value.dtype == torch.float32 and student_2[name].dtype == torch.float32, name
        expected = (1 - rate) * teacher_1[name].double() + rate * student_2[name].double()
        torch.testing.assert_close(value.double(), expected, rtol=0, atol=1e-6, msg=name)
        moved += int((value != teacher_1[name]).sum())
    total = sum(value.numel() for value in teacher_2.values())
    assert moved > 0.5 * total  # most weights move: the increments are far above float32 resolution


def test_pure_bf16_ema_barely_moves_the_teacher_which_is_why_mixed_is_the_default():
    torch.manual_seed(0)
    teacher = torch.randn(10_000)
    student = teacher * 1.01  # a 1% drift
    moved_fp32 = ((teacher + 0.01 * (student - teacher)) != teacher).float().mean()
    bf16 = teacher.bfloat16()
    moved_bf16 = (torch.lerp(bf16, student.bfloat16(), 0.01) != bf16).float().mean()
    assert moved_fp32 > 0.99 and moved_bf16 < 0.05


def test_precision_names():
    assert resolve_precision("auto", on_gpu=True).name == "mixed"
    assert resolve_precision("auto", on_gpu=False).parameters == torch.float32
    mixed = resolve_precision("mixed", on_gpu=False)
    assert (mixed.parameters, mixed.compute, mixed.teacher_dtype(False)) == (torch.float32, torch.bfloat16,
                                                                            torch.float32)
    assert resolve_precision("bfloat16").teacher_dtype(True) == torch.float32


def test_a_model_without_data_is_refused_while_run_length_flags_keep_the_embedded_default(tmp_path):
    assert runs_embedded_default([]) and runs_embedded_default(["--max_steps", "2", "--output_dir", "x"])
    assert not runs_embedded_default(["--model", "Qwen/Qwen2.5-7B-Instruct"])
    assert not runs_embedded_default(["--model=org/m"]) and not runs_embedded_default(["--config", "r.yaml"])
    with pytest.raises(UserInputError, match="no training data"):
        require_dataset(RunArgs(model="org/m"))
    for script in ("train_sdft.py", "train_sdpo.py"):
        result = run_training_script(script, "--model", tmp_path / "my-7b", "--max_steps", 1, check=False)
        assert result.returncode == 2 and "no training data: pass --dataset" in result.stderr, script
        assert "Traceback" not in result.stderr and "my-7b" not in result.stderr  # nothing was loaded


def test_a_step_that_does_not_split_evenly_says_which_flags():
    with pytest.raises(UserInputError, match="--prompts_per_step 6 must split evenly over 4 processes"):
        accumulation_steps(RunArgs(prompts_per_step=6), world=4, mini_batches=1)
    assert accumulation_steps(RunArgs(prompts_per_step=8, num_generations=2, per_device_batch_size=2), 2, 2) == 2


def test_nothing_on_the_accelerate_path_imports_megatron():
    chooser = ROOT / "sdft_utils" / "training" / "backend.py"
    offenders = []
    for path in [*(ROOT / "sdft_utils").rglob("*.py"), ROOT / "train_sdft.py", ROOT / "train_sdpo.py"]:
        if "megatron" in path.relative_to(ROOT).parts[:-1] or path == chooser:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            module = node.module if isinstance(node, ast.ImportFrom) else \
                " ".join(alias.name for alias in node.names) if isinstance(node, ast.Import) else ""
            if "megatron" in (module or ""):
                offenders.append(f"{path.relative_to(ROOT)}: {module}")
    assert not offenders
    # and running the accelerate path loads none of it
    code = ("import sys, train_sdft, train_sdpo; from sdft_utils.training.backend import make_backend; "
            "from sdft_utils.training import run; "
            "print(sorted(m for m in sys.modules if m.startswith(('sdft_utils.megatron', 'megatron'))))")
    import subprocess

    printed = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert printed.stdout.strip() == "[]"


def test_the_scripts_hold_no_backend_branches_and_share_no_code():
    for script in ("train_sdft.py", "train_sdpo.py"):
        tree = ast.parse((ROOT / script).read_text())
        code = ast.unparse([node for node in tree.body if not isinstance(node, ast.Expr)])  # without the docstring
        assert "megatron" not in code.lower() and "accelerate_backend" not in code, script


def test_progress_of_a_checkpoint_records_the_nonfinite_counters(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    run_training_script("train_sdft.py", *common_flags(tiny_model_dir, write_dataset(tmp_path / "d.jsonl"), out),
                        "--max_steps", 1)
    progress = json.loads((out / "checkpoint-1" / "progress.json").read_text())
    assert progress["nonfinite_in_a_row"] == 0 and progress["nonfinite_steps"] == 0
    assert read_metrics(out)[0]["nonfinite_steps"] == 0


def test_overlong_prompts_are_dropped_before_training_or_kept_for_truncation(tokenizer):
    from sdft_utils.training.run import rows_that_fit

    prompts = [[{"role": "user", "content": "x" * length}] for length in (5, 200, 10, 300)]
    drop = RunArgs(max_prompt_length=64, overlong_prompts="drop")
    assert rows_that_fit(drop, tokenizer, None, prompts, None) == [0, 2]  # byte-level: ~1 token per character
    assert rows_that_fit(RunArgs(max_prompt_length=64), tokenizer, None, prompts, None) == [0, 1, 2, 3]
    with pytest.raises(UserInputError, match="every one of the 2 training prompts is longer"):
        rows_that_fit(drop, tokenizer, None, prompts[1::2], None)

"""End to end: `train_sdft.py` on a tiny random Llama with an offline tokenizer, as a user runs it."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdft_utils.testing import run_training_script

ROOT = Path(__file__).resolve().parents[2]
EMA_RATE = 0.1


def run_script(*args, check=True):
    return run_training_script("train_sdft.py", *args, check=check)


def write_dataset(path: Path) -> Path:
    rows = [{"prompt": f"What is the code word number {i}?", "demonstration": f"The code word is w{i}x."}
            for i in range(8)]
    rows.append({"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name?"}],
                 "demonstration": ["Thought: easy.", "Answer: Zed."]})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def common_flags(model_dir, dataset, output_dir):
    return ["--model", model_dir, "--dataset", dataset, "--output_dir", output_dir, "--prompts_per_step", 4,
            "--per_device_batch_size", 2, "--max_completion_length", 12, "--max_prompt_length", 48,
            "--learning_rate", 1e-3, "--teacher_update_rate", EMA_RATE, "--gradient_checkpointing", "false",
            "--warmup_ratio", 0.0, "--num_loss_tokens_to_skip", 1]


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def four_step_run(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("sdft_run")
    dataset = write_dataset(root / "train.jsonl")
    output_dir = root / "out"
    result = run_script(*common_flags(tiny_model_dir, dataset, output_dir), "--max_steps", 4, "--save_steps", 1,
                        "--save_total_limit", "none")
    return root, dataset, output_dir, result, tiny_model_dir


def test_losses_are_finite_and_every_step_is_logged(four_step_run):
    _, _, output_dir, result, _ = four_step_run
    metrics = read_metrics(output_dir)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    for m in metrics:
        assert math.isfinite(m["loss"]) and m["loss"] >= 0 and m["kl"] >= 0
        assert m["is_ratio_mean"] == 1.0  # HF rollouts come from the training weights: no correction
        assert m["completion_length"] > 0 and m["learning_rate"] > 0 and m["grad_norm"] > 0
    assert "outputs: model" in result.stdout
    # --max_prompt_length 48 bytes cuts the teacher prompts: counted, and said once
    assert all(m["truncated_prompts"] >= 4 for m in metrics) and result.stdout.count("cut from the left") == 1


def test_checkpoints_reload_as_models(four_step_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, _, output_dir, _, _ = four_step_run
    path = output_dir / "checkpoint-4"
    model = AutoModelForCausalLM.from_pretrained(path)
    assert AutoTokenizer.from_pretrained(path).chat_template
    initial = AutoModelForCausalLM.from_pretrained(output_dir / "checkpoint-1")
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), initial.parameters(), strict=True))


def test_teacher_moves_by_exactly_the_ema_rule(four_step_run):
    _, _, output_dir, _, _ = four_step_run

    def teacher_at(step):  # one process: the whole teacher in rank0.pt
        return torch.load(output_dir / f"checkpoint-{step}" / "teacher" / "rank0.pt", weights_only=True)

    student_4 = load_file(output_dir / "checkpoint-4" / "model.safetensors")
    teacher_3, teacher_4 = teacher_at(3), teacher_at(4)
    moved = 0
    for name, value in teacher_4.items():
        expected = (1 - EMA_RATE) * teacher_3[name].double() + EMA_RATE * student_4[name].double()
        torch.testing.assert_close(value.double(), expected, rtol=0, atol=1e-6, msg=name)
        moved += not torch.equal(value, teacher_3[name])
    assert moved > 0


def test_resume_reproduces_the_uninterrupted_run(four_step_run):
    root, dataset, output_dir, _, model_dir = four_step_run
    resumed_dir = root / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(output_dir / "checkpoint-2", resumed_dir / "checkpoint-2")
    shutil.copy(output_dir / "metrics.jsonl", resumed_dir / "metrics.jsonl")  # as the crashed run left it
    result = run_script(*common_flags(model_dir, dataset, resumed_dir), "--max_steps", 4, "--save_steps", 1,
                        "--save_total_limit", "none", "--resume_from_checkpoint", "latest")
    assert "resumed from" in result.stdout
    uninterrupted = read_metrics(output_dir)
    resumed = read_metrics(resumed_dir)
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]  # steps 3-4 of the crashed run were dropped and redone
    for a, b in zip(uninterrupted[2:], resumed[2:], strict=True):
        assert a["completion_length"] == b["completion_length"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)
    final_a = load_file(output_dir / "checkpoint-4" / "model.safetensors")
    final_b = load_file(resumed_dir / "checkpoint-4" / "model.safetensors")
    for name in final_a:
        torch.testing.assert_close(final_a[name], final_b[name], rtol=1e-5, atol=1e-6)


def test_bad_data_exits_2_before_loading_any_model(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "", "demonstration": "x"}) + "\n")
    result = run_script("--model", tmp_path / "does-not-exist", "--dataset", bad, "--output_dir", tmp_path / "o",
                        check=False)
    assert result.returncode == 2
    assert "bad.jsonl" in result.stderr and "prompt" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_flag_combination_is_reported_before_loading(tmp_path):
    dataset = write_dataset(tmp_path / "train.jsonl")
    result = run_script("--model", tmp_path / "missing", "--dataset", dataset, "--divergence_mode", "sampled",
                        "--loss_grad_memory_mib", -1, check=False)
    assert result.returncode == 2 and "--alpha 1" in result.stderr and "Traceback" not in result.stderr
    assert "--loss_grad_memory_mib must be >= 0" in result.stderr


def write_letter_eval(path: Path) -> Path:
    """Held-out rows whose answer is one common letter: a tiny random model's accuracy moves as it trains."""
    rows = [{"prompt": f"Say something {i}.", "answers": [letter]} for i, letter in enumerate("aeiou tn")]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.slow
def test_eval_every_keeps_the_best_checkpoint_and_a_resume_remembers_it(tmp_path, tiny_model_dir):
    dataset, heldout = write_dataset(tmp_path / "train.jsonl"), write_letter_eval(tmp_path / "heldout.jsonl")
    flags = [*common_flags(tiny_model_dir, dataset, tmp_path / "out"), "--save_steps", 2, "--save_total_limit", 1,
             "--eval_datasets", heldout, "--eval_every", 1, "--eval_max_new_tokens", 16, "--learning_rate", 1e-2]
    result = run_script(*flags, "--max_steps", 4)
    out = tmp_path / "out"
    metrics = read_metrics(out)
    accuracy = {m["step"]: m["eval/heldout_accuracy"] for m in metrics if "eval/heldout_accuracy" in m}
    assert sorted(accuracy) == [0, 1, 2, 3, 4]  # before training, then every step
    best_value = max(accuracy[step] for step in (1, 2, 3, 4))
    best_step = min(step for step in (1, 2, 3, 4) if accuracy[step] == best_value)
    best = json.loads((out / "best.json").read_text())
    assert best == {"metric": "eval/heldout_accuracy", "value": best_value, "step": best_step,
                    "checkpoint": f"checkpoint-{best_step}"}
    assert (out / "best").resolve() == (out / f"checkpoint-{best_step}").resolve()
    # --save_total_limit 1 keeps the newest checkpoint, and the best one too
    assert {p.name for p in out.glob("checkpoint-*")} == {"checkpoint-4", f"checkpoint-{best_step}"}
    assert json.loads((out / "checkpoint-4" / "progress.json").read_text())["best"]["step"] == best_step
    assert f"best: checkpoint-{best_step}" in result.stdout
    assert (out / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # resumed for two more steps: the best so far comes from checkpoint-4's progress.json, not from scratch
    result = run_script(*flags, "--max_steps", 6, "--resume_from_checkpoint", "latest")
    assert "resumed from" in result.stdout
    accuracy = {m["step"]: m["eval/heldout_accuracy"] for m in read_metrics(out) if "eval/heldout_accuracy" in m}
    assert sorted(accuracy) == [0, 1, 2, 3, 4, 5, 6]
    best_value = max(accuracy[step] for step in range(1, 7))
    best_step = min(step for step in range(1, 7) if accuracy[step] == best_value)
    assert json.loads((out / "best.json").read_text())["step"] == best_step
    assert {p.name for p in out.glob("checkpoint-*")} == {"checkpoint-6", f"checkpoint-{best_step}"}

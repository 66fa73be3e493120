"""End to end: `train_sdpo.py` on a tiny random Llama with an offline tokenizer, as a user runs it."""

import json
import math
from pathlib import Path

import pytest
from safetensors.torch import load_file

from sdft_utils.testing import run_training_script

ROOT = Path(__file__).resolve().parents[2]


def run_script(*args, check=True):
    return run_training_script("train_sdpo.py", *args, check=check)


def write_questions(path: Path) -> Path:
    rows = [{"prompt": f"What is {a} + 1?", "answer": str(a + 1)} for a in range(4)]
    rows.append({"prompt": [{"role": "system", "content": "Answer in a code block."},
                            {"role": "user", "content": "Print 7."}],
                 "verifier": "code", "tests": [{"input": "", "output": "7"}]})
    rows.append({"prompt": "Pick one.", "verifier": "mcq", "answer": "B", "choices": ["x", "y"]})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize("teacher_flags", [
    ["--teacher_kind", "ema", "--grpo_lambda", 0.5, "--mini_batches", 2],
    ["--teacher_kind", "trust_region", "--divergence_mode", "sampled", "--alpha", 1.0],
], ids=["ema_hybrid_two_mini_batches", "trust_region_sampled"])
def test_two_steps_train_log_and_save(tmp_path, tiny_model_dir, teacher_flags):
    data = write_questions(tmp_path / "q.jsonl")
    out = tmp_path / "out"
    result = run_script("--model", tiny_model_dir, "--dataset", data, "--output_dir", out, "--prompts_per_step", 2,
                        "--num_generations", 4, "--per_device_batch_size", 2, "--max_completion_length", 8,
                        "--max_steps", 2, "--save_steps", 1, "--save_total_limit", "none", "--top_k", 5,
                        "--gradient_checkpointing", "false", "--learning_rate", 1e-3, "--warmup_steps", 0,
                        "--eval_datasets", data, "--eval_max_new_tokens", 4, *teacher_flags)
    assert "[before training] q: success" in result.stdout and "questions, greedy)" in result.stdout
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in train] == [1, 2]
    for m in train:
        assert math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])
        for key in ("reprompt/success_group_fraction", "reprompt/success_sample_fraction",
                    "reprompt/reprompt_sample_fraction", "reprompt/feedback_used_fraction", "reward/mean"):
            assert 0.0 <= m[key] <= 1.0
    first = load_file(next((out / "checkpoint-1").glob("*.safetensors")))
    second = load_file(next((out / "checkpoint-2").glob("*.safetensors")))
    assert any(not first[name].equal(second[name]) for name in first)  # the model was trained


def test_bad_data_stops_before_any_model_loads(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "answer": ""}) + "\n" + json.dumps({"prompt": "", "answer": "1"}) + "\n")
    result = run_script("--model", tmp_path / "no_such_model", "--dataset", bad, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "column 'answer'" in result.stderr and "rows 1" in result.stderr and "column 'prompt'" in result.stderr
    assert "no_such_model" not in result.stderr


@pytest.mark.slow
def test_eval_every_logs_the_held_out_success_and_keeps_the_best(tmp_path, tiny_model_dir):
    data = write_questions(tmp_path / "q.jsonl")
    out = tmp_path / "out"
    result = run_script("--model", tiny_model_dir, "--dataset", data, "--output_dir", out, "--prompts_per_step", 2,
                        "--num_generations", 2, "--per_device_batch_size", 2, "--max_completion_length", 6,
                        "--max_steps", 3, "--save_steps", 3, "--save_total_limit", 1, "--top_k", 5,
                        "--gradient_checkpointing", "false", "--warmup_steps", 0, "--eval_datasets", data,
                        "--eval_every", 2, "--eval_max_new_tokens", 4, "--eval_metric", "eval/q_success")
    success = {m["step"]: m["eval/q_success"] for m in (json.loads(line) for line in
                                                        (out / "metrics.jsonl").read_text().splitlines())
               if "eval/q_success" in m}
    assert sorted(success) == [0, 2, 3]  # before training, every 2 steps, and the last step
    best_step = 2 if success[2] >= success[3] else 3
    assert json.loads((out / "best.json").read_text())["step"] == best_step
    assert {p.name for p in out.glob("checkpoint-*")} == {"checkpoint-3", f"checkpoint-{best_step}"}
    assert f"best: checkpoint-{best_step}" in result.stdout and (out / "training_curves.png").is_file()

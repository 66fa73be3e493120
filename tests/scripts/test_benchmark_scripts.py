"""The benchmark scripts execute, and the pieces they rely on do what the tables claim."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sdft_utils.rollout.hf import HFRollout
from sdft_utils.rollout.sampling import SamplingConfig
from sdft_utils.testing import byte_level_tokenizer, save_random_model

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402
import loss_memory  # noqa: E402
import step_throughput  # noqa: E402


def run_benchmark(script: str, *args: str, timeout: float = 300) -> str:
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TRL_EXPERIMENTAL_SILENCE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_gpu_check_smoke_prints_one_table():
    # the cheap checks; the step, ZeRO-3 and Megatron checks start subprocesses and run in the slow test below
    out = run_benchmark("gpu_check.py", "--smoke", "--skip", "steps", "zero3", "megatron")
    summary = out.split("==== gpu_check summary")[1]
    assert "matmul peak 256^3 float32" in summary and "TFLOP/s" in summary
    assert "loss 256 tok, ours (chunked)" in summary and "loss 256 tok, plain full logits" in summary
    assert "failed" not in summary and summary.count("--skip") == 3


@pytest.mark.slow
def test_gpu_check_smoke_runs_the_steps_and_the_optional_checks():
    out = run_benchmark("gpu_check.py", "--smoke", "--skip", "loss", timeout=1200)
    summary = out.split("==== gpu_check summary")[1]
    assert "sdft step, ours" in summary and "sdpo step, ours" in summary
    assert "step, ours      failed" not in summary
    for optional in ("ZeRO-3 1-GPU SDFT step", "Megatron TP=1 step"):
        assert optional in summary  # a result, or one line saying why it was skipped or failed


def test_random_benchmark_model_generates_exactly_min_new_tokens(tmp_path):
    # both sides of step_throughput generate this many tokens: the folder's generation_config.json forces it
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(save_random_model(tmp_path / "m", "tiny", min_new_tokens=12))
    with torch.no_grad():
        model.lm_head.weight[2] += 50.0 * model.lm_head.weight[2].sign()  # EOS would otherwise come at once
    out = HFRollout(model, 2, [2]).generate([[1, 70, 71], [1, 5]], SamplingConfig(max_new_tokens=12))
    assert [len(ids) for ids in out.completion_ids] == [12, 12]
    assert all(2 not in ids for ids in out.completion_ids)


def test_large_vocab_tokenizer_keeps_text_encoding_and_decodes_fillers():
    small, large = byte_level_tokenizer(), byte_level_tokenizer(300)
    assert len(large) == 300 and large("hello <280>").input_ids == small("hello <280>").input_ids
    assert large.decode([299]) == "<299>"


def test_step_flops_follow_the_2n_forward_6n_training_rule():
    sizes = gpu_check.SMOKE  # 2 prompts (x2 for SDPO), 16 prompt + 8 completion tokens
    total, training = gpu_check.step_flops(1000, sizes, "sdft")
    student, teacher, generated = 2 * (16 + 8), 2 * (32 + 8), 2 * 8
    assert training == 6 * 1000 * student + 2 * 1000 * teacher
    assert total == training + 2 * 1000 * generated
    assert gpu_check.step_flops(1000, sizes, "sdpo")[1] == 2 * training


def test_step_summary_leaves_out_the_warmup_steps():
    row = step_throughput.summarize({"step_seconds": [10.0, 2.0, 4.0], "rollout_seconds": [9.0, 1.0, 2.0],
                                     "completion_length": [8.0, 10.0, 20.0]}, warmup=1, sequences_per_step=2)
    assert row["step_s"] == 3.0 and row["rollout_s"] == 1.5 and row["tokens_per_s"] == 2 * 15.0 / 3.0
    assert row["first_step_s"] == 10.0


def test_parity_reward_is_a_plain_function_of_the_text():
    assert step_throughput.parity_reward("ab", {}) == 1.0 and step_throughput.parity_reward("abc", {}) == 0.0


def test_loss_memory_implementations_agree():
    inputs = loss_memory.make_inputs(48, 300, 16, torch.float32, "cpu")
    for mode, alpha in (("full", 0.0), ("full", 0.5), ("topk", 0.5), ("sampled", 1.0)):
        ours = loss_memory.measure(lambda i, h, w, m=mode, a=alpha: loss_memory.run_chunked(
            i, h, w, 16, alpha=a, mode=m, top_k=20), inputs, "cpu", 1)
        plain = loss_memory.measure(lambda i, h, w, m=mode, a=alpha: loss_memory.run_plain(
            i, h, w, alpha=a, mode=m, top_k=20), inputs, "cpu", 1)
        torch.testing.assert_close(ours[2], plain[2], rtol=1e-5, atol=1e-6)
        assert ours[1] < plain[1]  # peak MiB: chunks of 16 tokens against all 48 tokens' logits


def test_loss_memory_trl_column_matches_ours():
    pytest.importorskip("trl", reason="trl is a benchmark extra (extra bench)")
    inputs = loss_memory.make_inputs(32, 300, 16, torch.float64, "cpu")  # TRL in float64, ours in float32
    for mode, alpha in (("full", 0.0), ("full", 1.0), ("full", 0.5), ("topk", 0.5)):
        ours = loss_memory.run_chunked(inputs, inputs["student_hidden"], inputs["weight"], 8, alpha=alpha, mode=mode,
                                       top_k=20)
        trl = loss_memory.run_trl(inputs, inputs["student_hidden"], inputs["weight"], alpha=alpha, mode=mode, top_k=20)
        torch.testing.assert_close(ours.loss.double(), trl.loss.double(), rtol=1e-5, atol=1e-6)


def test_loss_memory_cli_prints_one_row_per_length(tmp_path):
    out = run_benchmark("loss_memory.py", "--lengths", "32", "64", "--vocab", "500", "--hidden", "16",
                        "--implementations", "ours", "plain", "--json", str(tmp_path / "rows.json"))
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [row["tokens"] for row in rows] == [32, 64] and "max|Δ| plain" in out
    assert all(row["max_abs_diff_plain"] < 1e-4 for row in rows)

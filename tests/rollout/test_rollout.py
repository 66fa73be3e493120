import warnings
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from sdft_utils.errors import UserInputError
from sdft_utils.rollout.engines import use_compiled_decode
from sdft_utils.rollout.hf import HFRollout
from sdft_utils.rollout.sampling import SamplingConfig, left_pad, right_pad
from sdft_utils.testing import tiny_llama
from sdft_utils.training.batching import build_distill_batch
from sdft_utils.training.modeling import completion_hidden_states


def reference_logprobs(model, prompts, completions, temperature, top_p=1.0):
    """Log-probs of the sampled tokens from one plain forward over [prompt | completion], with top-p renormalised."""
    batch = build_distill_batch(prompts, prompts, completions, None, pad_token_id=2)
    with torch.no_grad():
        hidden = completion_hidden_states(model, batch.student_input_ids, batch.student_attention_mask,
                                          batch.num_completion_tokens)
        logits = model.lm_head(hidden).double() / (temperature or 1.0)
    if top_p < 1:
        probs = logits.softmax(-1)
        sorted_probs, order = probs.sort(-1, descending=True)
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    logprobs = logits.log_softmax(-1).gather(-1, batch.completion_ids[..., None])[..., 0]
    return logprobs, batch.completion_mask


def test_padding_helpers():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    values, mask = right_pad([[1.5], [2.0, 3.0]], 0.0, torch.float32)
    assert values.tolist() == [[1.5, 0.0], [2.0, 3.0]] and mask.tolist() == [[1, 0], [1, 1]]


def test_sampled_logprobs_match_a_forward_pass_of_the_same_tokens():
    torch.manual_seed(0)
    model = tiny_llama()
    rollout = HFRollout(model, pad_token_id=2, eos_token_ids=[2])
    prompts = [[1, 80, 81, 82, 83], [1, 90]]  # different lengths: left padding must not shift positions
    for temperature, top_p in [(1.0, 1.0), (0.7, 1.0), (1.0, 0.8)]:
        out = rollout.generate(prompts, SamplingConfig(max_new_tokens=10, temperature=temperature, top_p=top_p,
                                                       num_samples=2))
        assert len(out.completion_ids) == 4 and out.from_training_weights
        repeated = [p for p in prompts for _ in range(2)]
        # recorded: the tempered full-vocabulary log-probs, what the trainer computes (not renormalised over top-p)
        assert out.logprob_top_p == 1.0
        expected, mask = reference_logprobs(model, repeated, out.completion_ids, temperature)
        got, _ = right_pad(out.logprobs, 0.0, torch.float64)
        assert (got.exp() <= 1).all()
        torch.testing.assert_close(got * mask, expected * mask, atol=2e-5, rtol=0)
        # sampled from the nucleus all the same: every token has a finite log-prob there
        in_nucleus, _ = reference_logprobs(model, repeated, out.completion_ids, temperature, top_p)
        assert in_nucleus[mask.bool()].isfinite().all()
        if top_p < 1:  # and the renormalised values are visibly different
            assert (in_nucleus - expected)[mask.bool()].max() > 0.01


def test_compiled_decode_records_the_logprobs_of_what_it_samples():
    model = tiny_llama()
    prompts = [[1, 80, 81, 82, 83], [1, 90]]
    rollout = HFRollout(model, 2, [2], compile_decode=True, compile_backend="eager", prompt_bucket=8)
    out = rollout.generate(prompts, SamplingConfig(max_new_tokens=10, temperature=0.7, top_p=0.9))
    assert rollout.compile_decode
    expected, mask = reference_logprobs(model, prompts, out.completion_ids, 0.7)  # full vocabulary, as in eager
    got, _ = right_pad(out.logprobs, 0.0, torch.float64)
    torch.testing.assert_close(got * mask, expected * mask, atol=2e-5, rtol=0)
    in_nucleus, _ = reference_logprobs(model, prompts, out.completion_ids, 0.7, 0.9)
    assert in_nucleus[mask.bool()].isfinite().all()


def test_greedy_picks_the_argmax_token():
    model = tiny_llama()
    out = HFRollout(model, 2, [2]).generate([[1, 70, 71]], SamplingConfig(max_new_tokens=6, temperature=0.0))
    expected, _ = reference_logprobs(model, [[1, 70, 71]], out.completion_ids, temperature=1.0)
    batch = build_distill_batch([[1, 70, 71]], [[1, 70, 71]], out.completion_ids, None, 2)
    with torch.no_grad():
        hidden = completion_hidden_states(model, batch.student_input_ids, batch.student_attention_mask,
                                          batch.num_completion_tokens)
    assert model.lm_head(hidden).argmax(-1).tolist() == out.completion_ids


def test_completions_stop_after_the_first_eos():
    model = tiny_llama()
    with torch.no_grad():
        model.lm_head.bias = None
        model.lm_head.weight[2] += 100.0 * model.lm_head.weight[2].sign()  # make EOS very likely
    out = HFRollout(model, 2, [2]).generate([[1, 5, 6], [1, 7]], SamplingConfig(max_new_tokens=8))
    for tokens, logprobs in zip(out.completion_ids, out.logprobs, strict=True):
        assert len(tokens) == len(logprobs)
        assert tokens.count(2) <= 1 and (2 not in tokens or tokens[-1] == 2)


def test_inverse_cdf_sampling_with_counter_uniforms_samples_the_softmax():
    from sdft_utils.rollout.sampling import sample_tokens

    probs = torch.tensor([0.5, 0.2, 0.0, 0.15, 0.1, 0.05])  # a zero-probability token (top-p cut) is never drawn
    samples = 40_000
    keys = torch.arange(samples, dtype=torch.long) * 7919 - 12345  # negative keys too: all 64 bits are used
    scores = probs.log().expand(samples, -1)
    tokens, logprobs = sample_tokens(scores, keys, position=3)
    counts = torch.bincount(tokens, minlength=6).double()
    expected = probs.double() * samples
    assert counts[2] == 0
    assert ((counts - expected).abs() <= 4 * expected.sqrt() + 1e-9).all(), counts  # within 4 sigma per token
    torch.testing.assert_close(logprobs, probs.log()[tokens])
    # a row's sample is a function of (its scores, key, position) alone: alone it equals the row in a batch
    assert torch.equal(sample_tokens(scores[5:6], keys[5:6], 3)[0], tokens[5:6])
    assert not torch.equal(sample_tokens(scores[:100], keys[:100], 4)[0], tokens[:100])  # another position
    greedy, _ = sample_tokens(scores[:2], None, 3)
    assert greedy.tolist() == [0, 0]


def test_eager_loop_honours_min_new_tokens_of_the_model_folder():
    model = tiny_llama()
    with torch.no_grad():
        model.lm_head.bias = None
        model.lm_head.weight[2] += 100.0 * model.lm_head.weight[2].sign()  # EOS almost surely first
    model.generation_config.min_new_tokens = 5
    out = HFRollout(model, 2, [2]).generate([[1, 5, 6], [1, 7]], SamplingConfig(max_new_tokens=8))
    assert all(len(tokens) >= 6 and 2 not in tokens[:5] for tokens in out.completion_ids)  # EOS held off 5 tokens
    assert any(tokens[5] == 2 for tokens in out.completion_ids)  # and likely right after


def test_seeded_samples_do_not_depend_on_the_batch():
    from sdft_utils.rollout.sampling import prompt_seeds

    model = tiny_llama()
    rollout = HFRollout(model, pad_token_id=2, eos_token_ids=[2])
    prompts = [[1, 80, 81, 82, 83], [1, 90], [1, 60, 61]]
    seeds = prompt_seeds(seed=3, step=5, positions=[0, 1, 2])
    sampling = SamplingConfig(max_new_tokens=10, temperature=1.0, num_samples=2)
    together = rollout.generate(prompts, sampling, seeds)
    alone = rollout.generate(prompts[1:2], sampling, seeds[1:2])  # as if on another process, in another batch
    assert alone.completion_ids == together.completion_ids[2:4]
    torch.testing.assert_close(torch.tensor(alone.logprobs[0]), torch.tensor(together.logprobs[2]), atol=1e-5, rtol=0)
    one_by_one = HFRollout(model, 2, [2], batch_size=1).generate(prompts, sampling, seeds)
    assert one_by_one.completion_ids == together.completion_ids
    assert together.completion_ids[0] != together.completion_ids[1]  # the samples of one prompt differ
    # recorded log-probs are still those of the sampled tokens under the processed distribution
    expected, mask = reference_logprobs(model, [p for p in prompts for _ in range(2)], together.completion_ids, 1.0)
    got, _ = right_pad(together.logprobs, 0.0, torch.float64)
    torch.testing.assert_close(got * mask, expected * mask, atol=2e-5, rtol=0)
    other_step = rollout.generate(prompts, sampling, prompt_seeds(seed=3, step=6, positions=[0, 1, 2]))
    assert other_step.completion_ids != together.completion_ids


def test_static_cache_compiled_decode_gives_the_dynamic_paths_tokens_and_logprobs():
    # The "eager" backend runs torch.compile's graph capture of the static-cache decode step without inductor's
    # code generation (tens of seconds on a CPU); gpu_check.py runs the inductor + CUDA-graph path on a GPU.
    model = tiny_llama()
    prompts = [[1, 80, 81, 82, 83], [1, 90], [1, 70, 71]]  # 3 prompts in chunks of 2: the last chunk is padded
    sampling = SamplingConfig(max_new_tokens=12, temperature=0.0)
    dynamic = HFRollout(model, 2, [2], batch_size=2).generate(prompts, sampling)
    compiled = HFRollout(model, 2, [2], batch_size=2, compile_decode=True, compile_backend="eager", prompt_bucket=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a silent fallback to the dynamic path would make this test meaningless
        static = compiled.generate(prompts, sampling)
    assert compiled.compile_decode and hasattr(model, "_compiled_call")  # transformers' compiled decode was used
    assert static.completion_ids == dynamic.completion_ids
    for got, expected in zip(static.logprobs, dynamic.logprobs, strict=True):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), atol=1e-5, rtol=0)


def test_compiled_decode_falls_back_to_the_dynamic_cache_when_compilation_fails():
    model = tiny_llama()
    sampling = SamplingConfig(max_new_tokens=6, temperature=0.0)
    expected = HFRollout(model, 2, [2]).generate([[1, 70, 71]], sampling)
    broken = HFRollout(model, 2, [2], compile_decode=True, compile_backend="no_such_backend")
    with pytest.warns(UserWarning, match="compiled decoding unavailable"):
        got = broken.generate([[1, 70, 71]], sampling)
    assert got.completion_ids == expected.completion_ids and not broken.compile_decode


def test_rollout_compile_auto_is_off_on_cpu_and_under_sharding():
    accelerator = Accelerator(cpu=True)
    assert not use_compiled_decode("auto", accelerator)
    assert use_compiled_decode("on", accelerator) and not use_compiled_decode("off", accelerator)
    gpu = SimpleNamespace(device=torch.device("cuda"), distributed_type=DistributedType.NO)
    zero3 = SimpleNamespace(device=torch.device("cuda"), distributed_type=DistributedType.DEEPSPEED)
    assert use_compiled_decode("auto", gpu) and not use_compiled_decode("auto", zero3)  # no GPU here: stand-ins
    with pytest.raises(UserInputError, match="--rollout_compile"):
        use_compiled_decode("yes", accelerator)


def test_left_pad_rounds_the_width_up():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0, multiple_of=4)
    assert ids.tolist() == [[0, 5, 6, 7], [0, 0, 0, 8]] and mask.tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]


def test_rollouts_without_logprobs_sample_the_same_tokens():
    model = tiny_llama()
    prompts = [[1, 80, 81, 82, 83], [1, 90]]
    torch.manual_seed(3)
    recorded = HFRollout(model, 2, [2]).generate(prompts, SamplingConfig(max_new_tokens=10, temperature=0.8))
    torch.manual_seed(3)
    skipped = HFRollout(model, 2, [2]).generate(prompts, SamplingConfig(max_new_tokens=10, temperature=0.8,
                                                                         logprobs=False))
    assert skipped.completion_ids == recorded.completion_ids
    assert skipped.logprobs == [[], []] and all(len(row) for row in recorded.logprobs)


def test_both_decode_paths_record_full_vocabulary_logprobs_under_top_p_and_min_new_tokens():
    """Top-p and the model folder's min_new_tokens shape what is sampled, not what is recorded: the eager loop and
    the compiled path (whose recorder, not generate, holds EOS off) sample the same tokens and record the tempered
    full-vocabulary log-probs the trainer computes."""
    from sdft_utils.rollout.sampling import prompt_seeds

    model = tiny_llama()
    model.generation_config.min_new_tokens = 3
    prompts = [[1, 80, 81, 82, 83], [1, 90]]
    sampling = SamplingConfig(max_new_tokens=8, temperature=0.8, top_p=0.9)
    seeds = prompt_seeds(seed=1, step=0, positions=[0, 1])
    eager = HFRollout(model, 2, [2]).generate(prompts, sampling, seeds)
    compiled = HFRollout(model, 2, [2], compile_decode=True, compile_backend="eager", prompt_bucket=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        static = compiled.generate(prompts, sampling, seeds)
    assert static.completion_ids == eager.completion_ids
    expected, mask = reference_logprobs(model, prompts, eager.completion_ids, 0.8)
    for out in (eager, static):
        got, _ = right_pad(out.logprobs, 0.0, torch.float64)
        torch.testing.assert_close(got * mask, expected * mask, atol=2e-5, rtol=0)

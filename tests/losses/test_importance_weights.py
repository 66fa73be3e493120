"""Importance-sampling modes for the rollout-engine/trainer mismatch, against float64 hand computations."""

import math

import pytest
import torch

from sdft_utils.losses.weighting import importance_weights, sequence_mean_loss

ln = math.log
# Loss-token log-ratios: row 0: 0, ln 3, ln 0.25; row 1: ln 1.5; row 2: ln 4, ln 4 (geometric mean 4 > cap 2);
# row 3: no loss tokens. Padding holds garbage that must not leak.
ROLLOUT = torch.tensor([[-1.0, -1.0, -1.0, float("-inf")], [-2.0, -2.0, float("nan"), 0.0],
                        [-3.0, -3.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
TRAIN = torch.tensor([[-1.0, -1.0 + ln(3), -1.0 + ln(0.25), 5.0], [-2.0 + ln(1.5), 3.0, 0.0, 0.0],
                      [-3.0 + ln(4), -3.0 + ln(4), 0.0, 0.0], [0.0, 7.0, 0.0, 0.0]], dtype=torch.float64)
MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]])
TOKEN_RATIOS = [1, 3, 0.25, 1.5, 4, 4]


def check_stats(stats, clipped_fraction):
    assert stats["is_ratio_min"] == pytest.approx(0.25)
    assert stats["is_ratio_max"] == pytest.approx(4.0)  # uncapped
    assert stats["is_ratio_mean"] == pytest.approx(sum(TOKEN_RATIOS) / len(TOKEN_RATIOS))
    assert stats["is_clipped_fraction"] == pytest.approx(clipped_fraction)


def test_token_truncate_caps_each_token_without_floor():
    train = TRAIN.clone().requires_grad_()
    weights, stats = importance_weights(train, ROLLOUT, MASK, mode="token_truncate", cap=2.0)
    expected = torch.tensor([[1, 2, 0.25, 0], [1.5, 0, 0, 0], [2, 2, 0, 0], [0, 0, 0, 0]], dtype=torch.float64)
    torch.testing.assert_close(weights, expected, rtol=0, atol=1e-12)
    assert weights.dtype == torch.float64 and not weights.requires_grad
    check_stats(stats, clipped_fraction=3 / 6)  # 3, 4, 4 exceed the cap


def test_sequence_average_is_one_capped_mean_per_sequence():
    weights, stats = importance_weights(TRAIN, ROLLOUT, MASK, mode="sequence_average", cap=2.0)
    per_sequence = [(1 + 2 + 0.25) / 3, 1.5, 2.0, 1.0]  # the empty row gets weight 1
    expected = torch.tensor(per_sequence, dtype=torch.float64)[:, None].expand(4, 4)
    torch.testing.assert_close(weights.double(), expected, rtol=1e-6, atol=1e-6)
    check_stats(stats, clipped_fraction=3 / 6)


def test_sequence_mask_drops_sequences_outside_the_band():
    weights, stats = importance_weights(TRAIN, ROLLOUT, MASK, mode="sequence_mask", cap=2.0)
    # geometric means: row 0 (3 * 0.25)^(1/3) = 0.909 (kept), row 1 1.5 (kept), row 2 4 (> 2: masked), row 3 empty
    expected = torch.tensor([1.0, 1.0, 0.0, 1.0], dtype=torch.float64)[:, None].expand(4, 4)
    torch.testing.assert_close(weights, expected, rtol=0, atol=0)
    check_stats(stats, clipped_fraction=1 / 3)  # one of the three sequences with loss tokens
    # a ratio below 1/cap is masked too
    low = TRAIN.clone()
    low[1, 0] = -2.0 + ln(0.4)
    assert importance_weights(low, ROLLOUT, MASK, mode="sequence_mask", cap=2.0)[0][1, 0].item() == 0.0


@pytest.mark.parametrize("mode", ["sequence_average", "token_truncate", "sequence_mask"])
def test_no_rollout_logprobs_means_weight_one(mode):
    weights, stats = importance_weights(TRAIN, None, MASK, mode=mode)
    assert torch.equal(weights, torch.ones(4, 4, dtype=weights.dtype))
    assert stats["is_ratio_mean"] == 1.0 and stats["is_clipped_fraction"] == 0.0


def test_sequence_weights_through_the_token_path_equal_the_sequence_path():
    # multiplying the per-token loss by a per-sequence weight is the same as weighting the sequence mean
    loss = torch.rand(4, 4, dtype=torch.float64)
    weights, _ = importance_weights(TRAIN, ROLLOUT, MASK, mode="sequence_average")
    torch.testing.assert_close(sequence_mean_loss(loss * weights, MASK),
                               sequence_mean_loss(loss, MASK, weights[:, 0]))


def test_unknown_mode_is_an_error():
    with pytest.raises(ValueError, match="token_truncate"):
        importance_weights(TRAIN, ROLLOUT, MASK, mode="tis")


# ------------------------------------------------------------------------------------------------------------------
# Top-p: the sampler's log-probs are renormalised over the nucleus, the trainer's are full-vocabulary


def hand_nucleus_mass(probs: list[float], top_p: float) -> float:
    """Most probable first, up to and including the token at which the cumulative mass reaches top_p."""
    mass = 0.0
    for p in sorted(probs, reverse=True):
        if mass >= top_p:
            break
        mass += p
    return mass


@pytest.mark.parametrize("top_p", [0.3, 0.5, 0.9, 0.999, 1.0])
def test_nucleus_log_mass_matches_a_hand_computation_and_the_samplers_filter(top_p):
    from sdft_utils.losses.divergence import nucleus_log_mass
    from sdft_utils.rollout.sampling import top_p_filter

    logits = torch.randn(70, 13, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2
    logprobs = logits.log_softmax(-1)
    got = nucleus_log_mass(logprobs, top_p, block_rows=16)  # several blocks
    expected = torch.tensor([math.log(hand_nucleus_mass(row.exp().tolist(), top_p)) for row in logprobs],
                            dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    # the HF sampler's filter keeps exactly that mass
    kept = top_p_filter(logits, top_p).logsumexp(-1) - logits.logsumexp(-1)
    torch.testing.assert_close(got, kept, rtol=0, atol=1e-12)
    if top_p < 0.95:
        assert got.max() < 0  # the nucleus leaves mass out: the comparison is not vacuous


def test_full_vocabulary_logprobs_make_the_ratio_one_for_a_sampler_with_the_same_weights():
    """A top-p sampler's renormalised log-prob plus the trainer's nucleus mass is the trainer's full-vocabulary
    log-prob: IS ratio 1, where the raw comparison is biased by the nucleus mass."""
    from sdft_utils.losses.divergence import nucleus_log_mass
    from sdft_utils.losses.weighting import full_vocabulary_logprobs
    from sdft_utils.rollout.sampling import top_p_filter

    logits = torch.randn(2, 5, 50, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    full = logits.log_softmax(-1)
    sampler = top_p_filter(logits, 0.8).log_softmax(-1)  # what vLLM's processed_logprobs hold
    tokens = sampler.argmax(-1, keepdim=True)  # a token of the nucleus
    engine, trainer = sampler.gather(-1, tokens)[..., 0], full.gather(-1, tokens)[..., 0]
    nucleus = nucleus_log_mass(full.flatten(0, 1), 0.8).view(2, 5)
    mask = torch.ones(2, 5)
    _, stats = importance_weights(trainer, full_vocabulary_logprobs(engine, nucleus), mask, mode="token_truncate")
    assert stats["is_ratio_min"] == pytest.approx(1.0) and stats["is_ratio_max"] == pytest.approx(1.0)
    _, biased = importance_weights(trainer, engine, mask, mode="token_truncate")
    assert biased["is_ratio_max"] < 0.9


def test_chunked_loss_returns_the_students_nucleus_mass():
    from sdft_utils.losses.divergence import (
        chunked_token_divergence,
        nucleus_log_mass,
        token_divergence_from_logits,
    )

    g = torch.Generator().manual_seed(2)
    hidden, weight = torch.randn(9, 4, generator=g), torch.randn(30, 4, generator=g) * 2
    ids = torch.randint(0, 30, (9,), generator=g)
    out = chunked_token_divergence(hidden, weight, hidden, weight, ids, temperature=0.7, chunk_size=4,
                                   nucleus_top_p=0.9)
    expected = nucleus_log_mass(((hidden @ weight.T) / 0.7).log_softmax(-1), 0.9)
    torch.testing.assert_close(out.student_nucleus_log_mass, expected, rtol=0, atol=1e-6)
    reference = token_divergence_from_logits(hidden @ weight.T, hidden @ weight.T, ids, temperature=0.7,
                                             nucleus_top_p=0.9)
    torch.testing.assert_close(reference.student_nucleus_log_mass, expected, rtol=0, atol=1e-6)
    assert chunked_token_divergence(hidden, weight, hidden, weight, ids).student_nucleus_log_mass is None

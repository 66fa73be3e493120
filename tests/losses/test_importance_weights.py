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

"""Which completion tokens count and how much: loss masks, importance weights, entropy masks, the mean over tokens.

Pure tensor code: `sdft_utils.losses.divergence` gives the per-token divergences these weigh.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sdft_utils.losses.divergence import TokenDivergence


def completion_loss_mask(completion_mask: Tensor, num_skip: int = 3) -> Tensor:
    """(B, T) 0/1 completion mask -> (B, T) float mask with the first `num_skip` completion tokens of each row zeroed
    (they stay attended; they only leave the loss). Completion tokens start at column 0 (right-padded)."""
    if num_skip < 0:
        raise ValueError(f"num_skip must be >= 0, got {num_skip}")
    mask = completion_mask.float()
    # Counting completion tokens (rather than columns) also works if a row were not right-padded.
    position = mask.cumsum(-1)
    return mask * (position > num_skip).float()


def sequence_is_weights(
    train_logprobs: Tensor, rollout_logprobs: Tensor | None, loss_mask: Tensor, cap: float = 2.0
) -> tuple[Tensor, dict[str, float]]:
    """SDFT's importance weight for the rollout-engine/trainer mismatch (authors' code): token ratio
    exp(train_logp - rollout_logp), capped above at `cap` (no floor), averaged over each sequence's loss tokens into
    one detached weight per sequence (B,). rollout_logprobs None means the rollout came from the training weights:
    weights are exactly 1. A row with no loss tokens gets weight 1. Stats: ratio min/mean/max over loss tokens of the
    uncapped ratio and the fraction clipped (keys: is_ratio_min, is_ratio_mean, is_ratio_max, is_clipped_fraction;
    with None rollout logprobs: 1, 1, 1, 0)."""
    batch = train_logprobs.shape[0]
    neutral = {"is_ratio_min": 1.0, "is_ratio_mean": 1.0, "is_ratio_max": 1.0, "is_clipped_fraction": 0.0}
    if rollout_logprobs is None:
        return torch.ones(batch, dtype=torch.float32, device=train_logprobs.device), neutral

    with torch.no_grad():
        keep = loss_mask > 0
        # `where` before exp: padding positions may hold garbage (0, -inf, nan) that must not leak into sums.
        log_ratio = torch.where(keep, train_logprobs.float() - rollout_logprobs.float(), 0.0)
        ratio = log_ratio.exp()
        capped = torch.where(keep, ratio.clamp(max=cap), 0.0)
        count = keep.sum(-1)
        weights = capped.sum(-1) / count.clamp(min=1)
        weights = torch.where(count > 0, weights, torch.ones_like(weights))

        token_ratios = ratio[keep]
        if token_ratios.numel() == 0:
            return weights, neutral
        stats = {
            "is_ratio_min": token_ratios.min().item(),
            "is_ratio_mean": token_ratios.mean().item(),
            "is_ratio_max": token_ratios.max().item(),
            "is_clipped_fraction": (token_ratios > cap).float().mean().item(),
        }
    return weights, stats


def full_vocabulary_logprobs(rollout_logprobs: Tensor, nucleus_log_mass: Tensor) -> Tensor:
    """A top-p sampler's log-probs of its tokens (renormalised over the nucleus, as vLLM reports them) -> the
    full-vocabulary log-probs at the temperature that the trainer computes: log p(y) = log p_nucleus(y) + log Z.

    The engine does not report its nucleus mass Z, so the trainer's own is used (`nucleus_log_mass`, from
    `chunked_token_divergence(nucleus_top_p=...)`). The ratio exp(train − result) is then exactly the ratio of the
    two top-p samplers' probabilities, π_θ(y)/Z_θ over π_engine(y)/Z_engine, for a token inside both nuclei: 1 when
    the engine samples from the trainer's weights, as at top_p = 1. (B, T) -> (B, T)."""
    return rollout_logprobs + nucleus_log_mass.to(rollout_logprobs.dtype)


IS_MODES = ("sequence_average", "token_truncate", "sequence_mask")


def importance_weights(
    train_logprobs: Tensor, rollout_logprobs: Tensor | None, loss_mask: Tensor, mode: str = "sequence_average",
    cap: float = 2.0,
) -> tuple[Tensor, dict[str, float]]:
    """Detached (B,T) weights that correct for the rollout engine sampling from slightly different weights/kernels
    than the trainer. ratio = exp(train_logp - rollout_logp) per token. Multiply the per-token loss by the result.

    - `sequence_average` (SDFT default, authors' code): min(ratio, cap) averaged over the sequence's loss tokens,
      one weight per sequence (`sequence_is_weights`), broadcast over its tokens.
    - `token_truncate` (SDPO default): min(ratio, cap) per token (truncated IS, no floor).
    - `sequence_mask`: a sequence whose geometric-mean ratio exp(mean log ratio) lies outside [1/cap, cap] gets
      weight 0, every other sequence weight 1 (drop sequences the engine sampled too differently).
    Stats: min/mean/max of the uncapped token ratio over loss tokens and the fraction clipped (tokens above cap for
    the truncating modes, sequences masked for `sequence_mask`). None rollout logprobs -> all ones.
    """
    if mode not in IS_MODES:
        raise ValueError(f"unknown importance-sampling mode {mode!r}; choose one of {IS_MODES}")
    if mode == "sequence_average" or rollout_logprobs is None:
        weights, stats = sequence_is_weights(train_logprobs, rollout_logprobs, loss_mask, cap)
        return weights[:, None].expand(loss_mask.shape), stats
    with torch.no_grad():
        keep = loss_mask > 0
        dtype = torch.promote_types(train_logprobs.dtype, torch.float32)  # float64 stays float64 (tests)
        log_ratio = torch.where(keep, train_logprobs.to(dtype) - rollout_logprobs.to(dtype), 0.0)
        ratio = log_ratio.exp()
        if mode == "token_truncate":
            weights = torch.where(keep, ratio.clamp(max=cap), 0.0)
            clipped = (ratio[keep] > cap).float()
        else:
            count = keep.sum(-1)
            mean_log_ratio = log_ratio.sum(-1) / count.clamp(min=1)
            inside = (mean_log_ratio.abs() <= math.log(cap)) | (count == 0)
            weights = inside.to(dtype)[:, None].expand(loss_mask.shape)
            clipped = (~inside[count > 0]).float()
        token_ratios = ratio[keep]
        if token_ratios.numel() == 0:
            return torch.ones_like(weights), {"is_ratio_min": 1.0, "is_ratio_mean": 1.0, "is_ratio_max": 1.0,
                                               "is_clipped_fraction": 0.0}
        stats = {
            "is_ratio_min": token_ratios.min().item(),
            "is_ratio_mean": token_ratios.mean().item(),
            "is_ratio_max": token_ratios.max().item(),
            "is_clipped_fraction": clipped.mean().item(),
        }
    return weights, stats


def entropy_quantile_mask(entropy: Tensor, loss_mask: Tensor, quantile: float) -> Tensor:
    """Keep only the loss tokens whose entropy lies in the top `quantile` fraction of the batch's loss tokens
    (quantile 1.0 = keep all = return loss_mask unchanged; 0 < q ≤ 1 else ValueError). Returns a float (B,T) mask
    that is a subset of loss_mask. Threshold: torch.quantile(entropies of loss tokens, 1 - quantile); keep
    entropy >= threshold. (torch.quantile accepts at most 2**24 loss tokens.)"""
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"entropy quantile must lie in (0, 1], got {quantile}")
    mask = loss_mask.float()
    if quantile == 1.0:
        return mask
    keep = loss_mask > 0
    selected = entropy.detach().float()[keep]
    if selected.numel() == 0:
        return mask
    threshold = torch.quantile(selected, 1.0 - quantile)
    return mask * (entropy.detach().float() >= threshold).float()


def sequence_mean_loss(per_token_loss: Tensor, loss_mask: Tensor, sequence_weights: Tensor | None = None) -> Tensor:
    """mean over sequences of [Σ_t mask·w_b·loss / max(1, Σ_t mask)]. (B,T),(B,T),(B,) -> scalar. Rows with no loss
    tokens count as 0 in the mean (authors' code). Keep the graph connected even when the mask is all zero."""
    keep = loss_mask > 0
    # `where` (not multiply) so that non-finite values at masked positions cannot poison the sum.
    masked = torch.where(keep, per_token_loss, torch.zeros_like(per_token_loss))
    per_sequence = masked.sum(-1) / keep.sum(-1).clamp(min=1).to(masked.dtype)
    if sequence_weights is not None:
        per_sequence = per_sequence * sequence_weights.to(per_sequence.dtype)
    return per_sequence.mean()


def kl_k3(student_logprobs: Tensor, teacher_logprobs: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(student‖teacher) on sampled tokens: exp(r) - r - 1 with r = logp_t - logp_s.

    Unbiased for y ~ student and never negative. Shapes: any, elementwise.
    """
    r = teacher_logprobs - student_logprobs
    return torch.expm1(r) - r  # expm1 keeps precision when r ≈ 0


def scored_index(mask: Tensor) -> Tensor:
    """(B, T) mask -> (N,) flat positions (into B*T) of its nonzero entries.

    Compute it on the host, before the batch moves to the GPU: gathering with an index needs no device->host sync,
    while indexing with a boolean mask on the GPU must sync to learn N.
    """
    return mask.flatten().nonzero().squeeze(1)


def gather_rows(values: Tensor, index: Tensor) -> Tensor:
    """(B, T, ...) -> (N, ...): the positions `index` (from `scored_index`) of the flattened first two dims."""
    return values.flatten(0, 1).index_select(0, index)


def scatter_rows(divergence: TokenDivergence, scored: Tensor, index: Tensor | None = None) -> dict[str, Tensor]:
    """Per-token values of the scored positions back into (B, T) tensors (zeros elsewhere). `scored` is the (B, T)
    mask (only its shape is used when `index`, from `scored_index`, is given: then there is no device->host sync)."""
    out = {}
    names = ["loss", "student_logprobs", "teacher_logprobs", "student_entropy"]
    if divergence.student_nucleus_log_mass is not None:
        names.append("student_nucleus_log_mass")
    for name in names:
        values = getattr(divergence, name)
        if index is None:
            out[name] = torch.zeros(scored.shape, dtype=values.dtype, device=values.device).masked_scatter(scored,
                                                                                                         values)
        else:
            flat = torch.zeros(scored.numel(), dtype=values.dtype, device=values.device)
            out[name] = flat.index_put((index,), values).view(scored.shape)  # out of place: keeps the autograd graph
    return out

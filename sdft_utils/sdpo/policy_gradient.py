"""The reward side of SDPO: token importance weights, group advantages and the clipped policy-gradient term.

- `token_is_weights`: the release's two detached per-token factors, min(π_θ/π_old, cap) (several optimizer steps per
  generation batch) times min(π_old/π_rollout, cap) (truncated IS for a rollout engine that is not the trainer).
- `grpo_advantages`: r_i − mean(r) over the group (the release runs GRPO without std normalisation, Dr.GRPO).
- `clipped_policy_loss`: PPO's clipped surrogate with a per-sequence advantage, for the GRPO part of the paper's
  hybrid (Eq. 3: A = λ·A_GRPO + (1−λ)·A_SDPO, implemented as λ·L_GRPO + (1−λ)·L_SDPO since both are gradients of
  the same log-probabilities).
- `token_logprobs`: log π_θ(y_t) with gradients, chunked so full-vocabulary logits of the batch never coexist.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from sdft_utils.losses.divergence import IDENTITY, LogitTransform
from sdft_utils.losses.weighting import sequence_mean_loss


def token_is_weights(current_logprobs: Tensor, old_logprobs: Tensor, rollout_logprobs: Tensor | None,
                     cap: float = 2.0, rollout_cap: float = 2.0) -> tuple[Tensor, dict[str, Tensor]]:
    """(B, T) detached weight min(exp(cur − old), cap) · min(exp(old − rollout), rollout_cap), and the means of the two
    factors. `rollout_logprobs` None = the engine sampled from the training weights (second factor 1). Log-ratios
    are clamped to ±20 before exp, as in the release."""
    with torch.no_grad():
        policy = (current_logprobs.float() - old_logprobs.float()).clamp(-20, 20).exp().clamp(max=cap)
        if rollout_logprobs is None:
            correction = torch.ones_like(policy)
        else:
            correction = (old_logprobs.float() - rollout_logprobs.float()).clamp(-20, 20).exp().clamp(max=rollout_cap)
    # 0-d tensors, not floats: .item() here would make the CPU wait for the GPU inside the step
    stats = {"is_policy_mean": policy.mean(), "is_rollout_mean": correction.mean()}
    return policy * correction, stats


def grpo_advantages(rewards: Tensor, group_size: int, normalize_std: bool = False, eps: float = 1e-6) -> Tensor:
    """(N,) rewards with `group_size` consecutive rollouts per question -> (N,) r − group mean (÷ group std)."""
    groups = rewards.float().view(-1, group_size)
    advantages = groups - groups.mean(-1, keepdim=True)
    if normalize_std:
        advantages = advantages / (groups.std(-1, keepdim=True) + eps)
    return advantages.view(-1)


def clipped_policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, rollout_weights: Tensor | None = None,
                        clip_low: float = 0.2, clip_high: float = 0.28) -> Tensor:
    """Per-token PPO surrogate −min(r·A, clip(r, 1−ε_low, 1+ε_high)·A), r = exp(logp − old), optionally times the
    detached rollout correction. logprobs (B, T) with grad, old_logprobs (B, T), advantages (B,) -> (B, T)."""
    ratio = (logprobs - old_logprobs.detach()).clamp(-20, 20).exp()
    advantage = advantages.detach().to(ratio.dtype).unsqueeze(-1)
    surrogate = torch.minimum(ratio * advantage, ratio.clamp(1 - clip_low, 1 + clip_high) * advantage)
    loss = -surrogate
    return loss if rollout_weights is None else loss * rollout_weights.detach()


def _chunk_logprobs(hidden: Tensor, weight: Tensor, bias: Tensor | None, ids: Tensor, temperature: float,
                    transform: LogitTransform) -> Tensor:
    logits = transform.apply(F.linear(hidden.float(), weight.float(), None if bias is None else bias.float()))
    return (logits / temperature).log_softmax(-1).gather(-1, ids.long().unsqueeze(-1)).squeeze(-1)


def token_logprobs(hidden: Tensor, weight: Tensor, bias: Tensor | None, ids: Tensor, temperature: float = 1.0,
                   chunk_size: int = 512, logit_transform: LogitTransform = IDENTITY) -> Tensor:
    """(N, H) hidden states, (V, H) head, (N,) ids -> (N,) float32 log-probs of softmax(transform(logits) / T) with
    gradients; each chunk's logits are recomputed in backward instead of kept."""
    parts = [checkpoint(_chunk_logprobs, h, weight, bias, y, temperature, logit_transform, use_reentrant=False)
             for h, y in zip(hidden.split(chunk_size), ids.split(chunk_size), strict=True)]
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def hybrid_loss(distill: Tensor, weights: Tensor, completion_mask: Tensor, distill_mask: Tensor,
                policy: Tensor | None = None, lam: float = 0.0) -> Tensor:
    """λ · L_GRPO + (1 − λ) · L_SDPO, each a per-sequence token mean averaged over the sequences (release
    normalisation: masked rollouts count as zero in the SDPO mean). distill/weights/policy/completion_mask (B, T),
    distill_mask (B,) 0/1 from the reprompt (False = no solution and no feedback)."""
    sdpo = sequence_mean_loss(distill * weights, completion_mask * distill_mask.to(completion_mask.dtype).unsqueeze(-1))
    if policy is None or lam == 0.0:
        return sdpo
    return lam * sequence_mean_loss(policy, completion_mask) + (1.0 - lam) * sdpo

"""SDPO's loss pieces against float64 hand computations: IS weights, top-K distillation, GRPO advantages, hybrid."""

import math

import torch

from sdft_utils.losses.divergence import chunked_token_divergence
from sdft_utils.sdpo.policy_gradient import (
    clipped_policy_loss,
    grpo_advantages,
    hybrid_loss,
    token_is_weights,
    token_logprobs,
)


def test_token_is_weights_are_both_truncated_ratios_and_detached():
    current = torch.tensor([[-1.0, -2.0, -0.1]], requires_grad=True)
    old = torch.tensor([[-1.5, -1.0, -0.1]])
    rollout = torch.tensor([[-1.0, -3.0, -0.5]])
    weights, stats = token_is_weights(current, old, rollout)
    c, o, r = (t.detach().double() for t in (current, old, rollout))
    expected = (c - o).exp().clamp(max=2) * (o - r).exp().clamp(max=2)
    assert torch.allclose(weights.double(), expected, atol=1e-6)
    assert not weights.requires_grad
    assert math.isclose(stats["is_rollout_mean"], (o - r).exp().clamp(max=2).mean().item(), rel_tol=1e-6)
    assert torch.equal(token_is_weights(current, current.detach(), None)[0], torch.ones(1, 3))


def float64_topk_jsd(s_logits, t_logits, k, alpha):
    s, t = s_logits.double().log_softmax(-1), t_logits.double().log_softmax(-1)
    idx = s.topk(k, dim=-1).indices
    s_k, t_k = s.gather(-1, idx), t.gather(-1, idx)
    s_k = torch.cat([s_k, torch.log1p(-s_k.exp().sum(-1, keepdim=True))], -1)
    t_k = torch.cat([t_k, torch.log1p(-t_k.exp().sum(-1, keepdim=True))], -1)
    m = torch.log((1 - alpha) * s_k.exp() + alpha * t_k.exp())
    return (1 - alpha) * (s_k.exp() * (s_k - m)).sum(-1) + alpha * (t_k.exp() * (t_k - m)).sum(-1)


def test_sdpo_loss_is_topk_tail_jsd_times_is_weight_token_mean():
    torch.manual_seed(0)
    batch, width, hidden, vocab, k = 2, 3, 8, 40, 5
    s_hidden = torch.randn(batch * width, hidden)
    t_hidden = torch.randn(batch * width, hidden)
    head = torch.randn(vocab, hidden, requires_grad=True)
    ids = torch.randint(vocab, (batch * width,))
    divergence = chunked_token_divergence(s_hidden, head, t_hidden, head.detach(), ids, alpha=0.5, mode="topk",
                                          top_k=k, chunk_size=4)
    weights, _ = token_is_weights(divergence.student_logprobs.view(batch, width) + 0.3,
                                  divergence.student_logprobs.view(batch, width), None)
    completion_mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    loss = hybrid_loss(divergence.loss.view(batch, width), weights, completion_mask, torch.tensor([1.0, 1.0]))

    reference = float64_topk_jsd(s_hidden.double() @ head.double().T, t_hidden.double() @ head.double().T, k, 0.5)
    per_token = reference.view(batch, width) * math.exp(0.3) * completion_mask.double()
    expected = (per_token.sum(-1) / completion_mask.double().sum(-1)).mean()
    assert torch.allclose(loss.double(), expected, atol=1e-5)
    loss.backward()
    assert head.grad is not None and torch.isfinite(head.grad).all()


def test_masked_rollouts_count_as_zero_in_the_mean():
    distill = torch.tensor([[2.0, 2.0], [5.0, 5.0]])
    ones = torch.ones(2, 2)
    assert hybrid_loss(distill, ones, ones, torch.tensor([1.0, 0.0])).item() == 1.0


def test_grpo_advantage_is_reward_minus_group_mean():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    assert torch.allclose(grpo_advantages(rewards, 4), torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]))
    normalized = grpo_advantages(rewards, 4, normalize_std=True)
    assert torch.allclose(normalized[:4], torch.tensor([0.75, -0.25, -0.25, -0.25]) / 0.5, atol=1e-4)


def test_clipped_policy_loss_matches_ppo_by_hand():
    logprobs = torch.tensor([[0.0, math.log(2.0)], [math.log(0.5), 0.0]], requires_grad=True)
    old = torch.zeros(2, 2)
    advantages = torch.tensor([1.0, -1.0])
    loss = clipped_policy_loss(logprobs, old, advantages, clip_low=0.2, clip_high=0.28)
    # ratios [1, 2] with A=+1 -> -[1, 1.28]; ratios [0.5, 1] with A=-1 -> -min(-0.5, -0.8) = 0.8, and 1
    assert torch.allclose(loss, torch.tensor([[-1.0, -1.28], [0.8, 1.0]]))
    loss.sum().backward()
    # clipped entries have zero gradient; unclipped d(-r A)/d logp = -r A
    assert torch.allclose(logprobs.grad, torch.tensor([[-1.0, 0.0], [0.0, 1.0]]))


def test_hybrid_is_a_convex_mix_of_grpo_and_sdpo():
    distill, policy = torch.full((1, 2), 3.0), torch.full((1, 2), -1.0)
    ones = torch.ones(1, 2)
    mixed = hybrid_loss(distill, ones, ones, torch.ones(1), policy, lam=0.9)
    assert math.isclose(mixed.item(), 0.9 * -1.0 + 0.1 * 3.0, rel_tol=1e-6)
    assert hybrid_loss(distill, ones, ones, torch.ones(1), policy, lam=0.0).item() == 3.0


def test_token_logprobs_match_log_softmax_with_gradients():
    torch.manual_seed(1)
    hidden = torch.randn(7, 6, requires_grad=True)
    weight = torch.randn(11, 6)
    ids = torch.randint(11, (7,))
    got = token_logprobs(hidden, weight, None, ids, temperature=0.7, chunk_size=3)
    expected = ((hidden.double() @ weight.double().T) / 0.7).log_softmax(-1).gather(-1, ids[:, None]).squeeze(-1)
    assert torch.allclose(got.double(), expected, atol=1e-5)
    got.sum().backward()
    assert hidden.grad is not None

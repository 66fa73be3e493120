"""Per-token distillation divergences between a student and a teacher, plus the masking/weighting helpers.

One divergence convention everywhere (`alpha`):
  * alpha = 0: forward KL, KL(teacher‖student) = Σ_v p_t (log p_t − log p_s)
  * alpha = 1: reverse KL, KL(student‖teacher) = Σ_v p_s (log p_s − log p_t)
  * 0 < alpha < 1: generalized JSD with mixture M = (1−α)·p_s + α·p_t,
    loss = (1−α)·KL(p_s‖M) + α·KL(p_t‖M).
The endpoints are special-cased because the JSD formula degenerates to 0 there (the authors' convention).

Support modes: "full" (whole vocabulary), "topk" (the student's top-K ids, optionally with a tail bucket),
"sampled" (single-sample reverse-KL estimator on the completion token; alpha must be 1).

The teacher never receives gradients: its logits are detached / computed under no_grad.

`LogitTransform` is what some architectures do to the head's output before the softmax (Gemma-2/3 soft-capping,
Cohere/Granite scaling): the head-based paths apply it to both models' logits, forward and backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Mode = Literal["full", "topk", "sampled"]
MODES = ("full", "topk", "sampled")


@dataclass(frozen=True)
class LogitTransform:
    """logits -> softcap · tanh(scale · logits / softcap) (no tanh when softcap is None), applied to `hidden @ Wᵀ + b`
    before the temperature. Cohere: scale = logit_scale; Granite: scale = 1 / logits_scaling; Gemma-2/3:
    softcap = final_logit_softcapping. `training.modeling.logit_transform` reads it from a model config."""

    scale: float = 1.0
    softcap: float | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"logit scale must be a finite number > 0, got {self.scale}")
        if self.softcap is not None and not (math.isfinite(self.softcap) and self.softcap > 0):
            raise ValueError(f"logit softcap must be a finite number > 0 or None, got {self.softcap}")

    @property
    def is_identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None

    @property
    def is_linear(self) -> bool:
        """True when transforming a weighted sum of logits equals the weighted sum of transformed logits."""
        return self.softcap is None

    def apply(self, logits: Tensor, inplace: bool = False) -> Tensor:
        """(…, V) raw logits -> transformed logits. `inplace` only for tensors the caller owns and autograd does not
        need (the chunked paths' own matmul outputs)."""
        if self.scale != 1.0:
            logits = logits.mul_(self.scale) if inplace else logits * self.scale
        if self.softcap is not None:
            if inplace:
                logits = logits.div_(self.softcap).tanh_().mul_(self.softcap)
            else:
                logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def backward_(self, grad: Tensor, transformed: Tensor | None) -> Tensor:
        """dL/d(transformed logits) -> dL/d(raw logits), in `grad`'s storage. `transformed`: the transformed logits
        (needed only with a softcap: d/dx c·tanh(x/c) = 1 − tanh²(x/c) = 1 − (z/c)²)."""
        if self.softcap is not None:
            if transformed is None:
                raise ValueError("a soft-capped logit transform needs the transformed logits for its backward")
            squared = (transformed / self.softcap).square_()
            grad = grad.sub_(squared.mul_(grad))
            del squared
        return grad if self.scale == 1.0 else grad.mul_(self.scale)


IDENTITY = LogitTransform()


@dataclass(frozen=True)
class DivergenceOptions:
    """How `chunked_token_divergence` (and Megatron's vocab-parallel twin) compare the two distributions; the
    keyword arguments of those functions, gathered once from the flags."""

    alpha: float = 0.0
    mode: Mode = "full"
    top_k: int = 100
    tail_bucket: bool = True
    temperature: float = 1.0
    chunk_size: int = 512
    grad_memory_mib: float = 1024.0
    logit_transform: LogitTransform = IDENTITY  # the model's soft-capping / scaling of its logits
    nucleus_top_p: float = 1.0  # < 1: also return the student's top-p nucleus mass (see `full_vocabulary_logprobs`)


@dataclass
class TokenDivergence:
    loss: Tensor  # (N,) per-token divergence (float32); grad flows to the student only
    student_logprobs: Tensor  # (N,) detached log p_s(y_t) of the given completion token (full-vocab normalised)
    teacher_logprobs: Tensor  # (N,) detached log p_t(y_t)
    student_entropy: Tensor  # (N,) detached entropy of the student's full-vocab distribution
    # (N,) detached log of the probability mass of the student's top-p nucleus (`nucleus_log_mass`) when the caller
    # asked for one (`nucleus_top_p` < 1), else None
    student_nucleus_log_mass: Tensor | None = None


def _check_divergence_args(alpha: float, mode: str, top_k: int, temperature: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1] (0 = forward KL, 1 = reverse KL), got {alpha}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "sampled" and alpha != 1.0:
        raise ValueError(f"mode='sampled' is a reverse-KL estimator and needs alpha=1, got alpha={alpha}")
    if mode == "topk" and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def divergence_from_logprobs(student_logprobs: Tensor, teacher_logprobs: Tensor, alpha: float) -> Tensor:
    """(..., K) normalised log-probs on the same support -> (...) divergence summed over the last dim.

    Log-probs must be finite (p = 0 entries would give 0·∞ = nan).
    """
    s, t = student_logprobs, teacher_logprobs
    if alpha == 0.0:
        return (t.exp() * (t - s)).sum(-1)
    if alpha == 1.0:
        return (s.exp() * (s - t)).sum(-1)
    # log M computed in log space so that tiny probabilities do not underflow.
    log_m = torch.logaddexp(s + math.log(1.0 - alpha), t + math.log(alpha))
    kl_s_m = (s.exp() * (s - log_m)).sum(-1)
    kl_t_m = (t.exp() * (t - log_m)).sum(-1)
    return (1.0 - alpha) * kl_s_m + alpha * kl_t_m


def _with_tail_bucket(logprobs: Tensor) -> Tensor:
    """(..., K) log-probs of part of a distribution -> (..., K+1) with log(1 − Σ_k p) appended.

    The clamp keeps the tail finite (≈ log 1e-7) when the K entries already hold all the mass.
    """
    covered = torch.logsumexp(logprobs, dim=-1, keepdim=True).clamp(max=-1e-7)
    return torch.cat([logprobs, torch.log(-torch.expm1(covered))], dim=-1)


def topk_logprobs(
    student_logprobs: Tensor, teacher_logprobs: Tensor, top_k: int, tail_bucket: bool = True,
    support: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Restrict full-vocab log-probs (N, V) to the student's top-K ids -> two (N, K(+1)) normalised log-probs.

    The support is chosen from the detached student distribution (or given: `support`, (N, K) ids the caller already
    took from it). With `tail_bucket` one extra entry holds the remaining mass on each side; without it both sides
    are renormalised over the K entries.
    """
    if support is None:
        support = student_logprobs.detach().topk(min(top_k, student_logprobs.shape[-1]), dim=-1).indices
    s = student_logprobs.gather(-1, support)
    t = teacher_logprobs.gather(-1, support)
    if tail_bucket:
        return _with_tail_bucket(s), _with_tail_bucket(t)
    return s.log_softmax(-1), t.log_softmax(-1)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # bf16/fp16 -> float32; float64 stays float64 (gradcheck)


def nucleus_log_mass(logprobs: Tensor, top_p: float, block_rows: int = 64) -> Tensor:
    """(N, V) normalised log-probs -> (N,) log of the probability mass of each row's top-p nucleus, no graph.

    The nucleus is the rule of vLLM's and `rollout.sampling.process_scores`' top-p: the most probable tokens, in
    decreasing order, up to and including the one at which the cumulative mass reaches `top_p`. A sampler that
    renormalises over it reports log p(y) − this for a token y of the nucleus. 0 for top_p = 1. Rows are sorted
    `block_rows` at a time, so the sort's values and int64 indices stay small beside the (N, V) input.
    """
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    out = torch.zeros(logprobs.shape[:-1], dtype=logprobs.dtype, device=logprobs.device)
    if top_p == 1.0:
        return out
    with torch.no_grad():
        for start in range(0, logprobs.shape[0], block_rows):
            ordered = logprobs[start:start + block_rows].detach().sort(dim=-1, descending=True).values
            probs = ordered.exp()
            mass_before = probs.cumsum(-1).sub_(probs)  # mass of the tokens more probable than this one
            out[start:start + block_rows] = ordered.masked_fill_(mass_before >= top_p, -math.inf).logsumexp(-1)
    return out


def _scaled_log_softmax(logits: Tensor, temperature: float) -> Tensor:
    """(N, V) logits -> log-probs of softmax(logits / temperature), in float32 (float64 stays float64).

    Rebinding `logits` lets each intermediate (N, V) tensor be freed as soon as the next one exists.
    """
    logits = logits.to(_compute_dtype(logits.dtype))
    if temperature != 1.0:
        logits = logits / temperature
    return logits.log_softmax(-1)


def _log_mixture(s: Tensor, t: Tensor, alpha: float) -> Tensor:
    """No-grad log M = log((1−α) p_s + α p_t), (N, V), with one temporary instead of two."""
    log_m = s + math.log(1.0 - alpha)
    return torch.logaddexp(log_m, t + math.log(alpha), out=log_m)


def _full_divergence_no_grad(s: Tensor, t: Tensor, alpha: float) -> Tensor:
    """`divergence_from_logprobs` without autograd, overwriting `t` to save two (N, V) buffers. (N, V) -> (N,)."""
    if alpha == 0.0:
        p_t = t.exp()
        return t.sub_(s).mul_(p_t).sum(-1)
    if alpha == 1.0:
        p_s = s.exp()
        return t.neg_().add_(s).mul_(p_s).sum(-1)
    log_m = _log_mixture(s, t, alpha)
    p_t = t.exp()
    kl_t_m = t.sub_(log_m).mul_(p_t).sum(-1)
    del p_t
    kl_s_m = log_m.neg_().add_(s).mul_(s.exp()).sum(-1)
    return (1.0 - alpha) * kl_s_m + alpha * kl_t_m


def _full_divergence_and_logprob_grad(s: Tensor, t: Tensor, p_s: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """Full-vocab divergence (N,) and its gradient dL/ds (N, V) (the closed forms of `_logprob_grad`) in one pass,
    sharing exp(t), log M and p_s = exp(s) between the two. Overwrites `t`; only reads `p_s`."""
    if alpha == 0.0:
        p_t = t.exp()
        loss = t.sub_(s).mul_(p_t).sum(-1)
        return loss, p_t.neg_()
    if alpha == 1.0:
        grad = t.neg_().add_(s).mul_(p_s)  # p_s (s − t): the loss terms; + p_s makes them the gradient
        loss = grad.sum(-1)
        return loss, grad.add_(p_s)
    log_m = _log_mixture(s, t, alpha)
    p_t = t.exp()
    kl_t_m = t.sub_(log_m).mul_(p_t).sum(-1)
    del p_t
    grad = log_m.neg_().add_(s).mul_(p_s)  # p_s (s − log M): the KL(p_s‖M) terms, and the gradient / (1 − α)
    kl_s_m = grad.sum(-1)
    return (1.0 - alpha) * kl_s_m + alpha * kl_t_m, grad.mul_(1.0 - alpha)


def _divergence_on_support(
    student_logps: Tensor, teacher_logps: Tensor, ids: Tensor, alpha: float, mode: str, top_k: int,
    tail_bucket: bool, support: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Full-vocab log-probs (N, V) (+ completion ids (N,)) -> (loss, log p_s(y), log p_t(y)), each (N,).

    May overwrite `teacher_logps` (callers pass a tensor of their own that they no longer need). `support`: the
    student's top-K ids when the caller already has them (topk mode).
    """
    student_token = student_logps.gather(-1, ids.long().unsqueeze(-1)).squeeze(-1)
    teacher_token = teacher_logps.gather(-1, ids.long().unsqueeze(-1)).squeeze(-1)
    if mode == "full" and not (torch.is_grad_enabled() and student_logps.requires_grad):
        loss = _full_divergence_no_grad(student_logps, teacher_logps, alpha)
    elif mode == "full":
        loss = divergence_from_logprobs(student_logps, teacher_logps, alpha)
    elif mode == "topk":
        loss = divergence_from_logprobs(
            *topk_logprobs(student_logps, teacher_logps, top_k, tail_bucket, support), alpha)
    else:
        # Surrogate whose gradient is (log p_s(y) − log p_t(y))·∇log p_s(y): the score-function estimator of
        # the reverse-KL gradient with y ~ student.
        loss = (student_token - teacher_token).detach() * student_token
    return loss, student_token, teacher_token


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    """(N, V), (N, V) -> (N,) row-wise dot products as one batched matmul: no (N, V) product is materialised
    (3x faster than (a * b).sum(-1) on a CPU at V = 49,152)."""
    return (a.unsqueeze(-2) @ b.unsqueeze(-1)).reshape(a.shape[:-1])


def _entropy(logps: Tensor) -> Tensor:
    """(N, V) log-probs -> (N,) entropy, no graph."""
    with torch.no_grad():
        return -_row_dot(logps.exp(), logps)


def token_divergence_from_logits(
    student_logits: Tensor,
    teacher_logits: Tensor,
    completion_ids: Tensor,
    *,
    alpha: float = 0.0,
    mode: Mode = "full",
    top_k: int = 100,
    tail_bucket: bool = True,
    temperature: float = 1.0,
    logit_transform: LogitTransform = IDENTITY,
    nucleus_top_p: float = 1.0,
) -> TokenDivergence:
    """Reference path. student_logits/teacher_logits (N, V) (any float dtype; compute in float32), completion_ids (N,).

    Returns per-token (N,) tensors; see `TokenDivergence`. All log-probs are of the temperature-scaled
    distributions of the transformed logits (`logit_transform`, applied to both before the temperature).
    Gradients come from plain autograd. `nucleus_top_p` < 1 also returns `nucleus_log_mass` of the student.
    """
    _check_divergence_args(alpha, mode, top_k, temperature)
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student/teacher logits must both be (N, V), got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_logits.shape)}"
        )
    if completion_ids.shape != student_logits.shape[:1]:
        raise ValueError(f"completion_ids must be (N,)={tuple(student_logits.shape[:1])}, got {tuple(completion_ids.shape)}")

    student_logps = _scaled_log_softmax(logit_transform.apply(student_logits), temperature)
    with torch.no_grad():
        teacher_logps = _scaled_log_softmax(logit_transform.apply(teacher_logits), temperature)
    nucleus = nucleus_log_mass(student_logps, nucleus_top_p) if nucleus_top_p < 1.0 else None
    loss, student_token, teacher_token = _divergence_on_support(
        student_logps, teacher_logps, completion_ids, alpha, mode, top_k, tail_bucket
    )
    return TokenDivergence(
        loss=loss,
        student_logprobs=student_token.detach(),
        teacher_logprobs=teacher_token,
        student_entropy=_entropy(student_logps),
        student_nucleus_log_mass=nucleus,
    )


def _logprob_grad(
    student_logps: Tensor, teacher_logps: Tensor | None, ids: Tensor, alpha: float, mode: str, top_k: int,
    tail_bucket: bool, teacher_summary: tuple[Tensor, ...] | None = None,
) -> Tensor:
    """d loss_n / d log p_s(v) for every token n and vocab entry v, treating the (N, V) log-probs as free variables.

    Full mode uses closed forms (derivatives of the divergences w.r.t. s = log p_s):
      forward KL: −p_t;  reverse KL: p_s (s − t + 1);  JSD: (1−α) p_s (s − log M)
    (for the JSD the terms through log M cancel). Top-K/sampled modes differentiate the small (N, K(+1))
    problem with autograd and scatter the result into an (N, V) zero tensor; for them `teacher_summary` (from the
    forward pass: (support, teacher log-probs there) for topk, (teacher token log-probs,) for sampled) replaces
    the full teacher log-probs, so backward never recomputes the teacher's logits.
    """
    s, t = student_logps, teacher_logps
    if mode == "full":
        if alpha == 0.0:
            return t.exp().neg_()
        if alpha == 1.0:
            return (s - t).add_(1.0).mul_(s.exp())
        log_m = _log_mixture(s, t, alpha)
        return log_m.neg_().add_(s).mul_(s.exp()).mul_(1.0 - alpha)

    grad = torch.zeros_like(s)
    if mode == "sampled":
        index = ids.long().unsqueeze(-1)
        t_token = t.gather(-1, index) if teacher_summary is None else teacher_summary[0].unsqueeze(-1)
        return grad.scatter_(-1, index, s.gather(-1, index) - t_token)
    if teacher_summary is None:
        support = s.topk(min(top_k, s.shape[-1]), dim=-1).indices
        t_support = t.gather(-1, support)
    else:
        support, t_support = teacher_summary
    with torch.enable_grad():
        s_support = s.gather(-1, support).requires_grad_()
        if tail_bucket:
            s_support_full, t_support = _with_tail_bucket(s_support), _with_tail_bucket(t_support)
        else:
            s_support_full, t_support = s_support.log_softmax(-1), t_support.log_softmax(-1)
        loss = divergence_from_logprobs(s_support_full, t_support, alpha)
        (support_grad,) = torch.autograd.grad(loss.sum(), s_support)
    return grad.scatter_(-1, support, support_grad)


def _float_heads(
    s_weight: Tensor, s_bias: Tensor | None, t_weight: Tensor, t_bias: Tensor | None
) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
    """Float32 views/copies of both heads (float64 stays float64); one copy when the teacher shares the student's head
    (self-distillation)."""
    dtype = _compute_dtype(s_weight.dtype)
    s_weight32 = s_weight.to(dtype)
    same = t_weight.data_ptr() == s_weight.data_ptr() and t_weight.shape == s_weight.shape
    same = same and t_weight.stride() == s_weight.stride() and t_weight.dtype == s_weight.dtype
    t_weight32 = s_weight32 if same else t_weight.to(dtype)
    return (s_weight32, None if s_bias is None else s_bias.to(dtype), t_weight32,
            None if t_bias is None else t_bias.to(dtype))


def _head_logprobs(hidden: Tensor, weight: Tensor, bias: Tensor | None, temperature: float,
                   transform: LogitTransform, keep_transformed: bool = False) -> tuple[Tensor, Tensor | None]:
    """One chunk: hidden (chunk, H) and a compute-dtype head -> (log-probs (chunk, V), the transformed logits when
    `keep_transformed` and the transform's backward needs them (a softcap), else None). Only then do the logits
    outlive this call: one more (chunk, V) tensor, for the chunks whose gradient is formed."""
    logits = transform.apply(F.linear(hidden.to(weight.dtype), weight, bias), inplace=True)
    keep = keep_transformed and transform.softcap is not None
    return _scaled_log_softmax(logits, temperature), (logits if keep else None)


def _log_softmax_backward(grad: Tensor, student_probs: Tensor, temperature: float) -> Tensor:
    """dL/d log p_s (chunk, V) -> dL/d logits (chunk, V) of log_softmax(logits / T): (g − p_s Σ_v g) / T.

    Overwrites both arguments (the result lives in `grad`'s storage).
    """
    row_sum = grad.sum(-1, keepdim=True)
    grad = grad.sub_(student_probs.mul_(row_sum))
    return grad if temperature == 1.0 else grad.div_(temperature)


class _ChunkedDivergence(torch.autograd.Function):
    """Chunked lm_head + divergence that keeps each chunk's logit gradient from forward while a budget allows and
    recomputes the logits in backward for the chunks beyond it.

    Forward per chunk: both log-prob tensors, the divergence and, for a kept chunk, the gradient w.r.t. the chunk's
    student logits for a unit upstream gradient: g = dL/d log p_s (`_logprob_grad`, or in full mode
    `_full_divergence_and_logprob_grad` together with the divergence) pushed through log_softmax
    analytically, dz = (g − p_s Σ_v g) / T. Backward for a kept chunk is two matmuls; for any other chunk it first
    recomputes the student's log-probs (and the teacher's in full mode) to form dz the same way. Upstream gradients
    scale dz per token, so they are applied to the small (chunk, H) factors: d hidden = (dz W) · grad_loss and
    d W += dzᵀ (hidden · grad_loss), accumulated in float32.
    """

    @staticmethod
    def forward(ctx, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, ids, options):  # type: ignore[override]
        alpha, mode, top_k, tail_bucket, temperature, chunk_size, grad_budget_bytes, transform, top_p = options
        ctx.options = options
        outputs, supports, teacher_on_support, nuclei = [], [], [], []
        # needs_input_grad stays True under torch.no_grad(); the caller zeroes the budget there.
        if not any(ctx.needs_input_grad[:3]):
            grad_budget_bytes = 0
        kept_grads, kept_chunks, kept_bytes = [], [], 0
        # One float32 copy of each head for the whole pass (a no-op when already float32).
        s_weight32, s_bias32, t_weight32, t_bias32 = _float_heads(s_weight, s_bias, t_weight, t_bias)
        chunks = zip(s_hidden.split(chunk_size), t_hidden.split(chunk_size), ids.split(chunk_size), strict=True)
        for index, (s_h, t_h, y) in enumerate(chunks):
            chunk_bytes = s_h.shape[0] * s_weight32.shape[0] * s_weight32.element_size()
            keep = kept_bytes + chunk_bytes <= grad_budget_bytes
            s_logps, s_transformed = _head_logprobs(s_h, s_weight32, s_bias32, temperature, transform, keep)
            t_logps, _ = _head_logprobs(t_h, t_weight32, t_bias32, temperature, transform)
            if top_p < 1.0:
                nuclei.append(nucleus_log_mass(s_logps, top_p))
            summary = None
            if mode == "topk":  # what backward needs of the teacher, (chunk, K): it then skips the teacher's head
                support = s_logps.topk(min(top_k, s_logps.shape[-1]), dim=-1).indices
                summary = (support, t_logps.gather(-1, support))
                supports.append(summary[0])
                teacher_on_support.append(summary[1])
            if keep:
                student_probs = s_logps.exp()  # shared by the gradient, the entropy and log_softmax's backward
            # Both log-prob tensors are this loop's own, so the divergence may overwrite t_logps (so any gradient
            # that reads the teacher comes first).
            if keep and mode == "full":
                index_y = y.long().unsqueeze(-1)
                s_token, t_token = s_logps.gather(-1, index_y).squeeze(-1), t_logps.gather(-1, index_y).squeeze(-1)
                loss, grad = _full_divergence_and_logprob_grad(s_logps, t_logps, student_probs, alpha)
            else:
                if keep:
                    grad = _logprob_grad(s_logps, t_logps, y, alpha, mode, top_k, tail_bucket, summary)
                loss, s_token, t_token = _divergence_on_support(s_logps, t_logps, y, alpha, mode, top_k, tail_bucket,
                                                                None if summary is None else summary[0])
            del t_logps
            if keep:
                entropy = -_row_dot(student_probs, s_logps)
                grad_logits = _log_softmax_backward(grad, student_probs, temperature)
                del grad, student_probs
                kept_grads.append(transform.backward_(grad_logits, s_transformed))
                kept_chunks.append(index)
                kept_bytes += chunk_bytes
                del grad_logits, s_transformed
            else:
                entropy = _entropy(s_logps)
            outputs.append((loss, s_token, t_token, entropy))
            del s_logps  # loop variables outlive the iteration: free before the next chunk's logits exist
        loss, s_token, t_token, entropy = (torch.cat(parts) for parts in zip(*outputs, strict=True))
        nucleus = torch.cat(nuclei) if nuclei else torch.zeros_like(s_token)
        ctx.mark_non_differentiable(s_token, t_token, entropy, nucleus)
        if mode == "topk":
            summary = (torch.cat(supports), torch.cat(teacher_on_support))
        elif mode == "sampled":
            summary = (t_token,)
        else:
            summary = ()  # full vocabulary: backward recomputes the teacher chunk by chunk (never all of it at once)
        ctx.num_summary, ctx.kept_chunks = len(summary), kept_chunks
        # save_for_backward (not ctx attributes) so that the kept gradients are freed once backward has run.
        ctx.save_for_backward(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, ids, *summary, *kept_grads)
        return loss, s_token, t_token, entropy, nucleus

    @staticmethod
    def backward(ctx, grad_loss, *_unused):  # type: ignore[override]
        s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, ids, *saved = ctx.saved_tensors
        summary, kept = saved[:ctx.num_summary], dict(zip(ctx.kept_chunks, saved[ctx.num_summary:], strict=True))
        alpha, mode, top_k, tail_bucket, temperature, chunk_size, _, transform, _ = ctx.options
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]

        s_weight32, s_bias32, t_weight32, t_bias32 = _float_heads(s_weight, s_bias, t_weight, t_bias)
        grad_hidden = torch.empty_like(s_hidden) if need_hidden else None
        grad_weight = torch.zeros_like(s_weight32) if need_weight else None
        grad_bias = torch.zeros_like(s_bias32) if need_bias else None
        for index, start in enumerate(range(0, s_hidden.shape[0], chunk_size)):
            rows = slice(start, start + chunk_size)
            s_h = s_hidden[rows].to(s_weight32.dtype)
            if index in kept:
                grad_logits = kept[index]
            else:
                s_logps, s_transformed = _head_logprobs(s_h, s_weight32, s_bias32, temperature, transform, True)
                if summary:
                    grad = _logprob_grad(s_logps, None, ids[rows], alpha, mode, top_k, tail_bucket,
                                         tuple(part[rows] for part in summary))
                else:
                    t_logps, _ = _head_logprobs(t_hidden[rows], t_weight32, t_bias32, temperature, transform)
                    grad = _logprob_grad(s_logps, t_logps, ids[rows], alpha, mode, top_k, tail_bucket)
                    del t_logps
                grad_logits = _log_softmax_backward(grad, s_logps.exp_(), temperature)
                del grad, s_logps
                grad_logits = transform.backward_(grad_logits, s_transformed)
                del s_transformed
            # dz for the upstream gradient is grad_logits · grad_loss per row: scaling the (chunk, H) factors costs
            # no pass over (chunk, V).
            scale = grad_loss[rows].to(grad_logits.dtype).unsqueeze(-1)
            if need_hidden:
                grad_hidden[rows] = ((grad_logits @ s_weight32) * scale).to(s_hidden.dtype)
            if need_weight:
                grad_weight.addmm_(grad_logits.T, s_h * scale)
            if need_bias:
                grad_bias.add_(scale.squeeze(-1) @ grad_logits)
            del grad_logits  # free before the next chunk's logits exist
        if grad_weight is not None:
            grad_weight = grad_weight.to(s_weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(s_bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


def chunked_token_divergence(
    student_hidden: Tensor,
    student_head_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_head_weight: Tensor,
    completion_ids: Tensor,
    *,
    student_head_bias: Tensor | None = None,
    teacher_head_bias: Tensor | None = None,
    alpha: float = 0.0,
    mode: Mode = "full",
    top_k: int = 100,
    tail_bucket: bool = True,
    temperature: float = 1.0,
    chunk_size: int = 512,
    grad_memory_mib: float = 1024,
    logit_transform: LogitTransform = IDENTITY,
    nucleus_top_p: float = 1.0,
) -> TokenDivergence:
    """Memory-lean path: hidden states (N, H) of the completion positions and the lm_head weights (V, H).

    Computes logits = hidden @ weight.T (+bias) chunk by chunk over the N tokens in float32, so that full-vocab
    logits of all N tokens are never held at once. Gradients flow to student_hidden and student_head_weight (and
    bias) only; the teacher inputs are treated as constants.

    When the student needs a gradient, forward also computes each chunk's gradient w.r.t. its student logits,
    (chunk_size, V) float32, and keeps it for backward while the kept total stays within `grad_memory_mib` MiB;
    backward then only multiplies it with the head and the hidden states (2 head matmuls instead of 4, or 3 in
    topk/sampled mode). Chunks beyond the budget keep only the inputs: backward recomputes their student logits,
    and the teacher's in full mode (topk mode also saves the (N, K) support and the teacher's log-probs there,
    sampled mode the teacher's token log-probs, so that backward skips the teacher's head). `grad_memory_mib=0`
    always recomputes. Peak extra memory is the kept gradients (at most the budget and 4·N·V bytes) plus about
    five (chunk_size, V) float32 tensors plus a float32 copy of the heads when they are not float32 already.
    Values equal `token_divergence_from_logits` on the explicit logits, whatever the budget.

    `logit_transform` (soft-capping/scaling, `training.modeling.logit_transform`) is applied to both models' logits
    before the temperature, and its derivative in backward; a softcap costs one more (chunk_size, V) tensor for the
    chunks whose gradient is formed. `nucleus_top_p` < 1 also returns `student_nucleus_log_mass` (N,): what a top-p
    sampler's renormalisation subtracts from the student's log-probs (`nucleus_log_mass`; a sort per chunk).
    """
    _check_divergence_args(alpha, mode, top_k, temperature)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if not grad_memory_mib >= 0:
        raise ValueError(f"grad_memory_mib must be >= 0, got {grad_memory_mib}")
    if not 0.0 < nucleus_top_p <= 1.0:
        raise ValueError(f"nucleus_top_p must lie in (0, 1], got {nucleus_top_p}")
    n = student_hidden.shape[0]
    if student_hidden.dim() != 2 or teacher_hidden.shape[0] != n or completion_ids.shape != (n,):
        raise ValueError(
            f"expected student_hidden (N, H), teacher_hidden (N, H'), completion_ids (N,); got "
            f"{tuple(student_hidden.shape)}, {tuple(teacher_hidden.shape)}, {tuple(completion_ids.shape)}"
        )
    if student_head_weight.shape[0] != teacher_head_weight.shape[0]:
        raise ValueError(
            f"student and teacher heads must share the vocabulary, got {student_head_weight.shape[0]} "
            f"and {teacher_head_weight.shape[0]} rows"
        )
    # Inside Function.forward needs_input_grad stays True under torch.no_grad(), so grad mode is checked here: with
    # no backward to come, computing and keeping logit gradients would be wasted work and memory.
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (student_hidden, student_head_weight, student_head_bias))
    grad_budget_bytes = int(grad_memory_mib * 2**20) if wants_grad else 0
    options = (alpha, mode, top_k, tail_bucket, temperature, chunk_size, grad_budget_bytes, logit_transform,
               nucleus_top_p)
    # Detaching the teacher inputs makes "teacher gets no gradient" structural, not a convention of backward.
    teacher_bias = None if teacher_head_bias is None else teacher_head_bias.detach()
    loss, student_logprobs, teacher_logprobs, entropy, nucleus = _ChunkedDivergence.apply(
        student_hidden, student_head_weight, student_head_bias,
        teacher_hidden.detach(), teacher_head_weight.detach(), teacher_bias, completion_ids, options,
    )
    return TokenDivergence(loss, student_logprobs, teacher_logprobs, entropy,
                           nucleus if nucleus_top_p < 1.0 else None)

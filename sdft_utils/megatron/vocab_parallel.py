"""The alpha-family divergences of `sdft_utils.losses` over logits sharded along the vocabulary (tensor parallelism).

Under Megatron tensor parallelism the output head is a column-parallel linear: TP rank r holds the rows
[r·V_local, (r+1)·V_local) of the (padded) vocabulary and computes only those logits. Nothing here ever gathers a
full-vocabulary row. Per token:
  log-softmax: m = all-reduce MAX of the local maxima, S = all-reduce SUM of Σ_local exp(z − m), s = z − m − log S;
  full mode:   every divergence is a sum over v of an elementwise term of (s_v, t_v) -> local partial sums + one
               all-reduce SUM (log M of the JSD mixture is elementwise, it needs no communication);
  topk mode:   distributed top-K: local top-K of the student, all-gather the tp·K candidates, global top-K, then read
               both log-probs at those global ids on their owner rank (one all-reduce SUM of an (N, K) tensor). The
               small (N, K(+1)) problem (tail bucket or renormalisation) is then identical on every rank;
  sampled:     the student's and teacher's log-probs of the completion token (owner rank + all-reduce SUM).

Gradients come from a custom autograd function (no autograd through collectives): for the local log-probs the
gradient g = dL/ds is elementwise (full: closed forms from `losses._logprob_grad`; topk/sampled: nonzero only on the
owned support ids), and the log-softmax backward dz = (g − p_s·Σ_v g)/T needs one global row sum (all-reduce, or
nothing in topk/sampled where g lives on the replicated support). The loss is
replicated on every TP rank and counted once; the only cross-rank gradient term is Σ_v g.

Two entry points: `vocab_parallel_divergence_from_logits` on logits shards (N, V_local) (e.g. a GPTModel output;
its output layer's backward then all-reduces the hidden-state gradient), and `vocab_parallel_token_divergence` on
the replicated hidden states (N, H) and this rank's head shard (V_local, H), chunked over tokens like
`losses.chunked_token_divergence` so (N, V_local) logits are never held for all tokens; its backward all-reduces the
hidden-state gradient itself. Values and gradients equal the single-process functions on the full vocabulary.
A `LogitTransform` (soft-capping/scaling) is elementwise, so it applies to each shard's logits as is, and its
derivative multiplies each shard's logit gradient. The top-p nucleus mass of `losses.chunked_token_divergence`
(`nucleus_top_p`) needs a global sort of every row and is not offered here.
Plain torch.distributed: no megatron-core needed.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from sdft_utils.losses.divergence import (
    IDENTITY,
    LogitTransform,
    Mode,
    TokenDivergence,
    _check_divergence_args,
    _log_mixture,
    _with_tail_bucket,
    divergence_from_logprobs,
)


def vocab_shard_range(local_width: int, vocab_size: int, group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """This rank's slice [start, end) of the real vocabulary, for shards of `local_width` columns laid out in TP-rank
    order. Columns at or beyond `vocab_size` are Megatron's vocabulary padding (end may equal start on a rank that
    holds only padding)."""
    start = dist.get_rank(group) * local_width
    return min(start, vocab_size), min(start + local_width, vocab_size)


def _all_reduce(tensor: Tensor, group: dist.ProcessGroup | None, op=dist.ReduceOp.SUM) -> Tensor:
    dist.all_reduce(tensor, op=op, group=group)
    return tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # bf16 -> float32, float64 stays float64 (tests)


def _shard_logprobs(logits: Tensor, temperature: float, group: dist.ProcessGroup | None) -> Tensor:
    """(N, V_valid) local logits -> local log-probs of the distribution over the whole (sharded) vocabulary."""
    logits = logits.to(_compute_dtype(logits.dtype))
    if temperature != 1.0:
        logits = logits / temperature
    if logits.shape[-1]:
        local_max = logits.amax(-1)
    else:  # a rank holding only vocabulary padding
        local_max = torch.full(logits.shape[:1], -math.inf, dtype=logits.dtype, device=logits.device)
    global_max = _all_reduce(local_max, group, dist.ReduceOp.MAX)
    logits = logits - global_max.unsqueeze(-1)
    sum_exp = _all_reduce(logits.exp().sum(-1), group)
    return logits.sub_(sum_exp.log().unsqueeze(-1))


def _gather_global(logprobs: Tensor, ids: Tensor, start: int, group: dist.ProcessGroup | None) -> Tensor:
    """Read local log-probs (N, V_valid) at global vocabulary ids (N, K): the owner rank reads, the others add 0."""
    local = ids - start
    width = logprobs.shape[-1]
    if not width:  # a rank holding only vocabulary padding owns nothing
        return _all_reduce(torch.zeros(ids.shape, dtype=logprobs.dtype, device=logprobs.device), group)
    owned = (local >= 0) & (local < width)
    values = logprobs.gather(-1, local.clamp(0, width - 1))
    return _all_reduce(torch.where(owned, values, 0.0), group)


def distributed_topk(values: Tensor, k: int, start: int, group: dist.ProcessGroup | None) -> Tensor:
    """Global ids (N, k) of the k largest entries of a row sharded over the group (local (N, V_valid) values at global
    offset `start`): local top-k, all-gather the tp·k candidates, top-k of those. Ranks agree on the result."""
    width = values.shape[-1]
    local_k = min(k, width)
    top = values.topk(local_k, dim=-1) if local_k else None
    # Every rank must contribute the same shape to all_gather: pad with -inf candidates.
    cand_values = torch.full((values.shape[0], k), -math.inf, dtype=values.dtype, device=values.device)
    cand_ids = torch.zeros((values.shape[0], k), dtype=torch.long, device=values.device)
    if top is not None:
        cand_values[:, :local_k] = top.values
        cand_ids[:, :local_k] = top.indices + start
    world = dist.get_world_size(group)
    all_values = [torch.empty_like(cand_values) for _ in range(world)]
    all_ids = [torch.empty_like(cand_ids) for _ in range(world)]
    dist.all_gather(all_values, cand_values, group=group)
    dist.all_gather(all_ids, cand_ids, group=group)
    best = torch.cat(all_values, -1).topk(k, dim=-1).indices
    return torch.cat(all_ids, -1).gather(-1, best)


def _support_problem(s_support: Tensor, t_support: Tensor, tail_bucket: bool) -> tuple[Tensor, Tensor]:
    """(N, K) full-vocab log-probs at the support -> the two normalised (N, K(+1)) distributions (as losses.topk_logprobs)."""
    if tail_bucket:
        return _with_tail_bucket(s_support), _with_tail_bucket(t_support)
    return s_support.log_softmax(-1), t_support.log_softmax(-1)


def _chunk_forward(s_logits: Tensor, t_logits: Tensor, ids: Tensor, options: tuple, start: int, group
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Valid local logits of one chunk -> replicated (loss, log p_s(y), log p_t(y), student entropy), each (N,)."""
    alpha, mode, top_k, tail_bucket, temperature, transform, vocab_size = options
    s = _shard_logprobs(transform.apply(s_logits), temperature, group)
    t = _shard_logprobs(transform.apply(t_logits), temperature, group)
    tokens = _gather_global(torch.stack([s, t]).flatten(0, 1), ids.long().repeat(2).unsqueeze(-1), start, group)
    s_token, t_token = tokens.squeeze(-1).chunk(2)
    entropy = _all_reduce(-(s.exp() * s).sum(-1), group)
    if mode == "full":
        loss = _all_reduce(divergence_from_logprobs(s, t, alpha), group)
    elif mode == "topk":
        support = distributed_topk(s, min(top_k, vocab_size), start, group)
        pair = _gather_global(torch.stack([s, t]).flatten(0, 1), support.repeat(2, 1), start, group)
        loss = divergence_from_logprobs(*_support_problem(*pair.chunk(2), tail_bucket), alpha)
    else:
        loss = (s_token - t_token) * s_token  # the value of losses' score-function surrogate
    return loss, s_token, t_token, entropy


def _chunk_grad_logits(s_logits: Tensor, t_logits: Tensor, ids: Tensor, grad_loss: Tensor, options: tuple,
                       start: int, group) -> Tensor:
    """d(Σ_n grad_loss_n · loss_n) / d(local logits) for one chunk, (N, V_valid) in the compute dtype."""
    alpha, mode, top_k, tail_bucket, temperature, transform, vocab_size = options
    s_transformed = transform.apply(s_logits.to(_compute_dtype(s_logits.dtype)))
    s = _shard_logprobs(s_transformed, temperature, group)
    t = _shard_logprobs(transform.apply(t_logits), temperature, group)
    weight = grad_loss.to(s.dtype).unsqueeze(-1)
    if mode == "full":
        # Closed forms of dL/ds (see losses._logprob_grad); elementwise, so local.
        if alpha == 0.0:
            grad = t.exp().neg_()
        elif alpha == 1.0:
            grad = (s - t).add_(1.0).mul_(s.exp())
        else:
            grad = _log_mixture(s, t, alpha).neg_().add_(s).mul_(s.exp()).mul_(1.0 - alpha)
        grad.mul_(weight)
        row_sum = _all_reduce(grad.sum(-1, keepdim=True), group)
    else:
        if mode == "topk":
            support = distributed_topk(s, min(top_k, vocab_size), start, group)
        else:
            support = ids.long().unsqueeze(-1)
        pair = _gather_global(torch.stack([s, t]).flatten(0, 1), support.repeat(2, 1), start, group)
        s_support, t_support = pair.chunk(2)
        if mode == "topk":
            with torch.enable_grad():
                s_support = s_support.detach().requires_grad_()
                loss = divergence_from_logprobs(*_support_problem(s_support, t_support, tail_bucket), alpha)
                (support_grad,) = torch.autograd.grad((loss * weight.squeeze(-1)).sum(), s_support)
        else:
            support_grad = (s_support - t_support) * weight
        # The support gradient is replicated, so its row sum needs no communication; scatter the owned ids.
        row_sum = support_grad.sum(-1, keepdim=True)
        local = support - start
        owned = (local >= 0) & (local < s.shape[-1])
        grad = torch.zeros_like(s)
        if s.shape[-1]:
            grad.scatter_add_(-1, local.clamp(0, s.shape[-1] - 1), torch.where(owned, support_grad, 0.0))
    # log-softmax backward: dz = (g − p_s Σ_v g) / T, then through the logit transform (elementwise, local)
    return transform.backward_(grad.sub_(s.exp_().mul_(row_sum)).div_(temperature), s_transformed)


class _VocabParallelDivergence(torch.autograd.Function):
    """Chunked over tokens; saves only the inputs and recomputes each chunk's logits in backward.

    With `s_weight` None the first input is the logits shard itself (N, V_local); otherwise it is the replicated
    hidden state (N, H) and logits = hidden @ weightᵀ (+ bias) per chunk.
    """

    @staticmethod
    def forward(ctx, s_input, s_weight, s_bias, t_input, t_weight, t_bias, ids, options, chunk_size, group):  # type: ignore[override]
        ctx.save_for_backward(s_input, s_weight, s_bias, t_input, t_weight, t_bias, ids)
        ctx.options, ctx.chunk_size, ctx.group = options, chunk_size, group
        width = s_input.shape[-1] if s_weight is None else s_weight.shape[0]
        start, end = vocab_shard_range(width, options[-1], group)
        ctx.start, ctx.valid = start, end - start
        s_weight_c, s_bias_c, t_weight_c, t_bias_c = _valid_heads(ctx.valid, s_weight, s_bias, t_weight, t_bias)
        outputs = []
        for rows in _chunks(s_input.shape[0], chunk_size):
            s_logits = _logits(s_input[rows], s_weight_c, s_bias_c, ctx.valid)
            t_logits = _logits(t_input[rows], t_weight_c, t_bias_c, ctx.valid)
            outputs.append(_chunk_forward(s_logits, t_logits, ids[rows], options, start, group))
        loss, s_token, t_token, entropy = (torch.cat(parts) for parts in zip(*outputs, strict=True))
        ctx.mark_non_differentiable(s_token, t_token, entropy)
        return loss, s_token, t_token, entropy

    @staticmethod
    def backward(ctx, grad_loss, *_unused):  # type: ignore[override]
        s_input, s_weight, s_bias, t_input, t_weight, t_bias, ids = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_input = torch.zeros_like(s_input) if need_input else None
        grad_weight = torch.zeros_like(s_weight, dtype=_compute_dtype(s_weight.dtype)) if need_weight else None
        grad_bias = torch.zeros_like(s_bias, dtype=_compute_dtype(s_bias.dtype)) if need_bias else None
        s_weight_c, s_bias_c, t_weight_c, t_bias_c = _valid_heads(ctx.valid, s_weight, s_bias, t_weight, t_bias)
        for rows in _chunks(s_input.shape[0], ctx.chunk_size):
            s_logits = _logits(s_input[rows], s_weight_c, s_bias_c, ctx.valid)
            t_logits = _logits(t_input[rows], t_weight_c, t_bias_c, ctx.valid)
            dz = _chunk_grad_logits(s_logits, t_logits, ids[rows], grad_loss[rows], ctx.options, ctx.start, ctx.group)
            if s_weight is None:
                if need_input:
                    grad_input[rows, :ctx.valid] = dz.to(s_input.dtype)  # padded columns get zero gradient
                continue
            if need_input:
                grad_input[rows] = (dz @ s_weight_c).to(s_input.dtype)
            if need_weight:
                grad_weight[:ctx.valid].addmm_(dz.T, s_input[rows].to(dz.dtype))
            if need_bias:
                grad_bias[:ctx.valid].add_(dz.sum(0))
        if s_weight is not None and need_input:
            # The hidden state is replicated over the TP ranks and each rank saw only its vocabulary rows.
            _all_reduce(grad_input, ctx.group)
        if grad_weight is not None:
            grad_weight = grad_weight.to(s_weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(s_bias.dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, None


def _chunks(n: int, chunk_size: int) -> list[slice]:
    return [slice(start, start + chunk_size) for start in range(0, n, chunk_size)]


def _valid_heads(valid: int, *tensors: Tensor | None) -> list[Tensor | None]:
    """The heads' real-vocabulary rows in the compute dtype, converted once per pass (not once per chunk)."""
    return [None if t is None else t[:valid].to(_compute_dtype(t.dtype)) for t in tensors]


def _logits(inputs: Tensor, weight: Tensor | None, bias: Tensor | None, valid: int) -> Tensor:
    """One chunk's logits over this rank's real-vocabulary columns (a logits-shard input is just sliced)."""
    if weight is None:
        return inputs[:, :valid]
    return F.linear(inputs.to(weight.dtype), weight, bias)


def _check_shapes(student: Tensor, teacher: Tensor, ids: Tensor, vocab_size: int, width: int,
                  group: dist.ProcessGroup | None) -> None:
    n = student.shape[0]
    if student.dim() != 2 or teacher.dim() != 2 or teacher.shape[0] != n or ids.shape != (n,):
        raise ValueError(f"expected student (N, ·), teacher (N, ·), completion_ids (N,); got {tuple(student.shape)}, "
                         f"{tuple(teacher.shape)}, {tuple(ids.shape)}")
    if width * dist.get_world_size(group) < vocab_size:
        raise ValueError(f"{dist.get_world_size(group)} vocabulary shards of {width} columns cannot hold "
                         f"vocab_size={vocab_size}")


def _refuse_nucleus(top_p: float) -> None:
    if top_p != 1.0:
        raise ValueError(
            "the top-p nucleus mass (nucleus_top_p < 1) needs a global sort over the sharded vocabulary, which the "
            "vocab-parallel loss does not do. Sample with --top_p 1.0 under --backend megatron with a vLLM engine, or "
            "use --rollout hf, whose log-probs are full-vocabulary and need no nucleus mass.")


def vocab_parallel_divergence_from_logits(
    student_logits: Tensor,
    teacher_logits: Tensor,
    completion_ids: Tensor,
    *,
    vocab_size: int,
    group: dist.ProcessGroup | None = None,
    alpha: float = 0.0,
    mode: Mode = "full",
    top_k: int = 100,
    tail_bucket: bool = True,
    temperature: float = 1.0,
    chunk_size: int = 512,
    logit_transform: LogitTransform = IDENTITY,
    nucleus_top_p: float = 1.0,
) -> TokenDivergence:
    """Logits shards (N, V_local) of this TP rank (same layout for student and teacher), global completion ids (N,)
    -> per-token (N,) values replicated on every rank, equal to `losses.token_divergence_from_logits` on the full
    (N, vocab_size) logits. Columns beyond `vocab_size` (vocabulary padding) are ignored and get zero gradient.
    The gradient flows to the student logits only. `logit_transform` is applied to both shards' raw logits.
    `nucleus_top_p` exists for call compatibility with `losses.chunked_token_divergence`; only 1.0 is accepted."""
    _check_divergence_args(alpha, mode, top_k, temperature)
    _refuse_nucleus(nucleus_top_p)
    _check_shapes(student_logits, teacher_logits, completion_ids, vocab_size, student_logits.shape[-1], group)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"student/teacher logit shards differ: {tuple(student_logits.shape)} vs "
                         f"{tuple(teacher_logits.shape)}")
    options = (alpha, mode, top_k, tail_bucket, temperature, logit_transform, vocab_size)
    loss, s_token, t_token, entropy = _VocabParallelDivergence.apply(
        student_logits, None, None, teacher_logits.detach(), None, None, completion_ids, options, chunk_size, group)
    return TokenDivergence(loss, s_token, t_token, entropy)


def vocab_parallel_token_divergence(
    student_hidden: Tensor,
    student_head_shard: Tensor,
    teacher_hidden: Tensor,
    teacher_head_shard: Tensor,
    completion_ids: Tensor,
    *,
    vocab_size: int,
    group: dist.ProcessGroup | None = None,
    student_head_bias: Tensor | None = None,
    teacher_head_bias: Tensor | None = None,
    alpha: float = 0.0,
    mode: Mode = "full",
    top_k: int = 100,
    tail_bucket: bool = True,
    temperature: float = 1.0,
    chunk_size: int = 512,
    logit_transform: LogitTransform = IDENTITY,
    nucleus_top_p: float = 1.0,
) -> TokenDivergence:
    """Memory-lean path: hidden states (N, H) replicated on the TP ranks (no sequence parallelism) and this rank's
    head rows (V_local, H) -> the same per-token values as `losses.chunked_token_divergence` on the full head.

    Gradients reach student_hidden (already summed over the TP group, as the replicated input of a column-parallel
    linear expects), student_head_shard and its bias; the teacher inputs are constants. `logit_transform` as in
    `losses.chunked_token_divergence`; `nucleus_top_p` must be 1.0 (see `vocab_parallel_divergence_from_logits`)."""
    _check_divergence_args(alpha, mode, top_k, temperature)
    _refuse_nucleus(nucleus_top_p)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    _check_shapes(student_hidden, teacher_hidden, completion_ids, vocab_size, student_head_shard.shape[0], group)
    if teacher_head_shard.shape[0] != student_head_shard.shape[0]:
        raise ValueError(f"student and teacher head shards must hold the same vocabulary rows, got "
                         f"{student_head_shard.shape[0]} and {teacher_head_shard.shape[0]}")
    options = (alpha, mode, top_k, tail_bucket, temperature, logit_transform, vocab_size)
    teacher_bias = None if teacher_head_bias is None else teacher_head_bias.detach()
    loss, s_token, t_token, entropy = _VocabParallelDivergence.apply(
        student_hidden, student_head_shard, student_head_bias, teacher_hidden.detach(), teacher_head_shard.detach(),
        teacher_bias, completion_ids, options, chunk_size, group)
    return TokenDivergence(loss, s_token, t_token, entropy)


class _VocabParallelTokenLogprobs(torch.autograd.Function):
    """log p(y_t) over a vocabulary-sharded head, chunked over tokens; backward recomputes each chunk's logits.

    d log p(y)/dz_v = (1[v = y] - p_v) / T, so each rank's logit gradient needs only its own columns and the token
    id; the replicated hidden state's gradient is then summed over the TP group, as in `_VocabParallelDivergence`."""

    @staticmethod
    def forward(ctx, hidden, weight, ids, temperature, vocab_size, chunk_size, group):  # type: ignore[override]
        ctx.save_for_backward(hidden, weight, ids)
        ctx.temperature, ctx.chunk_size, ctx.group = temperature, chunk_size, group
        start, end = vocab_shard_range(weight.shape[0], vocab_size, group)
        ctx.start, ctx.valid = start, end - start
        (head,) = _valid_heads(ctx.valid, weight)
        values = [_gather_global(_shard_logprobs(_logits(hidden[rows], head, None, ctx.valid), temperature, group),
                                 ids[rows, None], start, group)[:, 0] for rows in _chunks(hidden.shape[0], chunk_size)]
        return torch.cat(values) if values else hidden.new_zeros(0, dtype=_compute_dtype(hidden.dtype))

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        hidden, weight, ids = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        (head,) = _valid_heads(ctx.valid, weight)
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=_compute_dtype(weight.dtype)) if need_weight else None
        for rows in _chunks(hidden.shape[0], ctx.chunk_size):
            logprobs = _shard_logprobs(_logits(hidden[rows], head, None, ctx.valid), ctx.temperature, ctx.group)
            local = ids[rows] - ctx.start
            owned = (local >= 0) & (local < ctx.valid)
            dz = -logprobs.exp()
            dz[owned, local[owned]] += 1.0
            dz *= grad_output[rows, None].to(dz.dtype) / ctx.temperature
            if need_hidden:
                grad_hidden[rows] = (dz @ head).to(hidden.dtype)
            if need_weight:
                grad_weight[:ctx.valid].addmm_(dz.T, hidden[rows].to(dz.dtype))
        if need_hidden:
            _all_reduce(grad_hidden, ctx.group)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def vocab_parallel_token_logprobs(hidden: Tensor, head_shard: Tensor, completion_ids: Tensor, *, vocab_size: int,
                                  group: dist.ProcessGroup | None = None, temperature: float = 1.0,
                                  chunk_size: int = 512) -> Tensor:
    """log pi(y_t) (N,) from replicated hidden states (N, H) and this rank's head rows (V_local, H): the same values
    and gradients as `sdft_utils.sdpo.policy_gradient.token_logprobs` on the full head."""
    if hidden.dim() != 2 or completion_ids.shape != hidden.shape[:1]:
        raise ValueError(f"expected hidden (N, H) and completion_ids (N,), got {tuple(hidden.shape)}, "
                         f"{tuple(completion_ids.shape)}")
    return _VocabParallelTokenLogprobs.apply(hidden, head_shard, completion_ids, temperature, vocab_size, chunk_size,
                                             group)

"""Tests for sdft_utils.losses: divergences pinned against float64 hand computations, the chunked path against
the reference path, memory boundedness of the chunked path, and the masking/weighting helpers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sdft_utils.losses import divergence as losses
from sdft_utils.losses.divergence import (
    TokenDivergence,
    chunked_token_divergence,
    divergence_from_logprobs,
    token_divergence_from_logits,
    topk_logprobs,
)
from sdft_utils.losses.weighting import (
    completion_loss_mask,
    entropy_quantile_mask,
    kl_k3,
    scatter_rows,
    sequence_is_weights,
    sequence_mean_loss,
)
from sdft_utils.testing import LiveTensorBytes

N, V, K = 5, 11, 4

# (alpha, mode, tail_bucket) for every alpha × support mode the module supports.
DIVERGENCE_CASES = [(a, "full", True) for a in (0.0, 0.25, 0.5, 1.0)]
DIVERGENCE_CASES += [(a, "topk", tail) for a in (0.0, 0.25, 0.5, 1.0) for tail in (True, False)]
DIVERGENCE_CASES += [(1.0, "sampled", True)]


def case_id(case: tuple[float, str, bool]) -> str:
    alpha, mode, tail = case
    return f"{mode}{'' if mode != 'topk' else ('+tail' if tail else '-tail')}-a{alpha}"


def random_logits(seed: int, n: int = N, v: int = V, scale: float = 2.5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(n, v, generator=g) * scale
    teacher = torch.randn(n, v, generator=g) * scale
    ids = torch.randint(0, v, (n,), generator=g)
    return student, teacher, ids


def hand_divergence(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, ids: torch.Tensor, alpha: float, mode: str,
    top_k: int = K, tail: bool = True, temperature: float = 1.0,
) -> torch.Tensor:
    """Float64, one token at a time, with the formulas written out (no code under test). (N, V) -> (N,)."""
    losses = []
    for n in range(student_logits.shape[0]):
        zs = student_logits[n].double() / temperature
        zt = teacher_logits[n].double() / temperature
        ps = torch.exp(zs - zs.max())
        ps = ps / ps.sum()
        pt = torch.exp(zt - zt.max())
        pt = pt / pt.sum()
        if mode == "sampled":
            y = int(ids[n])
            log_ps_y, log_pt_y = torch.log(ps[y]), torch.log(pt[y])
            losses.append((log_ps_y - log_pt_y).detach() * log_ps_y)
            continue
        if mode == "topk":
            # Support: the student's K most likely ids.
            order = sorted(range(len(zs)), key=lambda v: -float(zs[v].detach()))[:top_k]
            qs, qt = ps[order], pt[order]
            if tail:
                qs = torch.cat([qs, (1 - qs.sum()).reshape(1)])
                qt = torch.cat([qt, (1 - qt.sum()).reshape(1)])
            else:
                qs, qt = qs / qs.sum(), qt / qt.sum()
        else:
            qs, qt = ps, pt
        if alpha == 0.0:
            loss = (qt * torch.log(qt / qs)).sum()
        elif alpha == 1.0:
            loss = (qs * torch.log(qs / qt)).sum()
        else:
            m = (1 - alpha) * qs + alpha * qt
            loss = (1 - alpha) * (qs * torch.log(qs / m)).sum() + alpha * (qt * torch.log(qt / m)).sum()
        losses.append(loss)
    return torch.stack(losses)


# --------------------------------------------------------------------------------------------------------------
# Reference path against float64 hand computations


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("case", DIVERGENCE_CASES, ids=case_id)
def test_values_and_grads_match_hand_computation(case, temperature):
    alpha, mode, tail = case
    student, teacher, ids = random_logits(seed=1)
    weights = torch.rand(N, generator=torch.Generator().manual_seed(2)) + 0.5  # checks every token's grad

    s32 = student.clone().requires_grad_()
    out = token_divergence_from_logits(
        s32, teacher, ids, alpha=alpha, mode=mode, top_k=K, tail_bucket=tail, temperature=temperature
    )
    (out.loss * weights).sum().backward()

    s64 = student.double().requires_grad_()
    expected = hand_divergence(s64, teacher, ids, alpha, mode, K, tail, temperature)
    (expected * weights.double()).sum().backward()

    assert out.loss.dtype == torch.float32 and out.loss.shape == (N,)
    torch.testing.assert_close(out.loss.double(), expected.detach(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(s32.grad.double(), s64.grad, atol=1e-5, rtol=1e-4)
    assert s64.grad.abs().max() > 1e-3  # the gradient comparison is not vacuous


def test_token_logprobs_and_entropy_match_hand_computation():
    student, teacher, ids = random_logits(seed=3)
    out = token_divergence_from_logits(student.requires_grad_(), teacher, ids, temperature=0.7)
    ls = torch.log_softmax(student.detach().double() / 0.7, -1)
    lt = torch.log_softmax(teacher.double() / 0.7, -1)
    torch.testing.assert_close(out.student_logprobs.double(), ls[torch.arange(N), ids], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.teacher_logprobs.double(), lt[torch.arange(N), ids], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.student_entropy.double(), -(ls.exp() * ls).sum(-1), atol=1e-6, rtol=1e-5)
    assert not (out.student_logprobs.requires_grad or out.teacher_logprobs.requires_grad)
    assert not out.student_entropy.requires_grad


def test_direction_forward_and_reverse_kl():
    p_s, p_t = [0.4, 0.3, 0.3], [0.9, 0.05, 0.05]
    forward = sum(t * math.log(t / s) for s, t in zip(p_s, p_t, strict=True))  # KL(teacher‖student)
    reverse = sum(s * math.log(s / t) for s, t in zip(p_s, p_t, strict=True))  # KL(student‖teacher)
    assert abs(forward - reverse) > 0.1
    student = torch.tensor([p_s]).log()
    teacher = torch.tensor([p_t]).log()
    ids = torch.tensor([0])
    got_forward = token_divergence_from_logits(student, teacher, ids, alpha=0.0).loss.item()
    got_reverse = token_divergence_from_logits(student, teacher, ids, alpha=1.0).loss.item()
    assert got_forward == pytest.approx(forward, abs=1e-6)
    assert got_reverse == pytest.approx(reverse, abs=1e-6)
    # F.kl_div(input, target) is KL(target‖input): with the student as input it is the forward KL.
    torch_forward = F.kl_div(student, teacher, log_target=True, reduction="sum").item()
    assert got_forward == pytest.approx(torch_forward, abs=1e-6)


def test_jsd_is_symmetric_at_half_and_bounded():
    student, teacher, ids = random_logits(seed=4)
    a = token_divergence_from_logits(student, teacher, ids, alpha=0.5).loss
    b = token_divergence_from_logits(teacher, student, ids, alpha=0.5).loss
    torch.testing.assert_close(a, b)
    assert (a >= 0).all() and (a <= math.log(2) + 1e-6).all()
    # Not symmetric away from 0.5: swapping roles is the same as alpha -> 1 - alpha.
    c = token_divergence_from_logits(student, teacher, ids, alpha=0.25).loss
    d = token_divergence_from_logits(teacher, student, ids, alpha=0.75).loss
    torch.testing.assert_close(c, d)
    assert not torch.allclose(c, token_divergence_from_logits(teacher, student, ids, alpha=0.25).loss)


@pytest.mark.parametrize("case", DIVERGENCE_CASES, ids=case_id)
def test_teacher_gets_no_gradient(case):
    alpha, mode, tail = case
    student, teacher, ids = random_logits(seed=5)
    student.requires_grad_()
    teacher.requires_grad_()
    out = token_divergence_from_logits(student, teacher, ids, alpha=alpha, mode=mode, top_k=K, tail_bucket=tail)
    out.loss.sum().backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_sampled_gradient_is_logratio_times_score():
    temperature = 0.8
    student, teacher, ids = random_logits(seed=6)
    student.requires_grad_()
    out = token_divergence_from_logits(student, teacher, ids, alpha=1.0, mode="sampled", temperature=temperature)
    out.loss.sum().backward()
    ls = torch.log_softmax(student.detach().double() / temperature, -1)
    lt = torch.log_softmax(teacher.double() / temperature, -1)
    rows = torch.arange(N)
    log_ratio = ls[rows, ids] - lt[rows, ids]
    # ∇_z log p_s(y) = (onehot(y) − p_s) / T
    score = (F.one_hot(ids, V).double() - ls.exp()) / temperature
    torch.testing.assert_close(student.grad.double(), log_ratio[:, None] * score, atol=1e-6, rtol=1e-5)


def test_sampled_requires_reverse_kl_and_bad_args_raise():
    student, teacher, ids = random_logits(seed=7)
    for alpha in (0.0, 0.5):
        with pytest.raises(ValueError, match="alpha=1"):
            token_divergence_from_logits(student, teacher, ids, alpha=alpha, mode="sampled")
    with pytest.raises(ValueError, match="mode"):
        token_divergence_from_logits(student, teacher, ids, mode="bogus")
    with pytest.raises(ValueError, match="alpha"):
        token_divergence_from_logits(student, teacher, ids, alpha=1.5)
    with pytest.raises(ValueError, match="temperature"):
        token_divergence_from_logits(student, teacher, ids, temperature=0.0)
    with pytest.raises(ValueError, match="top_k"):
        token_divergence_from_logits(student, teacher, ids, mode="topk", top_k=0)


def test_divergence_from_logprobs_hand_values():
    s = torch.tensor([[0.2, 0.5, 0.3]]).log()
    t = torch.tensor([[0.6, 0.1, 0.3]]).log()
    ps, pt = [0.2, 0.5, 0.3], [0.6, 0.1, 0.3]
    m = [0.5 * a + 0.5 * b for a, b in zip(ps, pt, strict=True)]
    jsd = 0.5 * sum(a * math.log(a / c) for a, c in zip(ps, m, strict=True)) + 0.5 * sum(
        b * math.log(b / c) for b, c in zip(pt, m, strict=True)
    )
    assert divergence_from_logprobs(s, t, 0.5).item() == pytest.approx(jsd, abs=1e-6)
    assert divergence_from_logprobs(s, t, 0.0).item() == pytest.approx(
        sum(b * math.log(b / a) for a, b in zip(ps, pt, strict=True)), abs=1e-6
    )
    assert divergence_from_logprobs(s, s, 0.25).abs().item() < 1e-7


# --------------------------------------------------------------------------------------------------------------
# Top-K support and tail bucket


@pytest.mark.parametrize("tail", [True, False])
def test_topk_entries_sum_to_one_on_both_sides(tail):
    student, teacher, _ = random_logits(seed=8)
    s, t = topk_logprobs(student.log_softmax(-1), teacher.log_softmax(-1), K, tail)
    assert s.shape == t.shape == (N, K + int(tail))
    torch.testing.assert_close(s.exp().sum(-1), torch.ones(N))
    torch.testing.assert_close(t.exp().sum(-1), torch.ones(N))
    # The support is the student's top-K, and the first K entries are the full-vocab log-probs there.
    support = student.topk(K, -1).indices
    if tail:
        torch.testing.assert_close(s[:, :K], student.log_softmax(-1).gather(-1, support))
        torch.testing.assert_close(t[:, :K], teacher.log_softmax(-1).gather(-1, support))


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 1.0])
def test_topk_of_whole_vocab_with_tail_equals_full(alpha):
    student, teacher, ids = random_logits(seed=9)
    full = token_divergence_from_logits(student, teacher, ids, alpha=alpha, mode="full").loss
    for top_k in (V, V + 7):  # top_k above V is clamped
        topk = token_divergence_from_logits(student, teacher, ids, alpha=alpha, mode="topk", top_k=top_k).loss
        torch.testing.assert_close(topk, full, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# Chunked path against the reference path

CHUNK_CASES = [(0.0, "full", True), (0.25, "full", True), (1.0, "full", True), (0.5, "topk", True),
               (1.0, "topk", False), (1.0, "sampled", True)]


def head_inputs(seed: int, n: int, h: int, v: int, bias: bool, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)

    def make(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    return dict(
        student_hidden=make(n, h), student_head_weight=make(v, h, scale=0.5),
        teacher_hidden=make(n, h), teacher_head_weight=make(v, h, scale=0.5),
        completion_ids=torch.randint(0, v, (n,), generator=g),
        student_head_bias=make(v) if bias else None, teacher_head_bias=make(v) if bias else None,
    )


def reference_from_heads(inputs: dict, **kwargs):
    """Explicit full logits for all tokens, then the reference function; grads on float32 leaf copies."""
    leaves = {k: inputs[k].detach().float().requires_grad_() for k in ("student_hidden", "student_head_weight")}
    if inputs["student_head_bias"] is not None:
        leaves["student_head_bias"] = inputs["student_head_bias"].detach().float().requires_grad_()
    s_logits = leaves["student_hidden"] @ leaves["student_head_weight"].T
    t_logits = inputs["teacher_hidden"].float() @ inputs["teacher_head_weight"].float().T
    if inputs["student_head_bias"] is not None:
        s_logits = s_logits + leaves["student_head_bias"]
        t_logits = t_logits + inputs["teacher_head_bias"].float()
    return token_divergence_from_logits(s_logits, t_logits, inputs["completion_ids"], **kwargs), leaves


@pytest.mark.parametrize("chunk_size,n,bias,temperature", [(4, 10, False, 1.0), (5, 10, True, 0.7), (64, 10, True, 1.3)])
@pytest.mark.parametrize("case", CHUNK_CASES, ids=case_id)
def test_chunked_matches_reference(case, chunk_size, n, bias, temperature):
    alpha, mode, tail = case
    kwargs = dict(alpha=alpha, mode=mode, top_k=K, tail_bucket=tail, temperature=temperature)
    inputs = head_inputs(seed=10, n=n, h=6, v=V, bias=bias)
    weights = torch.rand(n, generator=torch.Generator().manual_seed(11)) + 0.5
    student_keys = [k for k in ("student_hidden", "student_head_weight", "student_head_bias") if inputs[k] is not None]
    for key in student_keys + ["teacher_hidden", "teacher_head_weight"]:
        inputs[key].requires_grad_()

    out = chunked_token_divergence(**inputs, chunk_size=chunk_size, **kwargs)
    (out.loss * weights).sum().backward()
    ref, leaves = reference_from_heads(inputs, **kwargs)
    (ref.loss * weights).sum().backward()

    for field in ("loss", "student_logprobs", "teacher_logprobs", "student_entropy"):
        torch.testing.assert_close(getattr(out, field), getattr(ref, field), atol=1e-5, rtol=1e-5)
    for key in student_keys:
        torch.testing.assert_close(inputs[key].grad, leaves[key].grad, atol=1e-5, rtol=1e-4)
        assert leaves[key].grad.abs().max() > 1e-3
    assert inputs["teacher_hidden"].grad is None and inputs["teacher_head_weight"].grad is None
    assert not out.student_logprobs.requires_grad and not out.student_entropy.requires_grad


@pytest.mark.parametrize("case", CHUNK_CASES, ids=case_id)
def test_chunked_matches_hand_computation(case):
    """Also pin the chunked path's own backward directly against float64 autograd of the hand formulas."""
    alpha, mode, tail = case
    inputs = head_inputs(seed=12, n=7, h=5, v=V, bias=True)
    inputs["student_head_weight"].requires_grad_()
    out = chunked_token_divergence(**inputs, alpha=alpha, mode=mode, top_k=K, tail_bucket=tail, temperature=0.9,
                                   chunk_size=3)
    out.loss.sum().backward()
    w64 = inputs["student_head_weight"].detach().double().requires_grad_()
    s_logits = inputs["student_hidden"].double() @ w64.T + inputs["student_head_bias"].double()
    t_logits = inputs["teacher_hidden"].double() @ inputs["teacher_head_weight"].double().T
    t_logits = t_logits + inputs["teacher_head_bias"].double()
    expected = hand_divergence(s_logits, t_logits, inputs["completion_ids"], alpha, mode, K, tail, 0.9)
    expected.sum().backward()
    torch.testing.assert_close(out.loss.double(), expected.detach(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(inputs["student_head_weight"].grad.double(), w64.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("case", [(0.5, "full", True), (1.0, "topk", True)], ids=case_id)
def test_chunked_bf16_inputs(case):
    alpha, mode, tail = case
    kwargs = dict(alpha=alpha, mode=mode, top_k=K, tail_bucket=tail, temperature=0.8)
    inputs = head_inputs(seed=13, n=9, h=8, v=V, bias=True, dtype=torch.bfloat16)
    for key in ("student_hidden", "student_head_weight", "student_head_bias"):
        inputs[key].requires_grad_()
    out = chunked_token_divergence(**inputs, chunk_size=4, **kwargs)
    out.loss.sum().backward()
    ref, leaves = reference_from_heads(inputs, **kwargs)
    ref.loss.sum().backward()
    assert out.loss.dtype == torch.float32
    # Both compute in float32 from the same upcast values, so the values agree closely.
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-4)
    for key in ("student_hidden", "student_head_weight", "student_head_bias"):
        assert inputs[key].grad.dtype == torch.bfloat16
        # bf16 gradients: only rounding of the final result (8 bits of mantissa).
        torch.testing.assert_close(inputs[key].grad.float(), leaves[key].grad, atol=1e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_with_shared_head(dtype):
    """Self-distillation: the teacher is the same model, so the same lm_head tensor is passed twice."""
    inputs = head_inputs(seed=16, n=9, h=6, v=V, bias=False, dtype=dtype)
    inputs["student_head_weight"].requires_grad_()
    inputs["teacher_head_weight"] = inputs["student_head_weight"]
    out = chunked_token_divergence(**inputs, alpha=0.25, chunk_size=4)
    out.loss.sum().backward()
    ref, leaves = reference_from_heads(inputs, alpha=0.25)
    ref.loss.sum().backward()
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-4)
    # Only the student's use of the head contributes to its gradient.
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-2, rtol=2e-2)
    torch.testing.assert_close(inputs["student_head_weight"].grad.float(), leaves["student_head_weight"].grad, **tol)


def test_chunked_without_grad_and_empty_input():
    inputs = head_inputs(seed=14, n=6, h=4, v=V, bias=False)
    with torch.no_grad():
        out = chunked_token_divergence(**inputs, alpha=0.5, chunk_size=4)
    ref, _ = reference_from_heads(inputs, alpha=0.5)
    torch.testing.assert_close(out.loss, ref.loss.detach())
    assert not out.loss.requires_grad

    empty = head_inputs(seed=14, n=0, h=4, v=V, bias=False)
    empty["student_hidden"].requires_grad_()
    out = chunked_token_divergence(**empty, chunk_size=4)
    assert out.loss.shape == (0,)
    out.loss.sum().backward()
    assert empty["student_hidden"].grad.shape == (0, 4)


# --------------------------------------------------------------------------------------------------------------
# Logit gradients kept from forward (grad_memory_mib)

# n=10 tokens in chunks of 4 -> chunks of 4, 4 and 2 tokens; one kept chunk holds 4·V float32 logit gradients.
KEPT_N, KEPT_CHUNK = 10, 4
ONE_CHUNK_MIB = KEPT_CHUNK * V * 4 / 2**20  # exactly the first chunk fits; adding the second or third would not
BUDGETS = {"recompute-all": 0.0, "keep-first-chunk": ONE_CHUNK_MIB, "keep-all": 1024.0}
KEPT_CASES = [(a, "full", True) for a in (0.0, 0.5, 1.0)] + [(a, "topk", True) for a in (0.0, 0.5, 1.0)]
KEPT_CASES += [(0.5, "topk", False), (1.0, "sampled", True)]


@pytest.mark.parametrize("budget", list(BUDGETS), ids=str)
@pytest.mark.parametrize("case", KEPT_CASES, ids=case_id)
def test_kept_logit_gradients_match_hand_computation(case, budget):
    """Whatever the budget (every chunk recomputed, some kept, all kept), values and gradients are the same."""
    alpha, mode, tail = case
    kwargs = dict(alpha=alpha, mode=mode, top_k=K, tail_bucket=tail, temperature=0.8)
    inputs = head_inputs(seed=17, n=KEPT_N, h=5, v=V, bias=True)
    student_keys = ("student_hidden", "student_head_weight", "student_head_bias")
    for key in student_keys:
        inputs[key].requires_grad_()
    weights = torch.rand(KEPT_N, generator=torch.Generator().manual_seed(18)) + 0.5  # a different grad per token

    out = chunked_token_divergence(**inputs, chunk_size=KEPT_CHUNK, grad_memory_mib=BUDGETS[budget], **kwargs)
    (out.loss * weights).sum().backward()

    leaves = {key: inputs[key].detach().double().requires_grad_() for key in student_keys}
    s_logits = leaves["student_hidden"] @ leaves["student_head_weight"].T + leaves["student_head_bias"]
    t_logits = inputs["teacher_hidden"].double() @ inputs["teacher_head_weight"].double().T
    t_logits = t_logits + inputs["teacher_head_bias"].double()
    expected = hand_divergence(s_logits, t_logits, inputs["completion_ids"], alpha, mode, K, tail, 0.8)
    (expected * weights.double()).sum().backward()
    torch.testing.assert_close(out.loss.double(), expected.detach(), atol=1e-5, rtol=1e-4)
    for key in student_keys:
        torch.testing.assert_close(inputs[key].grad.double(), leaves[key].grad, atol=1e-5, rtol=1e-4)
        assert leaves[key].grad.abs().max() > 1e-3
    # The per-token outputs (the kept path computes the entropy from its own exp(s)) against the reference path.
    ref, _ = reference_from_heads(inputs, **kwargs)
    for field in ("student_logprobs", "teacher_logprobs", "student_entropy"):
        torch.testing.assert_close(getattr(out, field), getattr(ref, field), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["full", "topk"])
def test_kept_logit_gradients_spare_backward_the_head_matmuls(mode, monkeypatch):
    """Backward runs the head (F.linear) only for the chunks whose gradient did not fit in the budget: per
    recomputed chunk twice in full mode (student and teacher), once in topk mode (the teacher's part is saved)."""
    heads_per_chunk = 2 if mode == "full" else 1
    expected_calls = {"recompute-all": 3 * heads_per_chunk, "keep-first-chunk": 2 * heads_per_chunk, "keep-all": 0}
    linear, counted = F.linear, []

    def counting_linear(*args, **kwargs):
        counted.append(1)
        return linear(*args, **kwargs)

    monkeypatch.setattr(F, "linear", counting_linear)
    for budget, calls in expected_calls.items():
        inputs = head_inputs(seed=19, n=KEPT_N, h=5, v=V, bias=False)
        inputs["student_hidden"].requires_grad_()
        out = chunked_token_divergence(**inputs, chunk_size=KEPT_CHUNK, grad_memory_mib=BUDGETS[budget], mode=mode,
                                       alpha=0.5, top_k=K)
        assert len(counted) == 6  # forward: student and teacher head for each of the 3 chunks
        counted.clear()
        out.loss.sum().backward()
        assert len(counted) == calls, budget
        counted.clear()


def test_nothing_is_kept_when_no_gradient_can_be_asked_for(monkeypatch):
    """Under no_grad / inference_mode, or with no student input requiring a gradient, forward computes no logit
    gradient at all (Function.forward sees needs_input_grad True under no_grad, so this is checked outside it)."""
    calls = []

    def spy(function):
        return lambda *args, **kw: calls.append(function.__name__) or function(*args, **kw)

    for name in ("_logprob_grad", "_full_divergence_and_logprob_grad"):
        monkeypatch.setattr(losses, name, spy(getattr(losses, name)))
    inputs = head_inputs(seed=20, n=KEPT_N, h=5, v=V, bias=False)
    for mode in ("full", "topk"):
        chunked_token_divergence(**inputs, chunk_size=KEPT_CHUNK, mode=mode, alpha=0.5)  # no input requires grad
        inputs["student_head_weight"].requires_grad_()
        with torch.no_grad():
            no_grad = chunked_token_divergence(**inputs, chunk_size=KEPT_CHUNK, mode=mode, alpha=0.5)
        with torch.inference_mode():
            chunked_token_divergence(**inputs, chunk_size=KEPT_CHUNK, mode=mode, alpha=0.5)
        assert calls == [] and no_grad.loss.grad_fn is None
        with_grad = chunked_token_divergence(**inputs, chunk_size=KEPT_CHUNK, mode=mode, alpha=0.5)
        assert len(calls) == 3  # one per chunk: the spy does see the kept path
        torch.testing.assert_close(with_grad.loss.detach(), no_grad.loss, atol=1e-6, rtol=1e-6)
        calls.clear()
        inputs["student_head_weight"].requires_grad_(False)


def test_kept_logit_gradients_are_freed_by_backward():
    """The kept gradients are saved tensors: backward releases them even while the outputs are still referenced."""
    inputs = head_inputs(seed=21, n=64, h=4, v=512, bias=False)
    inputs["student_head_weight"].requires_grad_()
    kept_bytes = 64 * 512 * 4
    with LiveTensorBytes() as tracker:
        out = chunked_token_divergence(**inputs, chunk_size=16, alpha=0.5)
        before_backward = tracker.live
        out.loss.sum().backward()
        after_backward = tracker.live
    assert before_backward >= kept_bytes
    assert after_backward <= before_backward - kept_bytes + 512 * 4 * 4  # + the head's gradient (V, H)


def test_grad_memory_mib_must_not_be_negative():
    with pytest.raises(ValueError, match="grad_memory_mib"):
        chunked_token_divergence(**head_inputs(seed=22, n=4, h=4, v=V, bias=False), grad_memory_mib=-1)


# --------------------------------------------------------------------------------------------------------------
# Memory boundedness of the chunked path


def measure_forward_backward(fn) -> LiveTensorBytes:
    with LiveTensorBytes() as tracker:
        fn().loss.sum().backward()
    return tracker


@pytest.mark.parametrize("kept_chunks", [0, 6])
@pytest.mark.parametrize("case", [(0.5, "full", True), (1.0, "topk", True)], ids=case_id)
def test_chunked_memory_is_bounded_by_chunk_not_tokens(case, kept_chunks):
    """Peak memory is a handful of chunks plus the kept logit gradients, which stop growing at the budget."""
    alpha, mode, tail = case
    vocab, hidden, chunk = 4096, 4, 16
    chunk_bytes = chunk * vocab * 4
    budget_bytes = kept_chunks * chunk_bytes  # both lengths below have more chunks than that
    kwargs = dict(alpha=alpha, mode=mode, top_k=64, tail_bucket=tail)
    peaks = {}
    for n in (256, 512):
        inputs = head_inputs(seed=15, n=n, h=hidden, v=vocab, bias=False)
        inputs["student_hidden"].requires_grad_()
        inputs["student_head_weight"].requires_grad_()
        chunked = measure_forward_backward(lambda inputs=inputs: chunked_token_divergence(
            **inputs, chunk_size=chunk, grad_memory_mib=budget_bytes / 2**20, **kwargs))
        # No single allocation larger than one chunk's logits, and a peak of a handful of chunks + the budget.
        assert chunked.largest <= chunk_bytes
        assert budget_bytes <= chunked.peak < 8 * chunk_bytes + budget_bytes + 2 * vocab * hidden * 4
        peaks[n] = chunked.peak
        # The tracker does see full-logit allocations: the plain path exceeds N·V floats.
        plain = measure_forward_backward(lambda inputs=inputs: reference_from_heads(inputs, **kwargs)[0])
        assert plain.largest >= n * vocab * 4 and plain.peak > 2 * n * vocab * 4
    # Doubling the tokens does not grow the peak beyond per-token tensors: (N,), (N, H), and in topk mode the saved
    # (N, K) support ids (int64) and teacher log-probs (float32) that spare backward the teacher's head.
    per_token_topk = 256 * 64 * (8 + 4) if mode == "topk" else 0
    assert peaks[512] - peaks[256] < chunk_bytes / 4 + per_token_topk


# --------------------------------------------------------------------------------------------------------------
# Masks, importance weights, reductions


def test_completion_loss_mask_skips_first_tokens():
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    expected = torch.tensor([[0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.float32)
    got = completion_loss_mask(mask, num_skip=3)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(completion_loss_mask(mask, num_skip=0), mask.float())
    torch.testing.assert_close(completion_loss_mask(mask, num_skip=1)[0], torch.tensor([0.0, 1, 1, 1, 1, 0]))


def test_sequence_is_weights_hand_values():
    ln = math.log
    rollout = torch.tensor([[-1.0, -1.0, -1.0, float("-inf")], [-2.0, -2.0, float("nan"), 0.0], [-1.0, -1.0, 0.0, 0.0]])
    # Loss-token log-ratios: row 0: 0, ln 3, ln 0.25; row 1: ln 1.5; row 2: none. Padding holds garbage.
    train = torch.tensor([[-1.0, -1.0 + ln(3), -1.0 + ln(0.25), 5.0], [-2.0 + ln(1.5), 3.0, 0.0, 0.0], [0.0, 7.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    train.requires_grad_()
    weights, stats = sequence_is_weights(train, rollout, mask, cap=2.0)
    torch.testing.assert_close(weights, torch.tensor([(1 + 2 + 0.25) / 3, 1.5, 1.0]))  # 3 capped to 2
    assert not weights.requires_grad
    assert stats["is_ratio_min"] == pytest.approx(0.25)
    assert stats["is_ratio_max"] == pytest.approx(3.0)  # uncapped
    assert stats["is_ratio_mean"] == pytest.approx((1 + 3 + 0.25 + 1.5) / 4)
    assert stats["is_clipped_fraction"] == pytest.approx(0.25)
    # A higher cap leaves the ratio of 3 alone; there is no floor (0.25 stays even with cap 2 or 10).
    weights, stats = sequence_is_weights(train, rollout, mask, cap=10.0)
    assert weights[0].item() == pytest.approx(4.25 / 3) and stats["is_clipped_fraction"] == 0.0


def test_sequence_is_weights_without_rollout_logprobs_are_exactly_one():
    train = torch.randn(3, 5)
    weights, stats = sequence_is_weights(train, None, torch.ones(3, 5))
    assert torch.equal(weights, torch.ones(3))
    assert stats == {"is_ratio_min": 1.0, "is_ratio_mean": 1.0, "is_ratio_max": 1.0, "is_clipped_fraction": 0.0}


def test_entropy_quantile_mask_hand_example():
    entropy = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 100.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    # Loss-token entropies 1..6; quantile(…, 0.5) = 3.5 -> keep 4, 5, 6 (the masked 100s neither count nor stay).
    expected = torch.tensor([[0.0, 0, 0, 1], [1, 1, 0, 0]])
    torch.testing.assert_close(entropy_quantile_mask(entropy, mask, 0.5), expected)
    # Top third: threshold quantile(…, 2/3) = 4.333 -> keep 5, 6.
    torch.testing.assert_close(entropy_quantile_mask(entropy, mask, 1 / 3), torch.tensor([[0.0, 0, 0, 0], [1, 1, 0, 0]]))
    torch.testing.assert_close(entropy_quantile_mask(entropy, mask, 1.0), mask.float())
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError):
            entropy_quantile_mask(entropy, mask, bad)


def test_sequence_mean_loss_hand_example():
    loss = torch.tensor([[1.0, 2.0, float("nan")], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 1, 1]])
    got = sequence_mean_loss(loss, mask, torch.tensor([2.0, 1.0, 0.5]))
    assert got.item() == pytest.approx((1.5 * 2 + 0 + 8 * 0.5) / 3)  # the empty row counts as 0
    assert sequence_mean_loss(loss, mask).item() == pytest.approx((1.5 + 0 + 8) / 3)
    got.backward()
    expected_grad = torch.tensor([[2 / 2 / 3, 2 / 2 / 3, 0], [0, 0, 0], [0.5 / 3 / 3] * 3])
    torch.testing.assert_close(loss.grad, expected_grad)


def test_sequence_mean_loss_all_masked_keeps_graph():
    loss = torch.randn(2, 3, requires_grad=True)
    got = sequence_mean_loss(loss * 2, torch.zeros(2, 3))
    assert got.item() == 0.0 and got.requires_grad
    got.backward()
    assert torch.equal(loss.grad, torch.zeros(2, 3))


def test_kl_k3_hand_values_and_unbiasedness():
    assert kl_k3(torch.tensor(-1.0), torch.tensor(-2.0)).item() == pytest.approx(math.exp(-1) - (-1) - 1)
    assert kl_k3(torch.tensor(-3.0), torch.tensor(-1.0)).item() == pytest.approx(math.exp(2) - 2 - 1)
    assert kl_k3(torch.tensor(-0.7), torch.tensor(-0.7)).item() == 0.0
    # E_{y~student}[k3] = KL(student‖teacher): pins the direction.
    ls = torch.randn(V, dtype=torch.float64).log_softmax(-1)
    lt = torch.randn(V, dtype=torch.float64).log_softmax(-1)
    expectation = (ls.exp() * kl_k3(ls, lt)).sum()
    torch.testing.assert_close(expectation, (ls.exp() * (ls - lt)).sum())
    assert not torch.allclose(expectation, (lt.exp() * (lt - ls)).sum())


def test_index_gather_and_scatter_equal_boolean_mask_indexing():
    # the scripts gather the loss positions by a host-computed index (no GPU->CPU sync); same values and gradients
    from sdft_utils.losses.weighting import gather_rows, scored_index

    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]])
    hidden = torch.randn(2, 4, 3, requires_grad=True)
    index = scored_index(mask)
    assert index.tolist() == [0, 1, 5, 6, 7]
    assert torch.equal(gather_rows(hidden, index), hidden[mask.bool()])
    values = gather_rows(hidden, index).sum(-1)
    divergence = TokenDivergence(values, values.detach(), values.detach(), values.detach())
    by_index = scatter_rows(divergence, mask.bool(), index)
    by_mask = scatter_rows(divergence, mask.bool())
    for name in by_mask:
        assert torch.equal(by_index[name], by_mask[name])
    (grad_index,) = torch.autograd.grad(by_index["loss"].pow(2).sum(), hidden, retain_graph=True)
    (grad_mask,) = torch.autograd.grad(by_mask["loss"].pow(2).sum(), hidden)
    assert torch.equal(grad_index, grad_mask)

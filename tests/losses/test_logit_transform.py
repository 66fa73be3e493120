"""Logit soft-capping and scaling (Gemma-2/3, Cohere, Granite) inside the chunked loss: the transform against float64
hand formulas, the chunked path's value and gradient against float64 autograd and `gradcheck` (kept and recomputed
chunk gradients, every support mode), and against the Hugging Face models' own logits for tiny offline configs."""

from __future__ import annotations

import math

import pytest
import torch
from test_losses import hand_divergence

from sdft_utils.losses.divergence import (
    IDENTITY,
    LogitTransform,
    chunked_token_divergence,
    token_divergence_from_logits,
)

N, H, V, K = 6, 4, 9, 3
TRANSFORMS = {"scale": LogitTransform(scale=0.25), "softcap": LogitTransform(softcap=1.5),
              "scale+softcap": LogitTransform(scale=3.0, softcap=2.0)}
MODES = [(0.0, "full", True), (0.5, "full", True), (1.0, "full", True), (0.5, "topk", True), (1.0, "topk", False),
         (1.0, "sampled", True)]


def mode_id(case) -> str:
    alpha, mode, tail = case
    return f"{mode}{'' if mode != 'topk' else ('+tail' if tail else '-tail')}-a{alpha}"


def inputs64(seed: int, bias: bool = True) -> dict:
    """Float64 hidden states and heads whose logits reach several times the softcaps above (so tanh bends them)."""
    g = torch.Generator().manual_seed(seed)

    def make(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    return dict(student_hidden=make(N, H), student_head_weight=make(V, H, scale=1.5),
                teacher_hidden=make(N, H), teacher_head_weight=make(V, H, scale=1.5),
                completion_ids=torch.randint(0, V, (N,), generator=g),
                student_head_bias=make(V) if bias else None, teacher_head_bias=make(V) if bias else None)


def hand_transform(z: float, transform: LogitTransform) -> float:
    z = z * transform.scale
    return z if transform.softcap is None else transform.softcap * math.tanh(z / transform.softcap)


@pytest.mark.parametrize("name", TRANSFORMS)
def test_transform_and_its_derivative_match_the_formulas(name):
    transform = TRANSFORMS[name]
    raw = torch.linspace(-9, 9, 37, dtype=torch.float64)
    expected = torch.tensor([hand_transform(float(z), transform) for z in raw], dtype=torch.float64)
    torch.testing.assert_close(transform.apply(raw), expected, rtol=0, atol=1e-14)
    torch.testing.assert_close(transform.apply(raw.clone(), inplace=True), expected, rtol=0, atol=1e-14)
    # derivative by central differences of the hand formula, against backward_
    step = 1e-6
    slope = torch.tensor([(hand_transform(float(z) + step, transform) - hand_transform(float(z) - step, transform))
                          / (2 * step) for z in raw], dtype=torch.float64)
    upstream = torch.linspace(0.5, 2.0, raw.numel(), dtype=torch.float64)
    torch.testing.assert_close(transform.backward_(upstream.clone(), transform.apply(raw)), upstream * slope,
                               rtol=1e-7, atol=1e-9)
    if transform.softcap is not None:
        assert transform.apply(raw).abs().max() < transform.softcap  # it does cap
        assert slope.min() < 0.2 * transform.scale  # and the cap is reached: the comparison is not vacuous


def test_transform_rejects_bad_values_and_knows_what_is_linear():
    for bad in (dict(scale=0.0), dict(scale=-1.0), dict(scale=math.inf), dict(softcap=0.0), dict(softcap=-2.0)):
        with pytest.raises(ValueError):
            LogitTransform(**bad)
    assert IDENTITY.is_identity and IDENTITY.is_linear
    assert TRANSFORMS["scale"].is_linear and not TRANSFORMS["softcap"].is_linear


@pytest.mark.parametrize("budget", [1024.0, 0.0], ids=["kept", "recomputed"])
@pytest.mark.parametrize("case", MODES, ids=mode_id)
@pytest.mark.parametrize("name", TRANSFORMS)
def test_chunked_loss_with_transform_matches_float64_hand_computation(name, case, budget):
    """Value and gradient (hidden, head, bias) against autograd through the hand formulas on the transformed logits,
    whether backward uses the gradient kept in forward or recomputes the chunk."""
    alpha, mode, tail = case
    transform = TRANSFORMS[name]
    inputs = inputs64(seed=3)
    for key in ("student_hidden", "student_head_weight", "student_head_bias"):
        inputs[key].requires_grad_()
    out = chunked_token_divergence(**inputs, alpha=alpha, mode=mode, top_k=K, tail_bucket=tail, temperature=0.8,
                                   chunk_size=4, grad_memory_mib=budget, logit_transform=transform)
    weights = torch.linspace(0.5, 1.5, N, dtype=torch.float64)
    (out.loss * weights).sum().backward()

    leaves = {key: inputs[key].detach().clone().requires_grad_()
              for key in ("student_hidden", "student_head_weight", "student_head_bias")}
    raw_student = leaves["student_hidden"] @ leaves["student_head_weight"].T + leaves["student_head_bias"]
    raw_teacher = inputs["teacher_hidden"] @ inputs["teacher_head_weight"].T + inputs["teacher_head_bias"]
    student, teacher = transform.apply(raw_student), transform.apply(raw_teacher)
    expected = hand_divergence(student, teacher, inputs["completion_ids"], alpha, mode, K, tail, 0.8)
    (expected * weights).sum().backward()

    assert out.loss.dtype == torch.float64  # float64 inputs are computed in float64
    torch.testing.assert_close(out.loss, expected.detach(), rtol=1e-10, atol=1e-12)
    for key, leaf in leaves.items():
        torch.testing.assert_close(inputs[key].grad, leaf.grad, rtol=1e-9, atol=1e-11, msg=key)
        assert leaf.grad.abs().max() > 1e-3
    # the untransformed loss is something else: the transform is really applied
    plain = hand_divergence(raw_student.detach(), raw_teacher, inputs["completion_ids"], alpha, mode, K, tail, 0.8)
    assert (plain - expected.detach()).abs().max() > 1e-3


@pytest.mark.parametrize("budget", [1024.0, 0.0], ids=["kept", "recomputed"])
@pytest.mark.parametrize("case", [(0.5, "full", True), (0.0, "full", True), (0.5, "topk", True)], ids=mode_id)
def test_gradcheck_of_the_chunked_loss_with_softcap_and_scale(case, budget):
    """torch.autograd.gradcheck: the custom backward against finite differences of the custom forward (sampled mode
    is a score-function surrogate whose gradient is not its value's derivative, so it is pinned above instead)."""
    alpha, mode, tail = case
    inputs = inputs64(seed=5)
    transform = TRANSFORMS["scale+softcap"]

    def loss(hidden, weight, bias):
        out = chunked_token_divergence(hidden, weight, inputs["teacher_hidden"], inputs["teacher_head_weight"],
                                       inputs["completion_ids"], student_head_bias=bias,
                                       teacher_head_bias=inputs["teacher_head_bias"], alpha=alpha, mode=mode,
                                       top_k=K, tail_bucket=tail, temperature=0.9, chunk_size=4,
                                       grad_memory_mib=budget, logit_transform=transform)
        return out.loss

    leaves = [inputs[key].detach().clone().requires_grad_()
              for key in ("student_hidden", "student_head_weight", "student_head_bias")]
    assert torch.autograd.gradcheck(loss, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("case", MODES, ids=mode_id)
def test_chunked_and_reference_paths_agree_under_a_transform(case):
    alpha, mode, tail = case
    transform = TRANSFORMS["scale+softcap"]
    inputs = {k: (v.float() if v is not None and v.is_floating_point() else v) for k, v in inputs64(seed=7).items()}
    chunked = chunked_token_divergence(**inputs, alpha=alpha, mode=mode, top_k=K, tail_bucket=tail, chunk_size=4,
                                       logit_transform=transform)
    s_logits = inputs["student_hidden"] @ inputs["student_head_weight"].T + inputs["student_head_bias"]
    t_logits = inputs["teacher_hidden"] @ inputs["teacher_head_weight"].T + inputs["teacher_head_bias"]
    reference = token_divergence_from_logits(s_logits, t_logits, inputs["completion_ids"], alpha=alpha, mode=mode,
                                             top_k=K, tail_bucket=tail, logit_transform=transform)
    for field in ("loss", "student_logprobs", "teacher_logprobs", "student_entropy"):
        torch.testing.assert_close(getattr(chunked, field), getattr(reference, field), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kept_chunks", [0, 6])
def test_softcap_keeps_the_loss_memory_bounded_by_the_chunk(kept_chunks):
    """With a softcap (and the nucleus mass asked for), peak memory is still a handful of (chunk, V) tensors plus
    the kept gradients, and does not grow with the number of tokens: no (N, V) logits ever exist."""
    from sdft_utils.testing import LiveTensorBytes

    vocab, hidden, chunk = 4096, 4, 16
    chunk_bytes = chunk * vocab * 4
    budget_bytes = kept_chunks * chunk_bytes
    peaks = {}
    for n in (256, 512):
        g = torch.Generator().manual_seed(n)
        student_hidden = torch.randn(n, hidden, generator=g).requires_grad_()
        weight = (torch.randn(vocab, hidden, generator=g) * 2).requires_grad_()
        teacher_hidden = torch.randn(n, hidden, generator=g)
        ids = torch.randint(0, vocab, (n,), generator=g)
        with LiveTensorBytes() as tracker:
            chunked_token_divergence(student_hidden, weight, teacher_hidden, weight.detach(), ids, alpha=0.5,
                                     chunk_size=chunk, grad_memory_mib=budget_bytes / 2**20, nucleus_top_p=0.9,
                                     logit_transform=LogitTransform(scale=0.5, softcap=2.0)).loss.sum().backward()
        # the largest single tensor is the nucleus sort's int64 indices of one chunk
        assert tracker.largest <= 2 * chunk_bytes
        assert budget_bytes <= tracker.peak < 10 * chunk_bytes + budget_bytes + 2 * vocab * hidden * 4
        peaks[n] = tracker.peak
    assert peaks[512] - peaks[256] < chunk_bytes / 4

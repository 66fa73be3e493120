"""Vocab-parallel divergences (sdft_utils.megatron.vocab_parallel) on 2 and 4 real gloo processes equal the
single-process full-vocabulary float64 reference built from sdft_utils.losses, in value and in gradient, for every
alpha and support mode, on both entry points (logits shards; hidden states + head shards), with vocabulary padding
(including a rank that holds only padding); and the token log-probs with gradients."""

from __future__ import annotations

import math

import pytest
import torch

from sdft_utils.losses.divergence import divergence_from_logprobs, topk_logprobs
from sdft_utils.megatron.vocab_parallel import (
    vocab_parallel_divergence_from_logits,
    vocab_parallel_token_divergence,
    vocab_parallel_token_logprobs,
)
from tests.distributed_harness import run_ranks

N, H, V, K, CHUNK = 7, 5, 11, 4, 3
CASES = [(a, "full", True) for a in (0.0, 0.25, 0.5, 1.0)]
CASES += [(a, "topk", tail) for a in (0.0, 0.25, 0.5, 1.0) for tail in (True, False)]
CASES += [(1.0, "sampled", True)]
FIELDS = ("loss", "student_logprobs", "teacher_logprobs", "student_entropy")


def case_id(case: tuple[float, str, bool]) -> str:
    alpha, mode, tail = case
    return f"{mode}{'' if mode != 'topk' else ('+tail' if tail else '-tail')}-a{alpha}"


def shard_width(world_size: int, path: str) -> int:
    # logits path: the tightest layout (1 padded column); hidden path: wider shards, so that with 4 ranks the last
    # rank holds only padding.
    return math.ceil(V / world_size) if path == "logits" else V // world_size + 2


def make_inputs(seed: int, padded: int) -> dict[str, torch.Tensor]:
    """Float64 inputs over a padded vocabulary; padded logits/rows are large so that using them would show."""
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "student_logits": torch.randn(N, padded, generator=g, dtype=torch.float64) * 2.5,
        "teacher_logits": torch.randn(N, padded, generator=g, dtype=torch.float64) * 2.5,
        "student_hidden": torch.randn(N, H, generator=g, dtype=torch.float64),
        "teacher_hidden": torch.randn(N, H, generator=g, dtype=torch.float64),
        "student_weight": torch.randn(padded, H, generator=g, dtype=torch.float64),
        "teacher_weight": torch.randn(padded, H, generator=g, dtype=torch.float64),
        "student_bias": torch.randn(padded, generator=g, dtype=torch.float64),
        "teacher_bias": torch.randn(padded, generator=g, dtype=torch.float64),
        "ids": torch.randint(0, V, (N,), generator=g),
        "token_weights": torch.rand(N, generator=g, dtype=torch.float64) + 0.5,  # checks every token's gradient
    }
    inputs["student_logits"][:, V:] = inputs["teacher_logits"][:, V:] = 50.0
    inputs["student_weight"][V:] = inputs["teacher_weight"][V:] = 5.0
    inputs["student_bias"][V:] = inputs["teacher_bias"][V:] = 50.0
    return inputs


def worker(rank: int, world_size: int) -> dict:
    torch.manual_seed(0)
    results = {}
    for index, (alpha, mode, tail) in enumerate(CASES):
        options = dict(alpha=alpha, mode=mode, top_k=K, tail_bucket=tail, vocab_size=V, chunk_size=CHUNK)
        width = shard_width(world_size, "logits")
        inputs = make_inputs(index, width * world_size)
        rows = slice(rank * width, (rank + 1) * width)
        student = inputs["student_logits"][:, rows].clone().requires_grad_()
        out = vocab_parallel_divergence_from_logits(student, inputs["teacher_logits"][:, rows], inputs["ids"],
                                                    temperature=0.7, **options)
        (out.loss * inputs["token_weights"]).sum().backward()
        results["logits", index] = {**{f: getattr(out, f) for f in FIELDS}, "grad_logits": student.grad}

        width = shard_width(world_size, "hidden")
        inputs = make_inputs(index, width * world_size)
        rows = slice(rank * width, (rank + 1) * width)
        hidden = inputs["student_hidden"].clone().requires_grad_()
        weight = inputs["student_weight"][rows].clone().requires_grad_()
        bias = inputs["student_bias"][rows].clone().requires_grad_()
        out = vocab_parallel_token_divergence(
            hidden, weight, inputs["teacher_hidden"], inputs["teacher_weight"][rows], inputs["ids"],
            student_head_bias=bias, teacher_head_bias=inputs["teacher_bias"][rows], **options)
        (out.loss * inputs["token_weights"]).sum().backward()
        results["hidden", index] = {**{f: getattr(out, f) for f in FIELDS}, "grad_hidden": hidden.grad,
                                    "grad_weight": weight.grad, "grad_bias": bias.grad}

    # log pi(y_t) with gradients (the GRPO part of SDPO's hybrid and pi_old for later mini-batches)
    width = shard_width(world_size, "hidden")
    inputs = make_inputs(99, width * world_size)
    rows = slice(rank * width, (rank + 1) * width)
    hidden = inputs["student_hidden"].clone().requires_grad_()
    weight = inputs["student_weight"][rows].clone().requires_grad_()
    values = vocab_parallel_token_logprobs(hidden, weight, inputs["ids"], vocab_size=V, temperature=0.7,
                                           chunk_size=CHUNK)
    (values * inputs["token_weights"]).sum().backward()
    results["logprobs"] = {"values": values, "grad_hidden": hidden.grad, "grad_weight": weight.grad}

    # bfloat16 model tensors: computed in float32, gradients returned in bfloat16
    width = shard_width(world_size, "hidden")
    rows = slice(rank * width, (rank + 1) * width)
    inputs = {k: v.bfloat16() if v.is_floating_point() else v for k, v in make_inputs(0, width * world_size).items()}
    hidden = inputs["student_hidden"].clone().requires_grad_()
    weight = inputs["student_weight"][rows].clone().requires_grad_()
    out = vocab_parallel_token_divergence(hidden, weight, inputs["teacher_hidden"], inputs["teacher_weight"][rows],
                                          inputs["ids"], vocab_size=V, alpha=0.5, mode="topk", top_k=K)
    out.loss.sum().backward()
    results["bf16"] = {"loss": out.loss, "grad_hidden": hidden.grad, "grad_weight": weight.grad}
    return results


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"tp{w}")
def ranks(request, tmp_path_factory) -> tuple[int, list[dict]]:
    world_size = request.param
    return world_size, run_ranks(worker, world_size, tmp_path_factory.mktemp(f"tp{world_size}"))


def reference(student_logits: torch.Tensor, teacher_logits: torch.Tensor, ids: torch.Tensor, case, temperature):
    """Single process, full vocabulary, float64, from the public helpers of sdft_utils.losses (themselves pinned
    to hand formulas in tests/losses/test_losses.py)."""
    alpha, mode, tail = case
    s = (student_logits / temperature).log_softmax(-1)
    t = (teacher_logits.detach() / temperature).log_softmax(-1)
    s_token, t_token = s.gather(-1, ids[:, None])[:, 0], t.gather(-1, ids[:, None])[:, 0]
    if mode == "full":
        loss = divergence_from_logprobs(s, t, alpha)
    elif mode == "topk":
        loss = divergence_from_logprobs(*topk_logprobs(s, t, K, tail), alpha)
    else:
        loss = (s_token - t_token).detach() * s_token
    entropy = -(s.exp() * s).sum(-1)
    return {"loss": loss, "student_logprobs": s_token.detach(), "teacher_logprobs": t_token,
            "student_entropy": entropy.detach()}


def assert_replicated_values(results: list[dict], key, expected: dict) -> None:
    for rank_result in results:
        for field in FIELDS:
            torch.testing.assert_close(rank_result[key][field], expected[field].detach(), atol=1e-12, rtol=1e-10,
                                       msg=f"{field} of {key}")
        assert not rank_result[key]["student_logprobs"].requires_grad


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_logits_shards_match_full_vocab_reference(ranks, case):
    world_size, results = ranks
    index = CASES.index(case)
    width = shard_width(world_size, "logits")
    inputs = make_inputs(index, width * world_size)
    student = inputs["student_logits"][:, :V].clone().requires_grad_()
    expected = reference(student, inputs["teacher_logits"][:, :V], inputs["ids"], case, temperature=0.7)
    (expected["loss"] * inputs["token_weights"]).sum().backward()

    assert_replicated_values(results, ("logits", index), expected)
    grad = torch.cat([r["logits", index]["grad_logits"] for r in results], -1)
    torch.testing.assert_close(grad[:, :V], student.grad, atol=1e-12, rtol=1e-10)
    assert grad[:, V:].abs().max() == 0  # vocabulary padding gets no gradient
    assert student.grad.abs().max() > 1e-3  # the comparison is not vacuous


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_hidden_states_and_head_shards_match_full_vocab_reference(ranks, case):
    world_size, results = ranks
    index = CASES.index(case)
    width = shard_width(world_size, "hidden")
    inputs = make_inputs(index, width * world_size)
    hidden = inputs["student_hidden"].clone().requires_grad_()
    weight = inputs["student_weight"][:V].clone().requires_grad_()
    bias = inputs["student_bias"][:V].clone().requires_grad_()
    teacher_logits = inputs["teacher_hidden"] @ inputs["teacher_weight"][:V].T + inputs["teacher_bias"][:V]
    expected = reference(hidden @ weight.T + bias, teacher_logits, inputs["ids"], case, temperature=1.0)
    (expected["loss"] * inputs["token_weights"]).sum().backward()

    assert_replicated_values(results, ("hidden", index), expected)
    for rank_result in results:  # the hidden-state gradient is complete (all-reduced) on every rank
        torch.testing.assert_close(rank_result["hidden", index]["grad_hidden"], hidden.grad, atol=1e-12, rtol=1e-10)
    grad_weight = torch.cat([r["hidden", index]["grad_weight"] for r in results])
    grad_bias = torch.cat([r["hidden", index]["grad_bias"] for r in results])
    torch.testing.assert_close(grad_weight[:V], weight.grad, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(grad_bias[:V], bias.grad, atol=1e-12, rtol=1e-10)
    assert grad_weight[V:].abs().max() == 0 and grad_bias[V:].abs().max() == 0
    assert hidden.grad.abs().max() > 1e-3 and weight.grad.abs().max() > 1e-3


def test_token_logprobs_match_the_full_vocabulary_in_value_and_gradient(ranks):
    world_size, results = ranks
    width = shard_width(world_size, "hidden")
    inputs = make_inputs(99, width * world_size)
    hidden = inputs["student_hidden"].clone().requires_grad_()
    weight = inputs["student_weight"][:V].clone().requires_grad_()
    expected = (hidden @ weight.T / 0.7).log_softmax(-1).gather(-1, inputs["ids"][:, None])[:, 0]  # float64
    (expected * inputs["token_weights"]).sum().backward()
    for rank, rank_result in enumerate(results):
        got = rank_result["logprobs"]
        torch.testing.assert_close(got["values"], expected.detach(), atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(got["grad_hidden"], hidden.grad, atol=1e-12, rtol=1e-10)
        start, end = rank * width, min((rank + 1) * width, V)
        torch.testing.assert_close(got["grad_weight"][:max(end - start, 0)], weight.grad[start:end], atol=1e-12,
                                   rtol=1e-10)
        assert not got["grad_weight"][max(end - start, 0):].any()  # padded vocabulary rows get no gradient


def test_bfloat16_inputs_compute_in_float32_and_return_bfloat16_gradients(ranks):
    from sdft_utils.losses.divergence import chunked_token_divergence

    world_size, results = ranks
    width = shard_width(world_size, "hidden")
    inputs = {k: v.bfloat16() if v.is_floating_point() else v for k, v in make_inputs(0, width * world_size).items()}
    hidden = inputs["student_hidden"].clone().requires_grad_()
    weight = inputs["student_weight"][:V].clone().requires_grad_()
    expected = chunked_token_divergence(hidden, weight, inputs["teacher_hidden"], inputs["teacher_weight"][:V],
                                        inputs["ids"], alpha=0.5, mode="topk", top_k=K)
    expected.loss.sum().backward()
    for result in results:
        assert result["bf16"]["loss"].dtype == torch.float32
        assert result["bf16"]["grad_hidden"].dtype == result["bf16"]["grad_weight"].dtype == torch.bfloat16
        torch.testing.assert_close(result["bf16"]["loss"], expected.loss, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(result["bf16"]["grad_hidden"], hidden.grad, atol=1e-2, rtol=1e-2)
    grad_weight = torch.cat([r["bf16"]["grad_weight"] for r in results])
    torch.testing.assert_close(grad_weight[:V], weight.grad, atol=1e-2, rtol=1e-2)


def memory_worker(rank: int, world_size: int) -> dict:
    """Peak and largest live tensor bytes of forward + backward on this rank's shard, for 256 and 512 tokens."""
    from sdft_utils.testing import LiveTensorBytes

    vocab, hidden, chunk = 4096, 4, 16
    width = vocab // world_size
    out = {}
    for mode in ("full", "topk"):
        for n in (256, 512):
            g = torch.Generator().manual_seed(n)
            student_hidden = torch.randn(n, hidden, generator=g).requires_grad_()
            weight = torch.randn(vocab, hidden, generator=g)[rank * width:(rank + 1) * width].clone().requires_grad_()
            teacher_hidden = torch.randn(n, hidden, generator=g)
            ids = torch.randint(0, vocab, (n,), generator=g)
            with LiveTensorBytes() as tracker:
                vocab_parallel_token_divergence(student_hidden, weight, teacher_hidden, weight.detach(), ids,
                                                vocab_size=vocab, alpha=0.5, mode=mode, top_k=64,
                                                chunk_size=chunk).loss.sum().backward()
            out[mode, n] = (tracker.peak, tracker.largest)
    return out


def test_memory_is_bounded_by_the_chunk_and_the_shard_not_the_tokens(tmp_path):
    world_size, vocab, hidden, chunk = 2, 4096, 4, 16
    chunk_bytes = chunk * (vocab // world_size) * 4  # one chunk's float32 logits shard
    for rank_result in run_ranks(memory_worker, world_size, tmp_path):
        for mode in ("full", "topk"):
            (peak_256, largest_256), (peak_512, largest_512) = rank_result[mode, 256], rank_result[mode, 512]
            # the biggest single tensor is a chunk's student and teacher log-probs read together (the tracker does
            # see the chunk's logits shard)
            assert chunk_bytes <= max(largest_256, largest_512) <= 2 * chunk_bytes
            assert peak_512 < 10 * chunk_bytes + 2 * (vocab // world_size) * hidden * 4
            # doubling the tokens does not grow the peak (keeping N x V_local values would add 16 chunks here)
            assert peak_512 - peak_256 < chunk_bytes / 2, mode


# ------------------------------------------------------------------------------------------------------------------
# Logit soft-capping / scaling (Gemma-2/3, Cohere, Granite) on the shards

TRANSFORM_CASES = [(0.5, "full", True), (1.0, "topk", True), (1.0, "sampled", True)]


def transform_worker(rank: int, world_size: int) -> dict:
    from sdft_utils.losses.divergence import LogitTransform

    transform = LogitTransform(scale=2.0, softcap=3.0)
    results = {}
    for index, (alpha, mode, tail) in enumerate(TRANSFORM_CASES):
        options = dict(alpha=alpha, mode=mode, top_k=K, tail_bucket=tail, vocab_size=V, chunk_size=CHUNK,
                       logit_transform=transform)
        width = shard_width(world_size, "logits")
        inputs = make_inputs(index, width * world_size)
        rows = slice(rank * width, (rank + 1) * width)
        student = inputs["student_logits"][:, rows].clone().requires_grad_()
        out = vocab_parallel_divergence_from_logits(student, inputs["teacher_logits"][:, rows], inputs["ids"],
                                                    temperature=0.7, **options)
        (out.loss * inputs["token_weights"]).sum().backward()
        results["logits", index] = {**{f: getattr(out, f) for f in FIELDS}, "grad_logits": student.grad}

        width = shard_width(world_size, "hidden")
        inputs = make_inputs(index, width * world_size)
        rows = slice(rank * width, (rank + 1) * width)
        hidden = inputs["student_hidden"].clone().requires_grad_()
        weight = inputs["student_weight"][rows].clone().requires_grad_()
        out = vocab_parallel_token_divergence(hidden, weight, inputs["teacher_hidden"], inputs["teacher_weight"][rows],
                                              inputs["ids"], temperature=0.7, **options)
        (out.loss * inputs["token_weights"]).sum().backward()
        results["hidden", index] = {**{f: getattr(out, f) for f in FIELDS}, "grad_hidden": hidden.grad,
                                    "grad_weight": weight.grad}
    return results


@pytest.fixture(scope="module")
def transform_ranks(tmp_path_factory) -> list[dict]:
    return run_ranks(transform_worker, 2, tmp_path_factory.mktemp("transform"))


@pytest.mark.parametrize("case", TRANSFORM_CASES, ids=case_id)
def test_logit_transform_on_shards_matches_the_single_process_loss(transform_ranks, case):
    """Soft-cap + scale applied per shard: values and gradients equal the single-process float64 reference on the
    transformed full-vocabulary logits (2 gloo ranks, both entry points)."""
    from sdft_utils.losses.divergence import LogitTransform

    world_size, transform = 2, LogitTransform(scale=2.0, softcap=3.0)
    index = TRANSFORM_CASES.index(case)

    width = shard_width(world_size, "logits")
    inputs = make_inputs(index, width * world_size)
    student = inputs["student_logits"][:, :V].clone().requires_grad_()
    expected = reference(transform.apply(student), transform.apply(inputs["teacher_logits"][:, :V]), inputs["ids"],
                         case, temperature=0.7)
    (expected["loss"] * inputs["token_weights"]).sum().backward()
    assert_replicated_values(transform_ranks, ("logits", index), expected)
    grad = torch.cat([r["logits", index]["grad_logits"] for r in transform_ranks], -1)
    torch.testing.assert_close(grad[:, :V], student.grad, atol=1e-12, rtol=1e-10)

    width = shard_width(world_size, "hidden")
    inputs = make_inputs(index, width * world_size)
    hidden = inputs["student_hidden"].clone().requires_grad_()
    weight = inputs["student_weight"][:V].clone().requires_grad_()
    teacher_logits = inputs["teacher_hidden"] @ inputs["teacher_weight"][:V].T
    expected = reference(transform.apply(hidden @ weight.T), transform.apply(teacher_logits), inputs["ids"], case,
                         temperature=0.7)
    (expected["loss"] * inputs["token_weights"]).sum().backward()
    assert_replicated_values(transform_ranks, ("hidden", index), expected)
    for rank_result in transform_ranks:
        torch.testing.assert_close(rank_result["hidden", index]["grad_hidden"], hidden.grad, atol=1e-12, rtol=1e-10)
    grad_weight = torch.cat([r["hidden", index]["grad_weight"] for r in transform_ranks])
    torch.testing.assert_close(grad_weight[:V], weight.grad, atol=1e-12, rtol=1e-10)
    # the cap is reached: the untransformed loss differs
    plain = reference(hidden.detach() @ weight.detach().T, teacher_logits, inputs["ids"], case, temperature=0.7)
    assert (plain["loss"] - expected["loss"].detach()).abs().max() > 1e-3


def test_nucleus_mass_is_refused_under_tensor_parallelism():
    ids = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="global sort"):
        vocab_parallel_token_divergence(torch.zeros(2, 3), torch.zeros(4, 3), torch.zeros(2, 3), torch.zeros(4, 3), ids,
                                        vocab_size=4, nucleus_top_p=0.9)

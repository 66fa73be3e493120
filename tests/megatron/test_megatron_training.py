"""One SDFT training step with the Megatron backend pieces (sdft_utils.megatron.training + vocab_parallel) on 2 gloo
processes with TP=2 equals the same step on the Hugging Face model with the accelerate path's functions
(modeling.completion_hidden_states + losses.chunked_token_divergence): loss, per-token values, gradients (mapped
through the shard layout), global grad norm, and after an SGD step + EMA the gathered weights of student and teacher.
Left-padded prompts and right-padded completions, a tied (Llama) and an untied qkv-bias (Qwen2) model."""

from __future__ import annotations

import pytest
import torch

from sdft_utils.losses.divergence import chunked_token_divergence
from sdft_utils.losses.weighting import completion_loss_mask, scatter_rows, sequence_mean_loss
from sdft_utils.training.batching import build_distill_batch
from tests.distributed_harness import run_ranks
from tests.megatron.test_megatron_convert import tiny_config
from tests.megatron_cpu import apply_cpu_shims

KINDS = ["llama_tied", "qwen2"]
LOSS = dict(alpha=0.5, mode="topk", top_k=5, tail_bucket=True, temperature=0.9, chunk_size=4)
LR, EMA = 0.5, 0.25  # SGD: AdamW would turn float noise in near-zero gradients into ±lr steps


def batch():
    g = torch.Generator().manual_seed(3)
    student_prompts = [torch.randint(3, 259, (n,), generator=g).tolist() for n in (3, 6)]
    teacher_prompts = [torch.randint(3, 259, (n,), generator=g).tolist() for n in (9, 5)]
    completions = [torch.randint(3, 259, (n,), generator=g).tolist() for n in (7, 4)]
    return build_distill_batch(student_prompts, teacher_prompts, completions, None, pad_token_id=2)


def distill_loss(student_hidden, teacher_hidden, head, teacher_head, divergence_fn, b, **extra):
    mask = completion_loss_mask(b.completion_mask, 1)
    scored = mask.bool()
    divergence = divergence_fn(student_hidden[scored], head, teacher_hidden[scored], teacher_head,
                               b.completion_ids[scored], **LOSS, **extra)
    per_token = scatter_rows(divergence, scored)
    return sequence_mean_loss(per_token["loss"], mask), per_token


def worker(rank: int, world_size: int, model_dirs: dict) -> dict:
    from sdft_utils.megatron.training import (
        clip_grad_norm_,
        completion_hidden_states,
        finalize_grads,
        hf_parameters,
        initialize_parallel,
        load_gpt_model,
        make_megatron_teacher,
        output_head_shard,
        tensor_parallel_group,
    )
    from sdft_utils.megatron.vocab_parallel import vocab_parallel_token_divergence
    from sdft_utils.training.teachers import ema_update_

    apply_cpu_shims()
    initialize_parallel(world_size, seed=0)
    results = {}
    b = batch()
    for kind in KINDS:
        student, layout = load_gpt_model(model_dirs[kind], world_size, torch.float32)
        teacher = make_megatron_teacher("ema", student, model_dirs[kind], world_size, torch.float32)
        width = b.num_completion_tokens
        student_hidden = completion_hidden_states(student, b.student_input_ids, b.student_attention_mask, width)
        with torch.no_grad():
            teacher_hidden = completion_hidden_states(teacher, b.teacher_input_ids, b.teacher_attention_mask, width)
        loss, per_token = distill_loss(student_hidden, teacher_hidden, output_head_shard(student),
                                       output_head_shard(teacher), vocab_parallel_token_divergence, b,
                                       vocab_size=layout.vocab_size, group=tensor_parallel_group())
        loss.backward()
        finalize_grads(student)
        grads = {n: p.grad.clone() for n, p in student.named_parameters()}
        norm = clip_grad_norm_(student, 0.0)
        optimizer = torch.optim.SGD(student.parameters(), lr=LR)
        optimizer.step()
        ema_update_(teacher, student, EMA)
        results[kind] = {"loss": loss.detach(), "per_token": {k: v.detach() for k, v in per_token.items()},
                         "grads": grads, "norm": norm, "student": dict(hf_parameters(student, layout)),
                         "teacher": dict(hf_parameters(teacher, layout))}
    return results


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    dirs = {}
    for kind in KINDS:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config(kind))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        dirs[kind] = tmp_path_factory.mktemp(kind)
        model.save_pretrained(dirs[kind])
    return dirs


@pytest.fixture(scope="module")
def ranks(model_dirs, tmp_path_factory):
    return run_ranks(worker, 2, tmp_path_factory.mktemp("ranks"), model_dirs)


@pytest.mark.parametrize("kind", KINDS)
def test_tp2_step_equals_hugging_face_step(ranks, model_dirs, kind):
    from sdft_utils.megatron.convert import hf_to_megatron_shard, layout_from_hf_config
    from sdft_utils.training.modeling import completion_hidden_states, load_model, output_head
    from sdft_utils.training.teachers import ema_update_

    student = load_model(model_dirs[kind], torch.float32, "eager")
    teacher = load_model(model_dirs[kind], torch.float32, "eager").requires_grad_(False)
    b = batch()
    width = b.num_completion_tokens
    student_hidden = completion_hidden_states(student, b.student_input_ids, b.student_attention_mask, width)
    with torch.no_grad():
        teacher_hidden = completion_hidden_states(teacher, b.teacher_input_ids, b.teacher_attention_mask, width)
    loss, per_token = distill_loss(student_hidden, teacher_hidden, output_head(student)[0], output_head(teacher)[0],
                                   chunked_token_divergence, b)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(student.parameters(), float("inf")).item()
    torch.optim.SGD(student.parameters(), lr=LR).step()
    ema_update_(teacher, student, EMA)

    layout = layout_from_hf_config(student.config, 2)
    hf_grads = {n: p.grad for n, p in student.named_parameters()}
    if layout.tie_word_embeddings:
        hf_grads["lm_head.weight"] = hf_grads["model.embed_tokens.weight"]
    for rank, result in enumerate(ranks):
        result = result[kind]
        torch.testing.assert_close(result["loss"], loss.detach(), atol=1e-5, rtol=1e-5)
        for name, values in per_token.items():
            torch.testing.assert_close(result["per_token"][name], values.detach(), atol=2e-5, rtol=1e-4, msg=name)
        expected = hf_to_megatron_shard(hf_grads, layout, rank)
        for name, grad in result["grads"].items():
            torch.testing.assert_close(grad, expected[name], atol=2e-6, rtol=1e-4, msg=name)
        assert result["norm"] == pytest.approx(norm, rel=1e-5)
        for label, model in (("student", student), ("teacher", teacher)):
            state = {n: p for n, p in model.state_dict().items()
                     if not (layout.tie_word_embeddings and n == "lm_head.weight")}
            assert result[label].keys() == state.keys()
            for name, tensor in state.items():
                torch.testing.assert_close(result[label][name], tensor, atol=1e-5, rtol=1e-5,
                                           msg=lambda m, n=name, lab=label: f"{lab} {n}: {m}")
    assert loss.item() > 1e-3 and norm > 1e-3


def data_parallel_worker(rank: int, world_size: int, model_dir) -> dict:
    """TP=1 on 2 processes = 2 data-parallel ranks, each with one of the batch's two sequences."""
    from sdft_utils.megatron.training import (
        clip_grad_norm_,
        completion_hidden_states,
        data_parallel_rank_and_size,
        finalize_grads,
        initialize_parallel,
        load_gpt_model,
        output_head_shard,
        tensor_parallel_group,
    )
    from sdft_utils.megatron.vocab_parallel import vocab_parallel_token_divergence

    apply_cpu_shims()
    initialize_parallel(1, seed=0)
    data_rank, data_world = data_parallel_rank_and_size()
    full = batch()
    b = type(full)(**{k: None if v is None else v[data_rank:data_rank + 1] for k, v in vars(full).items()})
    student, layout = load_gpt_model(model_dir, 1, torch.float32)
    teacher, _ = load_gpt_model(model_dir, 1, torch.float32)
    width = b.num_completion_tokens
    student_hidden = completion_hidden_states(student, b.student_input_ids, b.student_attention_mask, width)
    with torch.no_grad():
        teacher_hidden = completion_hidden_states(teacher, b.teacher_input_ids, b.teacher_attention_mask, width)
    loss, _ = distill_loss(student_hidden, teacher_hidden, output_head_shard(student), output_head_shard(teacher),
                           vocab_parallel_token_divergence, b, vocab_size=layout.vocab_size,
                           group=tensor_parallel_group())
    loss.backward()
    finalize_grads(student, bucket_bytes=64 << 10)  # several all-reduce buckets
    return {"data": (data_rank, data_world), "grads": {n: p.grad.clone() for n, p in student.named_parameters()},
            "norm": clip_grad_norm_(student, 0.0)}


def test_data_parallel_gradients_are_the_full_batch_average(model_dirs, tmp_path):
    """Per-sequence-mean losses on two data-parallel ranks, averaged by finalize_grads = the loss of the whole batch
    (both rows have the same weight in the batch mean)."""
    from sdft_utils.megatron.convert import hf_to_megatron_shard, layout_from_hf_config
    from sdft_utils.training.modeling import completion_hidden_states, load_model, output_head

    kind = "qwen2"
    results = run_ranks(data_parallel_worker, 2, tmp_path, model_dirs[kind])
    assert [r["data"] for r in results] == [(0, 2), (1, 2)]
    student = load_model(model_dirs[kind], torch.float32, "eager")
    teacher = load_model(model_dirs[kind], torch.float32, "eager").requires_grad_(False)
    b = batch()
    width = b.num_completion_tokens
    student_hidden = completion_hidden_states(student, b.student_input_ids, b.student_attention_mask, width)
    with torch.no_grad():
        teacher_hidden = completion_hidden_states(teacher, b.teacher_input_ids, b.teacher_attention_mask, width)
    loss, _ = distill_loss(student_hidden, teacher_hidden, output_head(student)[0], output_head(teacher)[0],
                           chunked_token_divergence, b)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(student.parameters(), float("inf")).item()
    expected = hf_to_megatron_shard({n: p.grad for n, p in student.named_parameters()},
                                    layout_from_hf_config(student.config, 1), 0)
    for result in results:  # identical, complete gradients on both ranks
        for name, grad in result["grads"].items():
            torch.testing.assert_close(grad, expected[name], atol=2e-6, rtol=1e-4, msg=name)
        assert result["norm"] == pytest.approx(norm, rel=1e-5)

"""LoRA (sdft_utils/training/lora.py): one copy of the base weights for the student and every teacher kind, merged weights for
rollout engines, the EMA adapter rule, and the refusals. End-to-end runs of the scripts are in test_train_lora.py."""

import sys
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("peft", reason="peft is not installed (pip install -e '.[peft]')")

from accelerate.utils import DistributedType  # noqa: E402

from sdft_utils.errors import UserInputError  # noqa: E402
from sdft_utils.losses.divergence import chunked_token_divergence  # noqa: E402
from sdft_utils.losses.weighting import scatter_rows, sequence_mean_loss
from sdft_utils.rollout.weight_sync import full_parameters  # noqa: E402
from sdft_utils.testing import tiny_llama  # noqa: E402
from sdft_utils.training.batching import build_distill_batch  # noqa: E402
from sdft_utils.training.config import RunArgs  # noqa: E402
from sdft_utils.training.lora import (
    STUDENT_ADAPTER,
    TEACHER_ADAPTER,
    AdapterTeacher,
    add_lora,
    check_lora,
    merged_parameters,
    require_peft,
)
from sdft_utils.training.modeling import (  # noqa: E402
    completion_hidden_states,
    output_head,
    trainable_parameters,
)
from sdft_utils.training.teachers import ema_update_, make_teacher  # noqa: E402

RATE = 0.25
IDS = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46]])


def lora_args(**overrides) -> RunArgs:
    return RunArgs(**{**dict(use_peft=True, lora_r=4, lora_alpha=8), **overrides})


def lora_model(tied=False, **overrides):
    return add_lora(tiny_llama(tie_word_embeddings=tied), lora_args(**overrides))


def randomize_adapter(model, name=STUDENT_ADAPTER, seed=1):
    """peft starts B at zero (adapter = identity); a random B makes the adapter visible in every output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if f"lora_B.{name}." in param_name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


def adapter_tensors(model, name):
    return {n: p.detach().clone() for n, p in model.named_parameters() if f".{name}." in n and "lora_" in n}


def base_tensors(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


def distill_step(model, teacher, optimizer):
    """One step of the scripts' math: student (with grad) then teacher (no grad) on the same completion tokens."""
    batch = build_distill_batch([[1, 40, 41]], [[1, 50, 51, 52, 40, 41]], [[60, 61, 62, 63, 2]], None, 2)
    width = batch.num_completion_tokens
    student_hidden = completion_hidden_states(model, batch.student_input_ids, batch.student_attention_mask, width)
    with torch.no_grad():
        teacher_hidden = completion_hidden_states(teacher, batch.teacher_input_ids, batch.teacher_attention_mask,
                                                  width)
    scored = batch.completion_mask.bool()
    (student_weight, student_bias), (teacher_weight, teacher_bias) = output_head(model), output_head(teacher)
    divergence = chunked_token_divergence(student_hidden[scored], student_weight, teacher_hidden[scored],
                                          teacher_weight, batch.completion_ids[scored],
                                          student_head_bias=student_bias, teacher_head_bias=teacher_bias, alpha=0.0,
                                          mode="full")
    loss = sequence_mean_loss(scatter_rows(divergence, scored)["loss"], batch.completion_mask.float())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("kind", ["ema", "frozen", "live"])
def test_two_steps_change_only_the_student_adapter(kind):
    model = lora_model()
    model.train()
    initial_base = base_tensors(model)
    teacher = make_teacher(kind, model, "unused: a LoRA teacher loads nothing", torch.float32)
    assert isinstance(teacher, AdapterTeacher)
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-2)
    student_ids = {id(p) for n, p in model.named_parameters() if f"lora_A.{STUDENT_ADAPTER}." in n
                   or f"lora_B.{STUDENT_ADAPTER}." in n}
    assert {id(p) for group in optimizer.param_groups for p in group["params"]} == student_ids

    for _ in range(2):
        teacher_before, student_before = adapter_tensors(model, TEACHER_ADAPTER), adapter_tensors(model,
                                                                                                  STUDENT_ADAPTER)
        distill_step(model, teacher, optimizer)
        student_after = adapter_tensors(model, STUDENT_ADAPTER)
        assert any(not torch.equal(student_before[n], student_after[n]) for n in student_after)  # it trained
        if kind == "ema":
            ema_update_(teacher, model, RATE)
            for name, value in adapter_tensors(model, TEACHER_ADAPTER).items():
                student_name = name.replace(f".{TEACHER_ADAPTER}.", f".{STUDENT_ADAPTER}.")
                expected = (1 - RATE) * teacher_before[name].double() + RATE * student_after[student_name].double()
                torch.testing.assert_close(value.double(), expected, rtol=0, atol=1e-7, msg=name)

    assert model.training and model.active_adapter == STUDENT_ADAPTER
    for name, value in base_tensors(model).items():
        assert torch.equal(value, initial_base[name]), name  # bitwise: the base never moves
    for name, param in model.named_parameters():
        is_student = f".{STUDENT_ADAPTER}." in name and "lora_" in name
        assert param.requires_grad == is_student, name  # the teacher adapter never becomes trainable
        assert (param.grad is None) or is_student, name
    assert (TEACHER_ADAPTER in model.peft_config) == (kind == "ema")  # frozen/live add nothing


def test_frozen_teacher_is_exactly_the_base_model_and_ema_starts_at_the_student():
    base = tiny_llama()
    model = lora_model()
    randomize_adapter(model)
    frozen = make_teacher("frozen", model, "unused", torch.float32)
    ema = make_teacher("ema", model, "unused", torch.float32)
    with torch.no_grad():
        base_logits, student_logits = base(IDS).logits, model(IDS).logits
        assert torch.equal(frozen(input_ids=IDS).logits, base_logits)
        assert not torch.allclose(student_logits, base_logits, atol=1e-3)  # the adapter matters
        assert torch.equal(ema(input_ids=IDS).logits, student_logits)  # the EMA adapter begins as a copy


def test_ema_teacher_parameters_are_its_adapter_and_the_views_own_nothing():
    model = lora_model()
    teacher = make_teacher("ema", model, "unused", torch.float32)
    named = dict(teacher.named_parameters())  # what checkpoint.py saves and restores for the teacher
    assert named and set(named) == set(adapter_tensors(model, TEACHER_ADAPTER))
    assert all(not param.requires_grad for param in named.values())
    for kind in ("frozen", "live"):
        assert not list(make_teacher(kind, lora_model(), "unused", torch.float32).parameters())


@pytest.mark.parametrize("tied", [False, True])
def test_merged_parameters_are_the_adapted_model_under_base_names(tied):
    model = lora_model(tied=tied)
    randomize_adapter(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    merged = dict(merged_parameters(model))
    plain = tiny_llama(tie_word_embeddings=tied)
    assert list(merged) == [name for name, _ in plain.named_parameters()]  # names and (layer) order of the base
    plain.load_state_dict(merged, strict=not tied)
    with torch.no_grad():
        torch.testing.assert_close(plain(IDS).logits, model(IDS).logits, rtol=0, atol=1e-5)
        unadapted = tiny_llama(tie_word_embeddings=tied)(IDS).logits
        assert not torch.allclose(plain(IDS).logits, unadapted, atol=1e-3)
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name  # nothing was merged in place
    # what every rollout engine receives (weight_sync.full_parameters) is this stream
    assert [name for name, _ in full_parameters(model)] == list(merged)


def test_merged_model_folder_loads_without_peft(tmp_path, tokenizer):
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    from sdft_utils.training.lora import save_merged_model

    model = lora_model()
    randomize_adapter(model)
    path = save_merged_model(Accelerator(cpu=True), model, tokenizer, tmp_path / "merged_model")
    reloaded = AutoModelForCausalLM.from_pretrained(path)
    assert not hasattr(reloaded, "peft_config")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, model(IDS).logits, rtol=0, atol=1e-5)


def plain_accelerator(distributed_type=DistributedType.NO, zero_stage=None):
    """A stand-in for Accelerator: ZeRO-3 and FSDP need a launched multi-process run, and only the type is read."""
    plugin = SimpleNamespace(zero_stage=zero_stage) if zero_stage else None
    return SimpleNamespace(distributed_type=distributed_type, state=SimpleNamespace(deepspeed_plugin=plugin))


@pytest.mark.parametrize("overrides, accelerator, message", [
    ({"teacher_model": "other/model"}, plain_accelerator(), "--teacher_model cannot be combined with --use_peft"),
    ({"teacher_fp32": True}, plain_accelerator(), "--teacher_fp32 cannot be combined with --use_peft"),
    ({"lora_target_modules": ["q_proj", "lm_head"]}, plain_accelerator(), "--lora_target_modules lm_head"),
    ({"lora_r": 0, "lora_dropout": 1.0}, plain_accelerator(), r"--lora_r must be at least 1.*\n.*--lora_dropout"),
    ({}, plain_accelerator(DistributedType.DEEPSPEED, zero_stage=3), "--use_peft under DeepSpeed ZeRO-3"),
    ({}, plain_accelerator(DistributedType.FSDP), "--use_peft under FSDP"),
    ({"use_peft": False, "merge_adapter_at_end": True}, plain_accelerator(), "--merge_adapter_at_end .* --use_peft"),
])
def test_unsupported_combinations_are_refused_naming_the_flags(overrides, accelerator, message):
    with pytest.raises(UserInputError, match=message):
        check_lora(lora_args(**overrides), accelerator)


def test_zero2_and_ddp_are_accepted():
    check_lora(lora_args(), plain_accelerator(DistributedType.DEEPSPEED, zero_stage=2))
    check_lora(lora_args(), plain_accelerator(DistributedType.MULTI_GPU))


def test_missing_peft_names_the_requirements_file(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # makes `import peft` fail as if it were not installed
    with pytest.raises(UserInputError, match="peft"):
        require_peft()


def test_target_modules_that_match_nothing_are_a_user_error():
    with pytest.raises(UserInputError, match="--lora_target_modules nope"):
        lora_model(lora_target_modules=["nope"])

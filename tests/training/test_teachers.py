import pytest
import torch

from sdft_utils.errors import UserInputError
from sdft_utils.testing import tiny_llama
from sdft_utils.training.teachers import ema_update_, make_teacher


def test_ema_moves_the_teacher_toward_the_student_by_the_rate():
    student, teacher = tiny_llama(seed=0), tiny_llama(seed=1)
    before = {name: p.detach().clone().double() for name, p in teacher.named_parameters()}
    ema_update_(teacher, student, 0.01)
    for name, param in teacher.named_parameters():
        expected = 0.99 * before[name] + 0.01 * dict(student.named_parameters())[name].double()
        torch.testing.assert_close(param.double(), expected, rtol=0, atol=1e-7)


def test_ema_direction_rate_one_copies_the_student_and_zero_keeps_the_teacher():
    student, teacher = tiny_llama(seed=0), tiny_llama(seed=1)
    original = {name: p.detach().clone() for name, p in teacher.named_parameters()}
    ema_update_(teacher, student, 0.0)
    assert all(torch.equal(p, original[n]) for n, p in teacher.named_parameters())
    ema_update_(teacher, student, 1.0)
    assert all(torch.equal(p, dict(student.named_parameters())[n]) for n, p in teacher.named_parameters())


def test_ema_keeps_a_float32_teacher_in_float32():
    student, teacher = tiny_llama(seed=0).to(torch.bfloat16), tiny_llama(seed=1)
    ema_update_(teacher, student, 0.5)
    assert all(p.dtype == torch.float32 for p in teacher.parameters())


def test_frozen_and_ema_teachers_are_separate_copies_without_gradients(tiny_model_dir):
    student = tiny_llama(seed=0)
    for kind in ("ema", "frozen"):
        teacher = make_teacher(kind, student, tiny_model_dir, torch.float32)
        assert teacher is not student
        assert not any(p.requires_grad for p in teacher.parameters())
        assert not teacher.training


def test_live_teacher_is_the_student_and_warns(tiny_model_dir):
    student = tiny_llama(seed=0)
    with pytest.warns(UserWarning, match="diverges"):
        assert make_teacher("live", student, tiny_model_dir, torch.float32) is student


def test_teacher_with_another_vocabulary_is_refused(tmp_path):
    other = tiny_llama(vocab_size=300)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(UserInputError, match="vocabulary of 300"):
        make_teacher("frozen", tiny_llama(), tmp_path / "other", torch.float32)


def test_ema_teacher_needs_the_same_architecture(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    bigger = LlamaForCausalLM(LlamaConfig(vocab_size=259, hidden_size=64, intermediate_size=128,
                                          num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1))
    bigger.save_pretrained(tmp_path / "bigger")
    with pytest.raises(UserInputError, match="--teacher_kind frozen"):
        make_teacher("ema", tiny_llama(), tmp_path / "bigger", torch.float32)
    make_teacher("frozen", tiny_llama(), tmp_path / "bigger", torch.float32)  # allowed: only the vocab must match

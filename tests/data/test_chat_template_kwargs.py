"""Extra chat-template variables (`--chat_template_kwargs`, `--teacher_chat_template_kwargs`): a Qwen3-style template
rendered both ways by every prompt renderer (student, teacher reprompt, evaluation), the config's checks, and the
recipes whose model needs thinking turned off."""

from __future__ import annotations

import pytest
from accelerate import Accelerator

from sdft_utils.data.prompts import ChatTemplateConfig, template_variables, tokenize_chat_prompts
from sdft_utils.errors import UserInputError
from sdft_utils.testing import CHATML_TEMPLATE, byte_level_tokenizer

# Qwen3's template writes an empty thinking block after the generation prompt when thinking is switched off
QWEN3_STYLE = CHATML_TEMPLATE + (
    "{% if add_generation_prompt %}{% if enable_thinking is defined and enable_thinking is false %}"
    "{{ '<think>\n\n</think>\n\n' }}{% endif %}{% endif %}")
OFF = {"enable_thinking": False}
EMPTY_THINKING = "<|im_start|>assistant\n<think>\n\n</think>\n\n"


@pytest.fixture(scope="module")
def qwen3_tokenizer():
    tokenizer = byte_level_tokenizer()
    tokenizer.chat_template = QWEN3_STYLE
    return tokenizer


def rendered(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids)


def test_student_prompts_render_with_thinking_on_by_default_and_off_when_asked(qwen3_tokenizer):
    conversation = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]]
    default, _ = tokenize_chat_prompts(qwen3_tokenizer, conversation, 512)
    explicit_on, _ = tokenize_chat_prompts(qwen3_tokenizer, conversation, 512, {"enable_thinking": True})
    off, _ = tokenize_chat_prompts(qwen3_tokenizer, conversation, 512, OFF)
    assert rendered(qwen3_tokenizer, default[0]).endswith("2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert explicit_on == default
    assert rendered(qwen3_tokenizer, off[0]).endswith("2+2?<|im_end|>\n" + EMPTY_THINKING)
    assert off[0][:len(default[0])] == default[0]  # the same prompt, with only the empty thinking block added


def test_teacher_reprompts_take_the_teachers_kwargs_also_when_shortening_the_demonstration(qwen3_tokenizer):
    from sdft_utils.sdpo.reprompt import Reprompt, reprompt_messages, tokenize_reprompts

    prompt = [{"role": "user", "content": "Solve x+1=3."}]
    solution = "x = 2 " * 40
    reprompts = [Reprompt(reprompt_messages(prompt, solution, None), solution, None)]
    full_off, _ = tokenize_reprompts(qwen3_tokenizer, [prompt], reprompts, 4096, chat_template_kwargs=OFF)
    full_on, _ = tokenize_reprompts(qwen3_tokenizer, [prompt], reprompts, 4096)
    assert rendered(qwen3_tokenizer, full_off[0]).endswith(EMPTY_THINKING)
    assert not rendered(qwen3_tokenizer, full_on[0]).endswith(EMPTY_THINKING)
    short, truncated = tokenize_reprompts(qwen3_tokenizer, [prompt], reprompts, len(full_off[0]) - 60,
                                          truncation="demonstration", chat_template_kwargs=OFF)
    assert truncated == 1 and rendered(qwen3_tokenizer, short[0]).endswith(EMPTY_THINKING)


def test_teacher_kwargs_default_to_the_students_and_can_be_set_apart():
    same = ChatTemplateConfig(chat_template_kwargs=OFF)
    assert same.student_template_kwargs == same.teacher_template_kwargs == OFF
    apart = ChatTemplateConfig(chat_template_kwargs=OFF, teacher_chat_template_kwargs={"enable_thinking": True})
    assert apart.student_template_kwargs == OFF and apart.teacher_template_kwargs == {"enable_thinking": True}
    assert ChatTemplateConfig(chat_template_kwargs=OFF, teacher_chat_template_kwargs={}).teacher_template_kwargs == {}
    assert ChatTemplateConfig().student_template_kwargs == ChatTemplateConfig().teacher_template_kwargs == {}


def test_config_refuses_names_apply_chat_template_uses_itself():
    ChatTemplateConfig(chat_template_kwargs=OFF).check()
    with pytest.raises(UserInputError, match=r"--teacher_chat_template_kwargs sets \['add_generation_prompt'\]"):
        ChatTemplateConfig(teacher_chat_template_kwargs={"add_generation_prompt": False}).check()
    with pytest.raises(UserInputError, match="identifiers"):
        ChatTemplateConfig(chat_template_kwargs={"enable thinking": False}).check()


def test_a_variable_the_template_never_reads_is_an_error_naming_the_flag(qwen3_tokenizer):
    ChatTemplateConfig(chat_template_kwargs=OFF).check_template(qwen3_tokenizer)
    with pytest.raises(UserInputError, match=r"--chat_template_kwargs sets \['enable_thinkng'\].*'enable_thinking'"):
        ChatTemplateConfig(chat_template_kwargs={"enable_thinkng": False}).check_template(qwen3_tokenizer)
    with pytest.raises(UserInputError, match="never reads"):  # a model without a thinking mode (plain ChatML)
        ChatTemplateConfig(chat_template_kwargs=OFF).check_template(byte_level_tokenizer())
    assert "enable_thinking" in template_variables(QWEN3_STYLE)
    assert template_variables("{% generation %}{{ x }}{% endgeneration %}") is None  # unknown tag: not checked


class RecordingRollout:
    """The real HFRollout on a tiny model, keeping the prompt ids it was asked to complete."""

    def __init__(self):
        from sdft_utils.rollout.hf import HFRollout
        from sdft_utils.testing import tiny_llama

        self.engine, self.prompts = HFRollout(tiny_llama(), pad_token_id=2, eos_token_ids=[2]), []

    def generate(self, prompt_ids, sampling, seeds=None):
        self.prompts += prompt_ids
        return self.engine.generate(prompt_ids, sampling, seeds)


def test_evaluation_renderers_take_the_kwargs(qwen3_tokenizer):
    from sdft_utils.evaluation.report import run_benchmark
    from sdft_utils.rollout.sampling import SamplingConfig
    from sdft_utils.sdpo.tasks import Task, make_scorer, success_rate
    from sdft_utils.sdpo.verifiers import Verdict

    accelerator = Accelerator(cpu=True)
    prompt = [{"role": "user", "content": "Name a colour."}]
    rollout = RecordingRollout()
    greedy = SamplingConfig(max_new_tokens=2, temperature=0.0)
    success_rate(rollout, qwen3_tokenizer, [Task(prompt, {"answers": ["red"]}, "contains")], accelerator, 256, greedy,
                 make_scorer(None), chat_template_kwargs=OFF)
    success_rate(rollout, qwen3_tokenizer, [Task(prompt, {}, "reward_fn")], accelerator, 256, greedy,
                 lambda task, text: Verdict(1.0), chat_template_kwargs=OFF)
    run_benchmark(rollout, qwen3_tokenizer, [Task(prompt, {"answers": ["red"]}, "contains")], greedy, 256, OFF)
    assert len(rollout.prompts) == 3
    assert all(rendered(qwen3_tokenizer, ids).endswith(EMPTY_THINKING) for ids in rollout.prompts)
    rollout.prompts.clear()
    success_rate(rollout, qwen3_tokenizer, [Task(prompt, {}, "reward_fn")], accelerator, 256, greedy,
                 lambda task, text: Verdict(1.0))
    assert not rendered(qwen3_tokenizer, rollout.prompts[0]).endswith(EMPTY_THINKING)


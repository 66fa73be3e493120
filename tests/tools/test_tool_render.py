"""Tools rendered through the model's chat template, or the system-turn fallback for templates without tools."""

import importlib.util
import json
from pathlib import Path

import pytest

from sdft_utils.testing import TOOLS_CHATML_TEMPLATE, byte_level_tokenizer
from sdft_utils.tools.render import ToolChat, ToolTemplateError, demonstration_text, template_renders_tools
from sdft_utils.tools.schemas import normalize_tools

TOOLS = normalize_tools([{"name": "add", "description": "Add two integers.", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}])
USER = [{"role": "user", "content": "What is 2 + 3?"}]
CALL = {"role": "assistant", "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]}
RESULT = [{"role": "tool", "name": "add", "content": "5"}]


def test_a_template_without_tools_gets_the_fallback_in_the_system_turn():
    tokenizer = byte_level_tokenizer()  # SmolLM2's ChatML template: no tools section
    assert not template_renders_tools(tokenizer)
    chat = ToolChat.from_tokenizer(tokenizer, [2])
    assert not chat.native and chat.call_format == "hermes" and chat.end_marker == "<|im_end|>"
    text = chat.render(USER, TOOLS)
    system = text.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\n# Tools\n")
    assert "<tools>\n" + json.dumps(TOOLS[0]) + "\n</tools>" in system  # one schema per line, parseable back
    assert '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>' in system
    assert text.endswith("<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n")


def test_the_fallback_keeps_a_system_message_and_writes_calls_and_results_as_text():
    chat = ToolChat.from_tokenizer(byte_level_tokenizer(), [2])
    messages = [{"role": "system", "content": "Be brief."}, *USER, CALL, *RESULT, RESULT[0]]
    text = chat.render(messages, TOOLS, add_generation_prompt=False)
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools")
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
            '<|im_end|>\n<|im_start|>user\n<tool_response>\n5\n</tool_response>\n<tool_response>\n5\n'
            '</tool_response><|im_end|>\n') in text  # consecutive results: one user turn
    react = ToolChat.from_tokenizer(byte_level_tokenizer(), [2], tool_format="react")
    assert "Action: add\nAction Input: {\"a\": 2, \"b\": 3}" in react.render([*USER, CALL, *RESULT], TOOLS, False)
    assert "Observation: 5" in react.render([*USER, CALL, *RESULT], TOOLS, False)


def test_a_template_with_tools_is_used_natively():
    tokenizer = byte_level_tokenizer(chat_template=TOOLS_CHATML_TEMPLATE)
    chat = ToolChat.from_tokenizer(tokenizer, [2])
    assert chat.native and chat.call_format == "hermes"
    assert chat.render(USER, TOOLS) == tokenizer.apply_chat_template(USER, tools=TOOLS, tokenize=False,
                                                                     add_generation_prompt=True)
    forced = ToolChat.from_tokenizer(tokenizer, [2], tool_template="fallback")
    assert not forced.native and "You may call one or more functions" in forced.render(USER, TOOLS)
    with pytest.raises(ToolTemplateError, match="has no tools section"):
        ToolChat.from_tokenizer(byte_level_tokenizer(), [2], tool_template="native")


@pytest.mark.parametrize("template", [None, TOOLS_CHATML_TEMPLATE], ids=["fallback", "native"])
def test_continuation_is_the_templates_text_after_the_end_of_turn_token(template):
    tokenizer = byte_level_tokenizer() if template is None else byte_level_tokenizer(chat_template=template)
    chat = ToolChat.from_tokenizer(tokenizer, [2])
    full = chat.render([*USER, CALL, *RESULT], TOOLS, add_generation_prompt=True)
    before = chat.render([*USER, CALL], TOOLS, add_generation_prompt=False)  # ends "...</tool_call><|im_end|>\n"
    expected = full[len(before) - 1:]  # the model stops at <|im_end|>: its "\n" and all after come from the template
    assert tokenizer.decode(chat.continuation_ids(USER, CALL, RESULT, TOOLS)) == expected
    assert expected.startswith("\n<|im_start|>user\n<tool_response>\n5") and expected.endswith("assistant\n")
    answer = {"role": "assistant", "content": "It is 5."}
    after_answer = chat.continuation_ids([*USER, CALL, *RESULT], answer, [{"role": "user", "content": "And 4+4?"}],
                                         TOOLS)
    assert tokenizer.decode(after_answer) == "\n<|im_start|>user\nAnd 4+4?<|im_end|>\n<|im_start|>assistant\n"


def test_a_template_whose_turns_do_not_end_with_the_stop_token_is_refused():
    with pytest.raises(ToolTemplateError, match="does not end an assistant turn with one of the stop tokens"):
        ToolChat.from_tokenizer(byte_level_tokenizer(), [0])  # <|endoftext|> never closes a ChatML turn


def test_demonstration_text_writes_a_trajectory_in_the_call_syntax():
    trajectory = [CALL, *RESULT, {"role": "assistant", "content": "2 + 3 = 5."}, {"role": "user", "content": "Thanks"}]
    assert demonstration_text(trajectory, "hermes") == (
        '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>\n'
        "<tool_response>\n5\n</tool_response>\n2 + 3 = 5.\nUser: Thanks")
    assert demonstration_text(trajectory, "react").startswith('Action: add\nAction Input: {"a": 2, "b": 3}\n'
                                                              "Observation: 5\n")


TRL_TEMPLATES = Path(importlib.util.find_spec("trl").submodule_search_locations[0]) / "chat_templates" \
    if importlib.util.find_spec("trl") else None


@pytest.mark.skipif(TRL_TEMPLATES is None, reason="the real model templates are read from the trl package")
@pytest.mark.parametrize("name, call_format, expected", [
    # Qwen3's own template re-renders earlier turns once messages follow (drops empty think blocks): only the
    # text after the last assistant turn is taken, so it still works
    ("qwen3.jinja", "hermes", "\n<|im_start|>user\n<tool_response>\n5\n</tool_response><|im_end|>\n"
                              "<|im_start|>assistant\n"),
    # Llama 3.1 drops a calling turn's text: the turn is found by its call
    ("llama3_1.jinja", "llama3", "<|start_header_id|>ipython<|end_header_id|>\n\n\"5\"<|eot_id|>"
                                 "<|start_header_id|>assistant<|end_header_id|>\n\n"),
])
def test_real_model_templates(name, call_format, expected):
    tokenizer = byte_level_tokenizer(chat_template=(TRL_TEMPLATES / name).read_text())
    stop = "<|im_end|>"
    if "llama" in name:
        tokenizer.add_special_tokens({"additional_special_tokens": [
            "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|python_tag|>", "<|begin_of_text|>"]})
        stop = "<|eot_id|>"
    chat = ToolChat.from_tokenizer(tokenizer, [tokenizer.convert_tokens_to_ids(stop)])
    assert chat.native and chat.call_format == call_format and chat.end_marker == stop
    assert tokenizer.decode(chat.continuation_ids(USER, CALL, RESULT, TOOLS)) == expected


@pytest.mark.slow
def test_the_embedded_smollm2_tokenizer_uses_the_fallback_and_continues_exactly():
    """SmolLM2's real BPE tokenizer (merges across characters): the continuation tokenised alone equals its tokens
    in the tokenisation of the whole conversation."""
    from transformers import AutoTokenizer

    from sdft_utils.assets import embedded_model_path

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_path())
    chat = ToolChat.from_tokenizer(tokenizer, [tokenizer.eos_token_id])
    assert not chat.native and chat.call_format == "hermes"
    prompt = chat.encode(chat.render(USER, TOOLS))
    model_turn = chat.encode('<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>') + \
        [tokenizer.eos_token_id]
    sequence = prompt + model_turn + chat.continuation_ids(USER, CALL, RESULT, TOOLS)
    assert sequence == chat.encode(chat.render([*USER, CALL, *RESULT], TOOLS, add_generation_prompt=True))

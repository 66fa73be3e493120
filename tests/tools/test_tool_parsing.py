"""Tool calls parsed out of generated text for each call format, malformed calls reported and never raised."""

import json

import pytest

from sdft_utils.tools.parsing import CALL_FORMATS, ToolCall, format_calls, parse_turn

CALLS = [ToolCall("get_weather", {"city": "Paris", "days": 2}), ToolCall("math.hypot", {"x": 3, "y": 4})]


@pytest.mark.parametrize("call_format", CALL_FORMATS)
def test_each_format_parses_back_what_it_writes(call_format):
    text = "Let me check.\n" + format_calls(CALLS, call_format) if call_format != "llama3" else \
        format_calls(CALLS, call_format)
    parsed = parse_turn(text, call_format)
    assert [(c.name, c.arguments) for c in parsed.calls] == [(c.name, c.arguments) for c in CALLS]
    assert parsed.errors == []


@pytest.mark.parametrize("text, call_format", [
    ('<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>', "hermes"),
    ('<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>', "hermes"),  # OpenAI-style JSON text
    ('<|python_tag|>{"name": "f", "parameters": {"x": 1}}', "llama3"),
    ('[TOOL_CALLS] [{"name": "f", "arguments": {"x": 1}}]', "mistral"),
    ('[TOOL_CALLS]f[ARGS]{"x": 1}', "mistral"),
    ('Thought: I need f.\nAction: f\nAction Input: {"x": 1}', "react"),
])
def test_family_variants(text, call_format):
    parsed = parse_turn(text, call_format)
    assert [(c.name, c.arguments) for c in parsed.calls] == [("f", {"x": 1})] and parsed.errors == []


@pytest.mark.parametrize("text, call_format", [
    ("The answer is 5.", "hermes"), ("The answer is 5.", "llama3"), ("The answer is 5.", "mistral"),
    ("Final Answer: 5", "react"), ("{braces} in prose", "llama3"),
])
def test_plain_answers_have_no_calls_and_no_errors(text, call_format):
    parsed = parse_turn(text, call_format)
    assert parsed.calls == [] and parsed.errors == [] and parsed.content == text


@pytest.mark.parametrize("text, call_format, reason", [
    ('<tool_call>\n{"name": "f", "arguments": {"x": 1}\n</tool_call>', "hermes", "not valid JSON"),
    ('<tool_call>\n{"arguments": {"x": 1}}\n</tool_call>', "hermes", 'no "name"'),
    ('<tool_call>\n{"name": "f", "arguments": [1, 2]}\n</tool_call>', "hermes", "not a JSON object"),
    ('<tool_call>\n[1, 2]\n</tool_call>', "hermes", "expected a JSON object"),
    ('{"name": "f", "parameters": {"x": 1}', "llama3", "not valid JSON"),
    ('[TOOL_CALLS] [{"name": "f", "arguments": {"x": 1}', "mistral", "not valid JSON"),
    ("[TOOL_CALLS]", "mistral", "nothing follows"),
    ('Action: f\nAction Input: {"x": 1,}', "react", "not valid JSON"),
    ("Action: f\nno input", "react", "without an Action Input"),
])
def test_malformed_calls_become_errors_that_say_how_to_call(text, call_format, reason):
    parsed = parse_turn(text, call_format)
    assert parsed.calls == []
    assert len(parsed.errors) == 1 and reason in parsed.errors[0] and "Write each call as" in parsed.errors[0]


def test_one_malformed_block_does_not_hide_the_good_ones():
    text = ('<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "b", "arguments": '
            '{\n</tool_call>\n<tool_call>\n{"name": "c", "arguments": {"k": "v"}}\n</tool_call>')
    parsed = parse_turn(text, "hermes")
    assert [c.name for c in parsed.calls] == ["a", "c"]
    assert len(parsed.errors) == 1 and parsed.errors[0].startswith("Tool call 2 could not be parsed")


def test_arguments_are_kept_as_written_not_cast_to_the_schema():
    parsed = parse_turn('<tool_call>{"name": "f", "arguments": {"n": "7"}}</tool_call>', "hermes")
    assert parsed.calls[0].arguments == {"n": "7"}  # the BFCL checker must see the string the model wrote


def test_a_tokenizer_response_template_is_used_when_present():
    """transformers 5.x tokenizers may ship a declarative `response_template`: tokenizer.parse_response parses."""
    from sdft_utils.testing import byte_level_tokenizer
    from sdft_utils.tools.parsing import HERMES_RESPONSE_TEMPLATE

    tokenizer = byte_level_tokenizer()
    template = json.loads(json.dumps(HERMES_RESPONSE_TEMPLATE))
    template["fields"]["tool_calls"].update(open_pattern=r"\s*<call>", close="</call>")
    tokenizer.response_template = template
    parsed = parse_turn('Sure.\n<call>{"name": "f", "arguments": {"x": 1}}</call>', "hermes", tokenizer,
                        prefix="<|im_start|>assistant\n")
    assert [(c.name, c.arguments) for c in parsed.calls] == [("f", {"x": 1})] and parsed.content == "Sure."
    # the same text under the hermes parser (no response template) holds no <tool_call>: plain text
    assert parse_turn('<call>{"name": "f"}</call>', "hermes").calls == []

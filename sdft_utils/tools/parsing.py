"""Tool calls out of generated text, for the common call formats; and the same calls written back as text.

Formats (`CALL_FORMATS`):
- `hermes`: Qwen2.5/Qwen3, Hermes and the fallback for templates without tools:
  `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one block per call. Parsed by transformers'
  declarative response parser (`transformers.utils.chat_parsing.parse_response`, the `tool_calls` field its
  `transformers serve` uses for Qwen2 models), with lenient JSON so one bad block does not hide the others;
- `llama3`: Llama 3.1-3.3 JSON tool calling: the turn is `{"name": ..., "parameters": {...}}` (optionally after
  `<|python_tag|>`, several separated by `;` or newlines);
- `mistral`: `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`, or the newer `[TOOL_CALLS]name[ARGS]{...}`;
- `react`: the papers' ToolAlpaca text, `Action: name` then `Action Input: {json}` (the syntax of the `tool` verifier).
A tokenizer that ships its own `response_template` (transformers 5.x) is parsed with `tokenizer.parse_response`
instead, whatever the family.

Parsing never raises for what a model wrote: a call that is recognisable as an attempt but malformed (bad JSON, no
name, arguments that are not an object) becomes an entry of `ParsedTurn.errors`, which the rollout loop turns into
an error tool message to the model and a feedback string. Arguments are kept as written (no casting to the schema):
the BFCL checkers judge the types the model produced.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from sdft_utils.sdpo.verifiers import ACTION

CALL_FORMATS = ["hermes", "llama3", "mistral", "react"]
FORMAT_EXAMPLES = {
    "hermes": '<tool_call>\n{"name": "function_name", "arguments": {"argument": "value"}}\n</tool_call>',
    "llama3": '{"name": "function_name", "parameters": {"argument": "value"}}',
    "mistral": '[TOOL_CALLS] [{"name": "function_name", "arguments": {"argument": "value"}}]',
    "react": 'Action: function_name\nAction Input: {"argument": "value"}',
}
# transformers' declarative response template for <tool_call> JSON blocks; `allow_non_json` keeps a malformed block
# as its text, so it can be reported on its own
HERMES_RESPONSE_TEMPLATE = {
    "defaults": {"role": "assistant"},
    "start_anchor": "<|im_start|>assistant\n",
    "fields": {
        "tool_calls": {"open_pattern": r"\s*<tool_call>", "close": "</tool_call>", "repeats": True,
                       "content": "json", "content_args": {"allow_non_json": True},
                       "transform": {"type": "function", "function": "{content}"}},
        "content": {"close_pattern": r"\s*(?:<\|im_end\|>|<\|endoftext\|>)", "content": "text"},
    },
}


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str | None = None

    def as_message_call(self) -> dict:
        """The OpenAI-shaped entry of an assistant message's `tool_calls`."""
        call = {"type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        if self.id is not None:
            call["id"] = self.id
        return call


@dataclass
class ParsedTurn:
    content: str  # the text of the turn outside its calls
    calls: list[ToolCall] = field(default_factory=list)  # well-formed calls, in order
    errors: list[str] = field(default_factory=list)  # one sentence per malformed call


def _call_from_object(value: Any, arguments_keys: tuple[str, ...] = ("arguments", "parameters")) -> ToolCall | str:
    """A ToolCall from a decoded {"name", "arguments"} object, or the reason it is not one."""
    if not isinstance(value, dict):
        return f"expected a JSON object with \"name\" and \"arguments\", got {type(value).__name__}"
    name = value.get("name")
    if not isinstance(name, str) or not name.strip():
        return "the call has no \"name\" string"
    arguments: Any = {}
    for key in arguments_keys:
        if key in value:
            arguments = value[key]
            break
    if isinstance(arguments, str):  # OpenAI style: the arguments as JSON text
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as error:
            return f"the arguments of {name} are not valid JSON ({error.msg})"
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        return f"the arguments of {name} are not a JSON object"
    call_id = value.get("id")
    return ToolCall(name.strip(), arguments, call_id if isinstance(call_id, str) else None)


def _collect(items: list[ToolCall | str], call_format: str) -> tuple[list[ToolCall], list[str]]:
    calls, errors = [], []
    for number, item in enumerate(items, start=1):
        if isinstance(item, ToolCall):
            calls.append(item)
        else:
            errors.append(f"Tool call {number} could not be parsed: {item}. Write each call as "
                          f"{FORMAT_EXAMPLES[call_format]}")
    return calls, errors


def _parse_hermes(text: str) -> ParsedTurn:
    from transformers.utils.chat_parsing import parse_response

    try:
        message = parse_response(text, HERMES_RESPONSE_TEMPLATE, prefix="")
    except Exception as error:  # the parser rejects the whole turn; report it rather than crash
        return ParsedTurn(text.strip(), [], [f"The tool calls could not be parsed ({error}). Write each call as "
                                             f"{FORMAT_EXAMPLES['hermes']}"])
    items = []
    for entry in message.get("tool_calls", []):
        body = entry.get("function")
        if isinstance(body, str):  # allow_non_json kept the text of a block that is not JSON
            try:
                json.loads(body)
                reason = "expected a JSON object"
            except json.JSONDecodeError as error:
                reason = f"not valid JSON ({error.msg} at character {error.pos})"
            items.append(reason)
        else:
            items.append(_call_from_object(body))
    calls, errors = _collect(items, "hermes")
    return ParsedTurn(str(message.get("content") or "").strip(), calls, errors)


def _json_objects(text: str) -> tuple[list[Any], str | None]:
    """Consecutive JSON values in `text` separated by whitespace, ';' or ','; the error if something else follows."""
    decoder, values, position = json.JSONDecoder(), [], 0
    while True:
        while position < len(text) and text[position] in " \t\r\n;,":
            position += 1
        if position >= len(text):
            return values, None
        try:
            value, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            return values, f"not valid JSON ({error.msg} at character {error.pos})"
        values.append(value)


def _parse_llama3(text: str) -> ParsedTurn:
    body = text.strip()
    body = body.removeprefix("<|python_tag|>").strip()
    if not body.startswith("{"):
        return ParsedTurn(text.strip())
    values, problem = _json_objects(body)
    if problem is not None and not values and '"name"' not in body:
        return ParsedTurn(text.strip())  # prose that happens to start with a brace
    items: list[ToolCall | str] = [_call_from_object(value) for value in values]
    if problem is not None:
        items.append(problem)
    calls, errors = _collect(items, "llama3")
    return ParsedTurn("", calls, errors)


MISTRAL_NAMED = re.compile(r"\s*([A-Za-z_][\w.\-]*)\s*\[ARGS\]")


def _parse_mistral(text: str) -> ParsedTurn:
    content, *chunks = text.split("[TOOL_CALLS]")
    items: list[ToolCall | str] = []
    for chunk in chunks:
        named = MISTRAL_NAMED.match(chunk)
        if named:  # [TOOL_CALLS]name[ARGS]{...}
            values, problem = _json_objects(chunk[named.end():])
            if problem is not None or len(values) != 1:
                items.append(problem or "expected one JSON object of arguments after [ARGS]")
            else:
                items.append(_call_from_object({"name": named.group(1), "arguments": values[0]}))
            continue
        values, problem = _json_objects(chunk)
        for value in values:
            items.extend(_call_from_object(call) for call in (value if isinstance(value, list) else [value]))
        if problem is not None or not values:
            items.append(problem or "nothing follows [TOOL_CALLS]")
    calls, errors = _collect(items, "mistral")
    return ParsedTurn(content.strip(), calls, errors)


def _parse_react(text: str) -> ParsedTurn:
    stripped = text.strip()
    items: list[ToolCall | str] = []
    for name, arguments in ACTION.findall(stripped):
        try:
            value = json.loads(arguments)
        except json.JSONDecodeError as error:
            items.append(f"the Action Input of {name.strip()} is not valid JSON ({error.msg})")
            continue
        items.append(_call_from_object({"name": name.strip(), "arguments": value}))
    if not items and re.search(r"^\s*Action:", stripped, re.MULTILINE):
        items.append("an Action: line without an Action Input: {json} line after it")
    calls, errors = _collect(items, "react")
    content = stripped.split("Action:", 1)[0].strip() if items else stripped
    return ParsedTurn(content, calls, errors)


PARSERS = {"hermes": _parse_hermes, "llama3": _parse_llama3, "mistral": _parse_mistral, "react": _parse_react}


def parse_turn(text: str, call_format: str, tokenizer=None, prefix: str = "") -> ParsedTurn:
    """Split one generated assistant turn (decoded, without its end-of-turn token) into text and calls.

    With a `tokenizer` that has a `response_template`, transformers' `tokenizer.parse_response(text, prefix=...)`
    parses it (`prefix`: the end of the prompt, which some templates pre-fill); otherwise the `call_format` parser.
    """
    if tokenizer is not None and getattr(tokenizer, "response_template", None) is not None:
        try:
            message = tokenizer.parse_response(text, prefix=prefix)
        except Exception as error:  # a malformed turn: reported, never raised
            return ParsedTurn(text.strip(), [], [f"The turn could not be parsed ({error}). Write each call as "
                                                 f"{FORMAT_EXAMPLES.get(call_format, FORMAT_EXAMPLES['hermes'])}"])
        items = [_call_from_object(call.get("function", call)) for call in message.get("tool_calls") or []]
        calls, errors = _collect(items, call_format if call_format in FORMAT_EXAMPLES else "hermes")
        return ParsedTurn(str(message.get("content") or "").strip(), calls, errors)
    if call_format not in PARSERS:
        raise ValueError(f"unknown call format {call_format!r}; choose one of {CALL_FORMATS}")
    return PARSERS[call_format](text)


def format_calls(calls: list[ToolCall], call_format: str) -> str:
    """The text a model of `call_format` writes for `calls` (fallback rendering, demonstrations in the teacher's
    prompt)."""
    if not calls:
        return ""
    if call_format == "hermes":
        return "\n".join(f"<tool_call>\n{json.dumps({'name': c.name, 'arguments': c.arguments})}\n</tool_call>"
                         for c in calls)
    if call_format == "llama3":
        return "\n".join(json.dumps({"name": c.name, "parameters": c.arguments}) for c in calls)
    if call_format == "mistral":
        return "[TOOL_CALLS] " + json.dumps([{"name": c.name, "arguments": c.arguments} for c in calls])
    if call_format == "react":
        return "\n".join(f"Action: {c.name}\nAction Input: {json.dumps(c.arguments)}" for c in calls)
    raise ValueError(f"unknown call format {call_format!r}; choose one of {CALL_FORMATS}")


def calls_of_message(message: dict) -> list[ToolCall]:
    """The ToolCalls of a (normalised) assistant message."""
    return [ToolCall(call["function"]["name"], call["function"]["arguments"], call.get("id"))
            for call in message.get("tool_calls") or []]

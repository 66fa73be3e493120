"""Tools in the prompt, tool calls out of the answer, and the tokens that continue a conversation after a turn.

`ToolChat` binds a tokenizer to one way of talking about tools, chosen once from its chat template:
- **native**: the template has a tools section (it renders `apply_chat_template(..., tools=...)` differently from
  the same messages without tools) and renders assistant `tool_calls`. The call syntax is read off the template by
  rendering a probe call: `<tool_call>` -> hermes, `[TOOL_CALLS]` -> mistral, a bare `{"name": ..., "parameters"`
  -> llama3. A tokenizer with a `response_template` is parsed by transformers' `parse_response`.
- **fallback** (templates with no tools section, e.g. SmolLM2-135M-Instruct's): the schemas go into the system turn,
  one JSON object per line inside `<tools></tools>`, followed by how to call (the call format's example; hermes by
  default); an assistant message's calls are written into its text in that format; consecutive tool results become
  one user turn, each result inside `<tool_response>...</tool_response>` (ReAct: `Observation: ...`). An existing
  system message is kept, the tools text appended to it.

Token continuity. The rollout loop never re-tokenises what the model wrote. After a turn that ended with an
end-of-turn token, it appends only the *continuation*: the template's text after that end-of-turn token, i.e. the
tool results (or the next user turn) and the next assistant header. It is found by rendering the conversation with
the just-finished assistant turn's text replaced by a sentinel and taking what follows the first end-of-turn marker
after the sentinel. This holds for templates that render earlier turns differently once more messages follow
(e.g. Qwen3 drops empty think blocks from earlier turns): only the text after the last assistant turn is used. The
continuation starts right after a special token, so tokenising it alone gives the tokens it has in context.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

from sdft_utils.errors import UserInputError
from sdft_utils.tools.parsing import CALL_FORMATS, ParsedTurn, calls_of_message, format_calls, parse_turn

TOOL_TEMPLATES = ["auto", "native", "fallback"]
TOOL_FORMATS = ["auto", *CALL_FORMATS]
SENTINEL = "@@sdft-turn-sentinel@@"
SENTINEL_NAME = "sdft_turn_sentinel"
PROBE_TOOL = {"type": "function", "function": {
    "name": "sdft_probe_tool", "description": "A probe.",
    "parameters": {"type": "object", "properties": {"query": {"type": "string", "description": "A query."}},
                   "required": ["query"]}}}
PROBE_CALL = {"type": "function", "id": "call00001",
              "function": {"name": "sdft_probe_tool", "arguments": {"query": "sdft-probe-value"}}}

FALLBACK_INSTRUCTIONS = {
    "hermes": "For each function call, return a json object with function name and arguments within "
              "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
              "<args-json-object>}\n</tool_call>",
    "llama3": "To call a function, reply with only a JSON object: {\"name\": <function-name>, \"parameters\": "
              "<args-json-object>}",
    "mistral": "To call functions, write [TOOL_CALLS] followed by a JSON list: [TOOL_CALLS] [{\"name\": "
               "<function-name>, \"arguments\": <args-json-object>}]",
    "react": "To call a function, write two lines:\nAction: <function-name>\nAction Input: <args-json-object>",
}
FALLBACK_HEADER = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided "
                   "with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
                   "{instructions}\n\nThe results come back as the next message. When you have the answer, reply in "
                   "plain text without a function call.")


class ToolTemplateError(UserInputError):
    """The chat template cannot be used for tool conversations as it is."""


def _apply(tokenizer, messages: list[dict], tools: list[dict] | None, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def template_renders_tools(tokenizer) -> bool:
    """Does the chat template have a tools section and render assistant tool calls? (Rendered, not guessed.)"""
    user = [{"role": "user", "content": "Hello."}]
    try:
        with_tools = _apply(tokenizer, user, [PROBE_TOOL], True)
        without = _apply(tokenizer, user, None, True)
        call = _apply(tokenizer, [*user, {"role": "assistant", "content": "", "tool_calls": [PROBE_CALL]}],
                      [PROBE_TOOL], False)
    except Exception:  # a template that raises on tools or tool calls has no usable tools section
        return False
    return with_tools != without and "sdft_probe_tool" in with_tools and "sdft-probe-value" in call


def native_call_format(tokenizer) -> str | None:
    """The call syntax the template writes for an assistant tool call, or None if not one of ours."""
    user = [{"role": "user", "content": "Hello."}]
    text = _apply(tokenizer, [*user, {"role": "assistant", "content": "", "tool_calls": [PROBE_CALL]}],
                  [PROBE_TOOL], False)
    tail = text[text.rfind("Hello."):]
    if "<tool_call>" in tail:
        return "hermes"
    if "[TOOL_CALLS]" in tail:
        return "mistral"
    if '"parameters"' in tail and "sdft-probe-value" in tail:
        return "llama3"
    return None


def result_text(results: list[str], call_format: str) -> str:
    """Tool results as the fallback writes them into one user turn."""
    if call_format == "react":
        return "\n".join(f"Observation: {result}" for result in results)
    return "\n".join(f"<tool_response>\n{result}\n</tool_response>" for result in results)


@dataclass
class ToolChat:
    tokenizer: object
    call_format: str  # one of CALL_FORMATS: what the model writes for a call
    native: bool  # the chat template renders tools and calls itself; False = the system-turn fallback
    end_marker: str  # the text of the token that ends an assistant turn in this template
    eos_token_ids: tuple[int, ...]

    @classmethod
    def from_tokenizer(cls, tokenizer, eos_token_ids: list[int], tool_template: str = "auto",
                       tool_format: str = "auto") -> ToolChat:
        """Choose native or fallback rendering (`tool_template`) and the call syntax (`tool_format`) for this
        tokenizer; `auto` decides by rendering probes through the template."""
        if tool_template not in TOOL_TEMPLATES or tool_format not in TOOL_FORMATS:
            raise UserInputError(f"tool template must be one of {TOOL_TEMPLATES} and tool format one of "
                                 f"{TOOL_FORMATS}; got {tool_template!r} and {tool_format!r}.")
        renders = template_renders_tools(tokenizer)
        if tool_template == "native" and not renders:
            raise ToolTemplateError(
                "--tool_template native: this tokenizer's chat template has no tools section (rendering with "
                "tools= changes nothing, or it does not render assistant tool_calls). Use --tool_template auto or "
                "fallback (the tools are then described in the system turn).")
        native = renders and tool_template != "fallback"
        call_format = tool_format
        if native and tool_format == "auto":
            call_format = native_call_format(tokenizer) or ""
            if not call_format and getattr(tokenizer, "response_template", None) is None:
                raise ToolTemplateError(
                    "the chat template renders tools but writes calls in a syntax this library does not parse "
                    f"({', '.join(CALL_FORMATS)}) and the tokenizer has no response_template. Pass --tool_format "
                    "with the model's syntax, or --tool_template fallback.")
            call_format = call_format or "hermes"
        elif call_format == "auto":
            call_format = "hermes"
        chat = cls(tokenizer, call_format, native, "", tuple(eos_token_ids))
        chat.end_marker = chat._find_end_marker()
        return chat

    # ------------------------------------------------------------------------------------------------ rendering
    def fallback_messages(self, messages: list[dict], tools: list[dict] | None) -> list[dict]:
        """The conversation as the fallback shows it to a template without tools (see the module docstring)."""
        converted: list[dict] = []
        if tools:
            header = FALLBACK_HEADER.format(tools="\n".join(json.dumps(tool) for tool in tools),
                                            instructions=FALLBACK_INSTRUCTIONS[self.call_format])
            if messages and messages[0]["role"] == "system":
                converted.append({"role": "system", "content": f"{messages[0]['content']}\n\n{header}"})
                messages = messages[1:]
            else:
                converted.append({"role": "system", "content": header})
        for message, results in with_results_merged(messages, self.call_format):
            if message is None:  # tool results come back as a user turn, as Qwen's template shows them
                converted.append({"role": "user", "content": results})
                continue
            content = message.get("content") or ""
            if message["role"] == "assistant" and message.get("tool_calls"):
                calls = format_calls(calls_of_message(message), self.call_format)
                content = f"{content}\n{calls}" if content else calls
            converted.append({"role": message["role"], "content": content})
        return converted

    def render(self, messages: list[dict], tools: list[dict] | None, add_generation_prompt: bool = True) -> str:
        """The conversation as text, with the tools in it (native template or fallback)."""
        if self.native:
            return _apply(self.tokenizer, messages, tools, add_generation_prompt)
        return _apply(self.tokenizer, self.fallback_messages(messages, tools), None, add_generation_prompt)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_ids(self, conversations: list[list[dict]], tools: list[list[dict] | None],
                   max_length: int) -> tuple[list[list[int]], int]:
        """Token ids of each conversation with its tools and the generation prompt, left-truncated to `max_length`
        (as `tokenize_chat_prompts`); returns (ids, number truncated)."""
        encoded = [self.encode(self.render(messages, row_tools)) for messages, row_tools in
                   zip(conversations, tools, strict=True)]
        truncated = sum(len(ids) > max_length for ids in encoded)
        return [ids[-max_length:] for ids in encoded], truncated

    def _find_end_marker(self) -> str:
        """The end-of-turn text the template writes after an assistant message: the earliest EOS token text after
        the message's content."""
        text = self.render([{"role": "user", "content": "Hello."}, {"role": "assistant", "content": SENTINEL}],
                           None, add_generation_prompt=False)
        tail = text[text.rfind(SENTINEL) + len(SENTINEL):]
        found = []
        for token_id in self.eos_token_ids:
            marker = self.tokenizer.decode([token_id], skip_special_tokens=False)
            if marker and marker in tail:
                found.append((tail.index(marker), marker))
        if not found:
            raise ToolTemplateError(
                f"the chat template does not end an assistant turn with one of the stop tokens "
                f"{list(self.eos_token_ids)} (after the message it writes {tail!r}); multi-turn tool rollouts need "
                "the turn to end with the token generation stops at. Fix the template or the EOS ids.")
        return min(found)[1]

    def continuation_ids(self, history: list[dict], assistant: dict, new_messages: list[dict],
                         tools: list[dict] | None) -> list[int]:
        """Tokens that follow the end-of-turn token of `assistant` (the turn just generated) when `new_messages`
        (tool results, or the next user turn) are appended: their rendering and the next assistant header."""
        marked = {**assistant, "content": SENTINEL}
        text = self.render([*history, marked, *new_messages], tools, add_generation_prompt=True)
        start = text.rfind(SENTINEL)
        if start < 0 and assistant.get("tool_calls"):  # templates that drop the text of a calling turn (Llama 3.1)
            calls = [dict(call) for call in assistant["tool_calls"]]
            calls[0] = {**calls[0], "function": {**calls[0]["function"], "name": SENTINEL_NAME}}
            text = self.render([*history, {**assistant, "tool_calls": calls}, *new_messages], tools, True)
            start = text.rfind(SENTINEL_NAME)
        end = text.find(self.end_marker, start + 1) if start >= 0 else -1
        if start < 0 or end < 0:
            raise ToolTemplateError(
                "cannot find where the assistant turn ends in the chat template's rendering of a tool conversation "
                "(it does not show the turn's text or its calls); use --tool_template fallback.")
        return self.encode(text[end + len(self.end_marker):])

    # ------------------------------------------------------------------------------------------------ parsing
    def parse(self, text: str, prefix: str = "") -> ParsedTurn:
        """Calls in one generated turn (decoded without its end-of-turn token)."""
        response_parser = self.tokenizer if self.native else None
        return parse_turn(text, self.call_format, response_parser, prefix)

    def parse_generated(self, token_ids: list[int], context_ids: list[int]) -> ParsedTurn:
        """Calls in a generated turn's tokens; `context_ids` (the end of what it was generated from) is decoded as
        the prefix only for a tokenizer's own response_template, which may need it."""
        prefix = ""
        if self.native and getattr(self.tokenizer, "response_template", None) is not None:
            prefix = self.tokenizer.decode(context_ids, skip_special_tokens=False)
        return self.parse(self.turn_text(token_ids), prefix)

    def turn_text(self, token_ids: list[int]) -> str:
        """A generated turn's text, its final end-of-turn token left out."""
        if token_ids and token_ids[-1] in self.eos_token_ids:
            token_ids = token_ids[:-1]
        return self.tokenizer.decode(token_ids, skip_special_tokens=False)

    def demonstration_text(self, messages: list[dict]) -> str:
        return demonstration_text(messages, self.call_format)


def demonstration_text(messages: list[dict], call_format: str = "hermes") -> str:
    """A tool trajectory (assistant turns with calls, tool results, later user turns) as plain text for a teacher
    prompt's `{demonstration}` (SDFT) or an SDPO reprompt's solution: each assistant turn's text followed by its calls
    in the model's call syntax, each run of tool results as the fallback writes them (`<tool_response>` blocks;
    ReAct: `Observation:` lines), a later user turn as `User: ...`."""
    parts: list[str] = []
    for message, results in with_results_merged(messages, call_format):
        if message is None:
            parts.append(results)
            continue
        content = (message.get("content") or "").strip()
        if message["role"] == "assistant":
            calls = format_calls(calls_of_message(message), call_format)
            parts.append("\n".join(part for part in (content, calls) if part))
        elif content:
            parts.append(f"{message['role'].capitalize()}: {content}")
    return "\n".join(part for part in parts if part)


def with_results_merged(messages: list[dict], call_format: str) -> Iterator[tuple[dict | None, str]]:
    """(message, "") for each message that is not a tool result, and (None, text) for each run of tool results, the
    run written as one text the way the fallback shows results (`result_text`)."""
    pending: list[str] = []
    for message in messages:
        if message["role"] == "tool":
            pending.append(message.get("content") or "")
            continue
        if pending:
            yield None, result_text(pending, call_format)
            pending = []
        yield message, ""
    if pending:
        yield None, result_text(pending, call_format)

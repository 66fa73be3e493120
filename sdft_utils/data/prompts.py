"""Chat prompts for SDFT: the student's prompt, the teacher's demonstration-conditioned prompt, and tokenization.

The teacher is the same model as the student; it only sees more context. Its prompt is the student's
conversation with the last user turn rewritten by a template that embeds the expert demonstration.

Every prompt is rendered by `render_chat`, with optional extra chat-template variables (`ChatTemplateConfig`), e.g.
`{"enable_thinking": false}`, which turns Qwen3's thinking off as the SDPO release does for student and teacher.
"""

from __future__ import annotations

import difflib
import string
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdft_utils.cli import arg
from sdft_utils.errors import UserInputError
from sdft_utils.tools.schemas import normalize_message

# apply_chat_template's own arguments (and the conversation itself): a template variable of that name would collide
RESERVED_TEMPLATE_NAMES = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs",
})


@dataclass
class ChatTemplateConfig:
    """Extra variables for the chat template, for the student's prompts and (separately) the teacher's."""

    chat_template_kwargs: dict[str, Any] = arg(
        {}, "extra chat-template variables for the student's prompts (and evaluation), a JSON object, e.g. "
            "'{\"enable_thinking\": false}' to turn Qwen3's thinking off (the SDPO release's setting)", "data")
    teacher_chat_template_kwargs: dict[str, Any] | None = arg(
        None, "the same for the teacher's prompts; none = the student's (--chat_template_kwargs)", "data")

    @property
    def student_template_kwargs(self) -> dict[str, Any]:
        return dict(self.chat_template_kwargs)

    @property
    def teacher_template_kwargs(self) -> dict[str, Any]:
        kwargs = self.chat_template_kwargs if self.teacher_chat_template_kwargs is None \
            else self.teacher_chat_template_kwargs
        return dict(kwargs)

    def _flags(self) -> list[tuple[str, dict[str, Any]]]:
        flags = [("--chat_template_kwargs", self.chat_template_kwargs)]
        if self.teacher_chat_template_kwargs is not None:
            flags.append(("--teacher_chat_template_kwargs", self.teacher_chat_template_kwargs))
        return flags

    def check(self) -> None:
        """Before any model loads: each value is a mapping of variable names that apply_chat_template does not
        already use for its own arguments."""
        for flag, kwargs in self._flags():
            if not isinstance(kwargs, Mapping):
                raise UserInputError(f"{flag} must be a mapping of template variables, e.g. "
                                     f"'{{\"enable_thinking\": false}}', got {kwargs!r}.")
            bad = [name for name in kwargs if not isinstance(name, str) or not name.isidentifier()]
            if bad:
                raise UserInputError(f"{flag}: template variable names must be identifiers, got {bad!r}.")
            reserved = sorted(set(kwargs) & RESERVED_TEMPLATE_NAMES)
            if reserved:
                raise UserInputError(f"{flag} sets {reserved}, which apply_chat_template sets itself; remove them "
                                     "(prompts are always rendered with the generation prompt, as text).")

    def check_template(self, tokenizer) -> None:
        """After the tokenizer loads: every variable set is one the chat template reads, so that a misspelt name
        (or a recipe's `enable_thinking` with a model that has no thinking mode) is an error, not silently ignored."""
        variables = template_variables(tokenizer.chat_template)
        if variables is None:  # a template our parser cannot read (custom tags): nothing to check against
            return
        for flag, kwargs in self._flags():
            unread = sorted(set(kwargs) - variables)
            if unread:
                hints = [f"'{name}' -> did you mean '{close[0]}'?" for name in unread
                         if (close := difflib.get_close_matches(name, sorted(variables), n=1))]
                offered = sorted(variables - RESERVED_TEMPLATE_NAMES - {"bos_token", "eos_token", "raise_exception"})
                raise UserInputError(
                    f"{flag} sets {unread}, which the model's chat template never reads"
                    + (f" ({'; '.join(hints)})" if hints else "")
                    + f". The template reads: {offered or 'no extra variables'}. Fix the name, or drop it for this "
                    f"model (e.g. {flag} '{{}}').")


def template_variables(chat_template: str | dict | None) -> set[str] | None:
    """The variables a Jinja chat template reads (all of its named templates together); None when it cannot be
    parsed here (e.g. a custom tag)."""
    import jinja2
    import jinja2.ext
    import jinja2.meta
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    if chat_template is None:
        return set()
    templates = chat_template.values() if isinstance(chat_template, dict) else [chat_template]
    environment = ImmutableSandboxedEnvironment(extensions=[jinja2.ext.loopcontrols])
    try:
        return set().union(*(jinja2.meta.find_undeclared_variables(environment.parse(text)) for text in templates))
    except jinja2.TemplateSyntaxError:
        return None


def render_chat(tokenizer, messages: list[dict], chat_template_kwargs: Mapping[str, Any] | None = None) -> str:
    """One conversation as text, rendered by the tokenizer's chat template with the generation prompt and the extra
    template variables (`ChatTemplateConfig.student_template_kwargs` / `.teacher_template_kwargs`)."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                         **(chat_template_kwargs or {}))

# The authors' teacher template (Self-Distillation main.py, a string.Template with $orig_content and
# $output_text), rewritten for str.format. The leading and trailing newlines are part of it.
AUTHORS_TEMPLATE = (
    "\n{prompt}\n\n"
    "This is an example for a response to the question:\n"
    "{demonstration}\n\n"
    "Now answer with a response of your own, including the thinking process.\n"
)
TEMPLATE_FIELDS = ("prompt", "demonstration")


def load_teacher_template(value: str | None) -> str:
    """Resolve the `--teacher_template` value into template text and check it.

    None -> AUTHORS_TEMPLATE. A path to an existing file -> the file's text, used as is. Anything else is the
    template itself; there the two characters backslash-n become a newline, so a shell argument like
    '{prompt}\\n\\n{demonstration}' works. The template must hold {prompt} and {demonstration} exactly once
    each and no other placeholder (write literal braces as {{ and }}); otherwise UserInputError.
    """
    if value is None:
        return AUTHORS_TEMPLATE
    path = Path(value)
    try:
        is_file = path.is_file()
    except OSError:  # e.g. a long multi-line template is not a valid file name
        is_file = False
    if is_file:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise UserInputError(
                f"teacher template file {value}: could not be read ({error}). "
                "Pass a readable UTF-8 text file or the template text itself."
            ) from None
        return check_teacher_template(text, where=f"teacher template file {value}")
    where = (
        f"teacher template {value!r} (no file has that name, so it was used as the template text)"
        if "\n" not in value and "{" not in value
        else "teacher template given on the command line"
    )
    return check_teacher_template(value.replace("\\n", "\n"), where=where)


def check_teacher_template(template: str, where: str = "teacher template") -> str:
    """Return `template` unchanged if it has exactly one {prompt} and one {demonstration} and no other
    placeholder; otherwise raise UserInputError naming `where`."""
    fix = (
        "It must contain {prompt} and {demonstration} exactly once each; write literal braces as {{ and }}. "
        "Pass it with --teacher_template as text or as the path of a text file."
    )
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as error:  # unbalanced braces
        raise UserInputError(f"{where}: cannot be parsed ({error}). {fix}") from None

    counts = dict.fromkeys(TEMPLATE_FIELDS, 0)
    others = []
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        if field in counts and not spec and not conversion:
            counts[field] += 1
        else:
            others.append("{" + field + ("!" + conversion if conversion else "") + (":" + spec if spec else "") + "}")
    problems = [f"{{{name}}} appears {count} times" for name, count in counts.items() if count != 1]
    if others:
        problems.append("unknown placeholders " + ", ".join(others))
    if problems:
        hint = ""
        if "$prompt" in template or "$demonstration" in template or "$orig_content" in template:
            hint = " (placeholders use str.format braces, not string.Template's $name)"
        raise UserInputError(f"{where}: {'; '.join(problems)}{hint}. {fix}")
    return template


def to_messages(prompt: str | list[dict]) -> list[dict]:
    """A prompt as chat messages: a string becomes one user turn; a message list is copied, keeping only `role`,
    `content` and the tool keys (`tool_calls`, `name`, `tool_call_id`; extra keys such as nulls filled in by Arrow
    are dropped). A tool-calling assistant message without text gets content ""; its calls get object arguments."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list | tuple):
        return [normalize_message(message) for message in prompt]
    raise TypeError(f"prompt must be a string or a list of messages, got {type(prompt).__name__}")


def build_teacher_messages(prompt_messages: list[dict], demonstration: str, template: str) -> list[dict[str, str]]:
    """The teacher's conversation: every message kept (system messages, earlier turns), only the LAST user
    turn rewritten to template.format(prompt=<its content>, demonstration=demonstration).

    Returns new dicts; the input is never mutated.
    """
    messages = to_messages(prompt_messages)
    last_user = max((i for i, message in enumerate(messages) if message["role"] == "user"), default=None)
    if last_user is None:
        raise ValueError("the prompt has no user turn to embed the demonstration in")
    content = messages[last_user]["content"]
    messages[last_user]["content"] = template.format(prompt=content, demonstration=demonstration)
    return messages


def tokenize_chat_prompts(tokenizer, conversations: list[list[dict]], max_length: int,
                          chat_template_kwargs: Mapping[str, Any] | None = None) -> tuple[list[list[int]], int]:
    """Token ids of each conversation rendered by the chat template with the generation prompt (`render_chat`, with
    `chat_template_kwargs` as extra template variables).

    The template already writes any BOS token, so the tokenizer call adds no special tokens. Prompts longer
    than `max_length` lose their START (left truncation): the generation prompt and the end of the question
    are what the model needs to answer. Returns (token id lists, number of prompts that were truncated).
    """
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    if not conversations:
        return [], 0
    texts = [render_chat(tokenizer, conversation, chat_template_kwargs) for conversation in conversations]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    truncated = sum(len(ids) > max_length for ids in encoded)
    return [list(ids[-max_length:]) for ids in encoded], truncated

"""Chat prompts for SDFT: the student's prompt, the teacher's demonstration-conditioned prompt, and tokenization.

The teacher is the same model as the student; it only sees more context. Its prompt is the student's
conversation with the last user turn rewritten by a template that embeds the expert demonstration.
"""

from __future__ import annotations

import string
from pathlib import Path

from sdft_utils.errors import UserInputError
from sdft_utils.tools.schemas import normalize_message

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


def tokenize_chat_prompts(tokenizer, conversations: list[list[dict]], max_length: int) -> tuple[list[list[int]], int]:
    """Token ids of each conversation rendered by the chat template with the generation prompt.

    The template already writes any BOS token, so the tokenizer call adds no special tokens. Prompts longer
    than `max_length` lose their START (left truncation): the generation prompt and the end of the question
    are what the model needs to answer. Returns (token id lists, number of prompts that were truncated).
    """
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    if not conversations:
        return [], 0
    texts = [
        tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        for conversation in conversations
    ]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    truncated = sum(len(ids) > max_length for ids in encoded)
    return [list(ids[-max_length:]) for ids in encoded], truncated

"""SDPO's teacher prompts ("reprompts"): the question plus a successful sibling rollout and/or this rollout's feedback.

Exactly the release's rule (lasgroup/SDPO `ray_trainer._maybe_build_self_distillation_batch`), per rollout i of a group:
- solution: the FIRST successful rollout (reward >= threshold) of the group other than i itself
  (`dont_reprompt_on_self_success`), with every <think>...</think> block and the whitespace after it removed
  (`remove_thinking_from_demonstration`);
- feedback: i's own feedback string when it is not blank and `include_environment_feedback`, dropped when a
  solution exists (`environment_feedback_only_without_solution`);
- neither: the original prompt is kept and the rollout is masked (zero loss).
The teacher conversation keeps every message before the last user turn (system messages included) and rewrites
that turn with the templates below. The student's sampled tokens are appended verbatim later (batching.py).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sdft_utils.data.prompts import render_chat, to_messages

# The texts that ran: the release's actor.yaml writes them as YAML `|-` block strings, which drop the trailing
# newline (its Python dataclass defaults, which TRL copies, end in newlines but are overridden by that yaml).
REPROMPT_TEMPLATE = "{prompt}{solution}{feedback}\n\nCorrectly solve the original question."
SOLUTION_TEMPLATE = "\nCorrect solution:\n\n{successful_previous_attempt}"
FEEDBACK_TEMPLATE = "\nThe following is feedback from your unsuccessful earlier attempt:\n\n{feedback_raw}"
THINKING = re.compile(r"<think>.*?</think>\s*", re.DOTALL)  # the release's pattern: the block and the space after it
TRUNCATION_SIDES = ["right", "left", "demonstration", "error"]


@dataclass
class RepromptConfig:
    success_threshold: float = 0.5
    dont_reprompt_on_self_success: bool = True
    remove_thinking_from_demonstration: bool = True
    include_environment_feedback: bool = True
    environment_feedback_only_without_solution: bool = True


@dataclass
class Reprompt:
    messages: list[dict[str, str]]  # the teacher's conversation; the original prompt when `used` is False
    solution: str | None = None
    feedback: str | None = None

    @property
    def used(self) -> bool:
        """False = no demonstration and no feedback: the rollout gets zero loss."""
        return self.solution is not None or self.feedback is not None


def strip_thinking(text: str) -> str:
    """The text without its <think>...</think> blocks and the whitespace after each; nothing else is trimmed."""
    return THINKING.sub("", text)


def reprompt_messages(prompt: list[dict], solution: str | None, feedback: str | None) -> list[dict[str, str]]:
    """The conversation with its last user turn rewritten by the release's templates."""
    messages = to_messages(prompt)
    last_user = max((i for i, message in enumerate(messages) if message["role"] == "user"), default=None)
    if last_user is None:
        raise ValueError("the prompt has no user turn to reprompt")
    content = messages[last_user]["content"]
    messages[last_user]["content"] = REPROMPT_TEMPLATE.format(
        prompt=content,
        solution="" if solution is None else SOLUTION_TEMPLATE.format(successful_previous_attempt=solution),
        feedback="" if feedback is None else FEEDBACK_TEMPLATE.format(feedback_raw=feedback))
    return messages[:last_user + 1]  # anything after the last user turn would sit between it and the answer


def build_reprompts(prompts: list[list[dict]], completions: list[str], rewards: list[float], feedbacks: list[str],
                    group_size: int, config: RepromptConfig) -> tuple[list[Reprompt], dict[str, float]]:
    """One Reprompt per rollout. `prompts` has one conversation per question; `completions`, `rewards` and
    `feedbacks` have `group_size` consecutive entries per question. Returns the reprompts and the release's
    fractions: success_group, success_sample, feedback_available, feedback_used, reprompt_sample."""
    if not len(completions) == len(rewards) == len(feedbacks) == len(prompts) * group_size:
        raise ValueError(f"expected {len(prompts)} x {group_size} rollouts, got {len(completions)} completions, "
                         f"{len(rewards)} rewards and {len(feedbacks)} feedback strings")
    reprompts, successful_groups, feedback_available, feedback_used = [], 0, 0, 0
    for question, prompt in enumerate(prompts):
        first = question * group_size
        successes = [j for j in range(first, first + group_size) if rewards[j] >= config.success_threshold]
        successful_groups += bool(successes)
        for i in range(first, first + group_size):
            others = [j for j in successes if j != i] if config.dont_reprompt_on_self_success else successes
            solution = None
            if others:
                solution = completions[others[0]]  # the first one: "effectively random" in the release
                if config.remove_thinking_from_demonstration:
                    solution = strip_thinking(solution)
            has_feedback = bool(feedbacks[i] and feedbacks[i].strip())  # whitespace says nothing (the release's rule)
            feedback = feedbacks[i] if config.include_environment_feedback and has_feedback else None
            feedback_available += has_feedback
            if solution is not None and config.environment_feedback_only_without_solution:
                feedback = None
            feedback_used += feedback is not None
            messages = reprompt_messages(prompt, solution, feedback) if solution is not None or feedback is not None \
                else to_messages(prompt)
            reprompts.append(Reprompt(messages, solution, feedback))
    total = max(len(reprompts), 1)
    stats = {
        "success_group_fraction": successful_groups / max(len(prompts), 1),
        "success_sample_fraction": sum(r >= config.success_threshold for r in rewards) / total,
        "feedback_available_fraction": feedback_available / total,
        "feedback_used_fraction": feedback_used / total,
        "reprompt_sample_fraction": sum(reprompt.used for reprompt in reprompts) / total,
    }
    return reprompts, stats


def tokenize_reprompts(tokenizer, prompts: list[list[dict]], reprompts: list[Reprompt], max_length: int,
                       truncation: str = "right", chat_template_kwargs: Mapping[str, Any] | None = None,
                       chat=None, tools: list[list[dict] | None] | None = None) -> tuple[list[list[int]], int]:
    """Token ids of each teacher prompt (chat template + generation prompt, `chat_template_kwargs` as extra template
    variables: the teacher's, `ChatTemplateConfig.teacher_template_kwargs`) and how many were too long.

    Tool rollouts: pass the `ToolChat` and each rollout's tools, so the teacher's prompt shows the same tools as
    the student's (native tools section or the system-turn fallback).

    `prompts[i]` is rollout i's original conversation (needed to re-render a shortened solution). Too-long prompts:
    `right` cuts the end like the release's tokenizer default (the instruction and the generation prompt go first),
    `left` cuts the start, `error` raises, `demonstration` shortens the solution text (keeping its end, where the
    final answer is) until the prompt fits, then cuts from the left if it still does not.
    """
    if truncation not in TRUNCATION_SIDES:
        raise ValueError(f"truncation must be one of {TRUNCATION_SIDES}, got {truncation!r}")
    ids, truncated = [], 0
    tools = tools if tools is not None else [None] * len(prompts)
    for prompt, reprompt, row_tools in zip(prompts, reprompts, tools, strict=True):
        tokens = _render(tokenizer, reprompt.messages, chat_template_kwargs, chat, row_tools)
        if len(tokens) > max_length:
            truncated += 1
            if truncation == "error":
                raise ValueError(f"a teacher prompt has {len(tokens)} tokens, more than max length {max_length}")
            if truncation == "demonstration" and reprompt.solution:
                solution_ids = tokenizer(reprompt.solution, add_special_tokens=False)["input_ids"]
                keep = len(solution_ids) - (len(tokens) - max_length) - 8  # 8 tokens of slack for the "..." and merges
                shorter = "..." + tokenizer.decode(solution_ids[max(keep, 0):]) if keep > 0 else "..."
                tokens = _render(tokenizer, reprompt_messages(prompt, shorter, reprompt.feedback),
                                 chat_template_kwargs, chat, row_tools)
            tokens = tokens[:max_length] if truncation == "right" else tokens[-max_length:]
        ids.append(tokens)
    return ids, truncated


def _render(tokenizer, messages: list[dict], chat_template_kwargs: Mapping[str, Any] | None, chat=None,
            tools: list[dict] | None = None) -> list[int]:
    if chat is not None:  # a tool rollout: the tools in the prompt as the student saw them
        return chat.encode(chat.render(messages, tools))
    text = render_chat(tokenizer, messages, chat_template_kwargs)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])

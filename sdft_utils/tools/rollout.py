"""Multi-turn tool rollouts over any engine: generate a turn for every open trajectory, parse, execute, continue.

`generate_with_tools` is what a training script calls instead of `engine.generate` when its rows have tools. Each
round makes ONE batched `engine.generate(contexts, sampling, seeds)` call for all trajectories still running (HF,
vLLM colocate and vLLM server engines all have it), then per trajectory: parse the turn's calls, run them, and append
the results as tokens. A trajectory ends when the model answers without a call (and its environment has no next
user turn), after `max_turns` model turns, when the completion budget (`sampling.max_new_tokens`, counting tool and
user tokens too) is spent, or after one turn when nothing executes its calls.

What is trained is exactly what was sampled: the model's tokens are kept as the engine returned them; only the
continuation after each turn's end-of-turn token (tool results or the next user turn, then the next assistant header;
`ToolChat.continuation_ids`) is tokenised. The result is a `Rollouts` whose completions hold everything after the
prompt, with `model_token_masks` 1 on the model's tokens and 0 on the appended context (never in the loss), log-probs
aligned (0.0 on context tokens), and one `Trajectory` per completion (messages, calls per user turn, errors for
feedback, the environment's final state).

Seeds: with per-prompt seeds, turn t of sample s of a prompt with seed k is sampled with `derive_seed(k, s, t)`, so a
trajectory depends only on its prompt's seed, never on which other trajectories share the batch.

Several processes: the rounds run in lockstep. Every process makes every round's `generate` call with the same number
of contexts and the same `max_new_tokens` (padding with one-token idle contexts whose output is dropped) until no
process has an open trajectory, because engines may hold collectives inside `generate`: HF on ZeRO-3/FSDP2 gathers
parameters in every forward, vLLM tensor-parallel groups share their prompts.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from sdft_utils.rollout.sampling import Rollouts, SamplingConfig, derive_seed
from sdft_utils.tools.config import ToolConfig
from sdft_utils.tools.execution import Toolbox, open_toolbox, resolve_tools, schemas_of
from sdft_utils.tools.parsing import ToolCall
from sdft_utils.tools.render import ToolChat
from sdft_utils.tools.schemas import normalize_tools, tool_names

FINISH_REASONS = ("answer", "max_turns", "budget", "not_executed")


@dataclass
class ToolPrompt:
    """One prompt of a tool rollout and what it may call."""

    messages: list[dict]  # the prompt conversation, ending with the user turn the model answers
    tools: list[dict] | None = None  # schemas shown to the model; None = those of the environment
    environment: str | None = None  # module:attribute; None = ToolConfig.tool_environment
    state: Any = None  # the environment's initial state (handed to its reset)

    @classmethod
    def from_row(cls, messages: list[dict], row: dict) -> ToolPrompt:
        """From a data row's `tools`, `environment` and `environment_state` columns (all optional)."""
        tools = row.get("tools")
        return cls(messages, normalize_tools(tools) if tools else None, row.get("environment") or None,
                   row.get("environment_state"))


@dataclass
class Trajectory:
    """What happened after the prompt, as messages and as parsed calls."""

    messages: list[dict] = field(default_factory=list)  # assistant turns (text + parsed calls), tool results, users
    calls: list[list[list[ToolCall]]] = field(default_factory=lambda: [[]])  # per user turn, per calling model turn
    errors: list[str] = field(default_factory=list)  # malformed calls, tool errors, timeouts, in order
    finish_reason: str = ""  # one of FINISH_REASONS
    model_turns: int = 0
    final_state: Any = None  # the environment's final_state(), if it has one

    @property
    def final_answer(self) -> str:
        """The text of the last assistant turn."""
        return next((m.get("content") or "" for m in reversed(self.messages) if m["role"] == "assistant"), "")

    @property
    def all_calls(self) -> list[ToolCall]:
        return [call for turn in self.calls for step in turn for call in step]


@dataclass
class _Running:
    """One trajectory while it is generated."""

    prompt: ToolPrompt
    tools: list[dict] | None
    toolbox: Toolbox
    context: list[int]  # prompt + completion so far: what the next turn is generated from
    seed: int | None
    sample: int
    completion: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    trajectory: Trajectory = field(default_factory=Trajectory)

    def add_model_tokens(self, tokens: list[int], logprobs: list[float] | None) -> None:
        self.context += tokens
        self.completion += tokens
        self.mask += [1] * len(tokens)
        self.logprobs += logprobs or []

    def add_context_tokens(self, tokens: list[int], record_logprobs: bool) -> None:
        self.context += tokens
        self.completion += tokens
        self.mask += [0] * len(tokens)
        if record_logprobs:
            self.logprobs += [0.0] * len(tokens)  # placeholders: the loss never reads them (mask 0)


class _Resolver:
    """Imports each environment spec once and lists its schemas once."""

    def __init__(self, config: ToolConfig):
        self.config = config
        self.targets: dict[str | None, Any] = {}
        self.schemas: dict[str | None, list[dict]] = {}

    def target(self, spec: str | None) -> Any:
        if spec not in self.targets:
            self.targets[spec] = resolve_tools(spec, "--tool_environment" if spec == self.config.tool_environment
                                               else "the row's 'environment'")
        return self.targets[spec]

    def tools(self, prompt: ToolPrompt, spec: str | None) -> list[dict] | None:
        if prompt.tools is not None:
            return prompt.tools
        if spec not in self.schemas:
            self.schemas[spec] = normalize_tools(schemas_of(self.target(spec), spec)) if spec else []
        return self.schemas[spec] or None


def resolve_prompt_tools(prompts: list[ToolPrompt], config: ToolConfig) -> list[ToolPrompt]:
    """Fill in `tools` (from the environment's schemas) where a prompt has none; the same list, for chaining."""
    resolver = _Resolver(config)
    for prompt in prompts:
        if prompt.tools is None:
            prompt.tools = resolver.tools(prompt, prompt.environment or config.tool_environment)
    return prompts


def render_tool_prompts(chat: ToolChat, prompts: list[ToolPrompt], config: ToolConfig, max_length: int,
                        conversations: list[list[dict]] | None = None) -> tuple[list[list[int]], int]:
    """Token ids of each prompt rendered with its tools and the generation prompt, left-truncated to `max_length`;
    (ids, number truncated). `conversations` replaces the prompts' messages (e.g. the SDFT teacher's or an SDPO
    reprompt) while keeping each prompt's tools, so teacher and student see the same tools."""
    resolve_prompt_tools(prompts, config)
    messages = [prompt.messages for prompt in prompts] if conversations is None else conversations
    return chat.prompt_ids(messages, [prompt.tools for prompt in prompts], max_length)


def start_trajectories(prompts: list[ToolPrompt], prompt_ids: list[list[int]], num_samples: int,
                       seeds: list[int] | None, config: ToolConfig) -> list[_Running]:
    resolver = _Resolver(config)
    running = []
    for index, (prompt, ids) in enumerate(zip(prompts, prompt_ids, strict=True)):
        spec = prompt.environment or config.tool_environment
        target, tools = resolver.target(spec), resolver.tools(prompt, spec)
        for sample in range(num_samples):
            toolbox = open_toolbox(target, spec or "", copy.deepcopy(prompt.state), config.tool_timeout,
                                   config.max_tool_result_chars)
            running.append(_Running(prompt, tools, toolbox, list(ids), None if seeds is None else seeds[index],
                                    sample))
    return running


def _execute(run: _Running, calls: list[ToolCall], parse_errors: list[str]) -> list[dict]:
    """Run the turn's calls; tool messages for them and for each malformed call (errors recorded)."""
    allowed = tool_names(run.tools) if run.tools else None
    messages = []
    for call in calls:
        result = run.toolbox.call(call.name, call.arguments, allowed)
        if result.error is not None:
            run.trajectory.errors.append(f"{call.name}: {result.error}")
        messages.append({"role": "tool", "name": call.name, "content": result.content, "tool_call_id": call.id})
    for error in parse_errors:
        messages.append({"role": "tool", "name": "error", "content": f"Error: {error}"})
    return messages


def _finish_turn(run: _Running, chat: ToolChat, tokens: list[int], logprobs: list[float] | None,
                 budget: int, config: ToolConfig) -> bool:
    """Record one generated turn, run its calls, append the continuation; False when the trajectory ends."""
    context_before = run.context[-64:]
    run.add_model_tokens(tokens, logprobs)
    trajectory = run.trajectory
    trajectory.model_turns += 1
    parsed = chat.parse_generated(tokens, context_before)
    calling = bool(parsed.calls or parsed.errors)
    assistant: dict = {"role": "assistant", "content": parsed.content}
    for number, call in enumerate(parsed.calls):  # ids for templates that pair results with calls (Mistral)
        call.id = call.id or f"{trajectory.model_turns:04d}{number:05d}"
    if parsed.calls:
        assistant["tool_calls"] = [call.as_message_call() for call in parsed.calls]
        trajectory.calls[-1].append(parsed.calls)
    trajectory.messages.append(assistant)
    trajectory.errors += parsed.errors
    if not tokens or tokens[-1] not in chat.eos_token_ids:  # cut by the budget (or the turn cap) mid-turn
        trajectory.finish_reason = "budget"
        return False
    if calling:
        if not run.toolbox.executes:
            trajectory.finish_reason = "not_executed"
            return False
        new_messages = _execute(run, parsed.calls, parsed.errors)
    else:
        next_user = run.toolbox.next_user_message()
        if next_user is None:
            trajectory.finish_reason = "answer"
            return False
        new_messages = [{"role": "user", "content": next_user}]
        trajectory.calls.append([])
    if trajectory.model_turns >= config.max_turns:
        trajectory.finish_reason = "max_turns"
        return False
    history = run.prompt.messages + trajectory.messages[:-1]
    continuation = chat.continuation_ids(history, assistant, new_messages, run.tools)
    if len(run.completion) + len(continuation) >= budget:  # no room left for a model token after it
        trajectory.finish_reason = "budget"
        return False
    trajectory.messages += new_messages
    run.add_context_tokens(continuation, record_logprobs=logprobs is not None)
    return True


def _agree_across_processes(open_trajectories: int, new_tokens: int) -> tuple[int, int]:
    """(the most open trajectories on any process, the largest max_new_tokens) over all processes."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return open_trajectories, new_tokens
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    values = torch.tensor([open_trajectories, new_tokens], device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return int(values[0]), int(values[1])


def generate_with_tools(engine, chat: ToolChat, prompts: list[ToolPrompt], prompt_ids: list[list[int]],
                        sampling: SamplingConfig, seeds: list[int] | None, config: ToolConfig) -> Rollouts:
    """Multi-turn rollouts with tool execution (see the module docstring); `prompt_ids` are the prompts rendered
    with their tools (`render_tool_prompts`). With num_samples > 1 the samples of one prompt are consecutive."""
    running = start_trajectories(prompts, prompt_ids, sampling.num_samples, seeds, config)
    budget = sampling.max_new_tokens
    from_training_weights, logprob_top_p = True, 1.0
    active = running
    idle = [prompt_ids[0][-1]] if prompt_ids else [chat.eos_token_ids[0]]  # a one-token context for lockstep padding
    while True:
        room = [budget - len(run.completion) for run in active]
        new_tokens = max(room, default=1)
        new_tokens = new_tokens if config.max_turn_tokens is None else min(config.max_turn_tokens, new_tokens)
        width, new_tokens = _agree_across_processes(len(active), new_tokens)
        if width == 0:
            break
        turn = SamplingConfig(max_new_tokens=new_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
                              num_samples=1, logprobs=sampling.logprobs)
        turn_seeds = None if seeds is None else [derive_seed(run.seed, run.sample, run.trajectory.model_turns)
                                                 for run in active] + [0] * (width - len(active))
        generated = engine.generate([run.context for run in active] + [idle] * (width - len(active)), turn,
                                    turn_seeds)
        from_training_weights, logprob_top_p = generated.from_training_weights, generated.logprob_top_p
        still = []
        for run, room_left, tokens, logprobs in zip(active, room, generated.completion_ids[:len(active)],
                                                    generated.logprobs[:len(active)], strict=True):
            limit = room_left if config.max_turn_tokens is None else min(room_left, config.max_turn_tokens)
            kept_logprobs = list(logprobs[:limit]) if sampling.logprobs else None
            if _finish_turn(run, chat, list(tokens[:limit]), kept_logprobs, budget, config):
                still.append(run)
        active = still
    for run in running:
        run.trajectory.final_state = run.toolbox.final_state()
    return Rollouts([run.completion for run in running],
                    [run.logprobs if sampling.logprobs else [] for run in running],
                    from_training_weights, logprob_top_p=logprob_top_p,
                    model_token_masks=[run.mask for run in running],
                    trajectories=[run.trajectory for run in running])


def tool_metrics(rollouts: Rollouts) -> dict[str, float]:
    """What a step's tool rollouts did, for metrics.jsonl (this process's rollouts; empty without tools): model
    turns, parsed calls and errors per rollout, and the fraction of completion tokens the model wrote (the rest are
    tool results and user turns, which the loss never sees)."""
    if not rollouts.trajectories:
        return {}
    count = len(rollouts.trajectories)
    written = sum(sum(mask) for mask in rollouts.model_token_masks)
    total = max(sum(len(ids) for ids in rollouts.completion_ids), 1)
    return {"tools/turns": sum(t.model_turns for t in rollouts.trajectories) / count,
            "tools/calls": sum(len(t.all_calls) for t in rollouts.trajectories) / count,
            "tools/errors": sum(len(t.errors) for t in rollouts.trajectories) / count,
            "tools/model_token_fraction": written / total}

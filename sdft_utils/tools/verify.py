"""Scoring tool rollouts: verifiers that read a whole `Trajectory` (calls per turn, errors), plus the text ones.

`TRAJECTORY_VERIFIERS` are `fn(trajectory, row) -> Verdict`, named in a row's `verifier` column like the text
verifiers of `sdft_utils.sdpo.verifiers`:
- `bfcl_ast`: the first calling turn, by the leaderboard's single-call AST checker (`answer` = possible answers,
  `functions` = the BFCL function docs);
- `bfcl_multi_turn`: the calls of every user turn, by the leaderboard's multi-turn checker (`answer` = the
  ground-truth calls per user turn, `environment_state` = initial_config and involved_classes).
`score_trajectory` scores any task: trajectory verifiers get the trajectory, text verifiers (math, mcq, code, tool,
a --reward_fn) get the final answer's text.
"""

from __future__ import annotations

from collections.abc import Callable

from sdft_utils.sdpo.verifiers import VERIFIERS, Verdict, Verifier
from sdft_utils.tools.bfcl import verify_bfcl_ast, verify_bfcl_multi_turn

TRAJECTORY_VERIFIERS: dict[str, Callable] = {"bfcl_ast": verify_bfcl_ast, "bfcl_multi_turn": verify_bfcl_multi_turn}
# columns each trajectory verifier reads, beside the prompt (checked before any model loads)
TRAJECTORY_COLUMNS = {"bfcl_ast": ("answer", "functions", "tools"),
                      "bfcl_multi_turn": ("answer", "environment_state", "tools")}


def column_problem(verifier: str, row: dict) -> tuple[str, str] | None:
    """(column, expectation) when a trajectory verifier cannot score this row, else None."""
    answer = row.get("answer")
    if verifier == "bfcl_ast":
        if not isinstance(answer, list) or not answer or not all(isinstance(a, dict) and len(a) == 1 for a in answer):
            return "answer", "a list of {function name: {parameter: [allowed values]}} (BFCL possible answers)"
        if not isinstance(row.get("functions"), list) or not row["functions"]:
            return "functions", "the BFCL function docs of the question"
    if verifier == "bfcl_multi_turn":
        if not isinstance(answer, list) or not all(isinstance(t, list) and all(isinstance(c, str) for c in t)
                                                   for t in answer):
            return "answer", "a list per user turn of ground-truth call strings"
        state = row.get("environment_state")
        if not isinstance(state, dict) or not {"id", "initial_config", "involved_classes"} <= set(state):
            return "environment_state", "an object with id, initial_config and involved_classes"
    if verifier in TRAJECTORY_VERIFIERS and not row.get("tools"):
        return "tools", "the function schemas shown to the model"
    return None


def score_trajectory(verifier: str, row: dict, trajectory, reward_fn: Verifier | None = None) -> Verdict:
    """The Verdict of one tool rollout under the row's verifier (`reward_fn` for "reward_fn")."""
    if verifier in TRAJECTORY_VERIFIERS:
        return TRAJECTORY_VERIFIERS[verifier](trajectory, row)
    verify = reward_fn if verifier == "reward_fn" else VERIFIERS[verifier]
    return verify(trajectory.final_answer, row)


def run_tool_tasks(engine, tokenizer, tasks: list, sampling, max_prompt_length: int, config, seeds=None):
    """Roll out SDPO/evaluation `Task`s with tools and score them: (one Verdict per rollout, the Rollouts).
    The chat format comes from the tokenizer's template and the engine's stop tokens (`engine.eos_token_ids`)."""
    from sdft_utils.tools.render import ToolChat
    from sdft_utils.tools.rollout import ToolPrompt, generate_with_tools, render_tool_prompts

    chat = ToolChat.from_tokenizer(tokenizer, engine.eos_token_ids, config.tool_template, config.tool_format)
    prompts = [ToolPrompt.from_row(task.prompt, task.row) for task in tasks]
    prompt_ids, _ = render_tool_prompts(chat, prompts, config, max_prompt_length)
    rollouts = generate_with_tools(engine, chat, prompts, prompt_ids, sampling, seeds, config)
    repeated = [task for task in tasks for _ in range(sampling.num_samples)]
    verdicts = [score_trajectory(task.verifier, task.row, trajectory)
                for task, trajectory in zip(repeated, rollouts.trajectories, strict=True)]
    return verdicts, rollouts


def tool_success_rate(engine, tokenizer, tasks: list, accelerator, max_prompt_length: int, max_new_tokens: int,
                      config, threshold: float = 0.5, temperature: float = 0.0, samples: int = 1) -> float:
    """`sdft_utils.sdpo.tasks.success_rate` for tool tasks: each process rolls out its share of `tasks` with tools;
    the success rate (score >= threshold) over all processes, greedy by default."""
    import torch

    from sdft_utils.rollout.sampling import SamplingConfig

    mine = tasks[accelerator.process_index::accelerator.num_processes]
    correct = 0.0
    if mine:
        sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                                  num_samples=samples if temperature > 0 else 1)
        verdicts, _ = run_tool_tasks(engine, tokenizer, mine, sampling, max_prompt_length, config)
        correct = sum(verdict.score >= threshold for verdict in verdicts) / sampling.num_samples
    total = accelerator.reduce(torch.tensor([correct, len(mine)], dtype=torch.float64, device=accelerator.device),
                               reduction="sum")
    return (total[0] / total[1]).item()

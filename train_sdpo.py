"""Self-Distillation Policy Optimization (SDPO): RL where the advantage comes from the model re-reading its own rollout.

Paper: Hübotter, Lübeck, Behric, Baumann, Bagatella, Marta, Hakimi, Shenfeld, Kleine Buening, Guestrin, Krause,
"Reinforcement Learning via Self-Distillation" (arXiv 2601.20802). Defaults follow the released code
(github.com/lasgroup/SDPO, `sdpo.yaml`), not TRL's trainer.

Each step:
  1. sample G completions per question from the student (32 questions x 8 rollouts, temperature 1.0);
  2. a verifier scores each one and may say what went wrong (runtime error, failing test, format);
  3. each rollout gets a reprompt: the question + the first *other* successful rollout of its group ("Correct
     solution:") or, without one, its own feedback; rollouts with neither are masked (zero loss);
  4. the teacher -- an EMA of the student -- reads the reprompt followed by the student's *same* tokens; the student's
     next-token distribution is pulled toward it with a generalized JSD over the student's top-100 tokens plus a tail
     bucket, times min(pi/pi_old, 2) x min(pi_old/pi_rollout, 2) per token (both detached);
  5. `--mini_batches` AdamW steps per generation batch, then teacher <- 0.95 * teacher + 0.05 * student, once.
Optional hybrid (paper Eq. 3): loss = lambda * clipped GRPO (advantage r - group mean) + (1 - lambda) * SDPO.

Defaults (release): alpha 0.5 (JSD), top-K 100 with tail, success threshold 0.5, never the rollout's own success as
its demonstration, thinking stripped from demonstrations, feedback only without a solution, EMA rate 0.05, AdamW lr
1e-5 constant after 10 warmup steps, weight decay 0.01, grad clip 1.0, one optimizer step per generation batch,
prompts 2048 / completions 8192 / reprompts 10240 tokens (cut on the right, as the release's tokenizer does).
Deviations (all flags): `--reprompt_truncation demonstration` shortens the solution instead of cutting the
instruction; `--teacher_kind trust_region` is PR #4's logit mix; `--grpo_lambda` adds the paper's hybrid, which the
release does not ship; `--dtype auto` trains in float32 on a CPU; the tool verifier's feedback does not leak the
answer. Everything else, shared with SDFT, is in sdft_utils/.

Run:
  python train_sdpo.py                                        # embedded default: SmolLM2-135M learns one-digit sums
  python train_sdpo.py --model Qwen/Qwen3-8B --dataset questions.jsonl --verifier math --output_dir outputs/sdpo1
  python train_sdpo.py --config recipes/sdpo_science.yaml     # Section 3 (needs GPUs)
  accelerate launch --config_file accelerate_configs/zero3.yaml train_sdpo.py --config recipes/sdpo_rich_feedback.yaml
  sbatch slurm/sdpo.sbatch                                    # multi-node, optional vLLM server node
  torchrun --nproc-per-node 8 train_sdpo.py --backend megatron --tensor_model_parallel_size 8 --model /models/M ...
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from sdft_utils.cli import arg, override, parse_args
from sdft_utils.data.order import process_positions, step_indices
from sdft_utils.errors import exit_on_user_error
from sdft_utils.losses.weighting import kl_k3
from sdft_utils.rollout.sampling import SamplingConfig, prompt_seeds
from sdft_utils.sdpo.policy_gradient import (
    clipped_policy_loss,
    grpo_advantages,
    hybrid_loss,
    token_is_weights,
)
from sdft_utils.sdpo.reprompt import TRUNCATION_SIDES, RepromptConfig, build_reprompts, tokenize_reprompts
from sdft_utils.sdpo.sandbox import SandboxConfig
from sdft_utils.sdpo.tasks import (
    is_tool_task,
    load_sdpo_tasks,
    make_scorer,
    needs_sandbox,
    score_rollouts,
    success_rate,
)
from sdft_utils.sdpo.verifiers import VERIFIERS, GradingConfig, load_reward_fn
from sdft_utils.tools.rollout import ToolPrompt, tool_metrics
from sdft_utils.training.batching import build_distill_batch, to_device
from sdft_utils.training.config import (
    DataArgs,
    LossArgs,
    OptimArgs,
    OutputArgs,
    RolloutArgs,
    RunArgs,
    TeacherArgs,
    require_dataset,
    runs_embedded_default,
)
from sdft_utils.training.run import make_evaluate, start_run

EMBEDDED_RECIPE = Path(__file__).parent / "recipes" / "sdpo_embedded.yaml"


@dataclass
class Args(GradingConfig, SandboxConfig, RunArgs):
    verifier: str = arg("math", "built-in verifier for rows without a `verifier` column", "data", sorted(VERIFIERS))
    verifier_column: str = arg("verifier", "optional per-row column naming the verifier", "data")
    reward_fn: str | None = arg(None, "your own verifier, 'module:function' or 'file.py:function', called as "
                                      "fn(completion, row) -> (score, feedback); replaces --verifier", "data")
    success_threshold: float = arg(0.5, "a rollout with reward >= this is a successful demonstration", "reprompt")
    dont_reprompt_on_self_success: bool = arg(True, "never use the rollout itself as its demonstration", "reprompt")
    remove_thinking_from_demonstration: bool = arg(True, "strip <think>...</think> from demonstrations", "reprompt")
    include_environment_feedback: bool = arg(True, "put the verifier's feedback in the reprompt", "reprompt")
    environment_feedback_only_without_solution: bool = arg(True, "drop the feedback when a solution is shown",
                                                           "reprompt")
    max_reprompt_length: int = arg(10240, "teacher prompt length limit in tokens", "reprompt")
    reprompt_truncation: str = arg("right", "too-long teacher prompts: cut the end (release), the start, shorten "
                                            "the demonstration, or stop", "reprompt", TRUNCATION_SIDES)
    is_cap: float = arg(2.0, "cap of the detached token ratio pi_theta / pi_old", "loss")
    rollout_is_cap: float = arg(2.0, "cap of the detached token ratio pi_old / pi_rollout", "loss")
    grpo_lambda: float = arg(0.0, "hybrid weight: lambda * GRPO + (1 - lambda) * SDPO (paper Eq. 3; 0.9 for small "
                                  "models)", "loss")
    clip_low: float = arg(0.2, "GRPO part: PPO clip 1 - eps_low", "loss")
    clip_high: float = arg(0.28, "GRPO part: PPO clip 1 + eps_high", "loss")
    normalize_advantage_std: bool = arg(False, "GRPO part: divide r - mean by the group std (off: Dr.GRPO)", "loss")
    mini_batches: int = arg(1, "optimizer steps per generation batch (1 = on-policy)", "optimization")
    max_prompt_length: int = override(DataArgs, "max_prompt_length", 2048)
    overlong_prompts: str = override(DataArgs, "overlong_prompts", "drop")
    max_completion_length: int = override(RolloutArgs, "max_completion_length", 8192)
    num_generations: int = override(RolloutArgs, "num_generations", 8)
    alpha: float = override(LossArgs, "alpha", 0.5)
    divergence_mode: str = override(LossArgs, "divergence_mode", "topk")
    teacher_update_rate: float = override(TeacherArgs, "teacher_update_rate", 0.05)
    learning_rate: float = override(OptimArgs, "learning_rate", 1e-5)
    lr_scheduler: str = override(OptimArgs, "lr_scheduler", "constant_with_warmup")
    warmup_steps: int = override(OptimArgs, "warmup_steps", 10)
    weight_decay: float = override(OptimArgs, "weight_decay", 0.01)
    output_dir: str = override(OutputArgs, "output_dir", "outputs/sdpo")
    run_name: str = override(OutputArgs, "run_name", "sdpo")

    def problems(self) -> list[str]:
        found = super().problems()
        if not 0.0 <= self.grpo_lambda <= 1.0:
            found.append(f"--grpo_lambda must be in [0, 1], got {self.grpo_lambda}")
        for name in ("mini_batches", "max_reprompt_length"):
            if getattr(self, name) < 1:
                found.append(f"--{name} must be at least 1, got {getattr(self, name)}")
        return found


STEP_TOTALS = ("loss", "divergence", "kl_approx", "entropy", "distill_tokens", "completion_tokens", "micro_batches")


def main() -> None:
    # ---------------------------------------------------------------- arguments and data, checked before any model
    args = parse_args(Args, description=__doc__,
                      default_config=EMBEDDED_RECIPE if runs_embedded_default(sys.argv[1:]) else None)
    args.check()
    require_dataset(args)
    reward_fn = load_reward_fn(args.reward_fn) if args.reward_fn else None
    load = partial(load_sdpo_tasks, prompt_column=args.prompt_column, verifier=args.verifier,
                   verifier_column=args.verifier_column, custom_reward=reward_fn is not None)
    tasks = load(args.dataset, split=args.dataset_split)
    eval_sets = {Path(path).stem: load(path) for path in args.eval_datasets}
    if needs_sandbox([*tasks, *(task for rows in eval_sets.values() for task in rows)]):
        args.check_isolation()  # model-written code runs only where isolation works (or --unsafe_code_execution says so)
    score = make_scorer(reward_fn, args, lenient=args.lenient_grading)  # the release's graders unless lenient
    tools = args.tool_environment is not None or any(is_tool_task(task) for task in tasks)
    reprompt_config = RepromptConfig(args.success_threshold, args.dont_reprompt_on_self_success,
                                     args.remove_thinking_from_demonstration, args.include_environment_feedback,
                                     args.environment_feedback_only_without_solution)
    run = start_run(args, method="sdpo", prompts=[task.prompt for task in tasks], mini_batches=args.mini_batches,
                    tool_prompts=[ToolPrompt.from_row(task.prompt, task.row) for task in tasks] if tools else None,
                    eval_metrics=[f"eval/{name}_success" for name in eval_sets],
                    evaluate=make_evaluate(eval_sets, partial(success_rate, score=score,
                                                              threshold=args.success_threshold), "success"))
    tasks = [tasks[row] for row in run.kept_rows]  # the release drops over-long prompts (--overlong_prompts)
    model, tokenizer, group = run.model, run.tokenizer, args.num_generations
    sampling = SamplingConfig(max_new_tokens=args.max_completion_length, temperature=args.temperature,
                              top_p=args.top_p, num_samples=group,
                              # HF samples from the training weights: its log-probs only serve as pi_old
                              logprobs=args.rollout != "hf" or args.mini_batches > 1)
    run.print(f"SDPO: {len(tasks)} questions, {run.total_steps} steps of {args.prompts_per_step} x {group} rollouts, "
              f"{args.mini_batches} optimizer step(s) each")

    # ---------------------------------------------------------------- the loop
    for step in run.steps():
        step_start = time.perf_counter()
        # this process's share of every mini-batch: an optimizer step sees the same questions on 1 or N processes
        positions = process_positions(args.prompts_per_step, run.backend.world, run.backend.rank, args.mini_batches)
        batch_tasks = [tasks[i] for i in step_indices(step, len(tasks), args.prompts_per_step, args.seed, positions)]
        # tool rows: multi-turn rollouts that execute the calls; the teacher's reprompt shows the same tools
        tool_prompts = [ToolPrompt.from_row(task.prompt, task.row) for task in batch_tasks] if tools else None
        prompt_ids, _ = run.render_prompts([task.prompt for task in batch_tasks], args.student_template_kwargs,
                                           tool_prompts)

        # 1-2. G rollouts per question (per-question seeds: the same on 1 process or N), scored by the verifier
        rollout_start = time.perf_counter()
        rollouts = run.generate(prompt_ids, sampling, prompt_seeds(args.seed, step, positions), tool_prompts)
        rollout_seconds = time.perf_counter() - rollout_start  # generate() returns host lists: already synced
        rollout_tasks = [task for task in batch_tasks for _ in range(group)]
        texts, verdicts = score_rollouts(rollout_tasks, rollouts, tokenizer, score, args, run.tool_chat, reward_fn)
        rewards = torch.tensor([verdict.score for verdict in verdicts])

        # 3. reprompts: a sibling's success, else this rollout's feedback, else masked
        reprompts, reprompt_stats = build_reprompts([task.prompt for task in batch_tasks], texts, rewards.tolist(),
                                                    [verdict.feedback for verdict in verdicts], group, reprompt_config)
        teacher_prompts, truncated = tokenize_reprompts(
            tokenizer, [task.prompt for task in rollout_tasks], reprompts, args.max_reprompt_length,
            args.reprompt_truncation, args.teacher_template_kwargs, run.tool_chat,
            None if tool_prompts is None else [prompt.tools for prompt in tool_prompts for _ in range(group)])
        student_prompts = [ids for ids in prompt_ids for _ in range(group)]
        distill_mask = torch.tensor([float(reprompt.used) for reprompt in reprompts])
        advantages = grpo_advantages(rewards, group, args.normalize_advantage_std)
        # the engine's log-probs only matter when it is not the training model (vLLM); HF samples from it directly
        rollout_logprobs = None if rollouts.from_training_weights else rollouts.logprobs
        batches = [build_distill_batch(student_prompts[rows], teacher_prompts[rows], rollouts.completion_ids[rows],
                                       None if rollout_logprobs is None else rollout_logprobs[rows],
                                       tokenizer.pad_token_id,
                                       None if rollouts.model_token_masks is None else rollouts.model_token_masks[rows])
                   for rows in (slice(start, start + args.per_device_batch_size)
                                for start in range(0, len(student_prompts), args.per_device_batch_size))]
        # pi_old: on-policy (one mini-batch) it is the current model; later mini-batches need the sampling policy's
        old_logprobs = rollouts.logprobs if args.mini_batches > 1 else None
        if args.mini_batches > 1 and not rollouts.from_training_weights:
            old_logprobs = [values for batch in batches for values in run.sequence_logprobs(batch)]

        # 4-5. mini-batches of questions; micro-batches accumulate into one optimizer step each
        model.train()
        totals = dict.fromkeys(STEP_TOTALS, 0.0)  # summed over micro-batches here, over processes below
        mini_batch_loss, is_stats, grad_norms, updated_any = 0.0, [], [], False
        learning_rate = run.scheduler.get_last_lr()[0]  # the rate this step uses
        for number, host_batch in enumerate(batches):
            rows = slice(number * args.per_device_batch_size, (number + 1) * args.per_device_batch_size)
            written = host_batch.completion_mask if host_batch.model_token_mask is None else \
                host_batch.completion_mask * host_batch.model_token_mask  # tool results are context, never loss
            batch = host_batch.to(run.device)
            with run.accelerator.accumulate(model):
                per_token = run.token_divergence(batch, scored=written.bool(), policy_logprobs=args.grpo_lambda > 0,
                                                 logprob_top_p=rollouts.logprob_top_p)
                mask = to_device(written.float(), run.device)
                current = per_token["student_logprobs"]
                old = current if old_logprobs is None else _padded(old_logprobs[rows], current)
                weights, stats = token_is_weights(current, old, per_token["rollout_logprobs"], args.is_cap,
                                                  args.rollout_is_cap)
                policy = None
                if args.grpo_lambda > 0:  # the hybrid's GRPO part: log pi(y) with gradients
                    correction, _ = token_is_weights(old, old, per_token["rollout_logprobs"], 1.0, args.rollout_is_cap)
                    policy = clipped_policy_loss(per_token["policy_logprobs"], old,
                                                 to_device(advantages[rows], run.device), correction, args.clip_low,
                                                 args.clip_high)
                rollout_mask = to_device(distill_mask[rows], run.device)
                loss = hybrid_loss(per_token["loss"], weights, mask, rollout_mask, policy, args.grpo_lambda)
                run.backward(loss)
                mini_batch_loss = mini_batch_loss + loss.detach()
                if run.accelerator.sync_gradients:  # the last micro-batch of a mini-batch: one optimizer step
                    updated, grad_norm = run.optimizer_step(mini_batch_loss)
                    updated_any, mini_batch_loss = updated_any or updated, 0.0
                    grad_norms.append(grad_norm)

            with torch.no_grad():
                distilled = mask * rollout_mask.unsqueeze(-1)
                for name, value in (("loss", loss.detach()), ("divergence", (per_token["loss"] * distilled).sum()),
                                    ("kl_approx", (kl_k3(current, per_token["teacher_logprobs"]) * distilled).sum()),
                                    ("entropy", (per_token["student_entropy"] * mask).sum()),
                                    ("distill_tokens", distilled.sum()), ("completion_tokens", mask.sum()),
                                    ("micro_batches", 1)):
                    totals[name] = totals[name] + value  # stays on the device: one sync per step, below
            is_stats.append(stats)

        # 6. once per generation batch, after all mini-batches: teacher <- 0.95 * teacher + 0.05 * student (if any step
        # trained), the schedule advances, the rollout engine gets the new weights
        sync_difference = run.after_update(updated_any, student_prompts[0])

        # 7. log and save
        total = run.reduce(totals)
        distill_tokens = max(total["distill_tokens"], 1.0)
        metrics = {
            "loss": total["loss"] / total["micro_batches"],
            "distill/divergence": total["divergence"] / distill_tokens,
            "distill/kl_approx": total["kl_approx"] / distill_tokens,
            "entropy": total["entropy"] / max(total["completion_tokens"], 1.0),
            "reward/mean": run.accelerator.reduce(rewards.mean().to(run.device), reduction="mean").item(),
            **{f"reprompt/{name}": value for name, value in reprompt_stats.items()},
            "reprompt/truncated": truncated,
            "is/policy_mean": float(sum(s["is_policy_mean"] for s in is_stats) / len(is_stats)),
            "is/rollout_mean": float(sum(s["is_rollout_mean"] for s in is_stats) / len(is_stats)),
            "completion_length": total["completion_tokens"] / len(student_prompts) / run.backend.world,
            "learning_rate": learning_rate,
            "grad_norm": sum(grad_norms) / len(grad_norms),
            "step_seconds": time.perf_counter() - step_start,
            "rollout_seconds": rollout_seconds,
            "weight_sync_logprob_diff": sync_difference,  # --check_weight_sync: largest |engine - trainer| log-prob
            "epoch": (step + 1) * args.prompts_per_step / len(tasks),
            **tool_metrics(rollouts),  # tool runs: turns, calls, errors, share of model-written tokens
        }
        run.log_and_save(step, metrics, postfix={"reward": f"{metrics['reward/mean']:.2f}",
                                                 "reprompted": f"{reprompt_stats['reprompt_sample_fraction']:.2f}"})
    run.finish()


def _padded(rows: list[list[float]], like: torch.Tensor) -> torch.Tensor:
    """Per-row lists of pi_old log-probs -> a (B, T) tensor like `like`, zeros after each row's end."""
    values = torch.zeros_like(like)
    for row, sequence in enumerate(rows):
        values[row, :len(sequence)] = torch.tensor(sequence, dtype=like.dtype)
    return values


if __name__ == "__main__":
    exit_on_user_error(main)

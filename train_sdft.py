"""Self-Distillation Fine-Tuning (SDFT): learn from demonstrations without leaving the model's own distribution.

Paper: Shenfeld, Damani, Hübotter, Agrawal, "Self-Distillation Enables Continual Learning" (arXiv 2601.19897).
Defaults follow the authors' released code (github.com/idanshen/Self-Distillation), not TRL's trainer.

Each step:
  1. the student samples one completion y per prompt x, on-policy, with the prompt alone;
  2. the teacher -- the same model, as an EMA of the student -- reads the prompt with the demonstration c in
     context (the authors' template) followed by the *same* tokens y;
  3. at every completion position the student's next-token distribution is pulled toward the teacher's with a
     per-token divergence over the full vocabulary (forward KL(teacher || student) by default, as the authors ran),
     weighted by a capped importance ratio when the rollout engine is not the training model;
  4. one AdamW step, then teacher <- 0.99 * teacher + 0.01 * student.

Defaults (authors' code): forward KL over the full vocabulary; first 3 completion tokens left out of the loss;
importance weight exp(logp_train - logp_rollout) capped at 2 and averaged per sequence; per-sequence token mean
then batch mean; EMA teacher rate 0.01 after every optimizer step; 1 sample per prompt at temperature 1.0;
prompts and completions up to 1024 tokens; 32 prompts per optimizer step; AdamW lr 2e-5, cosine, 10% warmup,
grad clip 1.0. Deviations (all flags): `--dtype auto` is mixed precision (float32 master weights and EMA teacher,
bf16 compute) on a GPU, where the authors' code keeps a bf16 teacher (`--dtype bfloat16`), and float32 on a CPU;
a step whose loss or gradient norm is not finite is skipped; entropy masking (`--top_entropy_quantile`), top-K and
sampled modes, and the other teacher kinds are extras. Everything else, shared with SDPO, is in sdft_utils/.

Run:
  python train_sdft.py                                        # embedded default: SmolLM2-135M on bundled facts
  python train_sdft.py --model Qwen/Qwen2.5-7B-Instruct --dataset data.jsonl --output_dir outputs/run1
  python train_sdft.py --config recipes/sdft_tooluse.yaml     # the paper's recipe (needs a GPU)
  accelerate launch --config_file accelerate_configs/zero3.yaml train_sdft.py --config recipes/sdft_science.yaml
  sbatch slurm/sdft.sbatch                                    # multi-node (edit the variables at its top)
  torchrun --nproc-per-node 8 train_sdft.py --backend megatron --tensor_model_parallel_size 8 --model /models/M ...
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
from sdft_utils.data.prompts import load_teacher_template
from sdft_utils.data.sdft import load_sdft_dataset
from sdft_utils.errors import exit_on_user_error
from sdft_utils.evaluation.suites import load_task_file
from sdft_utils.losses.weighting import (
    IS_MODES,
    completion_loss_mask,
    entropy_quantile_mask,
    importance_weights,
    kl_k3,
    sequence_mean_loss,
)
from sdft_utils.rollout.sampling import SamplingConfig, prompt_seeds
from sdft_utils.sdpo.tasks import make_scorer, success_rate
from sdft_utils.tools.rollout import ToolPrompt, tool_metrics
from sdft_utils.training.batching import build_distill_batch
from sdft_utils.training.config import (
    EvalArgs,
    OptimArgs,
    OutputArgs,
    RunArgs,
    require_dataset,
    runs_embedded_default,
)
from sdft_utils.training.run import make_evaluate, start_run

EMBEDDED_RECIPE = Path(__file__).parent / "recipes" / "sdft_embedded.yaml"


@dataclass
class Args(RunArgs):
    demonstration_column: str = arg("demonstration", "column with the demonstration (string or list of strings)",
                                    "data")
    teacher_prompt_column: str = arg("teacher_prompt", "column with an explicit teacher prompt, used instead of "
                                                       "the template when present", "data")
    teacher_template: str | None = arg(None, "teacher prompt template with {prompt} and {demonstration}, or a file "
                                             "holding one. Default: the authors' template", "data")
    num_loss_tokens_to_skip: int = arg(3, "first completion tokens left out of the loss (still attended)", "loss")
    rollout_is_cap: float = arg(2.0, "cap of the per-token importance ratio exp(logp_train - logp_rollout)", "loss")
    is_mode: str = arg("sequence_average", "rollout-engine/trainer correction: capped ratio averaged per sequence "
                                           "(SDFT), capped per token (SDPO), or sequences outside [1/cap, cap] "
                                           "masked", "loss", list(IS_MODES))
    top_entropy_quantile: float = arg(1.0, "keep only loss tokens in the top q fraction of student entropy "
                                           "(1.0 = all)", "loss")
    warmup_ratio: float = override(OptimArgs, "warmup_ratio", 0.1)
    output_dir: str = override(OutputArgs, "output_dir", "outputs/sdft")
    run_name: str = override(OutputArgs, "run_name", "sdft")
    eval_max_new_tokens: int = override(EvalArgs, "eval_max_new_tokens", 48)

    def problems(self) -> list[str]:
        found = super().problems()
        if not 0.0 < self.top_entropy_quantile <= 1.0:
            found.append(f"--top_entropy_quantile must be in (0, 1], got {self.top_entropy_quantile}")
        if self.num_loss_tokens_to_skip < 0:
            found.append(f"--num_loss_tokens_to_skip must be >= 0, got {self.num_loss_tokens_to_skip}")
        if self.rollout_is_cap < 1.0:
            found.append(f"--rollout_is_cap must be >= 1, got {self.rollout_is_cap}")
        return found


STEP_TOTALS = ("loss", "divergence", "kl_approx", "entropy", "loss_tokens", "completion_tokens", "sequences",
               "micro_batches", "truncated_prompts")


def main() -> None:
    # ---------------------------------------------------------------- arguments and data, checked before any model
    args = parse_args(Args, description=__doc__,
                      default_config=EMBEDDED_RECIPE if runs_embedded_default(sys.argv[1:]) else None)
    args.check()
    require_dataset(args)
    load = partial(load_sdft_dataset, args.dataset, prompt_column=args.prompt_column,
                   demonstration_column=args.demonstration_column, teacher_prompt_column=args.teacher_prompt_column,
                   teacher_template=load_teacher_template(args.teacher_template), split=args.dataset_split)
    dataset = load(call_format="hermes" if args.tool_format == "auto" else args.tool_format)
    tools = args.tool_environment is not None or any(example.tools or example.environment for example in dataset)
    eval_sets = {Path(path).stem: load_task_file(path) for path in args.eval_datasets}  # answers, or verifier rows
    run = start_run(args, method="sdft", prompts=[example.prompt for example in dataset],
                    tool_prompts=[tool_prompt(example) for example in dataset] if tools else None,
                    eval_metrics=[f"eval/{name}_accuracy" for name in eval_sets],
                    evaluate=make_evaluate(eval_sets, partial(success_rate, score=make_scorer(None)), "accuracy"))
    if tools and dataset[0].demonstration_messages is not None:
        dataset = load(call_format=run.tool_chat.call_format)  # trajectory demonstrations in this model's call syntax
    dataset = [dataset[row] for row in run.kept_rows]  # all rows, unless --overlong_prompts drop left some out
    model, tokenizer = run.model, run.tokenizer
    sampling = SamplingConfig(max_new_tokens=args.max_completion_length, temperature=args.temperature,
                              top_p=args.top_p, num_samples=args.num_generations,
                              logprobs=args.rollout != "hf")  # HF samples from the training weights: no IS needed
    run.print(f"SDFT: {len(dataset)} examples, {run.total_steps} steps of {args.prompts_per_step} prompts "
              f"({run.backend.world} processes x {run.backend.accumulation_steps} micro-batches of "
              f"{args.per_device_batch_size})")

    # ---------------------------------------------------------------- the loop
    warned_about_truncation = False
    for step in run.steps():
        step_start = time.perf_counter()
        positions = process_positions(args.prompts_per_step, run.backend.world, run.backend.rank)
        examples = [dataset[i] for i in step_indices(step, len(dataset), args.prompts_per_step, args.seed, positions)]
        # tool rows: student and teacher see the same tools, and rollouts execute the calls
        tool_prompts = [tool_prompt(example) for example in examples] if tools else None
        student_prompts, student_truncated = run.render_prompts([example.prompt for example in examples],
                                                                args.student_template_kwargs, tool_prompts)
        teacher_prompts, teacher_truncated = run.render_prompts([example.teacher_prompt for example in examples],
                                                                args.teacher_template_kwargs, tool_prompts)
        if student_truncated + teacher_truncated and not warned_about_truncation:
            run.note(f"note: prompts longer than --max_prompt_length {args.max_prompt_length} are cut from the left; "
                     "metrics.jsonl counts them in truncated_prompts")
            warned_about_truncation = True

        # 1. on-policy samples: the student sees the prompt alone (per-prompt seeds: the same on 1 process or N)
        rollout_start = time.perf_counter()
        rollouts = run.generate(student_prompts, sampling, prompt_seeds(args.seed, step, positions), tool_prompts)
        rollout_seconds = time.perf_counter() - rollout_start  # generate() returns host lists: already synced
        student_prompts = [ids for ids in student_prompts for _ in range(args.num_generations)]
        teacher_prompts = [ids for ids in teacher_prompts for _ in range(args.num_generations)]
        # the engine's log-probs only matter when it is not the training model (vLLM); HF samples from it directly
        rollout_logprobs = None if rollouts.from_training_weights else rollouts.logprobs

        # 2-3. teacher and student score the same tokens; per-token divergence; accumulate gradients
        model.train()
        totals = dict.fromkeys(STEP_TOTALS, 0.0)  # summed over micro-batches here, over processes below
        totals["truncated_prompts"] = float(student_truncated + teacher_truncated)
        is_stats = []
        for start in range(0, len(student_prompts), args.per_device_batch_size):
            rows = slice(start, start + args.per_device_batch_size)
            batch = build_distill_batch(student_prompts[rows], teacher_prompts[rows], rollouts.completion_ids[rows],
                                        None if rollout_logprobs is None else rollout_logprobs[rows],
                                        tokenizer.pad_token_id,
                                        None if rollouts.model_token_masks is None else rollouts.model_token_masks[rows])
            loss_mask = completion_loss_mask(batch.completion_mask, args.num_loss_tokens_to_skip)
            if batch.model_token_mask is not None:  # tool results are context, never loss
                loss_mask = loss_mask * batch.model_token_mask
            batch = batch.to(run.device)
            with run.accelerator.accumulate(model):
                per_token = run.token_divergence(batch, scored=loss_mask.bool(),  # (B, T) each
                                                 logprob_top_p=rollouts.logprob_top_p)
                loss_mask = entropy_quantile_mask(per_token["student_entropy"], loss_mask.to(run.device),
                                                  args.top_entropy_quantile)
                is_weights, stats = importance_weights(per_token["student_logprobs"], per_token["rollout_logprobs"],
                                                       loss_mask, mode=args.is_mode, cap=args.rollout_is_cap)
                loss = sequence_mean_loss(per_token["loss"] * is_weights, loss_mask)
                run.backward(loss)

            with torch.no_grad():
                mask = loss_mask.double()
                kl_estimate = kl_k3(per_token["student_logprobs"], per_token["teacher_logprobs"])
                for name, value in (("loss", loss.detach()), ("divergence", (per_token["loss"] * mask).sum()),
                                    ("kl_approx", (kl_estimate * mask).sum()),
                                    ("entropy", (per_token["student_entropy"] * mask).sum()),
                                    ("loss_tokens", mask.sum()), ("completion_tokens", batch.completion_mask.sum()),
                                    ("sequences", len(batch.completion_mask)), ("micro_batches", 1)):
                    totals[name] = totals[name] + value  # stays on the device: one sync per step, below
            is_stats.append(stats)

        # 4. optimizer step (skipped when not finite), then teacher <- 0.99 * teacher + 0.01 * student (EMA rate r)
        learning_rate = run.scheduler.get_last_lr()[0]  # the rate this step uses
        updated, grad_norm = run.optimizer_step(totals["loss"])
        sync_difference = run.after_update(updated, student_prompts[0])  # EMA, schedule, rollout-engine weights

        # 5. log and save
        total = run.reduce(totals)
        loss_tokens = max(total["loss_tokens"], 1.0)
        seconds = time.perf_counter() - step_start
        metrics = {
            "loss": total["loss"] / total["micro_batches"],
            "kl": total["divergence"] / loss_tokens,
            "kl_approx": total["kl_approx"] / loss_tokens,
            "entropy": total["entropy"] / loss_tokens,
            "completion_length": total["completion_tokens"] / total["sequences"],
            "is_ratio_min": min(s["is_ratio_min"] for s in is_stats),
            "is_ratio_mean": sum(s["is_ratio_mean"] for s in is_stats) / len(is_stats),
            "is_ratio_max": max(s["is_ratio_max"] for s in is_stats),
            "is_clipped_fraction": sum(s["is_clipped_fraction"] for s in is_stats) / len(is_stats),
            "truncated_prompts": total["truncated_prompts"],
            "learning_rate": learning_rate,
            "grad_norm": grad_norm,
            "tokens_per_second": total["completion_tokens"] / seconds,
            "step_seconds": seconds,
            "rollout_seconds": rollout_seconds,
            "weight_sync_logprob_diff": sync_difference,  # --check_weight_sync: largest |engine - trainer| log-prob
            "epoch": (step + 1) * args.prompts_per_step / len(dataset),
            **tool_metrics(rollouts),  # tool runs: turns, calls, errors, share of model-written tokens
        }
        run.log_and_save(step, metrics, postfix={"loss": f"{metrics['loss']:.4f}", "kl": f"{metrics['kl']:.4f}"})
    run.finish()


def tool_prompt(example) -> ToolPrompt:
    return ToolPrompt(example.prompt, example.tools, example.environment, example.environment_state)


if __name__ == "__main__":
    exit_on_user_error(main)

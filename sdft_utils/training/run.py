"""Everything around a training loop that both methods share: set-up, the step's bookkeeping, teardown.

`start_run` builds, in order: the backend (processes, accelerator), tokenizer, student and teacher, the rows that fit
(--overlong_prompts), optimizer and schedule, the rollout engine, a resumed state, `args.json`, trackers and
`metrics.jsonl`, and the evaluation before training. The script keeps its method: its data, its step and its loss,
written out in its own loop, which calls

    run.steps()                        the remaining step indices (with a progress bar)
    run.render_prompts / run.generate  prompts and on-policy rollouts (multi-turn with tools for tool rows)
    run.token_divergence(batch, ..)    teacher and student score the same completion tokens -> per-token divergence
    run.backward(loss)                 gradient accumulation through accelerate
    run.optimizer_step(loss_sum)       clip and step, or skip a step whose loss or gradient norm is not finite
    run.after_update(updated, prompt)  EMA teacher, schedule, the rollout engine's weights (optionally checked)
    run.log_and_save(step, metrics)    metrics, periodic evaluation, best checkpoint, checkpoints
    run.finish()                       final evaluation, merged adapter, engine teardown, summary, plot
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from sdft_utils.assets import embedded_model_path
from sdft_utils.data.prompts import tokenize_chat_prompts
from sdft_utils.errors import TrainingStopped, UserInputError
from sdft_utils.losses.divergence import DivergenceOptions
from sdft_utils.losses.weighting import full_vocabulary_logprobs, gather_rows, scatter_rows, scored_index
from sdft_utils.rollout.engines import compute_dtype, weight_sync_tolerance
from sdft_utils.rollout.sampling import Rollouts, SamplingConfig
from sdft_utils.rollout.weight_sync import check_weight_sync
from sdft_utils.tools.render import ToolChat
from sdft_utils.tools.rollout import ToolPrompt, generate_with_tools, render_tool_prompts
from sdft_utils.training.backend import Backend, make_backend
from sdft_utils.training.batching import DistillBatch, to_device
from sdft_utils.training.checkpoint import BestCheckpoint, choose_eval_metric, resolve_resume_path
from sdft_utils.training.config import RunArgs
from sdft_utils.training.metrics import MetricsLog
from sdft_utils.training.modeling import adamw, load_tokenizer
from sdft_utils.training.plots import plot_after_training
from sdft_utils.training.teachers import ema_update_

Evaluate = Callable[["Run", str], dict[str, float]]  # (run, when) -> {"eval/NAME_METRIC": value}


@dataclass
class Run:
    args: RunArgs
    backend: Backend
    tokenizer: Any
    model: torch.nn.Module
    teacher: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    rollout: Any  # the engine: generate(prompt_ids, sampling, seeds) and sync_weights(model)
    tool_chat: ToolChat | None  # tool runs: how tools enter prompts and how calls are parsed; None without tools
    metrics_log: MetricsLog
    total_steps: int
    kept_rows: list[int]  # the training rows the run uses (all, unless --overlong_prompts drop left some out)
    start_step: int = 0
    method: str = "train"
    best: BestCheckpoint | None = None
    evaluate: Evaluate | None = None
    before: dict[str, float] = field(default_factory=dict)  # evaluation before training
    evaluated: dict[str, float] = field(default_factory=dict)  # the latest evaluation during training
    nonfinite_in_a_row: int = 0
    nonfinite_total: int = 0
    last_checkpoint: Path | None = None
    progress_bar: Any = None

    @property
    def accelerator(self):
        return self.backend.accelerator

    @property
    def device(self) -> torch.device:
        return self.backend.accelerator.device

    @property
    def output_dir(self) -> Path:
        return Path(self.args.output_dir)

    def print(self, text: str) -> None:
        self.accelerator.print(text)

    def steps(self) -> Iterator[int]:
        self.progress_bar = tqdm(range(self.start_step, self.total_steps), initial=self.start_step,
                                 total=self.total_steps, desc=self.method,
                                 disable=not self.accelerator.is_local_main_process)
        yield from self.progress_bar

    def note(self, text: str) -> None:
        """A line above the progress bar (main process)."""
        if self.accelerator.is_main_process:
            (self.progress_bar.write if self.progress_bar is not None else print)(text)

    # ------------------------------------------------------------------ prompts and rollouts
    def render_prompts(self, conversations: list[list[dict]], template_kwargs: dict,
                       tool_prompts: list[ToolPrompt] | None = None) -> tuple[list[list[int]], int]:
        """Token ids of each conversation with the generation prompt, left-truncated to --max_prompt_length, and how
        many were cut. With `tool_prompts` (a tool run) each is rendered with its prompt's tools."""
        if tool_prompts is None:
            return tokenize_chat_prompts(self.tokenizer, conversations, self.args.max_prompt_length, template_kwargs)
        return render_tool_prompts(self.tool_chat, tool_prompts, self.args, self.args.max_prompt_length,
                                   conversations)

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig, seeds: list[int],
                 tool_prompts: list[ToolPrompt] | None = None) -> Rollouts:
        """Sample from the student. With `tool_prompts`: multi-turn rollouts that execute the calls, where
        `Rollouts.model_token_masks` marks the tokens the model wrote (tool results are context, never loss)."""
        if tool_prompts is None:
            return self.rollout.generate(prompt_ids, sampling, seeds)
        return generate_with_tools(self.rollout, self.tool_chat, tool_prompts, prompt_ids, sampling, seeds,
                                   self.args)

    # ------------------------------------------------------------------ scoring
    def divergence_options(self) -> DivergenceOptions:
        args = self.args
        return DivergenceOptions(alpha=args.alpha, mode=args.divergence_mode, top_k=args.top_k,
                                 tail_bucket=args.tail_bucket, temperature=args.temperature,
                                 chunk_size=args.loss_chunk_size, grad_memory_mib=args.loss_grad_memory_mib,
                                 logit_transform=self.backend.logit_transform)

    @torch.no_grad()
    def teacher_view(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, width: int):
        """The teacher's hidden states (B, T, H') and head (weight, bias) on its prompt + the completion. Trust
        region: logits (1-a)*z_ref + a*z_theta, written as one head over the concatenated hidden states
        [(1-a) h_ref, a h_theta] @ [W_ref, W_theta]^T, so the chunked loss needs no special case."""
        backend = self.backend
        hidden = backend.hidden_states(self.teacher, input_ids, attention_mask, width)
        weight, bias = backend.teacher_head(self.teacher)
        if self.args.teacher_kind != "trust_region":
            return hidden, (weight, bias)
        mix = self.args.teacher_update_rate
        current_hidden = backend.hidden_states(self.model, input_ids, attention_mask, width)
        current_weight, current_bias = backend.teacher_head(self.model)
        hidden = torch.cat([(1 - mix) * hidden, mix * current_hidden], dim=-1)
        weight = torch.cat([weight, current_weight], dim=-1)
        if bias is not None or current_bias is not None:
            bias = (1 - mix) * (0 if bias is None else bias) + mix * (0 if current_bias is None else current_bias)
        return hidden, (weight, bias)

    def token_divergence(self, batch: DistillBatch, scored: torch.Tensor, policy_logprobs: bool = False,
                         logprob_top_p: float = 1.0) -> dict[str, torch.Tensor]:
        """The teacher (no gradient) and the student score the same completion tokens; the divergence between their
        next-token distributions at the positions of the host mask `scored` (B, T), as (B, T) tensors `loss`,
        `student_logprobs`, `teacher_logprobs`, `student_entropy` (zeros elsewhere), `rollout_logprobs` (the
        engine's, on the trainer's full-vocabulary scale; None when the rollouts came from the training weights), and
        `policy_logprobs` (log pi(y_t) with gradients, for a policy-gradient term) when asked. `batch` is on the
        device; `logprob_top_p` is the rollouts' `Rollouts.logprob_top_p`."""
        index = to_device(scored_index(scored), self.device)  # found on the host: no device->host sync
        width = batch.num_completion_tokens
        # teacher first: its forward's activations are gone before the student's are kept for backward
        teacher_hidden, teacher_head = self.teacher_view(batch.teacher_input_ids, batch.teacher_attention_mask, width)
        student_hidden = self.backend.hidden_states(self.model, batch.student_input_ids, batch.student_attention_mask,
                                                    width)
        hidden, ids = gather_rows(student_hidden, index), gather_rows(batch.completion_ids, index)
        # vLLM reports log-probs renormalised over the top-p nucleus: the loss also measures the student's nucleus
        # mass, which puts them back on the full-vocabulary scale of the trainer's log-probs
        nucleus = logprob_top_p if batch.rollout_logprobs is not None else 1.0
        divergence = self.backend.token_divergence(self.model, hidden, gather_rows(teacher_hidden, index),
                                                   teacher_head, ids,
                                                   replace(self.divergence_options(), nucleus_top_p=nucleus))
        per_token = scatter_rows(divergence, scored, index)
        per_token["rollout_logprobs"] = batch.rollout_logprobs if nucleus == 1.0 else \
            full_vocabulary_logprobs(batch.rollout_logprobs, per_token["student_nucleus_log_mass"])
        if policy_logprobs:
            values = self.backend.token_logprobs(self.model, hidden, ids, self.args.temperature,
                                                 self.args.loss_chunk_size)
            flat = values.new_zeros(scored.numel())
            per_token["policy_logprobs"] = flat.index_put((index,), values).view(scored.shape)
        return per_token

    @torch.no_grad()
    def sequence_logprobs(self, host_batch: DistillBatch) -> list[list[float]]:
        """log pi(y_t) of every completion token under the current student (no gradient), one list per row."""
        scored, batch = host_batch.completion_mask.bool(), host_batch.to(self.device)
        hidden = self.backend.hidden_states(self.model, batch.student_input_ids, batch.student_attention_mask,
                                            batch.num_completion_tokens)
        index = to_device(scored_index(scored), self.device)
        values = self.backend.token_logprobs(self.model, gather_rows(hidden, index),
                                             gather_rows(batch.completion_ids, index), self.args.temperature,
                                             self.args.loss_chunk_size)
        return [part.tolist() for part in values.split(scored.sum(-1).tolist())]

    # ------------------------------------------------------------------ the update
    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)  # accelerate divides by the number of accumulation steps

    def optimizer_step(self, loss_sum: torch.Tensor) -> tuple[bool, float]:
        """Clip and step, unless the loss or the gradient norm is not finite on some process: then the gradients
        are dropped and nothing is updated; after --max_nonfinite_steps such steps in a row the run stops (exit 1).
        Returns (updated, gradient norm). One host sync: every process must agree on skipping."""
        grad_norm = self.backend.clip_grad_norm_(self.model, self.args.max_grad_norm)
        grad_norm = torch.as_tensor(grad_norm, dtype=torch.float64, device=self.device)
        bad = (~torch.isfinite(grad_norm) | ~torch.isfinite(torch.as_tensor(loss_sum, device=self.device))).double()
        updated = self.accelerator.reduce(bad, reduction="sum").item() == 0
        if updated:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if updated:
            self.nonfinite_in_a_row = 0
        else:
            self.nonfinite_in_a_row += 1
            self.nonfinite_total += 1
            self.note(f"warning: step skipped, the loss or the gradient norm is not finite (gradient norm "
                      f"{grad_norm.item()}); {self.nonfinite_in_a_row} in a row")
            if self.nonfinite_in_a_row >= self.args.max_nonfinite_steps:
                last = f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else \
                    "no checkpoint was written by this run"
                raise TrainingStopped(
                    f"{self.nonfinite_in_a_row} steps in a row had a non-finite loss or gradient norm "
                    f"(--max_nonfinite_steps {self.args.max_nonfinite_steps}); {last}. Lower --learning_rate, check "
                    "the data and the model's weights, or resume from that checkpoint.")
        return updated, grad_norm.item()

    def after_update(self, updated: bool, probe_prompt: list[int]) -> float | None:
        """The end of a step's update: the EMA teacher follows the student, teacher <- (1 - r) * teacher + r * student
        with r = --teacher_update_rate (only when an optimizer step happened), the schedule advances, and the rollout
        engine gets the new weights. Returns --check_weight_sync's largest |engine - trainer| log-prob, if checked."""
        if updated and self.args.teacher_kind == "ema":
            ema_update_(self.teacher, self.model, self.args.teacher_update_rate)
        self.scheduler.step()
        return self.sync_weights(probe_prompt) if updated else None

    def sync_weights(self, probe_prompt: list[int]) -> float | None:
        """The rollout engine samples from the updated weights (a no-op for HF rollouts). With --check_weight_sync:
        the largest |engine - trainer| log-prob on one sampled sequence of `probe_prompt`."""
        self.rollout.sync_weights(self.model)
        if not self.args.check_weight_sync:
            return None
        return check_weight_sync(self.rollout, self.model, probe_prompt, min(self.args.max_completion_length, 32),
                                 weight_sync_tolerance(self.args.weight_sync_tolerance,
                                                       compute_dtype(self.model, self.accelerator)))

    def reduce(self, totals: dict[str, Any]) -> dict[str, float]:
        """Per-process step totals (tensors or numbers) summed over the data-parallel processes; one sync."""
        values = torch.stack([torch.as_tensor(value, dtype=torch.float64, device=self.device).reshape(())
                              for value in totals.values()])
        summed = self.accelerator.reduce(values * self.backend.metric_weight, reduction="sum").tolist()
        return dict(zip(totals, summed, strict=True))

    # ------------------------------------------------------------------ logging, evaluation, checkpoints
    def log_and_save(self, step: int, metrics: dict[str, Any], postfix: dict[str, str]) -> None:
        """After step index `step` (0-based): log, evaluate when due, keep the best, save when due."""
        done = step + 1
        args = self.args
        eval_due = args.eval_every and (done % args.eval_every == 0 or done == self.total_steps)
        self.evaluated = self.evaluate(self, f"step {done}") if eval_due and self.evaluate else {}
        self.metrics_log.log({**metrics, "nonfinite_steps": self.nonfinite_total, **self.evaluated}, done)
        self.progress_bar.set_postfix(postfix)
        new_best = self.best is not None and self.best.update(self.evaluated, done)
        if done % args.save_steps == 0 or done == self.total_steps or new_best:
            self.save(done)

    def save(self, done: int) -> None:
        if not self.backend.parameters_finite(self.model):
            raise TrainingStopped(f"step {done}: the model holds non-finite weights; not saving them. "
                                  + (f"The last good checkpoint is {self.last_checkpoint}." if self.last_checkpoint
                                     else "No checkpoint was written by this run."))
        progress = {"step": done, "best": self.best and self.best.state(),
                    "nonfinite_in_a_row": self.nonfinite_in_a_row, "nonfinite_steps": self.nonfinite_total}
        self.last_checkpoint = self.backend.save(self.output_dir, done, self.model, self.teacher, self.optimizer,
                                                 self.scheduler, self.tokenizer, progress, self.args.save_total_limit)
        self.note(f"saved {self.last_checkpoint}")

    def finish(self) -> None:
        after = self.evaluated or (self.evaluate(self, "after training") if self.evaluate else {})
        if after and not self.evaluated:
            self.metrics_log.log(after, self.total_steps)
        self.backend.finish(self.model, self.tokenizer, self.output_dir)
        self.rollout.close()  # after the last collective, before the process group goes (vLLM's shutdown uses it)
        self.accelerator.end_training()
        if self.accelerator.is_main_process:
            for key, value in after.items():
                start = f"{self.before[key]:.3f} -> " if key in self.before else ""
                print(f"{key.removeprefix('eval/')}: {start}{value:.3f}")
            if self.best and self.best.step is not None:
                print(f"best: checkpoint-{self.best.step} ({self.best.metric} {self.best.value:.3f}) -> "
                      f"{self.output_dir / 'best'}")
            print(f"outputs: model {self.output_dir / f'checkpoint-{self.total_steps}'}  metrics "
                  f"{self.metrics_log.path}")
            plot = plot_after_training(self.metrics_log.path)
            if plot:
                print(f"plot: {plot}")


def start_run(args: RunArgs, *, method: str, prompts: list[list[dict]], eval_metrics: list[str],
              evaluate: Evaluate | None = None, mini_batches: int = 1,
              tool_prompts: list[ToolPrompt] | None = None) -> Run:
    """Set up a run whose data is already loaded and checked. `prompts`: the student prompt of every training row;
    `tool_prompts` (a tool run: rollouts are multi-turn, `Run.generate`): the same rows with their tools;
    `eval_metrics`: the names `evaluate` returns (the first picks the best checkpoint unless --eval_metric says
    otherwise). With --overlong_prompts drop, `Run.kept_rows` lists the rows that fit; train on those."""
    resume_path = resolve_resume_path(args.resume_from_checkpoint, args.output_dir)
    best_metric = choose_eval_metric(args.eval_metric, eval_metrics, args.eval_every)
    backend = make_backend(args, mini_batches)  # processes, accelerator; a bad launch config stops here
    set_seed(args.seed)

    model_path = args.model or str(embedded_model_path())
    tokenizer = load_tokenizer(model_path)
    args.check_template(tokenizer)  # --chat_template_kwargs names only variables this model's template reads
    model, teacher, eos_token_ids = backend.load_models(model_path, tokenizer)
    tool_chat = ToolChat.from_tokenizer(tokenizer, eos_token_ids, args.tool_template, args.tool_format) \
        if tool_prompts is not None else None
    kept_rows = rows_that_fit(args, tokenizer, tool_chat, prompts, tool_prompts)
    total_steps = args.max_steps if args.max_steps > 0 else math.ceil(
        args.num_train_epochs * len(kept_rows) / args.prompts_per_step)
    optimizer = adamw(model, args.learning_rate, args.weight_decay)
    # stepped once per step (generation batch), as the SDPO release does with several mini-batches
    scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.warmup(total_steps),
                              num_training_steps=total_steps)
    model, teacher, optimizer = backend.prepare(model, teacher, optimizer, scheduler)
    rollout = backend.rollout_engine(model, tokenizer, model_path, eos_token_ids)

    run = Run(args=args, backend=backend, tokenizer=tokenizer, model=model, teacher=teacher, optimizer=optimizer,
              scheduler=scheduler, rollout=rollout, tool_chat=tool_chat, metrics_log=None, total_steps=total_steps,
              kept_rows=kept_rows, method=method, best=BestCheckpoint(best_metric) if best_metric else None,
              evaluate=evaluate)
    if resume_path is not None:
        progress = backend.load(resume_path, model, teacher, optimizer, scheduler)
        run.start_step, run.last_checkpoint = progress["step"], resume_path
        run.nonfinite_in_a_row = progress.get("nonfinite_in_a_row", 0)
        run.nonfinite_total = progress.get("nonfinite_steps", 0)
        if run.best:
            run.best.restore(progress)
        run.print(f"resumed from {resume_path} at step {run.start_step}")
    rollout.sync_weights(model)  # a separate engine (vLLM) starts from the trainer's, possibly resumed, weights
    if run.accelerator.is_main_process:
        run.output_dir.mkdir(parents=True, exist_ok=True)
        (run.output_dir / "args.json").write_text(json.dumps(asdict(args), indent=2))
    run.accelerator.init_trackers(args.run_name, config=asdict(args))
    run.metrics_log = MetricsLog(run.accelerator, run.output_dir,
                                 resume_step=run.start_step if resume_path else None)
    if evaluate and run.start_step == 0:
        run.before = evaluate(run, "before training")
        if run.before:
            run.metrics_log.log(run.before, 0)
    return run


def rows_that_fit(args: RunArgs, tokenizer, tool_chat: ToolChat | None, prompts: list[list[dict]],
                  tool_prompts: list[ToolPrompt] | None) -> list[int]:
    """The rows to train on: all of them (--overlong_prompts truncate: long prompts are cut from the left at each
    step), or those whose rendered prompt fits --max_prompt_length (drop: the SDPO release's filter)."""
    if args.overlong_prompts == "truncate":
        return list(range(len(prompts)))
    if tool_prompts is None:
        ids, _ = tokenize_chat_prompts(tokenizer, prompts, 1 << 30, args.student_template_kwargs)
    else:
        ids, _ = render_tool_prompts(tool_chat, tool_prompts, args, 1 << 30, prompts)
    kept = [row for row, prompt_ids in enumerate(ids) if len(prompt_ids) <= args.max_prompt_length]
    if not kept:
        raise UserInputError(f"--overlong_prompts drop: every one of the {len(prompts)} training prompts is longer "
                             f"than --max_prompt_length {args.max_prompt_length} tokens (the shortest has "
                             f"{min(map(len, ids))}). Raise --max_prompt_length or use --overlong_prompts truncate.")
    if len(kept) < len(prompts):
        print(f"note: --overlong_prompts drop: {len(prompts) - len(kept)} of {len(prompts)} training prompts are longer "
              f"than --max_prompt_length {args.max_prompt_length} tokens and are left out")
    return kept


def make_evaluate(eval_sets: dict[str, list], score_set: Callable[..., float], metric: str) -> Evaluate:
    """The evaluation hook of `start_run`: `score_set(rollout, tokenizer, examples, accelerator, max_prompt_length,
    sampling, chat_template_kwargs=..., tool_config=...) -> float` on every held-out set, logged as eval/NAME_METRIC."""

    def evaluate(run: Run, when: str) -> dict[str, float]:
        sampling = eval_sampling(run.args)
        protocol = "greedy" if sampling.temperature == 0 else \
            f"avg@{sampling.num_samples}, T={sampling.temperature}, top-p {sampling.top_p}"
        results = {}
        for name, examples in eval_sets.items():
            value = score_set(run.rollout, run.tokenizer, examples, run.accelerator, run.args.max_prompt_length,
                              sampling, chat_template_kwargs=run.args.student_template_kwargs, tool_config=run.args)
            results[f"eval/{name}_{metric}"] = value
            run.print(f"[{when}] {name}: {metric} {value:.3f} ({len(examples)} questions, {protocol})")
        return results

    return evaluate


def eval_sampling(args: RunArgs) -> SamplingConfig:
    """The evaluation protocol: greedy by default; avg@n over --eval_samples completions at --eval_temperature."""
    sampled = args.eval_temperature > 0
    return SamplingConfig(max_new_tokens=args.eval_max_new_tokens, temperature=args.eval_temperature,
                          top_p=args.eval_top_p if sampled else 1.0, num_samples=args.eval_samples if sampled else 1)

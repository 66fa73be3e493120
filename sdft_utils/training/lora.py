"""LoRA adapters (through `peft`) for both scripts, with every teacher kind on one copy of the base weights.

- student: the adapter named "default" on the base model; only its tensors train (and only they are in the optimizer).
- frozen teacher: the same model with its adapters switched off (`disable_adapter`), i.e. exactly the base model.
- EMA teacher: a second adapter named "ema_teacher" on the same base weights. It starts as a copy of the student's adapter
  and follows it by the EMA rule, tensor by tensor (A and B separately, as TRL does: its B·A is the product of the
  averages, not the average of the products). It never requires gradients and is never in the optimizer.
- live teacher: the student's own adapter (run in eval mode, so the teacher sees no LoRA dropout).
- trust region (SDPO): the frozen teacher above, mixed with the current student as without LoRA.
- rollout engines (vLLM) receive merged weights W + scale·B·A under the base model's parameter names, computed one
  layer at a time into a new tensor: the training model is never merged in place.
- checkpoints: `checkpoint-STEP/` holds the adapter in PEFT format (`adapter_model.safetensors`, and the EMA adapter in
  `checkpoint-STEP/ema_teacher/`); accelerate's `trainer_state/` keeps only the trained adapter, not the base weights.

Supported: one process, DDP and DeepSpeed ZeRO-1/2 (full parameters on every rank). Refused up front: ZeRO-3 and
FSDP, where the adapter and base weights are sharded and the EMA adapter / merged sync would need gathering.
"""

from __future__ import annotations

import copy
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate.utils import DistributedType, extract_model_from_parallel
from torch import nn

from sdft_utils.errors import UserInputError
from sdft_utils.training.config import LoraArgs, TeacherArgs

STUDENT_ADAPTER = "default"  # peft's name for the first adapter
TEACHER_ADAPTER = "ema_teacher"
# the loss multiplies hidden states with the head weight directly, and vLLM gets merged linear weights only
_UNSUPPORTED_TARGETS = {"lm_head", "embed_tokens", "embed_out", "wte", "output"}


def require_peft() -> None:
    try:
        import peft  # noqa: F401
    except ImportError as error:
        raise UserInputError("--use_peft needs the `peft` package: pip install -e '.[peft]'") from error


def check_lora(args: LoraArgs | TeacherArgs, accelerator) -> None:
    """Refuse LoRA settings that cannot work, before any model is loaded (the launch config is known by then)."""
    if not args.use_peft:
        if args.merge_adapter_at_end:
            raise UserInputError("--merge_adapter_at_end merges a LoRA adapter: it needs --use_peft true.")
        return
    require_peft()
    problems = []
    if args.lora_r < 1:
        problems.append(f"--lora_r must be at least 1, got {args.lora_r}")
    if args.lora_alpha <= 0:
        problems.append(f"--lora_alpha must be positive, got {args.lora_alpha}")
    if not 0.0 <= args.lora_dropout < 1.0:
        problems.append(f"--lora_dropout must be in [0, 1), got {args.lora_dropout}")
    if not args.lora_target_modules:
        problems.append("--lora_target_modules needs at least one module name (or all-linear)")
    if unsupported := sorted(_UNSUPPORTED_TARGETS & set(args.lora_target_modules)):
        problems.append(f"--lora_target_modules {' '.join(unsupported)}: the output head and the embeddings cannot "
                        "carry an adapter here (the loss reads the head weight directly); adapt the linear layers")
    if args.teacher_model:
        problems.append("--teacher_model cannot be combined with --use_peft: with LoRA the teacher is the student's "
                        "own base model (adapters off, or an EMA adapter on the same weights). Drop --use_peft to "
                        "distil from another checkpoint, or drop --teacher_model")
    if args.teacher_fp32:
        problems.append("--teacher_fp32 cannot be combined with --use_peft: the LoRA teachers share the student's "
                        "base weights, so they have the student's dtype (set --dtype float32 for both)")
    distributed = accelerator.distributed_type
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if distributed == DistributedType.DEEPSPEED and plugin is not None and plugin.zero_stage == 3:
        problems.append("--use_peft under DeepSpeed ZeRO-3 is not supported: the EMA adapter, the merged vLLM weight "
                        "sync and the adapter checkpoints need full tensors on every rank. Use an accelerate config "
                        "with ZeRO stage 1 or 2 (or plain DDP): a LoRA run rarely needs ZeRO-3's sharded base weights")
    elif distributed == DistributedType.FSDP:
        problems.append("--use_peft under FSDP is not supported: the EMA adapter, the merged vLLM weight sync and the "
                        "adapter checkpoints need full tensors on every rank. Use DDP or DeepSpeed ZeRO-2")
    if problems:
        raise UserInputError("invalid LoRA arguments:\n  " + "\n  ".join(problems))


def is_lora_model(model: nn.Module) -> bool:
    """True for a (possibly DDP/DeepSpeed-wrapped) PeftModel. peft is never imported here: a model can only be a
    PeftModel if peft was imported to build it."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(extract_model_from_parallel(model), peft.PeftModel)


def add_lora(model: nn.Module, args: LoraArgs, accelerator=None) -> nn.Module:
    """Wrap `model` with a trainable LoRA adapter ("default"); its base weights are frozen.

    With an `accelerator`, its checkpoints keep only the trained adapter in `trainer_state/` (see
    `register_adapter_checkpointing`)."""
    require_peft()
    from peft import LoraConfig, get_peft_model

    targets = args.lora_target_modules
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, bias="none",
                        target_modules="all-linear" if targets == ["all-linear"] else list(targets),
                        task_type="CAUSAL_LM")
    try:
        # adapters of a 16-bit base are kept in float32 (peft's autocast_adapter_dtype): stable updates and EMA
        peft_model = get_peft_model(model, config, adapter_name=STUDENT_ADAPTER)
    except ValueError as error:  # e.g. no module matched the target names
        raise UserInputError(f"--lora_target_modules {' '.join(targets)}: {error}") from None
    from peft.tuners.tuners_utils import BaseTunerLayer

    if isinstance(peft_model.get_output_embeddings(), BaseTunerLayer):
        raise UserInputError(f"--lora_target_modules {' '.join(targets)} put an adapter on the output head; the loss "
                             "reads the head weight directly. Name the linear layers instead.")
    if accelerator is not None:
        register_adapter_checkpointing(accelerator)
    return peft_model


def lora_summary(model: nn.Module) -> str:
    model = extract_model_from_parallel(model)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    base = sum(p.numel() for name, p in model.named_parameters() if "lora_" not in name)
    return f"LoRA: {trained:,} trainable parameters ({100 * trained / max(base, 1):.3f}% of the {base:,} base ones)"


# ------------------------------------------------------------------------------------------------ teachers
@contextmanager
def adapter_active(model: nn.Module, adapter: str | None):
    """Run the PeftModel `model` with only `adapter` on (None: every adapter off, i.e. the base model), in eval mode.

    Afterwards the active adapter, the train/eval mode and every `requires_grad` flag are as before: peft's
    `set_adapter` and `disable_adapter` mark adapters trainable or frozen as a side effect, and the teacher adapter
    must never become trainable while the student's must stay so."""
    flags = [(param, param.requires_grad) for param in model.parameters()]
    was_training, previous = model.training, model.active_adapter
    model.eval()  # the teacher is deterministic: no LoRA dropout
    try:
        if adapter is None:
            with model.disable_adapter():
                yield
        else:
            if adapter != previous:
                model.set_adapter(adapter, inference_mode=True)
            yield
    finally:
        if adapter is not None and adapter != previous:
            model.set_adapter(previous)
        for param, flag in flags:
            param.requires_grad_(flag)
        model.train(was_training)


class AdapterTeacher(nn.Module):
    """The teacher as a view of the student's PeftModel: same base weights, another adapter (or none).

    Scripts use it like any teacher model: `completion_hidden_states(teacher, ...)` calls its forward (the student's
    forward with the teacher's adapter switched on) and `output_head(teacher)` reads the shared head. For the EMA kind
    its parameters are the "ema_teacher" adapter's tensors, under the student's names, so `checkpoint.py` saves and
    restores exactly those (in `checkpoint-STEP/teacher/`); the frozen and live views own no parameters."""

    def __init__(self, student: nn.Module, adapter: str | None):
        super().__init__()
        object.__setattr__(self, "student", student)  # a plain attribute: these weights belong to the student
        self.adapter = adapter

    def forward(self, *args, **kwargs):
        with adapter_active(self.student, self.adapter):
            return self.student(*args, **kwargs)

    def get_decoder(self) -> nn.Module:
        return self.student.get_decoder()

    def get_output_embeddings(self) -> nn.Module:
        return self.student.get_output_embeddings()

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        if self.adapter == TEACHER_ADAPTER:
            for name, param in self.student.named_parameters():
                if f".{TEACHER_ADAPTER}." in f"{name}.":
                    yield prefix + name, param

    def ema_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(teacher adapter tensors, the student adapter tensors they follow), in the same order."""
        teacher, student = [], []
        for _, module in _lora_layers(self.student):
            for layer_name in module.adapter_layer_names:
                adapters = getattr(module, layer_name)
                if self.adapter in adapters:
                    teacher += _tensors(adapters[self.adapter])
                    student += _tensors(adapters[STUDENT_ADAPTER])
        return teacher, student


def make_lora_teacher(kind: str, student: nn.Module) -> AdapterTeacher:
    """`frozen`: adapters off; `live`: the student's adapter; `ema`: a new "ema_teacher" adapter, a copy of the student's."""
    peft_model = extract_model_from_parallel(student)
    if kind == "frozen":
        return AdapterTeacher(peft_model, None)
    if kind == "live":
        return AdapterTeacher(peft_model, STUDENT_ADAPTER)
    if TEACHER_ADAPTER not in peft_model.peft_config:
        peft_model.add_adapter(TEACHER_ADAPTER, copy.deepcopy(peft_model.peft_config[STUDENT_ADAPTER]))
    teacher = AdapterTeacher(peft_model, TEACHER_ADAPTER)
    targets, sources = teacher.ema_pairs()
    with torch.no_grad():
        for target, source in zip(targets, sources, strict=True):
            target.copy_(source)  # the EMA starts at the student, as a full-model EMA starts from the same checkpoint
            target.requires_grad_(False)
    for param in sources:
        param.requires_grad_(True)  # add_adapter re-marks the active adapter; make sure the student still trains
    return teacher


def _lora_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def _tensors(entry) -> list[torch.Tensor]:
    return [entry] if isinstance(entry, torch.Tensor) else list(entry.parameters())


# ------------------------------------------------------------------------------------------------ rollout weights
@torch.no_grad()
def merged_parameters(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(base-model name, tensor) for every base parameter, with the student adapter merged into each adapted weight:
    W + scale·B·A, computed in float32 into a new tensor and cast to W's dtype (as peft's in-place merge rounds).
    Names are the base model's (`model.layers.0.self_attn.q_proj.weight`), in module (= layer) order; adapter tensors
    are skipped. One merged weight exists at a time (the caller may keep it)."""
    peft_model = extract_model_from_parallel(model)
    base = peft_model.get_base_model()
    lora_layers = dict(_lora_layers(base))
    for name, param in base.named_parameters():
        if any(part.startswith("lora_") for part in name.split(".")):
            continue
        owner, _, leaf = name.rpartition(".")
        if not owner.endswith(".base_layer"):
            yield name, param.detach()
            continue
        layer_name = owner.removesuffix(".base_layer")
        layer = lora_layers[layer_name]
        tensor = param.detach()
        if leaf == "weight" and STUDENT_ADAPTER in layer.lora_A and not layer.merged:
            tensor = (tensor.float() + layer.get_delta_weight(STUDENT_ADAPTER).float()).to(param.dtype)
        yield f"{layer_name}.{leaf}", tensor


def save_merged_model(accelerator, model: nn.Module, tokenizer, path: str | Path) -> Path:
    """Write the base model with the student adapter merged in as a plain Hugging Face folder (no peft needed to
    load it). Atomic: written to PATH.tmp, then renamed. Every process must call this."""
    path = Path(path)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        staging = path.with_name(path.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        peft_model = extract_model_from_parallel(model)
        state = {name: tensor.contiguous() for name, tensor in merged_parameters(peft_model)}
        peft_model.get_base_model().save_pretrained(staging, state_dict=state)
        tokenizer.save_pretrained(staging)
        shutil.rmtree(path, ignore_errors=True)
        staging.rename(path)
    accelerator.wait_for_everyone()
    return path


# ------------------------------------------------------------------------------------------------ checkpoints
def register_adapter_checkpointing(accelerator) -> None:
    """accelerate's `save_state` writes the whole model; with LoRA only the trained adapter changes, so
    `trainer_state/model.safetensors` keeps just the trainable tensors and loading checks it got all of them.
    (Under DeepSpeed, which saves the model itself, the full state is kept: correct, only larger.)"""

    def trained_names(model) -> set[str]:  # names as the unwrapped model has them (no DDP "module." prefix)
        return {name for name, param in extract_model_from_parallel(model).named_parameters() if param.requires_grad}

    def keep_trainable(models, weights, output_dir) -> None:
        for model, state in zip(models, weights, strict=False):
            if is_lora_model(model):
                trained = trained_names(model)
                for name in [name for name in state if name.removeprefix("module.") not in trained]:
                    del state[name]

    def load_trainable(models, input_dir) -> None:
        from safetensors.torch import load_file

        for index, model in enumerate(list(models)):
            if not is_lora_model(model):
                continue
            file = Path(input_dir) / ("model.safetensors" if index == 0 else f"model_{index}.safetensors")
            state = {name.removeprefix("module."): tensor for name, tensor in load_file(file).items()}
            trained = trained_names(model)
            if set(state) != trained:
                raise UserInputError(
                    f"{input_dir}: the saved adapter does not match this run's ({len(set(state) ^ trained)} tensors "
                    "differ): resume with the --lora_* flags of the run that wrote it.")
            extract_model_from_parallel(model).load_state_dict(state, strict=False)
            models.remove(model)  # loaded here; accelerate would expect every base weight in the file

    accelerator.register_save_state_pre_hook(keep_trainable)
    accelerator.register_load_state_pre_hook(load_trainable)

"""Loading models and reading the hidden states that feed the chunked divergence.

The loss never asks a model for full-vocabulary logits over the batch. Instead it takes the last hidden state at
the completion positions and multiplies it with the output head chunk by chunk (`losses.chunked_token_divergence`).
What some architectures do to the head's output before returning logits (soft-capping, scaling) is read once from
the config (`logit_transform`) and checked against the model's own forward (`check_logit_transform`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import extract_model_from_parallel
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from sdft_utils.errors import UserInputError
from sdft_utils.losses.divergence import LogitTransform


def resolve_dtype(name: str) -> torch.dtype:
    """Inference dtype (evaluation): `auto` is bfloat16 on a GPU and float32 on a CPU (bf16 matmuls are slow and
    inexact on CPUs). Training precision is `sdft_utils.training.backend.resolve_precision`."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def load_model(path: str | Path, dtype: torch.dtype, attn_implementation: str | None = None) -> nn.Module:
    """A causal LM from a local folder or a hub id, with a clear error when it cannot be found."""
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    except OSError as error:
        raise UserInputError(f"could not load the model '{path}': {error}") from None
    model.config.use_cache = False  # training forwards never reuse a KV cache; generate() turns it on itself
    return model


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.chat_template is None:
        raise UserInputError(
            f"the tokenizer of '{path}' has no chat template. Use an instruction-tuned model, or add a "
            "`chat_template` to its tokenizer_config.json."
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is always masked, any id works
    return tokenizer


def eos_token_ids(tokenizer: PreTrainedTokenizerBase, generation_config=None) -> list[int]:
    """The tokenizer's end-of-sequence id plus the generation config's (chat models often stop on several)."""
    configured = None if generation_config is None else generation_config.eos_token_id
    configured = configured if isinstance(configured, list) else [configured]
    return sorted({tokenizer.eos_token_id, *configured} - {None})


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What the optimizer gets: every parameter of a full model; the adapter only (never a teacher adapter) with LoRA."""
    return [param for param in model.parameters() if param.requires_grad]


def adamw(model: nn.Module, learning_rate: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over `trainable_parameters`, fused where torch has the kernel (CPU and CUDA floating-point tensors): one
    pass over all parameters, ~8x faster than the per-parameter loop on a CPU. Fused AdamW is HF Trainer's default
    optimizer, so TRL's trainers use it too."""
    parameters = trainable_parameters(model)
    fused = all(param.device.type in ("cpu", "cuda") and param.dtype.is_floating_point for param in parameters)
    return torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=weight_decay, fused=fused)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 after left padding, as `generate` computes them. (B, S) -> (B, S)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def output_head(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The lm_head weight (V, H) and bias (V,) or None, of a possibly wrapped model."""
    head = extract_model_from_parallel(model).get_output_embeddings()
    return head.weight, head.bias


def logit_transform(config) -> LogitTransform:
    """What the model's forward does to `lm_head(hidden)` before it returns logits, read from its config, so that the
    loss (which multiplies hidden states with the head itself) scores the distribution that `generate` and vLLM
    sample from:
      Gemma-2/3/3n/4, VaultGemma, nanochat: final_logit_softcapping c -> c · tanh(z / c);
      Cohere, Cohere2: z · logit_scale;  Granite family, MiniCPM3: z / logits_scaling;
      HyperCLOVA X: z · logits_scaling;  Falcon-H1: z · lm_head_multiplier.
    Any other architecture: the identity. A multimodal config is read through its text config.
    `check_logit_transform` verifies the result against one forward of the model."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = str(getattr(text, "model_type", "") or "")
    scale = 1.0
    if model_type.startswith("cohere"):
        scale = float(getattr(text, "logit_scale", None) or 1.0)
    elif model_type == "hyperclovax":  # multiplies by logits_scaling, where Granite divides
        scale = float(getattr(text, "logits_scaling", None) or 1.0)
    elif model_type.startswith("granite") or model_type == "minicpm3":
        scale = 1.0 / float(getattr(text, "logits_scaling", None) or 1.0)
    elif model_type == "falcon_h1":
        scale = float(getattr(text, "lm_head_multiplier", None) or 1.0)
    softcap = getattr(text, "final_logit_softcapping", None)
    return LogitTransform(scale=scale, softcap=None if softcap is None else float(softcap))


@torch.no_grad()
def check_logit_transform(model: nn.Module, transform: LogitTransform, num_tokens: int = 8) -> float:
    """Run a Hugging Face model once on `num_tokens` tokens and compare its own logits with
    transform(hidden @ Wᵀ + b), the way the loss computes them. Returns the largest difference; raises
    UserInputError when they differ (an architecture that changes its logits in a way `logit_transform` does not
    know: training would distil a different distribution from the one the rollouts sample). Call it on the loaded
    model, before accelerate/DeepSpeed/FSDP wrap it and before LoRA."""
    model = extract_model_from_parallel(model)
    weight, bias = output_head(model)
    if hasattr(weight, "ds_id") or weight.numel() == 0:
        return 0.0  # ZeRO-3 loads partitioned weights (zero3_init_flag): no forward outside its engine; trust the config
    ids = (torch.arange(num_tokens, device=weight.device) % weight.shape[0])[None]
    captured = {}

    def keep_output(module, inputs, output):
        captured["hidden"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

    handle = model.get_decoder().register_forward_hook(keep_output)
    was_training = model.training
    model.eval()
    try:
        logits = model(input_ids=ids, use_cache=False).logits.float()
    finally:
        handle.remove()
        model.train(was_training)
    expected = transform.apply(F.linear(captured["hidden"].float(), weight.float(),
                                        None if bias is None else bias.float()))
    # a 16-bit head rounds its output to a few significant digits; float32 agrees to rounding noise
    relative = 1e-4 if weight.dtype in (torch.float32, torch.float64) else 3e-2
    finite = torch.isfinite(logits) & torch.isfinite(expected)
    if not finite.any():  # non-finite weights: nothing to compare; training skips such steps and says so
        return 0.0
    difference = (logits - expected)[finite].abs().max().item()
    if not difference <= relative * max(1.0, expected[finite].abs().max().item()):
        model_type = getattr(getattr(model, "config", None), "model_type", "?")
        raise UserInputError(
            f"the model's logits differ from its output head applied to its hidden states (largest difference "
            f"{difference:.3g}; model_type '{model_type}', logit transform read from the config: {transform}). The "
            "loss computes logits from the hidden states and lm_head itself, so it would train on another "
            "distribution than the one sampled. This architecture post-processes its logits in a way "
            "sdft_utils.training.modeling.logit_transform does not know; add it there.")
    return difference


def packs_sequences(model: nn.Module) -> bool:
    """Padding-free batching pays where the attention kernel takes variable-length sequences: the flash-attention
    implementations. sdpa/eager would get a dense block-diagonal mask over the whole pack instead, which costs more
    than the padding it saves. `model` is unwrapped (`extract_model_from_parallel`)."""
    return "flash" in str(getattr(getattr(model, "config", None), "_attn_implementation", None) or "")


def completion_hidden_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                             num_completion_tokens: int, pack: bool | None = None) -> torch.Tensor:
    """Final hidden states at the positions that predict the completion tokens.

    `input_ids` is (B, S) = [left-padded prompt | right-padded completion of width T]. The forward goes through the
    (possibly DDP/DeepSpeed/FSDP-wrapped) model so gradient synchronisation works; a hook on the decoder catches its
    output, and `logits_to_keep=1` keeps the head from computing logits for every position. Returns (B, T, H).
    `pack` (None = `packs_sequences(model)`): padding-free, the real tokens of all rows go through the model as one
    sequence whose position ids restart at each row, so no layer computes anything for padding; the hidden states at
    padded positions are then 0 (they are never scored).
    """
    unwrapped = extract_model_from_parallel(model)
    decoder = unwrapped.get_decoder()
    captured = {}

    def keep_output(module, inputs, output):
        captured["hidden"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

    positions = position_ids_from_mask(attention_mask)
    packed = packs_sequences(unwrapped) if pack is None else pack
    if packed:
        # one device->host sync for the token count; HF's flash path syncs for the sequence lengths anyway
        real = attention_mask.flatten().nonzero().squeeze(1)
        inputs = dict(input_ids=input_ids.flatten()[real][None], position_ids=positions.flatten()[real][None])
    else:
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions)
    handle = decoder.register_forward_hook(keep_output)
    try:
        model(**inputs, use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    hidden = captured["hidden"]
    if packed:  # back to the (B, S) grid, zeros at padding (index_copy keeps the graph to the packed states)
        batch, width = input_ids.shape
        hidden = hidden.new_zeros(batch * width, hidden.shape[-1]).index_copy(0, real, hidden[0]).view(
            batch, width, -1)
    # position t predicts token t+1: completion token j is predicted at column S - T - 1 + j
    return hidden[:, -num_completion_tokens - 1:-1]

"""Hugging Face Llama / Qwen2 / Qwen3 <-> megatron-core GPTModel (local layer spec): config and tensor-parallel shards.

Our own converter (no Megatron-Bridge: it cannot share an environment with vLLM 0.33). Layout of a
megatron-core GPTModel built with `get_gpt_layer_local_spec` (names per decoder layer i):

  embedding.word_embeddings.weight            vocab rows split over TP ranks (after padding the vocabulary)
  decoder.layers.i.input_layernorm.weight     replicated
  ...self_attention.linear_qkv.weight/.bias   q/k/v interleaved per query group: for each group g,
                                              [q heads of g (heads/groups·head_dim) | k (head_dim) | v (head_dim)];
                                              rows split over TP ranks (each rank holds whole groups)
  ...self_attention.q_layernorm/k_layernorm   Qwen3's per-head RMSNorms, replicated
  ...self_attention.linear_proj.weight        o_proj, split along the input dim (dim 1)
  decoder.layers.i.pre_mlp_layernorm.weight   replicated (HF post_attention_layernorm)
  ...mlp.linear_fc1.weight                    each rank holds [gate shard r; up shard r] (not a split of [gate; up])
  ...mlp.linear_fc2.weight                    down_proj, split along dim 1
  decoder.final_layernorm.weight              replicated
  output_layer.weight                         lm_head rows split over TP ranks (absent when embeddings are tied)

The shard functions are pure tensor code (`hf_to_megatron_shard`, `megatron_shards_to_hf`), so the layout is tested
without megatron-core; only `gpt_model_from_hf_config` imports it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sdft_utils.errors import UserInputError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")


@dataclass(frozen=True)
class Layout:
    """The numbers the shard layout depends on, read once from a Hugging Face config."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_query_groups: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int  # the tokenizer's vocabulary (HF embedding rows)
    padded_vocab_size: int  # Megatron's: a multiple of make_vocab_size_divisible_by · TP
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_layernorm: bool
    tensor_parallel_size: int


def padded_vocab_size(vocab_size: int, tensor_parallel_size: int, divisible_by: int = 128) -> int:
    """Megatron pads the vocabulary so every TP rank holds the same number of rows (Megatron-LM's rule)."""
    multiple = divisible_by * tensor_parallel_size
    return math.ceil(vocab_size / multiple) * multiple


def _rope_parameters(hf_config: Any) -> dict:
    parameters = getattr(hf_config, "rope_parameters", None) or {}
    if "rope_theta" not in parameters and hasattr(hf_config, "rope_theta"):  # transformers < 5
        parameters = {"rope_theta": hf_config.rope_theta, **(getattr(hf_config, "rope_scaling", None) or {})}
    return parameters


def layout_from_hf_config(hf_config: Any, tensor_parallel_size: int, make_vocab_size_divisible_by: int = 128
                          ) -> Layout:
    """Check that the model can be converted and split `tensor_parallel_size` ways; UserInputError says why not."""
    model_type = hf_config.model_type
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserInputError(f"--backend megatron supports the model types {SUPPORTED_MODEL_TYPES}, got "
                             f"'{model_type}'. Use --backend accelerate for other architectures.")
    if model_type != "qwen2" and getattr(hf_config, "attention_bias", False) or getattr(hf_config, "mlp_bias", False):
        raise UserInputError("--backend megatron: attention_bias/mlp_bias on a Llama-style model is not supported "
                             "(megatron-core would add biases to every linear). Use --backend accelerate.")
    if getattr(hf_config, "use_sliding_window", False):
        raise UserInputError("--backend megatron: sliding-window attention is not supported; use --backend accelerate.")
    if hf_config.hidden_act != "silu":
        raise UserInputError(f"--backend megatron expects a SwiGLU MLP (hidden_act silu), got '{hf_config.hidden_act}'.")
    rope = _rope_parameters(hf_config)
    if rope.get("rope_type", "default") not in ("default", "llama3"):
        raise UserInputError(f"--backend megatron supports the rope types default and llama3, got "
                             f"'{rope.get('rope_type')}'. Use --backend accelerate.")
    heads = hf_config.num_attention_heads
    groups = getattr(hf_config, "num_key_value_heads", None) or heads
    tp = tensor_parallel_size
    for what, count in (("attention heads", heads), ("key/value heads", groups),
                        ("MLP intermediate size", hf_config.intermediate_size)):
        if count % tp:
            raise UserInputError(f"--tensor_model_parallel_size {tp} must divide the model's {what} ({count}); "
                                 f"choose a divisor of {count}.")
    return Layout(
        num_layers=hf_config.num_hidden_layers, hidden_size=hf_config.hidden_size, num_heads=heads,
        num_query_groups=groups, head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads,
        ffn_hidden_size=hf_config.intermediate_size, vocab_size=hf_config.vocab_size,
        padded_vocab_size=padded_vocab_size(hf_config.vocab_size, tp, make_vocab_size_divisible_by),
        tie_word_embeddings=bool(hf_config.tie_word_embeddings), qkv_bias=model_type == "qwen2",
        qk_layernorm=model_type == "qwen3",
        tensor_parallel_size=tp,
    )


# ----------------------------------------------------------------------------------------------------------------
# Pure tensor layout: HF tensors <-> one TP rank's megatron tensors


def _split(tensor: Tensor, dim: int, rank: int, size: int) -> Tensor:
    return tensor.chunk(size, dim=dim)[rank].clone()


def _pad_rows(tensor: Tensor, rows: int) -> Tensor:
    return torch.cat([tensor, tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:])])


def _interleave_qkv(q: Tensor, k: Tensor, v: Tensor, layout: Layout) -> Tensor:
    """HF q (heads·hd, ...), k/v (groups·hd, ...) -> megatron (groups·(heads/groups + 2)·hd, ...), per group [q|k|v]."""
    groups, hd = layout.num_query_groups, layout.head_dim
    rest = q.shape[1:]
    per_group = (q.reshape(groups, -1, *rest), k.reshape(groups, hd, *rest), v.reshape(groups, hd, *rest))
    return torch.cat(per_group, dim=1).reshape(-1, *rest)


def _split_qkv(qkv: Tensor, layout: Layout) -> tuple[Tensor, Tensor, Tensor]:
    groups, hd = layout.num_query_groups, layout.head_dim
    rest = qkv.shape[1:]
    q, k, v = qkv.reshape(groups, -1, *rest).split([layout.num_heads // groups * hd, hd, hd], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def _layer_names(i: int) -> dict[str, str]:
    hf, mc = f"model.layers.{i}.", f"decoder.layers.{i}."
    return {
        "input_norm": (hf + "input_layernorm.weight", mc + "input_layernorm.weight"),
        "post_norm": (hf + "post_attention_layernorm.weight", mc + "pre_mlp_layernorm.weight"),
        "q_norm": (hf + "self_attn.q_norm.weight", mc + "self_attention.q_layernorm.weight"),
        "k_norm": (hf + "self_attn.k_norm.weight", mc + "self_attention.k_layernorm.weight"),
        "o_proj": (hf + "self_attn.o_proj.weight", mc + "self_attention.linear_proj.weight"),
        "down": (hf + "mlp.down_proj.weight", mc + "mlp.linear_fc2.weight"),
        "qkv": (hf + "self_attn.{}_proj.{}", mc + "self_attention.linear_qkv.{}"),
        "fc1": (hf + "mlp.{}_proj.weight", mc + "mlp.linear_fc1.weight"),
    }


def hf_to_megatron_shard(hf: Mapping[str, Tensor] | Callable[[str], Tensor], layout: Layout, rank: int
                         ) -> dict[str, Tensor]:
    """HF checkpoint tensors (a mapping, or a function name -> tensor that reads lazily) -> TP rank `rank`'s
    megatron tensors by name. Only the tensors this rank needs are read."""
    get = hf.__getitem__ if isinstance(hf, Mapping) else hf
    tp = layout.tensor_parallel_size
    out: dict[str, Tensor] = {}
    vocab_rows = layout.padded_vocab_size
    out["embedding.word_embeddings.weight"] = _split(_pad_rows(get("model.embed_tokens.weight"), vocab_rows), 0, rank, tp)
    for i in range(layout.num_layers):
        names = _layer_names(i)
        for key in ("input_norm", "post_norm") + (("q_norm", "k_norm") if layout.qk_layernorm else ()):
            out[names[key][1]] = get(names[key][0]).clone()
        for key in ("o_proj", "down"):
            out[names[key][1]] = _split(get(names[key][0]), 1, rank, tp)
        hf_qkv, mc_qkv = names["qkv"]
        for kind in ("weight", "bias") if layout.qkv_bias else ("weight",):
            qkv = _interleave_qkv(*(get(hf_qkv.format(p, kind)) for p in "qkv"), layout)
            out[mc_qkv.format(kind)] = _split(qkv, 0, rank, tp)
        hf_fc1, mc_fc1 = names["fc1"]
        gate, up = (_split(get(hf_fc1.format(p)), 0, rank, tp) for p in ("gate", "up"))
        out[mc_fc1] = torch.cat([gate, up])
    out["decoder.final_layernorm.weight"] = get("model.norm.weight").clone()
    if not layout.tie_word_embeddings:
        out["output_layer.weight"] = _split(_pad_rows(get("lm_head.weight"), vocab_rows), 0, rank, tp)
    return out


def megatron_layer_to_hf(shards: list[Mapping[str, Tensor]], layout: Layout, layer: int | None
                         ) -> Iterator[tuple[str, Tensor]]:
    """The TP shards (one mapping per rank, rank order) of one decoder layer, or of the non-layer tensors when
    `layer` is None (embedding; then final norm and lm_head), -> (hf_name, full tensor) in HF checkpoint order."""
    if layer is None:
        embedding = torch.cat([s["embedding.word_embeddings.weight"] for s in shards])[:layout.vocab_size]
        yield "model.embed_tokens.weight", embedding
        return
    names = _layer_names(layer)
    hf_qkv, mc_qkv = names["qkv"]
    yield names["input_norm"][0], shards[0][names["input_norm"][1]]
    kinds = ("weight", "bias") if layout.qkv_bias else ("weight",)
    split = {kind: _split_qkv(torch.cat([s[mc_qkv.format(kind)] for s in shards]), layout) for kind in kinds}
    for index, p in enumerate("qkv"):
        for kind in kinds:
            yield hf_qkv.format(p, kind), split[kind][index]
    yield names["o_proj"][0], torch.cat([s[names["o_proj"][1]] for s in shards], dim=1)
    if layout.qk_layernorm:
        yield names["q_norm"][0], shards[0][names["q_norm"][1]]
        yield names["k_norm"][0], shards[0][names["k_norm"][1]]
    hf_fc1, mc_fc1 = names["fc1"]
    gate_up = [s[mc_fc1].chunk(2) for s in shards]  # each rank holds [gate_r; up_r]
    yield hf_fc1.format("gate"), torch.cat([g for g, _ in gate_up])
    yield hf_fc1.format("up"), torch.cat([u for _, u in gate_up])
    yield names["down"][0], torch.cat([s[names["down"][1]] for s in shards], dim=1)
    yield names["post_norm"][0], shards[0][names["post_norm"][1]]


def megatron_final_to_hf(shards: list[Mapping[str, Tensor]], layout: Layout) -> Iterator[tuple[str, Tensor]]:
    """The final norm and (untied) lm_head from the TP shards."""
    yield "model.norm.weight", shards[0]["decoder.final_layernorm.weight"]
    if not layout.tie_word_embeddings:
        yield "lm_head.weight", torch.cat([s["output_layer.weight"] for s in shards])[:layout.vocab_size]


def megatron_shards_to_hf(shards: list[Mapping[str, Tensor]], layout: Layout) -> dict[str, Tensor]:
    """All TP shards (rank order) -> the Hugging Face state dict (vocabulary padding dropped)."""
    pairs = list(megatron_layer_to_hf(shards, layout, None))
    for i in range(layout.num_layers):
        pairs += megatron_layer_to_hf(shards, layout, i)
    pairs += megatron_final_to_hf(shards, layout)
    return dict(pairs)


# ----------------------------------------------------------------------------------------------------------------
# Reading a Hugging Face checkpoint lazily (each rank reads only the tensors it needs)


def safetensors_reader(path: str | Path) -> Callable[[str], Tensor]:
    """name -> tensor over a local HF folder's safetensors files (sharded or not), read on demand.
    Tied checkpoints may lack lm_head.weight; ask for it only when untied."""
    from safetensors import safe_open

    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        file_of = {name: path / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    elif (path / "model.safetensors").exists():
        with safe_open(path / "model.safetensors", framework="pt") as handle:
            file_of = dict.fromkeys(handle.keys(), path / "model.safetensors")
    else:
        raise UserInputError(f"--backend megatron loads safetensors weights from a local folder; '{path}' has no "
                             "model.safetensors(.index.json). Download the model first (hf download).")

    def read(name: str) -> Tensor:
        if name not in file_of:
            raise UserInputError(f"the checkpoint '{path}' has no tensor '{name}' (not a Llama/Qwen2/Qwen3 layout?)")
        with safe_open(file_of[name], framework="pt") as handle:
            return handle.get_tensor(name)

    return read


# ----------------------------------------------------------------------------------------------------------------
# Building the megatron-core model (needs megatron-core and an initialised parallel_state)


def transformer_config_from_hf(hf_config: Any, layout: Layout, params_dtype: torch.dtype, **overrides: Any):
    """megatron-core TransformerConfig for the HF model. Fusions that need CUDA kernels (apex/TE) are off, so the
    same config runs on CPU (tests) and GPU; dropout is 0 as in the HF models."""
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    on_gpu = torch.cuda.is_available()
    options = dict(
        num_layers=layout.num_layers, hidden_size=layout.hidden_size, num_attention_heads=layout.num_heads,
        num_query_groups=layout.num_query_groups, kv_channels=layout.head_dim, ffn_hidden_size=layout.ffn_hidden_size,
        normalization="RMSNorm", layernorm_epsilon=hf_config.rms_norm_eps, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, add_qkv_bias=layout.qkv_bias, qk_layernorm=layout.qk_layernorm,
        hidden_dropout=0.0, attention_dropout=0.0, tensor_model_parallel_size=layout.tensor_parallel_size,
        sequence_parallel=False, params_dtype=params_dtype, bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16, use_cpu_initialization=not on_gpu, perform_initialization=False,
        gradient_accumulation_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False,
        masked_softmax_fusion=False, persist_layer_norm=False,
    )
    options.update(overrides)
    return TransformerConfig(**options)


def gpt_model_from_hf_config(hf_config: Any, layout: Layout, params_dtype: torch.dtype, **config_overrides: Any):
    """An (uninitialised) megatron-core GPTModel with the HF model's architecture for this rank's TP shard.
    Load weights with `load_hf_weights`. Needs `parallel_state.initialize_model_parallel` first."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel

    config = transformer_config_from_hf(hf_config, layout, params_dtype, **config_overrides)
    rope = _rope_parameters(hf_config)
    llama3 = rope.get("rope_type") == "llama3"
    if llama3 and (rope.get("low_freq_factor"), rope.get("high_freq_factor"),
                   rope.get("original_max_position_embeddings")) != (1.0, 4.0, 8192):
        raise UserInputError("--backend megatron implements Llama-3 RoPE scaling with megatron-core's fixed "
                             "low/high frequency factors 1/4 and original context 8192; this model differs.")
    spec = get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=layout.qk_layernorm)
    return GPTModel(
        config=config, transformer_layer_spec=spec, vocab_size=layout.padded_vocab_size,
        max_sequence_length=hf_config.max_position_embeddings, parallel_output=True,
        share_embeddings_and_output_weights=layout.tie_word_embeddings, position_embedding_type="rope",
        rotary_base=rope.get("rope_theta", 10000.0), rope_scaling=llama3,
        rope_scaling_factor=rope.get("factor", 8.0),
    )


@torch.no_grad()
def load_hf_weights(model: torch.nn.Module, hf: Mapping[str, Tensor] | Callable[[str], Tensor], layout: Layout,
                    rank: int) -> None:
    """Copy this rank's shard of the HF weights into a GPTModel built by `gpt_model_from_hf_config`; every parameter
    must be covered exactly (a missing or extra name is a converter bug, not a user error)."""
    shard = hf_to_megatron_shard(hf, layout, rank)
    params = dict(model.named_parameters())
    if set(params) != set(shard):
        raise RuntimeError(f"converter/model mismatch: only in model {sorted(set(params) - set(shard))}, only in "
                           f"converter {sorted(set(shard) - set(params))}")
    for name, param in params.items():
        if param.shape != shard[name].shape:
            raise RuntimeError(f"{name}: model {tuple(param.shape)} vs converted {tuple(shard[name].shape)}")
        param.copy_(shard[name])

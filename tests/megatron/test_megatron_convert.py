"""HF <-> megatron-core tensor-parallel shard layout (sdft_utils.megatron.convert), pure tensor code: round trips are
exact for Llama (tied and untied), Qwen2 (qkv bias) and Qwen3 (qk norms) at TP 1, 2, 4, and the grouped-QKV and
gate/up layouts match hand-written examples. No megatron-core needed."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, Qwen2Config, Qwen3Config

from sdft_utils.errors import UserInputError
from sdft_utils.megatron.convert import (
    hf_to_megatron_shard,
    layout_from_hf_config,
    megatron_shards_to_hf,
    padded_vocab_size,
)


def tiny_config(kind: str, **overrides):
    """4 heads in 4 key/value groups (so TP 4 divides them), head_dim 8, vocab 259 (padded for TP)."""
    common = dict(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=64)
    common.update({k: overrides.pop(k) for k in list(overrides) if k in common})
    if kind == "llama":
        return LlamaConfig(**common, head_dim=8, **overrides)
    if kind == "llama_tied":
        return LlamaConfig(**common, head_dim=8, tie_word_embeddings=True, **overrides)
    if kind == "qwen2":
        return Qwen2Config(**common, **overrides)
    return Qwen3Config(**common, head_dim=8, **overrides)


def random_state_dict(config) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    return {name: torch.randn_like(p) for name, p in model.state_dict().items()}


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("kind", ["llama", "llama_tied", "qwen2", "qwen3"])
def test_round_trip_is_exact(kind, tp):
    config = tiny_config(kind)
    state = random_state_dict(config)
    layout = layout_from_hf_config(config, tp)
    shards = [hf_to_megatron_shard(state, layout, rank) for rank in range(tp)]
    if layout.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied: one tensor, stored as the embedding
    back = megatron_shards_to_hf(shards, layout)
    assert back.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(back[name], tensor), name
    # every shard has the same names and shapes (megatron ranks are symmetric)
    assert all({n: t.shape for n, t in s.items()} == {n: t.shape for n, t in shards[0].items()} for s in shards)
    assert shards[0]["embedding.word_embeddings.weight"].shape[0] * tp == padded_vocab_size(259, tp)
    assert ("decoder.layers.0.self_attention.linear_qkv.bias" in shards[0]) == (kind == "qwen2")
    assert ("decoder.layers.0.self_attention.q_layernorm.weight" in shards[0]) == (kind == "qwen3")
    assert ("output_layer.weight" in shards[0]) == (kind != "llama_tied")


def test_grouped_qkv_and_gate_up_layout_by_hand():
    """4 query heads in 2 groups, head_dim 1: per group [q heads | k | v]; TP 2 gives each rank one whole group.
    gate/up: each rank holds [gate rows of the rank; up rows of the rank]. Rows are labelled by their value."""
    config = LlamaConfig(vocab_size=4, hidden_size=4, intermediate_size=4, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=1, max_position_embeddings=8)
    state = {name: torch.zeros(p.shape) for name, p in random_state_dict(config).items()}
    prefix = "model.layers.0."
    def rows(*labels: float) -> torch.Tensor:
        return torch.tensor(labels)[:, None].expand(-1, 4).clone()

    state[prefix + "self_attn.q_proj.weight"] = rows(0, 1, 2, 3)
    state[prefix + "self_attn.k_proj.weight"] = rows(10, 11)
    state[prefix + "self_attn.v_proj.weight"] = rows(20, 21)
    state[prefix + "mlp.gate_proj.weight"] = rows(0, 1, 2, 3)
    state[prefix + "mlp.up_proj.weight"] = rows(10, 11, 12, 13)
    layout = layout_from_hf_config(config, 2, make_vocab_size_divisible_by=1)
    qkv = "decoder.layers.0.self_attention.linear_qkv.weight"
    fc1 = "decoder.layers.0.mlp.linear_fc1.weight"
    rank0, rank1 = (hf_to_megatron_shard(state, layout, r) for r in (0, 1))
    assert rank0[qkv][:, 0].tolist() == [0, 1, 10, 20]
    assert rank1[qkv][:, 0].tolist() == [2, 3, 11, 21]
    assert rank0[fc1][:, 0].tolist() == [0, 1, 10, 11]
    assert rank1[fc1][:, 0].tolist() == [2, 3, 12, 13]
    tp1 = hf_to_megatron_shard(state, layout_from_hf_config(config, 1, make_vocab_size_divisible_by=1), 0)
    assert tp1[qkv][:, 0].tolist() == [0, 1, 10, 20, 2, 3, 11, 21]
    assert tp1[fc1][:, 0].tolist() == [0, 1, 2, 3, 10, 11, 12, 13]


def test_vocab_padding_rows_are_zero_and_dropped_on_the_way_back():
    config = tiny_config("llama")
    state = random_state_dict(config)
    layout = layout_from_hf_config(config, 2)
    shards = [hf_to_megatron_shard(state, layout, r) for r in range(2)]
    embedding = torch.cat([s["embedding.word_embeddings.weight"] for s in shards])
    assert embedding.shape[0] == 256 * 2 and embedding[259:].abs().max() == 0
    assert torch.equal(embedding[:259], state["model.embed_tokens.weight"])


@pytest.mark.parametrize("overrides,flag_part", [
    (dict(num_key_value_heads=2), "key/value heads (2)"),
    (dict(intermediate_size=66), "MLP intermediate size (66)"),
])
def test_tensor_parallel_size_must_divide_the_model(overrides, flag_part):
    with pytest.raises(UserInputError, match="--tensor_model_parallel_size 4") as error:
        layout_from_hf_config(tiny_config("llama", **overrides), 4)
    assert flag_part in str(error.value)


def test_unsupported_architecture_is_a_user_error():
    from transformers import GPT2Config

    with pytest.raises(UserInputError, match="--backend accelerate"):
        layout_from_hf_config(GPT2Config(), 1)

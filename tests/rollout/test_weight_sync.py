"""Parameter streaming for rollout-engine weight sync: names, tied weights, order, layer-aligned buckets."""

import pytest
import torch
from torch import nn

from sdft_utils.rollout.sampling import Rollouts
from sdft_utils.rollout.weight_sync import check_weight_sync, engine_name, full_parameters, layer_buckets
from sdft_utils.testing import tiny_llama


def test_engine_names_drop_wrapper_prefixes():
    assert engine_name("module.model.layers.0.mlp.up_proj.weight") == "model.layers.0.mlp.up_proj.weight"
    assert engine_name("model._fsdp_wrapped_module.layers.1._checkpoint_wrapped_module.self_attn.q_proj.weight") \
        == "model.layers.1.self_attn.q_proj.weight"
    assert engine_name("_orig_mod.lm_head.weight") == "lm_head.weight"


class Wrapper(nn.Module):  # like DDP / a DeepSpeed engine: the model sits in `.module`
    def __init__(self, module):
        super().__init__()
        self.module = module


@pytest.mark.parametrize("tied", [False, True])
def test_full_parameters_are_the_models_own_tensors_in_layer_order(tied):
    model = tiny_llama(tie_word_embeddings=tied)
    pairs = list(full_parameters(Wrapper(model)))
    assert [name for name, _ in pairs] == [name for name, _ in model.named_parameters()]
    assert ("lm_head.weight" in dict(pairs)) is not tied  # a tied head is the embedding: sent once
    for (_, tensor), param in zip(pairs, model.parameters(), strict=True):
        assert tensor.data_ptr() == param.data_ptr() and not tensor.requires_grad  # no copy without ZeRO-3


def test_buckets_hold_whole_layers_and_everything_once():
    model = tiny_llama()
    pairs = list(full_parameters(model))
    layer_bytes = sum(t.numel() * t.element_size() for n, t in pairs if ".layers.0." in n)
    for max_bytes in (1, layer_bytes, 10**9):
        buckets = list(layer_buckets(pairs, max_bytes))
        assert [name for bucket in buckets for name, _ in bucket] == [name for name, _ in pairs]
        layers_per_bucket = [{name.split(".")[2] for name, _ in bucket if ".layers." in name} for bucket in buckets]
        seen = [layer for layers in layers_per_bucket for layer in layers]
        assert len(seen) == len(set(seen))  # no layer split over two buckets
        if max_bytes == 10**9:
            assert len(buckets) == 1
        if max_bytes == 1:
            assert all(len(layers) <= 1 for layers in layers_per_bucket)


class FixedEngine:
    def __init__(self, tokens, logprobs):
        self.rollouts = Rollouts([tokens], [logprobs], from_training_weights=False)

    def generate(self, prompt_ids, sampling):
        return self.rollouts


def test_check_weight_sync_passes_on_equal_logprobs_and_fails_loudly_otherwise():
    from sdft_utils.rollout.weight_sync import sequence_logprobs

    model = tiny_llama()
    prompt, tokens = [1, 40, 41], [50, 51, 52]
    exact = sequence_logprobs(model, prompt, tokens, 1.0).tolist()
    assert check_weight_sync(FixedEngine(tokens, exact), model, prompt, 3, tolerance=1e-5) <= 1e-5
    with pytest.raises(RuntimeError, match="weight sync check failed.*0.1"):
        check_weight_sync(FixedEngine(tokens, [exact[0], exact[1] + 0.1, exact[2]]), model, prompt, 3, 1e-3)
    with pytest.raises(RuntimeError):
        check_weight_sync(FixedEngine(tokens, [float("nan")] * 3), model, prompt, 3, 1e-3)
    assert torch.is_grad_enabled()

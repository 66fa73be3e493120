"""A real megatron-core GPTModel built and loaded by sdft_utils.megatron.convert, on 1 and 2 gloo processes (CPU
shims in tests/megatron_cpu.py): its logits equal the Hugging Face model's, its gradients equal the HF gradients
mapped through the same shard layout (forward + backward with TP=2), and its parameters convert back to the exact
HF weights. Skipped when megatron-core is not installed."""

from __future__ import annotations

import pytest
import torch

from tests.distributed_harness import run_ranks
from tests.megatron.test_megatron_convert import tiny_config
from tests.megatron_cpu import init_megatron_cpu

KINDS = ["llama", "llama_tied", "qwen2", "qwen3"]
BATCH, SEQ = 2, 7


def hf_model_and_batch(kind: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(kind), attn_implementation="eager").float()
    with torch.no_grad():  # HF initialises norms to 1 and biases to 0: randomise so the layout matters everywhere
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ids = torch.randint(0, model.config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    upstream = torch.randn(BATCH, SEQ, model.config.vocab_size, generator=torch.Generator().manual_seed(2))
    return model, ids, upstream


def worker(rank: int, world_size: int) -> dict:
    from megatron.core import parallel_state

    from sdft_utils.megatron.convert import gpt_model_from_hf_config, layout_from_hf_config, load_hf_weights
    from sdft_utils.megatron.training import finalize_grads

    init_megatron_cpu(world_size)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    results = {}
    for kind in KINDS:
        hf_model, ids, upstream = hf_model_and_batch(kind)
        layout = layout_from_hf_config(hf_model.config, world_size)
        model = gpt_model_from_hf_config(hf_model.config, layout, torch.float32)
        load_hf_weights(model, hf_model.state_dict(), layout, tp_rank)
        causal = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), 1)[None, None]  # True = masked
        logits = model(input_ids=ids, position_ids=torch.arange(SEQ).expand(BATCH, -1), attention_mask=causal)
        width = layout.padded_vocab_size // world_size
        start = tp_rank * width
        local_upstream = torch.zeros(BATCH, SEQ, width)
        valid = max(0, min(width, layout.vocab_size - start))
        local_upstream[..., :valid] = upstream[..., start:start + valid]
        (logits * local_upstream).sum().backward()
        finalize_grads(model)  # Qwen3's q/k norms see only this rank's heads: their gradients are summed over TP
        results[kind] = {
            "logits": logits.detach(),
            "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
        }
    parallel_state.destroy_model_parallel()
    return results


@pytest.fixture(scope="module", params=[1, 2], ids=lambda w: f"tp{w}")
def ranks(request, tmp_path_factory):
    return request.param, run_ranks(worker, request.param, tmp_path_factory.mktemp(f"tp{request.param}"))


@pytest.mark.parametrize("kind", KINDS)
def test_logits_and_gradients_equal_hugging_face(ranks, kind):
    from sdft_utils.megatron.convert import hf_to_megatron_shard, layout_from_hf_config, megatron_shards_to_hf

    world_size, results = ranks
    hf_model, ids, upstream = hf_model_and_batch(kind)
    expected = hf_model(input_ids=ids).logits
    (expected * upstream).sum().backward()
    layout = layout_from_hf_config(hf_model.config, world_size)
    vocab = hf_model.config.vocab_size

    logits = torch.cat([r[kind]["logits"] for r in results], -1)
    assert logits.shape == (BATCH, SEQ, layout.padded_vocab_size)
    torch.testing.assert_close(logits[..., :vocab], expected.detach(), atol=2e-5, rtol=1e-5)

    # Gradients are linear in the same layout as the weights: map the HF gradients shard by shard.
    hf_grads = {n: p.grad for n, p in hf_model.named_parameters()}
    if layout.tie_word_embeddings:
        hf_grads["lm_head.weight"] = hf_grads["model.embed_tokens.weight"]
    for rank, rank_result in enumerate(results):
        expected_grads = hf_to_megatron_shard(hf_grads, layout, rank)
        assert rank_result[kind]["grads"].keys() == expected_grads.keys()
        for name, grad in rank_result[kind]["grads"].items():
            torch.testing.assert_close(grad, expected_grads[name], atol=5e-5, rtol=1e-4, msg=name)

    # Megatron parameters -> HF weights is exact.
    back = megatron_shards_to_hf([r[kind]["params"] for r in results], layout)
    state = {n: p for n, p in hf_model.state_dict().items() if not (layout.tie_word_embeddings and n == "lm_head.weight")}
    assert back.keys() == state.keys()
    assert all(torch.equal(back[n], state[n]) for n in state)

"""Methods added to every vLLM worker (`worker_extension_cls="sdft_utils.rollout.vllm_worker.WeightSyncExtension"`).

They run inside the worker, with `self.model_runner` at hand, and are called through `collective_rpc`: in-process
for the colocated engine, over the dev-mode HTTP endpoint `/collective_rpc` for `vllm serve` on CPU.

Why `reload_weights` and not `model.load_weights`: vLLM's CPU backend repacks every linear weight into a GEMM handle
after loading and leaves an empty parameter behind, so `load_weights` fails there. The layerwise in-place reload
restores the checkpoint-format parameters, loads Hugging Face names, re-runs `process_weights_after_loading` (which
repacks) and copies into the original storage. It works on GPU too (and re-quantises online-quantised layers).
"""

from __future__ import annotations

import base64
from collections.abc import Iterable

import torch


class WeightSyncExtension:
    model_runner: object  # provided by the vLLM worker this class is mixed into

    def push_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Load (hf_name, tensor) pairs in place, whole transformer layers per call. Returns the number of tensors.
        `weights` may be a lazy iterator: the colocated engine passes one that gathers one parameter at a time."""
        count = 0
        saw_embedding = False

        def counted():
            nonlocal count, saw_embedding
            for name, tensor in weights:
                count += 1
                saw_embedding |= name.endswith("embed_tokens.weight")
                yield name, tensor

        self.model_runner.reload_weights(weights_iterator=counted(), is_checkpoint_format=True)
        if saw_embedding:
            self._repack_tied_lm_head()
        return count

    def model_dtype(self) -> str:
        """The dtype the engine holds the model in, e.g. "torch.bfloat16" (the trainer compares it with its own)."""
        return str(self.model_runner.model_config.dtype)

    def push_serialized_weights(self, payload: str) -> int:
        """`push_weights` for a base64 safetensors blob: the dev-mode HTTP `/collective_rpc` passes strings only."""
        from safetensors.torch import load

        tensors = load(base64.b64decode(payload))
        return self.push_weights(list(tensors.items()))  # safetensors keeps the insertion (layer) order

    def _repack_tied_lm_head(self) -> None:
        """With tied embeddings the lm_head shares the embedding's parameter and gets no tensor of its own, so the
        reload never re-processes it. On CPU its GEMM holds a packed copy of the *old* embedding: repack it from
        the updated shared weight. (On GPU the unquantised head does no packing; this is then a cheap no-op.)"""
        model = self.model_runner.get_model()
        head = getattr(model, "lm_head", None)
        embedding = getattr(getattr(model, "model", None), "embed_tokens", None)
        if head is None or embedding is None or head.weight is not embedding.weight:
            return
        quant_method = getattr(head, "quant_method", None)
        if quant_method is not None and hasattr(quant_method, "process_weights_after_loading"):
            quant_method.process_weights_after_loading(head)

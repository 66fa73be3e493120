"""Tiny offline models and tokenizers for tests and benchmarks (no hub access, built from a config)."""

from __future__ import annotations

import os
import subprocess
import sys
import weakref
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_level_tokenizer(vocab_size: int = 259) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with no merges (259 tokens) and a ChatML chat template.

    Token ids 0-2 are the special tokens; eos = pad = `<|im_end|>` (id 2), as in SmolLM2. A larger `vocab_size`
    appends filler tokens `<259>`, `<260>`, ... that text never encodes to but a random model may sample (so a
    benchmark model can have a realistic output head).
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tokens = SPECIAL_TOKENS + sorted(alphabet)
    tokens += [f"<{index}>" for index in range(len(tokens), vocab_size)]
    vocab = {token: index for index, token in enumerate(tokens)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>",
        additional_special_tokens=SPECIAL_TOKENS,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tiny_llama(vocab_size: int = 259, seed: int = 0, tie_word_embeddings: bool = False) -> LlamaForCausalLM:
    """A 2-layer random Llama (head_dim 64, so vLLM's CPU backend can load it too)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=2048,
        tie_word_embeddings=tie_word_embeddings, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def save_tiny_model(path: str | Path, seed: int = 0, tie_word_embeddings: bool = False) -> Path:
    """Write a tiny random Llama and the byte-level tokenizer as a Hugging Face folder."""
    path = Path(path)
    tiny_llama(seed=seed, tie_word_embeddings=tie_word_embeddings).save_pretrained(path)
    byte_level_tokenizer().save_pretrained(path)
    return path


# A Qwen2-shaped model of ~0.4B parameters, the shape of research/gpu_anchor.md (SmolLM2's 49,152-token vocabulary)
QWEN2_0P4B = dict(vocab_size=49_152, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)


def save_random_model(path: str | Path, preset: str = "tiny", dtype: torch.dtype = torch.float32,
                      min_new_tokens: int | None = None, seed: int = 0) -> Path:
    """Write a random model + byte-level tokenizer folder: `tiny` (2-layer Llama, 259 tokens), `tiny-49k` (the same
    with SmolLM2's 49,152-token vocabulary, so the output head weighs as in real models) or `qwen2-0.4b`.

    `min_new_tokens` goes into generation_config.json, so every `generate` caller (ours and TRL's) produces
    completions of the same length from a random model, whose EOS would otherwise end them at random.
    """
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    path = Path(path)
    if preset == "tiny":
        model = tiny_llama(seed=seed)
    elif preset == "tiny-49k":
        model = tiny_llama(vocab_size=QWEN2_0P4B["vocab_size"], seed=seed)
    elif preset == "qwen2-0.4b":
        torch.manual_seed(seed)
        config = Qwen2Config(**QWEN2_0P4B, max_position_embeddings=32_768, bos_token_id=1, eos_token_id=2,
                             pad_token_id=2)
        model = Qwen2ForCausalLM(config)
    else:
        raise ValueError(f"unknown model preset {preset!r}; choose tiny, tiny-49k or qwen2-0.4b")
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2,
                                               min_new_tokens=min_new_tokens)
    model.to(dtype).save_pretrained(path)
    byte_level_tokenizer(model.config.vocab_size).save_pretrained(path)
    return path


class LiveTensorBytes(TorchDispatchMode):
    """Tracks bytes of live tensor storages created inside the mode: current, peak and largest single one.

    A CPU stand-in for `torch.cuda.max_memory_allocated`, used by the memory tests and benchmarks.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = self.largest = 0
        self._seen: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in self._seen:  # views share their base's storage
                continue
            self._seen.add(key)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            self.largest = max(self.largest, nbytes)
            weakref.finalize(storage, self._release, key, nbytes)
        return out


def run_training_script(script: str, *args, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python SCRIPT ARGS...` from the repository root as a user would, offline, one thread per process."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, str(root / script), *map(str, args)], cwd=root, env=env,
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result

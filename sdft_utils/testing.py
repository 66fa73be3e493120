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
# ChatML with a tools section in the style of Qwen2.5's template (written for the tests): the schemas in the system
# turn, calls as <tool_call> JSON blocks, consecutive tool results grouped into one user turn of <tool_response>s
TOOLS_CHATML_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}{% endif %}"
    "# Tools\n\n<tools>{% for tool in tools %}{{ '\n' + (tool | tojson) }}{% endfor %}{{ '\n</tools>\n\n' }}"
    "Call a function as <tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>"
    "<|im_end|>\n"
    "{% elif messages[0]['role'] == 'system' %}{{ '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' or (message['role'] == 'system' and not loop.first) %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' + (message['content'] or '') }}"
    "{% for call in message.get('tool_calls') or [] %}"
    "{% if message['content'] or not loop.first %}{{ '\n' }}{% endif %}"
    "{{ '<tool_call>\n{\"name\": \"' + call['function']['name'] + '\", \"arguments\": ' }}"
    "{{ call['function']['arguments'] | tojson }}{{ '}\n</tool_call>' }}"
    "{% endfor %}{{ '<|im_end|>\n' }}"
    "{% elif message['role'] == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{ '<|im_start|>user' }}{% endif %}"
    "{{ '\n<tool_response>\n' + message['content'] + '\n</tool_response>' }}"
    "{% if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{ '<|im_end|>\n' }}{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def byte_level_tokenizer(vocab_size: int = 259, chat_template: str = CHATML_TEMPLATE) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with no merges (259 tokens) and a ChatML chat template (SmolLM2's shape, no tools
    section; `TOOLS_CHATML_TEMPLATE` gives one with tools in Qwen2.5's style).

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
    tokenizer.chat_template = chat_template
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


def favour_token(model: LlamaForCausalLM, token_id: int, logit_gap: float = 5.5) -> LlamaForCausalLM:
    """Make a random Llama likely to sample `token_id` (e.g. EOS, so tool-rollout turns end after a few tokens):
    every input embedding gets a shared large component u, so the final normalised hidden state points along u,
    and the token's output row is set along u to give it ~`logit_gap` more logit than the others (ln(258) ~ 5.5:
    about even odds against all other tokens of the 259-token vocabulary). Untied embeddings only; in place."""
    with torch.no_grad():
        embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        direction = torch.nn.functional.normalize(torch.randn(embedding.shape[1], generator=torch.Generator()
                                                              .manual_seed(1)), dim=0)
        embedding += 10.0 * direction
        head[token_id] = logit_gap / embedding.shape[1] ** 0.5 * direction
    return model


def save_tiny_model(path: str | Path, seed: int = 0, tie_word_embeddings: bool = False) -> Path:
    """Write a tiny random Llama and the byte-level tokenizer as a Hugging Face folder."""
    path = Path(path)
    tiny_llama(seed=seed, tie_word_embeddings=tie_word_embeddings).save_pretrained(path)
    byte_level_tokenizer().save_pretrained(path)
    return path


# A Qwen2-shaped model of ~0.4B parameters, the shape of the H200 probe in benchmarks/RESULTS.md (SmolLM2's 49,152-token vocabulary)
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


class ScriptedEngine:
    """A rollout engine that returns fixed turns: `turns[i]` lists trajectory i's turns, each a text (encoded, EOS
    appended) or token ids; log-probs are -0.25, -0.26, ... per turn.

    A fake engine, for the tool-loop unit tests only: a random tiny model never writes a well-formed tool call, and
    those tests need known calls to drive parse -> execute -> continue. The loop sees nothing of an engine but this
    contract (token ids and log-probs per context); the real HF and vLLM engines are tested on it separately.
    A context is matched to its trajectory because it extends what that trajectory was last given.
    """

    def __init__(self, tokenizer, turns: list[list], eos_token_id: int = 2):
        self.tokenizer, self.turns, self.eos_token_ids = tokenizer, turns, [eos_token_id]
        self.calls: list[dict] = []  # per generate(): the contexts, seeds and max_new_tokens it was given
        self.seen: list[list[int]] = []

    def ids(self, turn) -> list[int]:
        if isinstance(turn, list):
            return turn
        return self.tokenizer(turn, add_special_tokens=False)["input_ids"] + self.eos_token_ids

    def generate(self, prompt_ids, sampling, seeds=None):
        from sdft_utils.rollout.sampling import Rollouts

        self.calls.append({"contexts": [list(ids) for ids in prompt_ids], "seeds": seeds,
                           "max_new_tokens": sampling.max_new_tokens})
        owners = list(range(len(prompt_ids))) if not self.seen else []
        for context in prompt_ids if self.seen else []:
            owners.append(next(i for i, before in enumerate(self.seen)
                               if i not in owners and context[:len(before)] == before))
        out = [self.ids(self.turns[owner].pop(0)) for owner in owners]
        self.seen = self.seen or [[] for _ in prompt_ids]
        for owner, context, tokens in zip(owners, prompt_ids, out, strict=True):
            self.seen[owner] = list(context) + tokens
        return Rollouts(out, [[-0.25 - 0.01 * i for i in range(len(ids))] for ids in out], False)


def run_training_script(script: str, *args, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python SCRIPT ARGS...` from the repository root as a user would, offline, one thread per process."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, str(root / script), *map(str, args)], cwd=root, env=env,
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result

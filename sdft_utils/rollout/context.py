"""How many tokens a vLLM engine may hold per sequence: the model's context, and the prompt + completion lengths.

vLLM refuses an engine longer than the model's context (the smallest of the config's length keys, times a RoPE
scaling factor, capped by the tokenizer's `model_max_length`) with a pydantic traceback, and refuses a prompt that
fills the whole engine. So, before any model loads:
- the lengths fit: the engine gets prompt + completion (or `--vllm_max_model_len`), as before;
- they do not, but a full-length prompt still leaves room: the engine is cut to the model's context, and a completion
  whose prompt is long stops where the context ends (vLLM marks it as cut by length, like any truncated completion);
- a full-length prompt would fill the context, or `--vllm_max_model_len` asks for more than the model has: stop, with
  the flags to change.
"""

from __future__ import annotations

import json
from pathlib import Path

from sdft_utils.errors import UserInputError

# vLLM's keys for a model's context (the smallest present wins), as in its model_arch_config_convertor.py
LENGTH_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "model_max_length",
               "max_target_positions", "max_sequence_length", "max_seq_length", "seq_len")
# RoPE types whose `max_position_embeddings` is already the scaled length (vLLM does not multiply these)
PRESCALED_ROPE = {"su", "longrope", "llama3", "yarn", "deepseek_yarn", "deepseek_llama_scaling"}


def model_context_length(model_path: str) -> tuple[int, str] | None:
    """(tokens, where that number came from) for a model folder or a cached hub id; None when its config cannot be
    read here (then vLLM's own check is all there is)."""
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_path)
    except Exception:  # not downloaded, no network, an unknown architecture: vLLM will say more when it loads
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    found = [(int(getattr(text, key)), key) for key in LENGTH_KEYS if isinstance(getattr(text, key, None), int | float)]
    if not found:
        return None
    length, key = min(found)
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    if isinstance(rope, dict) and "gemma3" not in getattr(text, "model_type", ""):
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in PRESCALED_ROPE and rope.get("factor"):
            length, key = int(length * rope["factor"]), f"{key} x RoPE factor {rope['factor']}"
    tokenizer_limit = _tokenizer_max_length(model_path)
    if tokenizer_limit is not None and tokenizer_limit < length:
        length, key = tokenizer_limit, "model_max_length in tokenizer_config.json"
    return length, f"{key} in the model's config" if "tokenizer" not in key else key


def _tokenizer_max_length(model_path: str) -> int | None:
    path = Path(model_path) / "tokenizer_config.json"
    try:
        value = json.loads(path.read_text()).get("model_max_length")
    except (OSError, ValueError):
        return None
    return int(value) if isinstance(value, int | float) and value < 10**9 else None  # 1e30 means "no limit"


def fit_engine_length(context: tuple[int, str] | None, max_prompt_length: int, max_completion_length: int,
                      vllm_max_model_len: int | None) -> tuple[int, str | None]:
    """(the engine's max_model_len, a warning to print or None); UserInputError when no length is safe."""
    wanted = vllm_max_model_len or max_prompt_length + max_completion_length
    if context is None or wanted <= context[0]:
        return wanted, None
    limit, source = context
    if vllm_max_model_len:
        raise UserInputError(
            f"--vllm_max_model_len {vllm_max_model_len} is longer than the model's context of {limit} tokens "
            f"({source}); vLLM cannot run it. Set --vllm_max_model_len {limit} or less (or leave it out).")
    if max_prompt_length >= limit:
        half = limit // 2
        raise UserInputError(
            f"the model's context is {limit} tokens ({source}), but --max_prompt_length {max_prompt_length} lets a "
            f"prompt fill all of it, leaving vLLM no room for a completion (and --max_completion_length is "
            f"{max_completion_length}). Choose lengths that sum to at most {limit}, e.g. --max_prompt_length {half} "
            f"--max_completion_length {limit - half}.")
    return limit, (
        f"vLLM's context is cut to the model's {limit} tokens ({source}): --max_prompt_length {max_prompt_length} + "
        f"--max_completion_length {max_completion_length} = {wanted}, so completions of prompts longer than "
        f"{limit - max_completion_length} tokens stop early (cut by length). Make the two sum to at most {limit} to "
        "silence this.")

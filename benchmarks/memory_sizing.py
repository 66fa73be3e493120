"""GPU memory estimates for the paper-size runs (0.5B, 7B, 8B): training state, vLLM weights and KV cache.

Arithmetic, not a measurement (docs/scale_out.md shows it and labels it an estimate). Parameter counts and KV sizes
come from the models' published config.json (layers, hidden size, heads, vocabulary), written out below so nothing
is downloaded. Per parameter:
  student under mixed precision with fp32 master weights: 4 (weights) + 4 (gradients) + 8 (AdamW moments) = 16 bytes
  EMA teacher kept in float32: 4 bytes;          vLLM's copy in bf16: 2 bytes
KV cache per token: 2 (K and V) x layers x KV heads x head dim x 2 bytes (bf16).
Activations are not in the totals: with gradient checkpointing they are about tokens x hidden x 2 bytes x layers
for one micro-batch, printed separately.

  python benchmarks/memory_sizing.py            # CPU, instant
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9


@dataclass
class Shape:
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    qkv_bias: bool = False
    qk_norm: bool = False

    def parameters(self) -> int:
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        attention = self.hidden * q + 2 * self.hidden * kv + q * self.hidden
        attention += (q + 2 * kv) if self.qkv_bias else 0
        attention += 2 * self.head_dim if self.qk_norm else 0
        layer = attention + 3 * self.hidden * self.intermediate + 2 * self.hidden
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * layer + embeddings + self.hidden

    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * 2


MODELS = [
    Shape("Qwen2.5-0.5B-Instruct", 24, 896, 14, 2, 64, 4864, 151_936, tied=True, qkv_bias=True),
    Shape("Qwen2.5-7B-Instruct", 28, 3584, 28, 4, 128, 18_944, 152_064, tied=False, qkv_bias=True),
    Shape("Qwen3-8B", 36, 4096, 32, 8, 128, 12_288, 151_936, tied=False, qk_norm=True),
]
# Rollout shapes of the recipes: sequences per step and the longest sequence (prompt + completion).
WORKLOADS = {"SDFT recipes": (32, 1024 + 1024), "SDPO recipes": (32 * 8, 2048 + 8192)}


def main() -> None:
    print("model                    params  student 16B/p  teacher 4B/p  state/GPU zero3 x8  vLLM bf16  KV/token")
    for model in MODELS:
        p = model.parameters()
        state = 20 * p
        print(f"{model.name:<24} {p / 1e9:5.2f}B  {16 * p / GB:9.1f} GB  {4 * p / GB:9.1f} GB  "
              f"{state / 8 / GB:12.1f} GB  {2 * p / GB:6.1f} GB  {model.kv_bytes_per_token() / 1024:5.0f} KiB")
    print("\nKV cache to hold a whole step's rollouts at once (longest sequences):")
    for workload, (sequences, length) in WORKLOADS.items():
        tokens = sequences * length
        cells = "  ".join(f"{model.name.split('-')[1]} {tokens * model.kv_bytes_per_token() / GB:6.1f} GB"
                          for model in MODELS)
        print(f"  {workload:<13} {sequences:>3} x {length:>5} tokens = {tokens / 1e6:5.2f}M tokens:  {cells}")
    print("\nActivation checkpoints of one sequence (tokens x hidden x 2 B x layers), student forward with grad:")
    for model in MODELS:
        for workload, (_, length) in WORKLOADS.items():
            print(f"  {model.name:<24} {workload:<13} {length:>5} tokens: "
                  f"{length * model.hidden * 2 * model.layers / GB:5.2f} GB")


if __name__ == "__main__":
    main()

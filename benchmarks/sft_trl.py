"""The SFT baseline of the forgetting frontier: TRL's `SFTTrainer` on the SDFT data's demonstrations.

Plain supervised fine-tuning is the peer a user would pick instead of SDFT, and TRL is the well-kept library they
would pick it from. The settings mirror an SDFT run of `train_sdft.py` so that only the method differs: the same
model, rows (the student prompt as the conversation, the demonstration as the assistant's answer), optimizer steps,
prompts per step (one micro-batch, no accumulation), AdamW with weight decay 0 and gradient clipping 1.0, the
cosine schedule with 10% warmup, dtype and seed. The loss is on the completion only (TRL's default for
prompt-completion data). The order of the rows differs (the HF Trainer shuffles each epoch with the seed; SDFT draws
seeded per-epoch shuffles of its own), so each row is seen as often but not at the same steps.

    python benchmarks/sft_trl.py --learning_rate 3e-5 --output_dir outputs/sft_trl   # ~1 min on one CPU thread

Writes the trained model and tokenizer to OUTPUT_DIR/final (a folder `evaluate.py --model` reads) and TRL's log
history to OUTPUT_DIR/log_history.json. Needs trl==1.16.0 (the `bench` extra).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sdft_utils.cli import arg, parse_args  # noqa: E402
from sdft_utils.errors import UserInputError, exit_on_user_error  # noqa: E402


@dataclass
class Args:
    model: str | None = arg(None, "model folder; default: the embedded SmolLM2-135M-Instruct", "model")
    dataset: str = arg("data/sdft_facts/train.jsonl", "SDFT data: `prompt` and `demonstration` columns", "data")
    learning_rate: float = arg(3e-4, "AdamW learning rate", "optimization")
    max_steps: int = arg(40, "optimizer steps", "optimization")
    prompts_per_step: int = arg(8, "rows per optimizer step (one micro-batch)", "optimization")
    warmup_ratio: float = arg(0.1, "fraction of the steps with linear warmup", "optimization")
    lr_scheduler: str = arg("cosine", "learning-rate schedule", "optimization")
    max_length: int = arg(256, "prompt + completion tokens; longer rows are cut", "data")
    seed: int = arg(42, "seed of the row order and initialisation", "optimization")
    threads: int = arg(1, "torch CPU threads", "model")
    output_dir: str = arg("outputs/sft_trl", "OUTPUT_DIR/final gets the model", "outputs")


def sft_rows(path: str) -> list[dict]:
    """Prompt-completion conversations: the student's question and the demonstration as the answer."""
    from sdft_utils.data.prompts import to_messages
    from sdft_utils.data.tables import load_rows

    rows = load_rows(path)
    missing = [number for number, row in enumerate(rows, start=1) if not row.get("demonstration")]
    if missing:
        raise UserInputError(f"{path}: rows {missing[:5]} have no `demonstration`, the SFT target (1-based).")
    return [{"prompt": to_messages(row["prompt"]),
             "completion": [{"role": "assistant", "content": str(row["demonstration"])}]} for row in rows]


def train(args: Args) -> Path:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from sdft_utils.assets import embedded_model_path
    from sdft_utils.training.modeling import load_tokenizer

    torch.set_num_threads(args.threads)
    model_path = str(args.model or embedded_model_path())
    tokenizer = load_tokenizer(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    config = SFTConfig(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.prompts_per_step,
        gradient_accumulation_steps=1, learning_rate=args.learning_rate, lr_scheduler_type=args.lr_scheduler,
        warmup_steps=args.warmup_ratio, weight_decay=0.0, max_grad_norm=1.0, seed=args.seed,
        completion_only_loss=True, max_length=args.max_length, gradient_checkpointing=False,
        use_cpu=not torch.cuda.is_available(), bf16=False, save_strategy="no", report_to="none",
        logging_steps=1, dataloader_num_workers=0, disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(sft_rows(args.dataset)),
                         processing_class=tokenizer)
    trainer.train()
    final = Path(args.output_dir) / "final"
    trainer.save_model(str(final))
    tokenizer.save_pretrained(str(final))
    (Path(args.output_dir) / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
    return final


def main(argv: list[str] | None = None) -> None:
    args = parse_args(Args, argv, description=__doc__)
    if args.max_steps < 1 or args.prompts_per_step < 1:
        raise UserInputError("--max_steps and --prompts_per_step must be at least 1")
    print(f"model: {train(args)}")


if __name__ == "__main__":
    exit_on_user_error(main)

"""How good is SDFT's teacher on the bundled facts, and how often does the student already sample the answer?

SDFT rests on the in-context assumption: the model *with* the demonstration in its prompt answers well, so pulling
the student (prompt alone) toward it teaches the fact. This measures that assumption on `data/sdft_facts/train.jsonl`
for several teacher templates, and the student's own chance to hit the answer, which decides how much on-policy
signal there is at the answer tokens:
- greedy accuracy of the teacher (the answer keyword in its completion), and sampled accuracy at the training
  temperature (n samples per question), with the completion-token budget of training;
- how many sampled completions end within that budget (the rest are cut: the loss then sees a cut sentence);
- the same for the student with the question alone.

    python benchmarks/sdft_teacher.py                        # SmolLM2-135M-Instruct, ~2 CPU minutes
    python benchmarks/sdft_teacher.py --temperature 0.7 --max_new_tokens 32 --samples 8
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sdft_utils.data.prompts import AUTHORS_TEMPLATE  # noqa: E402

# The teacher prompts compared (the user turn; the system message of the chat template stays).
TEMPLATES = {
    "authors": AUTHORS_TEMPLATE,
    "embedded": ("{prompt}\n\nThis is an example for a response to the question:\n{demonstration}\n\n"
                 "Now answer with a response of your own."),  # recipes/sdft_embedded.yaml
    "fact_first": "{demonstration}\n\n{prompt}",
}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder; default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--dataset", default=str(ROOT / "data" / "sdft_facts" / "train.jsonl"))
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (training's)")
    parser.add_argument("--samples", type=int, default=4, help="sampled completions per question")
    parser.add_argument("--max_new_tokens", type=int, default=16, help="training's completion budget")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", help="also write the numbers as JSON here")
    return parser.parse_args(argv)


def measure(rollout, tokenizer, conversations: list[list[dict]], answers: list[list[str]], sampling,
            eos_ids: list[int], seed: int) -> dict[str, float]:
    from sdft_utils.data.prompts import tokenize_chat_prompts
    from sdft_utils.evaluation.suites import contains_answer

    prompt_ids, _ = tokenize_chat_prompts(tokenizer, conversations, 1024)
    rollouts = rollout.generate(prompt_ids, sampling, [seed + i for i in range(len(prompt_ids))])
    texts = tokenizer.batch_decode(rollouts.completion_ids, skip_special_tokens=True)
    n = sampling.num_samples
    correct = [contains_answer(text, answers[i // n]) for i, text in enumerate(texts)]
    ended = [bool(ids) and ids[-1] in eos_ids for ids in rollouts.completion_ids]
    return {"accuracy": sum(correct) / len(correct), "ended": sum(ended) / len(ended),
            "tokens": sum(map(len, rollouts.completion_ids)) / len(texts), "example": texts[0]}


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    import torch

    from sdft_utils.assets import embedded_model_path
    from sdft_utils.data.prompts import build_teacher_messages, to_messages
    from sdft_utils.data.tables import load_rows
    from sdft_utils.rollout.hf import HFRollout
    from sdft_utils.rollout.sampling import SamplingConfig
    from sdft_utils.training.modeling import load_model, load_tokenizer

    torch.set_num_threads(1)
    start = time.process_time()
    model_path = str(args.model or embedded_model_path())
    tokenizer, model = load_tokenizer(model_path), load_model(model_path, torch.float32).eval()
    configured = model.generation_config.eos_token_id  # chat models stop on several ids
    eos = sorted({tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])} - {None})
    rollout = HFRollout(model, tokenizer.pad_token_id, eos)
    rows = load_rows(args.dataset)
    answers = [row["answers"] for row in rows]
    students = [to_messages(row["prompt"]) for row in rows]
    greedy = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=0.0, logprobs=False)
    sampled = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                             num_samples=args.samples, logprobs=False)
    who = {"student (question alone)": students}
    who.update({f"teacher, {name} template": [build_teacher_messages(s, row["demonstration"], template)
                                              for s, row in zip(students, rows, strict=True)]
                for name, template in TEMPLATES.items()})
    results = {}
    print(f"{len(rows)} questions, {args.max_new_tokens} new tokens, sampled at T={args.temperature} "
          f"({args.samples} per question)\n")
    print(f"{'prompt':34} {'greedy acc':>10} {'sampled acc':>11} {'ended':>6} {'tokens':>6}  greedy example")
    for name, conversations in who.items():
        g = measure(rollout, tokenizer, conversations, answers, greedy, eos, args.seed)
        s = measure(rollout, tokenizer, conversations, answers, sampled, eos, args.seed)
        results[name] = {"greedy": g, "sampled": s}
        print(f"{name:34} {g['accuracy']:10.3f} {s['accuracy']:11.3f} {s['ended']:6.2f} {s['tokens']:6.1f}  "
              f"{g['example'][:60]!r}")
    print(f"\n{time.process_time() - start:.0f} CPU seconds")
    if args.output:
        Path(args.output).write_text(json.dumps({"settings": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()

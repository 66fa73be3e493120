"""Multiple choice by log-likelihood: padded batches score like one sequence at a time, and the best option wins."""

import pytest
import torch

from sdft_utils.errors import UserInputError
from sdft_utils.evaluation.likelihood import (
    CONTEXT_TEMPLATE,
    likelihood_choices,
    option_sequences,
    sequence_logprobs,
)
from sdft_utils.evaluation.report import run_likelihood_benchmark
from sdft_utils.evaluation.suites import mcq_task
from sdft_utils.rollout.hf import HFRollout
from sdft_utils.testing import tiny_llama


@pytest.fixture(scope="module")
def model():
    return tiny_llama().eval()


def one_by_one(model, sequence: list[int], scored: int) -> float:
    """log p of the last `scored` tokens from an unpadded forward, written out step by step."""
    with torch.no_grad():
        logprobs = model(input_ids=torch.tensor([sequence])).logits[0].double().log_softmax(-1)
    return sum(logprobs[position - 1, sequence[position]].item()
               for position in range(len(sequence) - scored, len(sequence)))


def test_padded_batches_score_each_sequence_as_alone(model):
    sequences = [[5, 6, 7, 8, 9], [5, 6, 10], [11, 12, 13, 14, 15, 16, 17], [20, 21]]
    scored = [2, 1, 4, 1]
    batched = sequence_logprobs(model, sequences, scored, pad_id=0, batch_size=3)  # two batches, padding inside
    expected = [one_by_one(model, s, n) for s, n in zip(sequences, scored, strict=True)]
    assert batched == pytest.approx(expected, abs=1e-4)


def test_each_option_is_read_after_the_question(tokenizer):
    task = mcq_task("Which is a gas?", ["iron", "oxygen"], 1)
    sequences, counts = option_sequences(tokenizer, task)
    context = tokenizer(CONTEXT_TEMPLATE.format(question="Which is a gas?"), add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(context) == "Question: Which is a gas?\nAnswer:"
    for sequence, count, option in zip(sequences, counts, ["iron", "oxygen"], strict=True):
        assert sequence[:len(context)] == context and tokenizer.decode(sequence[-count:]) == " " + option


def test_the_most_likely_option_is_chosen(model, tokenizer):
    tasks = [mcq_task(f"Question {i}?", ["aa", "bbbb", "c", "dd d"], i % 4) for i in range(5)]
    choices = likelihood_choices(model, tokenizer, tasks, batch_size=7)  # batches cut across questions
    for task, choice in zip(tasks, choices, strict=True):
        sequences, counts = option_sequences(tokenizer, task)
        totals = [one_by_one(model, s, n) for s, n in zip(sequences, counts, strict=True)]
        assert choice == max(range(4), key=totals.__getitem__)


def test_likelihood_benchmark_counts_the_choice_for_every_sample(model, tokenizer):
    tasks = [mcq_task(f"Question {i}?", ["aa", "bbbb", "c"], i % 3) for i in range(4)]
    engine = HFRollout(model, tokenizer.pad_token_id, [tokenizer.eos_token_id])
    correct, texts = run_likelihood_benchmark(engine, tokenizer, tasks, num_samples=3)
    choices = likelihood_choices(model, tokenizer, tasks)
    assert correct == [[choice == i % 3] * 3 for i, choice in enumerate(choices)]
    assert texts[0][0] == f"{'ABC'[choices[0]]}. {tasks[0].row['choices'][choices[0]]}"
    with pytest.raises(UserInputError, match="--rollout hf"):
        run_likelihood_benchmark(object(), tokenizer, tasks, num_samples=1)

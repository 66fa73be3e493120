"""What SDPO's self-distillation adds on a small model: the hybrid weight lambda swept from pure SDPO to pure GRPO.

`train_sdpo.py --grpo_lambda L` trains on L * (clipped GRPO, advantage r - group mean) + (1 - L) * (SDPO's
distillation toward the reprompted teacher), the paper's Eq. 3: L = 0 is pure SDPO (the release), L = 1 pure GRPO,
and the paper recommends L = 0.9 for small models (Fig. 11). This runs L in {0, 0.5, 0.9, 1} x seeds on the bundled
one-digit sums (`data/sdpo_sums/`) with everything else fixed (`SDPO_FLAGS` below, the only place the training
flags are set), then evaluates each final model with `evaluate.py` by the paper's validation protocol: n samples
per held-out question at temperature 0.6, top-p 0.95, accuracy averaged over them (avg@n), plus pass@n.
From each run's metrics.jsonl it also reads, per step, the training success rate (the fraction of rollouts whose
reward is >= 0.5) and the fraction of rollouts that got a teacher (a sibling's success in the reprompt; the rest
are masked out of SDPO's loss). The sums ask for "just the number", so rewards and evaluation use the lenient
math rule (the last number); the release's rule needs a \\boxed{} answer.

Output: OUTPUT_DIR/lambda<L>_seed<S>/ (metrics.jsonl, eval/report.json; checkpoints are deleted after their
evaluation), OUTPUT_DIR/sdpo_lambda.png (success by step, teacher fraction by step, held-out avg@n per lambda),
OUTPUT_DIR/sdpo_lambda.json and a printed table; `--results_md benchmarks/RESULTS.md` also writes the table between
this script's markers there. Runs whose record exists are skipped, so an interrupted sweep resumes.

    python benchmarks/sdpo_lambda.py --results_md benchmarks/RESULTS.md   # the full sweep (hours on a CPU)
    python benchmarks/sdpo_lambda.py --smoke                               # a tiny random model, one run
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

DATA = ROOT / "data" / "sdpo_sums"
# ---------------------------------------------------------------------------------------------------- the experiment
# The embedded SDPO recipe (lr 5e-5, EMA 0.05, no environment feedback, JSD on the top-100 + tail), smaller: 4
# questions x 8 rollouts per step, 16 new tokens, 8 steps. Today's train_sdpo.py flag names; --grpo_lambda and
# --seed are added per run. The sums ask for "just the number", hence the lenient math rule (the last number).
SDPO_FLAGS = {
    "dataset": str(DATA / "train.jsonl"),
    "verifier": "math",
    "lenient_grading": True,
    "include_environment_feedback": False,
    "learning_rate": 5e-5,
    "warmup_steps": 0,
    "teacher_update_rate": 0.05,
    "prompts_per_step": 4,
    "num_generations": 8,
    "per_device_batch_size": 16,
    "max_completion_length": 16,
    "max_prompt_length": 256,
    "max_reprompt_length": 512,
    "max_steps": 8,
    "gradient_checkpointing": False,
    "save_steps": 100_000,  # only the final checkpoint
    "save_total_limit": 1,
}
LAMBDAS = [0.0, 0.5, 0.9, 1.0]
# One setting changed (--variant NAME), to find out why a lambda does what it does.
SDPO_VARIANTS = {
    "lr_1e-5": {"learning_rate": 1e-5},  # the paper's Section 3 rate: is the collapse the step size or the target?
}
SEEDS = [42, 7]
EVAL_SAMPLES = 4  # the paper: 16 (Section 3) or 4 (Section 4) samples per question
EVAL_FLAGS = {"temperature": 0.6, "top_p": 0.95, "num_samples": EVAL_SAMPLES, "max_new_tokens": 16,
              "grading": "lenient", "seed": 0}
HELDOUT = str(DATA / "heldout.jsonl")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/sdpo_lambda", help="one folder per run, the PNG, the JSON")
    parser.add_argument("--lambdas", nargs="+", type=float, default=LAMBDAS, help="values of --grpo_lambda")
    parser.add_argument("--seeds", nargs="+", type=int, default=SEEDS, help="compare means over seeds")
    parser.add_argument("--variant", choices=sorted(SDPO_VARIANTS), help="change one setting (SDPO_VARIANTS)")
    parser.add_argument("--model", help="model folder; default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--results_md", help="also write the table into this Markdown file, between the markers")
    parser.add_argument("--figure", help="also copy the PNG here (the Markdown links this copy), e.g. "
                                         "benchmarks/figures/sdpo_lambda.png")
    parser.add_argument("--keep_checkpoints", action="store_true", help="keep each run's model after evaluation")
    parser.add_argument("--smoke", action="store_true", help="a tiny random model, one lambda and seed, one step: "
                                                             "checks the pipeline, measures nothing")
    return parser.parse_args(argv)




def run_name(grpo_lambda: float, seed: int, variant: str | None = None) -> str:
    return f"lambda{grpo_lambda:g}{'+' + variant if variant else ''}_seed{seed}"




def eval_command(model_dir: Path, out_dir: Path, smoke: bool) -> list[str]:
    flags = {**EVAL_FLAGS, "output_dir": out_dir, **({"limit": 2, "max_new_tokens": 4} if smoke else {})}
    return [sys.executable, str(ROOT / "evaluate.py"), "--model", str(model_dir), "--tasks", HELDOUT,
            "--pass_k", "1", str(flags["num_samples"]), *as_flags(flags)]


def heldout_scores(report_path: Path) -> dict[str, float]:
    (model,) = json.loads(report_path.read_text())["models"].values()
    (scores,) = model["benchmarks"].values()
    return {"avg": scores["accuracy"], "pass": scores[f"pass@{EVAL_SAMPLES}"]} if f"pass@{EVAL_SAMPLES}" in scores \
        else {"avg": scores["accuracy"], "pass": scores["accuracy"]}


def per_step(train_dir: Path) -> dict[str, list[float]]:
    rows = [json.loads(line) for line in (train_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = sorted((row for row in rows if "loss" in row), key=lambda row: row["step"])
    return {"success": [row["reward/mean"] for row in rows],
            "teacher": [row["reprompt/reprompt_sample_fraction"] for row in rows],
            "completion_length": [row["completion_length"] for row in rows]}


def evaluate_run(grpo_lambda: float, seed: int, args: argparse.Namespace, output_dir: Path) -> dict:
    run_dir = output_dir / run_name(grpo_lambda, seed, args.variant)

    def run() -> dict:
        flags = {**SDPO_FLAGS, **SDPO_VARIANTS.get(args.variant, {}), "grpo_lambda": grpo_lambda, "seed": seed,
                 "output_dir": run_dir / "train", **({"model": args.model} if args.model else {})}
        if args.smoke:
            flags.update(max_steps=1, prompts_per_step=2, num_generations=2, per_device_batch_size=4,
                         max_completion_length=4, top_k=5)
        model_dir = run_dir / "train" / f"checkpoint-{flags['max_steps']}"
        costs = train_then_evaluate([sys.executable, str(ROOT / "train_sdpo.py"), *as_flags(flags)], model_dir,
                                    eval_command(model_dir, run_dir / "eval", args.smoke), run_dir,
                                    args.keep_checkpoints)
        return {"grpo_lambda": grpo_lambda, "variant": args.variant, "seed": seed,
                "heldout": heldout_scores(run_dir / "eval" / "report.json"), "steps": per_step(run_dir / "train"),
                **costs}

    return record_once(run_dir / "record.json", run)


def evaluate_base(args: argparse.Namespace, output_dir: Path) -> dict:
    from sdft_utils.assets import embedded_model_path

    def run() -> dict:
        model = Path(args.model or embedded_model_path())
        cpu = run_logged(eval_command(model, output_dir / "base" / "eval", args.smoke),
                         output_dir / "base" / "eval.log")
        return {"heldout": heldout_scores(output_dir / "base" / "eval" / "report.json"), "eval_cpu_s": round(cpu, 1)}

    return record_once(output_dir / "base" / "record.json", run)


def summarize(records: list[dict]) -> list[dict]:
    rows = []
    keys = sorted({(record.get("variant") or "", record["grpo_lambda"]) for record in records})
    for variant, grpo_lambda in keys:
        runs = [record for record in records
                if record["grpo_lambda"] == grpo_lambda and (record.get("variant") or "") == variant]
        avg = [run["heldout"]["avg"] for run in runs]
        steps = min(len(run["steps"]["success"]) for run in runs)
        rows.append({
            "grpo_lambda": grpo_lambda, "variant": variant or None, "seeds": [run["seed"] for run in runs],
            "heldout_avg": statistics.mean(avg), "heldout_range": [min(avg), max(avg)],
            "heldout_pass": statistics.mean(run["heldout"]["pass"] for run in runs),
            "success_by_step": [statistics.mean(run["steps"]["success"][i] for run in runs) for i in range(steps)],
            "teacher_by_step": [statistics.mean(run["steps"]["teacher"][i] for run in runs) for i in range(steps)],
            "completion_length": statistics.mean(run["steps"]["completion_length"][-1] for run in runs),
            "train_cpu_s": statistics.mean(run["train_cpu_s"] for run in runs)})
    return rows


def markdown(rows: list[dict], base: dict) -> str:
    header = ["lambda", "what it is", "seeds", f"held-out avg@{EVAL_SAMPLES}", f"pass@{EVAL_SAMPLES}",
              "train success, first -> last step", "rollouts with a teacher (mean over steps)",
              "final completion tokens", "train CPU s/run"]
    names = {0.0: "pure SDPO", 1.0: "pure GRPO"}
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
             f"| base | - | - | {base['heldout']['avg']:.3f} | {base['heldout']['pass']:.3f} | - | - | - | - |"]
    for row in rows:
        success = row["success_by_step"]
        what = names.get(row["grpo_lambda"], "hybrid") + (f", {row['variant']}" if row.get("variant") else "")
        lines.append(
            f"| {row['grpo_lambda']:g} | {what} | {len(row['seeds'])} | "
            f"{row['heldout_avg']:.3f} ({row['heldout_range'][0]:.3f}-{row['heldout_range'][1]:.3f}) | "
            f"{row['heldout_pass']:.3f} | {success[0]:.3f} -> {success[-1]:.3f} | "
            f"{statistics.mean(row['teacher_by_step']):.3f} | {row['completion_length']:.1f} | "
            f"{row['train_cpu_s']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], records: list[dict], base: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (success_axes, teacher_axes, heldout_axes) = plt.subplots(1, 3, figsize=(14, 4.2))
    colours = plt.get_cmap("viridis")
    main = [row for row in rows if not row.get("variant")]
    for index, row in enumerate(rows):
        variant = row.get("variant")  # variants: dashed, coloured like the lambda they change
        same = [r for r in main if r["grpo_lambda"] == row["grpo_lambda"]]
        colour = colours((main.index(same[0]) if same else index) / max(len(main) - 1, 1))
        steps = range(1, len(row["success_by_step"]) + 1)
        label = f"lambda {row['grpo_lambda']:g}" + (f", {variant}" if variant else "")
        style = dict(marker="o", color=colour, label=label, linestyle="--" if variant else "-")
        success_axes.plot(steps, row["success_by_step"], **style)
        teacher_axes.plot(steps, row["teacher_by_step"], **style)
        heldout_axes.bar(index, row["heldout_avg"], color=colour, alpha=0.4 if variant else 0.7,
                         hatch="//" if variant else None)
        runs = [record["heldout"]["avg"] for record in records if record["grpo_lambda"] == row["grpo_lambda"]
                and record.get("variant") == variant]
        heldout_axes.scatter([index] * len(runs), runs, color="black", s=14, zorder=3)
    heldout_axes.axhline(base["heldout"]["avg"], color="grey", linestyle="--", label="base model")
    heldout_axes.set_xticks(range(len(rows)), [f"{row['grpo_lambda']:g}" + ("\n" + row["variant"] if row.get("variant")
                                                                           else "") for row in rows], fontsize=8)
    success_axes.set(title="training success (seed mean)", xlabel="step", ylabel="rollouts with reward >= 0.5")
    teacher_axes.set(title="rollouts that got a teacher", xlabel="step", ylabel="fraction (rest: masked)")
    heldout_axes.set(title=f"held-out avg@{EVAL_SAMPLES} (T 0.6, top-p 0.95)", xlabel="grpo_lambda (0 = pure SDPO)",
                     ylabel="success")
    success_axes.legend(fontsize=8)
    heldout_axes.legend()
    for axes in (success_axes, teacher_axes, heldout_axes):
        axes.grid(alpha=0.3)
    figure.suptitle("SDPO hybrid weight on one-digit sums, SmolLM2-135M-Instruct (dots: seeds)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if not args.lambdas or not args.seeds:
        raise UserInputError("--lambdas and --seeds each need at least one value")
    if any(not 0 <= value <= 1 for value in args.lambdas):
        raise UserInputError(f"--lambdas must lie in [0, 1], got {args.lambdas}")
    if args.smoke:
        from sdft_utils.testing import save_tiny_model

        args.lambdas, args.seeds, args.results_md = args.lambdas[:1], args.seeds[:1], None
        args.output_dir = tempfile.mkdtemp(prefix="sdpo_lambda_smoke_")
        args.model = str(save_tiny_model(Path(args.output_dir) / "tiny_model"))
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    base = evaluate_base(args, output_dir)
    records = []
    for seed in args.seeds:  # seed-major: after the first pass every lambda has one run
        for grpo_lambda in args.lambdas:
            record = evaluate_run(grpo_lambda, seed, args, output_dir)
            records.append(record)
            print(f"{run_name(grpo_lambda, seed, args.variant)}: held-out avg@{EVAL_SAMPLES} {record['heldout']['avg']:.3f}, "
                  f"train success {record['steps']['success'][0]:.2f} -> {record['steps']['success'][-1]:.2f} "
                  f"(train {record['train_cpu_s']:.0f} CPU s)", flush=True)
    records = recorded_runs(output_dir)
    rows = summarize(records)
    table = markdown(rows, base)
    png = output_dir / "sdpo_lambda.png"
    plot(rows, records, base, png)
    (output_dir / "sdpo_lambda.json").write_text(json.dumps({"base": base, "rows": rows, "runs": records}, indent=1))
    publish("sdpo_lambda", table, png, records, base, args, argv, start,
            title="SDPO's hybrid weight lambda (`benchmarks/sdpo_lambda.py`)",
            note="Seed means, the seeds' range in brackets.", caption="SDPO lambda sweep")
    if args.smoke:
        shutil.rmtree(output_dir, ignore_errors=True)


if __name__ == "__main__":
    exit_on_user_error(main)

"""Training curves as a PNG, from a run's metrics.jsonl (SDFT or SDPO).

One panel per group of metrics that the run logged (panels of metrics it never logged are left out): loss,
divergence/KL, entropy, importance-sampling ratios, reward and success (SDPO), evaluation accuracy or success,
learning rate, gradient norm, completion length. matplotlib with the Agg backend (no display needed).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from sdft_utils.errors import UserInputError

PLOT_FILE = "training_curves.png"
MATPLOTLIB_INSTALL = "pip install matplotlib"

# (panel title, metric keys; a key ending in "/" takes every metric with that prefix)
PANELS: list[tuple[str, list[str]]] = [
    ("loss", ["loss"]),
    ("divergence / KL", ["kl", "kl_approx", "distill/divergence", "distill/kl_approx"]),
    ("entropy", ["entropy"]),
    ("importance ratios", ["is_ratio_min", "is_ratio_mean", "is_ratio_max", "is_clipped_fraction", "is/policy_mean",
                           "is/rollout_mean"]),
    ("reward / success", ["reward/mean", "reprompt/success_sample_fraction", "reprompt/success_group_fraction",
                          "reprompt/reprompt_sample_fraction"]),
    ("evaluation", ["eval/"]),
    ("learning rate", ["learning_rate"]),
    ("grad norm", ["grad_norm"]),
    ("completion length", ["completion_length"]),
]


def read_metrics(path: str | Path) -> list[dict]:
    """The lines of a metrics.jsonl (or of RUN_DIR/metrics.jsonl); a clear error when it is missing or broken."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise UserInputError(f"--plot {path}: no such file. Pass a run's output folder or its metrics.jsonl.")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise UserInputError(f"{path}: line {number} is not JSON.") from None
    return rows


def metric_series(rows: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """metric -> (steps, values), finite numbers only (several lines may share a step: training and evaluation)."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for row in rows:
        step = row.get("step")
        for key, value in row.items():
            if key == "step" or step is None or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if math.isfinite(value):
                steps, values = series.setdefault(key, ([], []))
                steps.append(step)
                values.append(float(value))
    return series


def panel_contents(series: dict[str, tuple[list[int], list[float]]]) -> list[tuple[str, list[str]]]:
    """The panels this run can fill, each with the metrics it draws."""
    panels = []
    for title, keys in PANELS:
        drawn = [name for key in keys for name in sorted(series)
                 if (name.startswith(key) if key.endswith("/") else name == key)]
        if drawn:
            panels.append((title, drawn))
    return panels


def plot_training_curves(metrics_path: str | Path, output: str | Path | None = None) -> tuple[Path, list[str]]:
    """Write the PNG (default: training_curves.png beside metrics.jsonl); returns its path and the panel titles."""
    try:
        import matplotlib
    except ImportError:
        raise UserInputError(f"plots need matplotlib: {MATPLOTLIB_INSTALL}") from None
    matplotlib.use("Agg")  # files only: works on a headless node
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    metrics_path = Path(metrics_path)
    series = metric_series(read_metrics(metrics_path))
    panels = panel_contents(series)
    if not panels:
        raise UserInputError(f"{metrics_path}: no metrics to plot yet.")
    run_dir = metrics_path if metrics_path.is_dir() else metrics_path.parent
    output = Path(output) if output is not None else run_dir / PLOT_FILE
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.4 * rows), squeeze=False)
    for axis, (title, names) in zip(axes.flat, panels, strict=False):
        for name in names:
            steps, values = series[name]
            # evaluations are sparse (every N steps): markers make single points visible
            axis.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=name)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
        if len(names) > 1 or title == "evaluation":  # evaluation curves are named by their data set
            axis.legend(fontsize=7)
    for axis in list(axes.flat)[len(panels):]:
        axis.remove()
    figure.suptitle(run_dir.name)
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=100)
    titles = [axis.get_title() for axis in figure.axes]
    plt.close(figure)
    return output, titles


def plot_after_training(metrics_path: str | Path, print_fn=print) -> Path | None:
    """End of a training run: write the curves, but never fail the run over a plot (matplotlib missing, etc.)."""
    try:
        path, _ = plot_training_curves(metrics_path)
    except UserInputError as error:
        print_fn(f"note: no training-curve plot ({error})")
        return None
    return path

"""Training-curve PNGs from metrics.jsonl: a valid PNG with one panel per group of metrics the run logged."""

import builtins
import json

import pytest

from sdft_utils.errors import UserInputError
from sdft_utils.training.plots import PLOT_FILE, plot_after_training, plot_training_curves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

SDFT_LINE = {"loss": 0.5, "kl": 0.5, "kl_approx": 0.4, "entropy": 2.0, "completion_length": 12.0,
             "is_ratio_min": 1.0, "is_ratio_mean": 1.0, "is_ratio_max": 1.0, "is_clipped_fraction": 0.0,
             "truncated_prompts": 0.0, "learning_rate": 1e-5, "grad_norm": 0.7, "tokens_per_second": 9.0,
             "step_seconds": 1.0, "weight_sync_logprob_diff": None, "epoch": 0.5}
SDPO_LINE = {"loss": 0.1, "distill/divergence": 0.1, "distill/kl_approx": 0.1, "entropy": 1.0, "reward/mean": 0.3,
             "reprompt/success_group_fraction": 0.5, "reprompt/success_sample_fraction": 0.3,
             "reprompt/reprompt_sample_fraction": 0.6, "is/policy_mean": 1.0, "is/rollout_mean": 1.0,
             "completion_length": 8.0, "learning_rate": 1e-5, "grad_norm": None, "step_seconds": 2.0}


def write_run(path, lines):
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_sdft_run_gives_a_png_with_its_panels(tmp_path):
    run = write_run(tmp_path / "sdft", [{"step": 0, "eval/heldout_accuracy": 0.1},
                                        *({"step": s, **SDFT_LINE} for s in (1, 2, 3)),
                                        {"step": 3, "eval/heldout_accuracy": 0.4, "eval/known_accuracy": 0.9}])
    path, titles = plot_training_curves(run)
    assert path == run / PLOT_FILE and path.read_bytes()[:8] == PNG_MAGIC
    assert titles == ["loss", "divergence / KL", "entropy", "importance ratios", "evaluation", "learning rate",
                      "grad norm", "completion length"]


def test_sdpo_run_adds_reward_and_leaves_out_what_it_never_logged(tmp_path):
    run = write_run(tmp_path / "sdpo", [{"step": s, **SDPO_LINE} for s in (1, 2)])
    path, titles = plot_training_curves(run / "metrics.jsonl", tmp_path / "figures" / "curves.png")
    assert path.read_bytes()[:8] == PNG_MAGIC
    # grad_norm is only ever null here, and there is no evaluation: no panels for them
    assert titles == ["loss", "divergence / KL", "entropy", "importance ratios", "reward / success",
                      "learning rate", "completion length"]


def test_missing_or_broken_metrics_are_user_errors(tmp_path):
    with pytest.raises(UserInputError, match="no such file"):
        plot_training_curves(tmp_path / "nowhere")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1}\n{broken\n')
    with pytest.raises(UserInputError, match="line 2 is not JSON"):
        plot_training_curves(tmp_path)


def test_a_run_never_fails_over_a_missing_matplotlib(tmp_path, monkeypatch):
    run = write_run(tmp_path / "run", [{"step": 1, "loss": 1.0}])
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(UserInputError, match="pip install matplotlib"):
        plot_training_curves(run)
    notes = []
    assert plot_after_training(run / "metrics.jsonl", notes.append) is None
    assert "pip install matplotlib" in notes[0] and not (run / PLOT_FILE).exists()

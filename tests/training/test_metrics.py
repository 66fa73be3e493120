import json

import pytest
from accelerate import Accelerator

from sdft_utils.errors import UserInputError
from sdft_utils.training.metrics import MetricsLog, tracker_for


def test_metrics_are_appended_as_json_lines_with_non_finite_values_as_null(tmp_path):
    log = MetricsLog(Accelerator(cpu=True), tmp_path)
    log.log({"loss": 0.5, "grad_norm": float("nan")}, step=1)
    log.log({"loss": 0.25, "grad_norm": 1.0}, step=2)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": 1, "loss": 0.5, "grad_norm": None}, {"step": 2, "loss": 0.25, "grad_norm": 1.0}]


def test_resume_drops_the_steps_after_the_checkpoint_and_a_new_run_starts_clean(tmp_path):
    log = MetricsLog(Accelerator(cpu=True), tmp_path)
    for step in (1, 2, 3):
        log.log({"loss": float(step)}, step=step)
    MetricsLog(Accelerator(cpu=True), tmp_path, resume_step=2)
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    MetricsLog(Accelerator(cpu=True), tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_missing_tracker_package_is_a_user_error(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(UserInputError, match="pip install tensorboard"):
        tracker_for("tensorboard")
    assert tracker_for("none") is None


def test_wandb_runs_offline_without_a_key(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: object())
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert tracker_for("wandb") == "sdft_wandb"  # our subclass of accelerate's tracker, registered by name
    import os

    assert os.environ["WANDB_MODE"] == "offline"
    monkeypatch.delenv("WANDB_MODE")

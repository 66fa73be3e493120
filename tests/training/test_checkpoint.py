import json

import pytest
import torch
from accelerate import Accelerator

from sdft_utils.errors import UserInputError
from sdft_utils.testing import byte_level_tokenizer, tiny_llama
from sdft_utils.training.checkpoint import (
    BestCheckpoint,
    choose_eval_metric,
    list_checkpoints,
    load_checkpoint,
    resolve_resume_path,
    save_checkpoint,
)


@pytest.fixture
def training(tmp_path):
    accelerator = Accelerator(cpu=True)
    model = tiny_llama()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model, optimizer, tmp_path


def take_a_step(model, optimizer):
    loss = model(torch.tensor([[1, 5, 6, 7]]), labels=torch.tensor([[1, 5, 6, 7]])).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def test_checkpoint_is_a_loadable_model_folder_and_restores_the_optimizer(training):
    accelerator, model, optimizer, tmp_path = training
    take_a_step(model, optimizer)
    path = save_checkpoint(accelerator, tmp_path, 1, model, byte_level_tokenizer(), {"step": 1}, keep_last=None)
    assert path.name == "checkpoint-1" and not (tmp_path / "checkpoint-1.tmp").exists()
    reloaded = type(model).from_pretrained(path)
    for (name, saved), (_, live) in zip(reloaded.state_dict().items(), model.state_dict().items(), strict=True):
        torch.testing.assert_close(saved, live, rtol=0, atol=0, msg=name)
    saved_state = {k: v.clone() for k, v in optimizer.state_dict()["state"][0].items()}
    take_a_step(model, optimizer)  # move away, then come back
    assert json.loads((path / "progress.json").read_text()) == load_checkpoint(accelerator, path) == {"step": 1}
    for key, value in optimizer.state_dict()["state"][0].items():
        torch.testing.assert_close(value, saved_state[key], rtol=0, atol=0)


def test_only_the_newest_checkpoints_are_kept_and_latest_resolves(training):
    accelerator, model, _, tmp_path = training
    for step in (1, 2, 3):
        save_checkpoint(accelerator, tmp_path, step, model, byte_level_tokenizer(), {"step": step}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    assert resolve_resume_path("latest", tmp_path).name == "checkpoint-3"


def test_an_interrupted_save_is_ignored_and_cleaned_up(training):
    accelerator, model, _, tmp_path = training
    save_checkpoint(accelerator, tmp_path, 1, model, byte_level_tokenizer(), {"step": 1}, keep_last=None)
    crashed = tmp_path / "checkpoint-2.tmp"
    crashed.mkdir()
    (crashed / "half_written.bin").write_bytes(b"\0" * 10)
    (tmp_path / "checkpoint-5").mkdir()  # no progress.json: never completed
    assert resolve_resume_path("latest", tmp_path).name == "checkpoint-1"
    save_checkpoint(accelerator, tmp_path, 2, model, byte_level_tokenizer(), {"step": 2}, keep_last=None)
    assert not crashed.exists() and resolve_resume_path("latest", tmp_path).name == "checkpoint-2"


def test_resume_errors_are_clear(tmp_path):
    with pytest.raises(UserInputError, match="no complete checkpoint"):
        resolve_resume_path("latest", tmp_path)
    with pytest.raises(UserInputError, match="not a complete checkpoint folder"):
        resolve_resume_path(str(tmp_path), tmp_path)
    assert resolve_resume_path(None, tmp_path) is None


def test_best_checkpoint_keeps_the_highest_value_and_the_earlier_of_ties():
    best = BestCheckpoint("eval/a_accuracy")
    assert best.state() is None and not best.update({}, 1)  # no evaluation this step
    assert best.update({"eval/a_accuracy": 0.25}, 2)
    assert not best.update({"eval/a_accuracy": 0.25}, 3)  # a tie keeps step 2
    assert best.update({"eval/a_accuracy": 0.5}, 4) and not best.update({"eval/a_accuracy": 0.1}, 5)
    assert best.state() == {"metric": "eval/a_accuracy", "value": 0.5, "step": 4}
    restored = BestCheckpoint("eval/a_accuracy")
    restored.restore({"step": 5, "best": best.state()})
    assert restored == best
    other_metric = BestCheckpoint("eval/b_accuracy")
    other_metric.restore({"step": 5, "best": best.state()})  # the run now selects on another metric: start over
    assert other_metric.state() is None


def test_pruning_keeps_the_best_checkpoint_and_best_points_at_it(training):
    accelerator, model, _, tmp_path = training
    best = BestCheckpoint("eval/a_accuracy")
    for step, accuracy in ((1, 0.2), (2, 0.6), (3, 0.4), (4, 0.5)):
        best.update({"eval/a_accuracy": accuracy}, step)
        save_checkpoint(accelerator, tmp_path, step, model, byte_level_tokenizer(), {"step": step, "best": best.state()},
                        keep_last=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-4"]
    assert (tmp_path / "best").resolve() == (tmp_path / "checkpoint-2").resolve()
    assert json.loads((tmp_path / "best.json").read_text()) == {
        "metric": "eval/a_accuracy", "value": 0.6, "step": 2, "checkpoint": "checkpoint-2"}
    assert type(model).from_pretrained(tmp_path / "best") is not None  # the pointer is a loadable model folder


@pytest.mark.parametrize("requested, every, expected", [
    (None, 0, None), (None, 2, "eval/a_accuracy"), ("eval/b_accuracy", 2, "eval/b_accuracy")])
def test_eval_metric_choice(requested, every, expected):
    assert choose_eval_metric(requested, ["eval/a_accuracy", "eval/b_accuracy"], every) == expected


def test_eval_metric_errors_name_the_flag():
    with pytest.raises(UserInputError, match="--eval_datasets"):
        choose_eval_metric(None, [], 5)
    with pytest.raises(UserInputError, match=r"--eval_metric eval/c.*eval/a_accuracy"):
        choose_eval_metric("eval/c", ["eval/a_accuracy"], 5)

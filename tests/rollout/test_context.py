"""The vLLM engine's length against the model's context: fitted where that is safe, a clear error where it is not."""

import json

import pytest

from sdft_utils.errors import UserInputError
from sdft_utils.rollout.context import fit_engine_length, model_context_length
from sdft_utils.testing import byte_level_tokenizer, tiny_llama


def saved_model(path, **config):
    model = tiny_llama()
    for key, value in config.items():
        setattr(model.config, key, value)
    model.save_pretrained(path)
    byte_level_tokenizer().save_pretrained(path)
    return path


def test_the_context_is_the_configs_length(tmp_path):
    assert model_context_length(str(saved_model(tmp_path / "m", max_position_embeddings=1024))) == (
        1024, "max_position_embeddings in the model's config")


def test_a_rope_factor_stretches_the_context_unless_already_applied(tmp_path):
    linear = saved_model(tmp_path / "linear", max_position_embeddings=1024,
                         rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0})
    yarn = saved_model(tmp_path / "yarn", max_position_embeddings=1024,
                       rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                        "original_max_position_embeddings": 256})
    assert model_context_length(str(linear))[0] == 4096
    assert model_context_length(str(yarn))[0] == 1024  # YaRN's max_position_embeddings is the scaled length


def test_a_shorter_tokenizer_limit_wins(tmp_path):
    path = saved_model(tmp_path / "m", max_position_embeddings=1024)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 512}))
    assert model_context_length(str(path)) == (512, "model_max_length in tokenizer_config.json")


def test_an_unreadable_model_is_left_to_vllm(tmp_path):
    assert model_context_length(str(tmp_path / "missing")) is None
    assert fit_engine_length(None, 1024, 1024, None) == (2048, None)


def test_lengths_that_fit_are_kept():
    assert fit_engine_length((4096, "k"), 1024, 1024, None) == (2048, None)
    assert fit_engine_length((4096, "k"), 1024, 1024, 3000) == (3000, None)


def test_the_engine_is_cut_to_the_context_when_a_full_prompt_still_leaves_room():
    length, warning = fit_engine_length((1024, "max_position_embeddings"), 512, 1000, None)
    assert length == 1024
    assert "--max_prompt_length 512 + --max_completion_length 1000 = 1512" in warning
    assert "prompts longer than 24 tokens stop early" in warning


def test_a_prompt_that_can_fill_the_context_stops_the_run_naming_the_flags():
    """The issue's case: the default 1,024 + 1,024 on a model with a 1,024-token context."""
    with pytest.raises(UserInputError) as error:
        fit_engine_length((1024, "max_position_embeddings in the model's config"), 1024, 1024, None)
    message = str(error.value)
    assert "context is 1024 tokens" in message and "--max_prompt_length 512 --max_completion_length 512" in message


def test_an_explicit_engine_length_beyond_the_context_is_refused():
    with pytest.raises(UserInputError, match="--vllm_max_model_len 4096 is longer than the model's context of 1024"):
        fit_engine_length((1024, "k"), 256, 256, 4096)

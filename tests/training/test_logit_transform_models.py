"""The loss's logits equal the Hugging Face models' own for architectures that post-process them: tiny offline Gemma-2
(final_logit_softcapping), Cohere (logit_scale) and Granite (logits_scaling) models built from a config; the transform
is read from the config once (`modeling.logit_transform`) and checked against one forward (`check_logit_transform`)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3Config,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
)

from sdft_utils.errors import UserInputError
from sdft_utils.losses.divergence import IDENTITY, LogitTransform, chunked_token_divergence
from sdft_utils.sdpo.policy_gradient import token_logprobs
from sdft_utils.training.modeling import (
    check_logit_transform,
    completion_hidden_states,
    logit_transform,
    output_head,
)

VOCAB, PROMPT, COMPLETION, TEMPERATURE = 96, 5, 9, 0.7
SHAPE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=1, head_dim=16, tie_word_embeddings=False)


def tiny(kind: str):
    torch.manual_seed(0)
    if kind == "gemma2":
        config = Gemma2Config(**SHAPE, final_logit_softcapping=3.0, sliding_window=16)
        model, expected = Gemma2ForCausalLM(config), LogitTransform(softcap=3.0)
    elif kind == "cohere":
        model, expected = CohereForCausalLM(CohereConfig(**SHAPE, logit_scale=0.125)), LogitTransform(scale=0.125)
    else:
        model, expected = GraniteForCausalLM(GraniteConfig(**SHAPE, logits_scaling=4.0)), LogitTransform(scale=0.25)
    with torch.no_grad():  # logits of a few units, so that the cap bends them and a scale moves them visibly
        model.get_output_embeddings().weight.mul_(60.0)
    return model.eval(), expected


@pytest.mark.parametrize("kind", ["gemma2", "cohere", "granite"])
def test_loss_logprobs_equal_the_hf_models_own(kind):
    model, expected = tiny(kind)
    transform = logit_transform(model.config)
    assert transform == expected
    assert check_logit_transform(model, transform) < 1e-4
    with pytest.raises(UserInputError, match="post-processes its logits"):
        check_logit_transform(model, IDENTITY)  # the loss without the transform would score another distribution

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, PROMPT + COMPLETION), generator=g)
    mask = torch.ones_like(ids)
    completion = ids[:, PROMPT:]
    with torch.no_grad():
        hf = (model(input_ids=ids).logits[:, PROMPT - 1:-1].float() / TEMPERATURE).log_softmax(-1)
    hf_token = hf.gather(-1, completion[..., None])[..., 0].flatten()
    hf_entropy = -(hf.exp() * hf).sum(-1).flatten()

    hidden = completion_hidden_states(model, ids, mask, COMPLETION).flatten(0, 1).detach()
    weight, bias = output_head(model)
    ours = chunked_token_divergence(hidden, weight, hidden, weight, completion.flatten(), student_head_bias=bias,
                                    teacher_head_bias=bias, temperature=TEMPERATURE, chunk_size=5,
                                    logit_transform=transform)
    torch.testing.assert_close(ours.student_logprobs, hf_token, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.teacher_logprobs, hf_token, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.student_entropy, hf_entropy, rtol=1e-5, atol=1e-5)
    grpo = token_logprobs(hidden, weight, bias, completion.flatten(), TEMPERATURE, 5, logit_transform=transform)
    torch.testing.assert_close(grpo, hf_token, rtol=1e-5, atol=1e-5)

    plain = chunked_token_divergence(hidden, weight, hidden, weight, completion.flatten(), temperature=TEMPERATURE)
    assert (plain.student_logprobs - hf_token).abs().max() > 0.05  # without the transform: visibly different

    # a bfloat16 model passes the check too (its head rounds its output), and still fails it without the transform
    model = model.to(torch.bfloat16)
    check_logit_transform(model, transform)
    with pytest.raises(UserInputError):
        check_logit_transform(model, IDENTITY)


def test_transform_is_read_through_text_configs_and_is_the_identity_elsewhere():
    gemma3 = Gemma3Config(text_config=dict(final_logit_softcapping=5.0, vocab_size=VOCAB))
    assert logit_transform(gemma3) == LogitTransform(softcap=5.0)
    assert logit_transform(LlamaConfig(vocab_size=VOCAB)) == IDENTITY
    assert logit_transform(Gemma2Config(vocab_size=VOCAB, final_logit_softcapping=None)) == IDENTITY

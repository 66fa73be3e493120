import torch

from sdft_utils.testing import tiny_llama
from sdft_utils.training.modeling import adamw


def test_adamw_is_fused_on_cpu_and_steps_like_the_reference_loop():
    model, reference_model = tiny_llama(seed=0), tiny_llama(seed=0)
    for frozen in (model.model.embed_tokens.weight, reference_model.model.embed_tokens.weight):
        frozen.requires_grad_(False)  # frozen parameters stay out of the optimizer (LoRA's base weights)
    optimizer = adamw(model, learning_rate=1e-2, weight_decay=0.1)
    reference = torch.optim.AdamW([p for p in reference_model.parameters() if p.requires_grad], lr=1e-2,
                                  weight_decay=0.1, foreach=False)
    assert optimizer.defaults["fused"]
    assert sum(len(group["params"]) for group in optimizer.param_groups) == len(list(model.parameters())) - 1
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    for net, opt in ((model, optimizer), (reference_model, reference)):
        for _ in range(2):
            net(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
    for got, expected in zip(model.parameters(), reference_model.parameters(), strict=True):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert not torch.equal(model.lm_head.weight, tiny_llama(seed=0).lm_head.weight)  # it did train


def test_padding_free_forward_gives_the_padded_forwards_states_and_gradients():
    from sdft_utils.training.batching import build_distill_batch
    from sdft_utils.training.modeling import completion_hidden_states, packs_sequences

    prompts = [[1, 80, 81, 82, 83, 84], [1, 90], [1, 60, 61, 62]]  # left padding of 0, 4 and 2 tokens
    completions = [[5, 6, 7], [8, 9, 10, 11, 12], [13]]  # right padding of 2, 0 and 4 tokens
    batch = build_distill_batch(prompts, prompts, completions, None, pad_token_id=2)
    results = []
    for pack in (False, True):
        model = tiny_llama(seed=0).double()  # float64: the two attention masks then agree to rounding
        hidden = completion_hidden_states(model, batch.student_input_ids, batch.student_attention_mask,
                                          batch.num_completion_tokens, pack=pack)
        mask = batch.completion_mask.bool()
        (hidden[mask].square().sum()).backward()
        grads = [param.grad for param in model.parameters() if param.grad is not None]
        results.append((hidden[mask].detach(), grads))
        if pack:  # row 2 has one completion token: its states 2..4 would come from padding, never computed
            assert (hidden[2, 2:] == 0).all() and (hidden[2, :2] != 0).any()
    (padded, padded_grads), (packed, packed_grads) = results
    torch.testing.assert_close(packed, padded, atol=1e-10, rtol=1e-10)
    assert len(packed_grads) == len(padded_grads) > 10  # every layer below the head
    for got, expected in zip(packed_grads, padded_grads, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
    model = tiny_llama()
    assert not packs_sequences(model)  # sdpa: a dense mask over the pack would cost more than the padding
    model.config._attn_implementation = "flash_attention_2"
    assert packs_sequences(model)

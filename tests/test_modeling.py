import torch

from sdft_utils.modeling import adamw
from sdft_utils.testing import tiny_llama


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

import torch

from sdft_utils.testing import tiny_llama
from sdft_utils.training.batching import build_distill_batch
from sdft_utils.training.modeling import completion_hidden_states, position_ids_from_mask


def test_student_and_teacher_share_one_right_aligned_completion_block():
    batch = build_distill_batch(student_prompts=[[10, 11], [12]], teacher_prompts=[[20, 21, 22, 23], [24, 25]],
                                completions=[[30, 31, 2], [32]], rollout_logprobs=[[-1.0, -2.0, -3.0], [-4.0]],
                                pad_token_id=0)
    assert batch.student_input_ids.tolist() == [[10, 11, 30, 31, 2], [0, 12, 32, 0, 0]]
    assert batch.teacher_input_ids.tolist() == [[20, 21, 22, 23, 30, 31, 2], [0, 0, 24, 25, 32, 0, 0]]
    assert batch.student_attention_mask.tolist() == [[1, 1, 1, 1, 1], [0, 1, 1, 0, 0]]
    assert batch.completion_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch.rollout_logprobs.tolist() == [[-1.0, -2.0, -3.0], [-4.0, 0.0, 0.0]]
    assert batch.num_completion_tokens == 3
    # positions restart after left padding; right padding (never attended) repeats the last one
    assert position_ids_from_mask(batch.student_attention_mask).tolist() == [[0, 1, 2, 3, 4], [0, 0, 1, 1, 1]]


def test_completion_hidden_states_predict_the_completion_tokens_whatever_the_padding():
    """Row 2 is row 1 with extra left padding: its hidden states at the completion positions must match."""
    model = tiny_llama()
    batch = build_distill_batch([[1, 40, 41, 42], [1, 40, 41, 42], [1, 50]], [[1]] * 3,
                                [[60, 61], [60, 61], [70, 71]], None, pad_token_id=2)
    wider = build_distill_batch([[1, 40, 41, 42], [9] * 6], [[1]] * 2, [[60, 61], [0]], None, pad_token_id=2)
    with torch.no_grad():
        hidden = completion_hidden_states(model, batch.student_input_ids, batch.student_attention_mask, 2)
        alone = completion_hidden_states(model, wider.student_input_ids, wider.student_attention_mask, 2)
        logits = model(batch.student_input_ids[:1]).logits[0, 3:5]  # positions that predict tokens 60, 61
    torch.testing.assert_close(hidden[0], hidden[1])
    torch.testing.assert_close(hidden[0], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.lm_head(hidden[0]), logits, atol=1e-5, rtol=1e-5)

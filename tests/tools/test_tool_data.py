"""Tool data through the SDFT and SDPO validators: tools, tool_calls without content, tool results, trajectories."""

import json

import pytest

from sdft_utils.data.sdft import load_sdft_dataset
from sdft_utils.errors import UserInputError
from sdft_utils.sdpo.reprompt import Reprompt, tokenize_reprompts
from sdft_utils.sdpo.tasks import load_sdpo_tasks
from sdft_utils.testing import byte_level_tokenizer
from sdft_utils.tools.render import ToolChat

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city.", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CALL = {"type": "function", "id": "c1", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
CONVERSATION = [  # OpenAI-shaped: the calling turn has no content at all, the arguments are JSON text
    {"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "c1", "content": "sunny"}, {"role": "assistant", "content": "Sunny."},
    {"role": "user", "content": "And tomorrow?"}]
TRAJECTORY = [{"role": "assistant", "content": None, "tool_calls": [CALL]},
              {"role": "tool", "content": "rain"}, {"role": "assistant", "content": "Rain tomorrow."}]


def write(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_sdft_rows_with_tools_tool_calls_and_a_trajectory_demonstration(tmp_path):
    rows = [{"prompt": CONVERSATION, "tools": TOOLS, "demonstration": TRAJECTORY},
            {"prompt": "Plain question", "demonstration": "Plain answer"}]
    example, plain = load_sdft_dataset(write(tmp_path / "t.jsonl", rows), teacher_template="{prompt}|{demonstration}")
    assert example.prompt[1] == {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}, "id": "c1"}]}
    assert example.prompt[2] == {"role": "tool", "content": "sunny", "tool_call_id": "c1"}
    assert example.tools == TOOLS and plain.tools is None and plain.demonstration_messages is None
    assert example.teacher_prompt[-1]["content"] == (
        'And tomorrow?|<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        "<tool_response>\nrain\n</tool_response>\nRain tomorrow.")
    (react,) = load_sdft_dataset(write(tmp_path / "r.jsonl", rows[:1]), teacher_template="{prompt}|{demonstration}",
                                 call_format="react")
    assert 'Action: get_weather\nAction Input: {"city": "Paris"}\nObservation: rain' in react.teacher_prompt[-1]["content"]


def test_sdft_tool_problems_are_reported_together_with_their_rows(tmp_path):
    rows = [
        {"prompt": "q", "tools": [{"function": {"name": "bad name!"}}], "demonstration": "d"},
        {"prompt": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]},
                    {"role": "user", "content": "q"}], "demonstration": "d"},
        {"prompt": "q", "demonstration": [{"role": "tool", "content": "x"}]},
        {"prompt": "q", "demonstration": "d", "environment": "no_colon"},
    ]
    with pytest.raises(UserInputError) as error:
        load_sdft_dataset(write(tmp_path / "t.jsonl", rows))
    message = str(error.value)
    assert message.splitlines()[0].endswith("4 problems in the data:")
    assert "column 'tools' must be a list of function schemas" in message and "line 1 has a list that" in message
    assert "line 2 has invalid tool calls (found: has a tool call (f) whose 'arguments' is not an object" in message
    assert "line 3 has a trajectory that starts with a 'tool' message" in message
    assert "column 'environment' must be 'module:attribute'" in message and "line 4" in message


def test_sdpo_rows_with_tool_messages_and_tool_columns(tmp_path):
    rows = [{"prompt": CONVERSATION, "tools": TOOLS, "answer": "4"},
            {"prompt": CONVERSATION, "tools": [{"name": 3}], "answer": "4"},
            {"prompt": [{"role": "tool", "tool_calls": [CALL], "content": "x"}], "answer": "4"}]
    with pytest.raises(UserInputError) as error:
        load_sdpo_tasks(write(tmp_path / "t.jsonl", rows))
    message = str(error.value)
    assert "column 'tools': expected a list of function schemas (it has a tool whose name 3 is not an identifier" \
        in message and "rows 2 " in message
    assert "has 'tool_calls' on a tool message" in message and "rows 3 " in message
    (task,) = load_sdpo_tasks(write(tmp_path / "ok.jsonl", rows[:1]))
    assert task.prompt[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}


def test_reprompts_show_the_tools_to_the_teacher():
    tokenizer = byte_level_tokenizer()
    chat = ToolChat.from_tokenizer(tokenizer, [2])
    prompt = [{"role": "user", "content": "Weather in Paris?"}]
    reprompt = Reprompt(prompt, None, "get_weather: unknown city")
    (with_tools,), _ = tokenize_reprompts(tokenizer, [prompt], [reprompt], 4096, chat=chat, tools=[TOOLS])
    (plain,), _ = tokenize_reprompts(tokenizer, [prompt], [reprompt], 4096)
    assert tokenizer.decode(with_tools) == chat.render(prompt, TOOLS) and "<tools>" not in tokenizer.decode(plain)

"""Tool data: function schemas (`tools`), assistant `tool_calls`, `tool` results; checked and brought into one shape.

The shapes are the ones transformers' `apply_chat_template(messages, tools=...)` takes (OpenAI's):
- a tool is `{"type": "function", "function": {"name", "description", "parameters": JSON schema}}`; the bare
  `{"name", "description", "parameters"}` form (OpenAI's older `functions`, BFCL's files) is accepted and wrapped;
- an assistant message may carry `tool_calls`, a list of `{"type": "function", "id"?, "function": {"name",
  "arguments"}}` whose `arguments` is an object or its JSON text; its `content` may then be empty, null or missing;
- a `{"role": "tool", "content": "...", "name"?, "tool_call_id"?}` message holds one call's result.

Each `*_problem` function returns None when the value is fine, else a short phrase saying what is wrong (the data
validators put it into their row-by-row report). The `normalize_*` functions assume a value passed its check.
"""

from __future__ import annotations

import json
import re
from typing import Any

NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,127}$")  # dots allowed: BFCL names functions like math.hypot
ROLES = ("system", "user", "assistant", "tool")


def _decoded(value: Any) -> Any:
    """A JSON text (as CSV cells and string columns store lists) decoded; anything else as it is."""
    if isinstance(value, str) and value.strip()[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


# ---------------------------------------------------------------------------------------------------- tools
def tool_problem(tool: Any) -> str | None:
    function = tool.get("function", tool) if isinstance(tool, dict) else None
    if not isinstance(function, dict):
        return f"has a tool that is not an object ({type(tool).__name__})"
    name = function.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        return f"has a tool whose name {name!r} is not an identifier (letters, digits, _ . -)"
    parameters = function.get("parameters")
    if parameters is not None:
        if not isinstance(parameters, dict):
            return f"has a tool ({name}) whose 'parameters' is not a JSON schema object"
        if not isinstance(parameters.get("properties", {}), dict):
            return f"has a tool ({name}) whose 'parameters.properties' is not an object"
        required = parameters.get("required", [])
        if not isinstance(required, list) or not all(isinstance(item, str) for item in required):
            return f"has a tool ({name}) whose 'parameters.required' is not a list of names"
    return None


def tools_problem(value: Any) -> str | None:
    """None for a valid `tools` cell: a non-empty list of tool schemas (or its JSON text)."""
    value = _decoded(value)
    if not isinstance(value, list) or not value:
        return "is not a non-empty list of function schemas"
    for tool in value:
        problem = tool_problem(tool)
        if problem:
            return problem
    names = [tool.get("function", tool)["name"] for tool in value]
    if len(set(names)) != len(names):
        return "names a function twice"
    return None


def normalize_tools(value: Any) -> list[dict]:
    """Tool schemas in the wrapped form `{"type": "function", "function": {...}}` (copies)."""
    tools = []
    for tool in _decoded(value):
        function = json.loads(json.dumps(tool.get("function", tool)))
        function.setdefault("parameters", {"type": "object", "properties": {}})
        tools.append({"type": "function", "function": function})
    return tools


def tool_names(tools: list[dict]) -> list[str]:
    return [tool["function"]["name"] for tool in tools]


# ---------------------------------------------------------------------------------------------------- messages
def _arguments(value: Any) -> dict | None:
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError:
            return None
    return value if isinstance(value, dict) else None


def tool_calls_problem(value: Any) -> str | None:
    if not isinstance(value, list):
        return "has 'tool_calls' that is not a list"
    for call in value:
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or \
                not NAME.match(function["name"]):
            return "has a tool call without a valid function name"
        if _arguments(function.get("arguments", {})) is None:
            return f"has a tool call ({function['name']}) whose 'arguments' is not an object or its JSON text"
        if "id" in call and call["id"] is not None and not isinstance(call["id"], str):
            return "has a tool call whose 'id' is not a string"
    return None


def message_problem(message: Any) -> str | None:
    """None for a valid chat message; tool messages and assistant tool calls included."""
    if not isinstance(message, dict):
        return f"has messages that are not objects ({type(message).__name__})"
    role = message.get("role")
    if role not in ROLES:
        return f"has messages with unknown roles ({role!r}; use {', '.join(ROLES)})"
    calls = message.get("tool_calls")
    if calls is not None:
        if role != "assistant":
            return f"has 'tool_calls' on a {role} message (only assistant messages call tools)"
        problem = tool_calls_problem(calls)
        if problem:
            return problem
    content = message.get("content")
    if calls:  # an assistant message that calls tools may have no text
        if content is not None and not isinstance(content, str):
            return "has messages whose content is not a string"
        return None
    if "content" not in message:
        return "has messages without a 'content' key"
    if not isinstance(content, str):
        return "has messages whose content is not a string"
    return None


def normalize_message(message: dict) -> dict:
    """A copy with `content` a string ("" when a tool-calling message has none), tool calls in the wrapped form
    with object arguments, and only the keys chat templates read (role, content, tool_calls, name, tool_call_id)."""
    normalized = {"role": message["role"], "content": message.get("content") or ""}
    if message.get("tool_calls"):
        normalized["tool_calls"] = [normalize_call(call) for call in message["tool_calls"]]
    for key in ("name", "tool_call_id"):
        if message.get(key) is not None:
            normalized[key] = message[key]
    return normalized


def normalize_call(call: dict) -> dict:
    function = call.get("function", call)
    normalized = {"type": "function", "function": {"name": function["name"],
                                                   "arguments": _arguments(function.get("arguments", {}))}}
    if call.get("id") is not None:
        normalized["id"] = call["id"]
    return normalized


def trajectory_problem(value: Any) -> str | None:
    """None for a valid demonstration trajectory: messages that start with an assistant turn (calls, tool results,
    later user turns, a final answer)."""
    if not isinstance(value, list) or not value or not all(isinstance(item, dict) for item in value):
        return "is not a non-empty list of messages"
    for message in value:
        problem = message_problem(message)
        if problem:
            return problem
    if value[0]["role"] != "assistant":
        return f"starts with a {value[0]['role']!r} message instead of the assistant's first turn"
    return None


def is_message_list(value: Any) -> bool:
    """True for a list of objects (chat messages); False for text and lists of strings (a JSON text stays text)."""
    return isinstance(value, list) and bool(value) and all(isinstance(item, dict) for item in value)

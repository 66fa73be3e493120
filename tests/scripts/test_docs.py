"""README.md and docs/*.md, checked the way a user reads and runs them.

Static checks: README.md has at most 250 lines and lists every page of docs/; every relative link resolves inside
the repository (anchors included); every repository path named in backticks exists (package-relative names such as
`training/run.py` are looked up under sdft_utils/; what a documented command writes, `outputs/...` and the data of
`data/prepare.py`, is allowed); no text file of the repository points outside it (a parent's shared folder, research
notes, absolute work paths, or a *.md file that is not in the repository); the README's example rows load through
the training scripts' own validators, and its BFCL row scores 1 under the leaderboard's checker with the
ground-truth calls (when bfcl-eval is installed).

Commands: every line of a ```bash block in README.md or docs/*.md is one shell command (a trailing backslash
continues it) that ends with `# CPU` (runs on a machine without a GPU) or `# GPU-only`; an unmarked command fails,
and so does a command that no rule below knows. Each command is exercised as far as a CPU can:

executed as written (in this process, or in a scratch folder or a copy of the repository, so the checkout is never
written to):
  - `python -m sdft_utils.cli docs/flags.md` (what it writes must equal docs/flags.md);
  - `--help` of the training scripts, `evaluate.py` and `data/prepare.py`;
  - `make TARGET`, as `make -n TARGET` (prints what it would run; installs nothing);
  - `DRY_RUN=1 bash slurm/...` in a copy of the repository, and `sbatch ...` under the fake Slurm of test_slurm.py
    with DRY_RUN=1; the command each node would run is then checked like a documented command;
  - `python evaluate.py --plot RUN` (from a scratch folder holding a copy of RUN/metrics.jsonl, or a stand-in when
    the run does not exist here);
  - `python benchmarks/memory_sizing.py`, `python -m sdft_utils.rollout.vllm_server ... --print_command`.
parsed only (these would train, download or evaluate for minutes to hours):
  - `python train_*.py ...`, `accelerate launch ...`, `torchrun ...`: the launcher's own parser (accelerate's,
    torchrun's), then the script's `parse_args`, `check()`, `require_dataset`, `MegatronBackend.check_args` for
    `--backend megatron`, and the split of a step over the launched processes; recipes, data sets, evaluation sets
    and reward files must exist, be written by `data/prepare.py`, or be one of the PLACEHOLDERS below; a
    `checkpoint-N` of a recipe's output folder must match the recipe's `max_steps`;
  - `python evaluate.py ...`: its `parse_args` and `check_args`; task files and benchmark names must exist;
  - other Python scripts (`data/prepare.py RECIPE`, `benchmarks/*.py`, the vLLM launcher): their own argparse parser,
    stopped right after it parsed;
  - `bash *.sh`: `bash -n` (and `gpu_check.sh`'s flags through `gpu_check.py`'s parser);
  - `pip install`: requirement files, extras and pins exist in this repository; `hf download`: the CLI exists;
    `python -m pytest`: the paths and markers exist.
For `# GPU-only` commands, problems that only say a GPU package is missing here (vLLM, flash-attn) are ignored.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fnmatch
import importlib.util
import io
import json
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from unittest import mock

import pytest
import yaml
from test_slurm import FAKE_SBATCH, FAKE_SCONTROL, FAKE_SRUN, RECORDER, repository_copy, write_programs

from sdft_utils.errors import UserInputError

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MAX_README_LINES = 250
MARKER = re.compile(r"^#\s*(CPU|GPU-only)\b")
# Names the documents use for the user's own files and folders (nothing to check beyond the flags).
PLACEHOLDERS = {"my_data.jsonl": "your SDFT rows", "my_questions.jsonl": "your SDPO rows",
                "my_rewards.py": "your reward function", "/shared/": "a folder on your cluster's shared file system"}
# Problems that only say this machine lacks a GPU package; ignored for `# GPU-only` commands.
MACHINE_DEPENDENT = ("needs vLLM", "needs the flash-attn package")
# Outside pointers, spelled in pieces so that this file does not match itself.
OUTSIDE = re.compile("|".join([r"\.\./" + "shared", r"(?<![\w.-])" + "research" + "/", r"(?<![\w.])/" + "work" + "/"]))
# *.md names that are not files of this repository on purpose: what evaluate.py writes.
MD_NAMES_ELSEWHERE = {"report.md"}
# File names quoted from other projects or written at run time, not files of this repository.
FOREIGN_FILES = {"main.py", "distil_trainer.py", "eval_tooluse.py", "sdpo.yaml", "user.yaml", "solution.py",
                 "report.md", "report.json", "completions.jsonl", "metrics.jsonl", "args.json", "progress.json",
                 "best.json", "training_curves.png", "generation_config.json", "adapter_config.json",
                 "adapter_model.safetensors", "model.safetensors", "rank0.pt", "dataset_info.json",
                 "bubblewrap.c", "train.jsonl", "eval.jsonl", "test.jsonl", "heldout.jsonl", "known.jsonl",
                 "tokenizer_config.json", "run_sdpo.sh", "run_sdpo_all.sh", "preprocess.py",
                 "file.py"}  # the last: --reward_fn's placeholder `file.py:function`
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".sh", ".sbatch", ".txt", ".toml", ".cff", ".cfg"}


# ---------------------------------------------------------------------------------------------------- reading docs
@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    info: str  # the fence's info string ("bash", "json sdft", "")
    lines: list[str]


@dataclass
class Command:
    path: Path
    line: int
    text: str  # without the marker comment
    marker: str  # "CPU" or "GPU-only"
    env: dict[str, str] = field(default_factory=dict)
    argv: list[str] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def gpu_only(self) -> bool:
        return self.marker == "GPU-only"


def blocks(path: Path) -> list[Block]:
    found, current = [], None
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fence = re.match(r"^\s*(```+|~~~+)\s*(.*)$", line)
        if current is None and fence:
            current = Block(path, number, fence.group(2).strip(), [])
        elif current is not None and fence and not fence.group(2):
            found.append(current)
            current = None
        elif current is not None:
            current.lines.append(line)
    assert current is None, f"{path}: a code block opened on line {current.line} is never closed"
    return found


def prose(path: Path) -> str:
    """The text outside code blocks."""
    text = path.read_text()
    return re.sub(r"^\s*```.*?^\s*```[ \t]*$", "", text, flags=re.S | re.M)


def split_comment(line: str) -> tuple[str, str]:
    """(code, comment) of one shell line: the first # outside quotes that starts a word."""
    quote = None
    for index, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            return line[:index].rstrip(), line[index:]
    return line.rstrip(), ""


def commands_of(block: Block) -> tuple[list[Command], list[str]]:
    """The commands of a bash block, and the lines that lack a marker."""
    commands, unmarked, pending, start = [], [], "", 0
    for offset, raw in enumerate(block.lines, start=1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        start = start or block.line + offset
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        code, comment = split_comment(pending + line)
        pending, number, start = "", start, 0
        match = MARKER.match(comment)
        if not match:
            unmarked.append(f"{block.path.relative_to(ROOT)}:{number}: {code}")
            continue
        argv = shlex.split(code)
        env = {}
        while argv and re.match(r"^[A-Z_][A-Z0-9_]*=", argv[0]):
            key, _, value = argv.pop(0).partition("=")
            env[key] = value
        commands.append(Command(block.path, number, code, match.group(1), env, argv))
    return commands, unmarked


def all_commands() -> list[Command]:
    return [command for path in DOCS for block in blocks(path) if block.info.split()[:1] == ["bash"]
            for command in commands_of(block)[0]]


# ---------------------------------------------------------------------------------------------------- static checks
def test_readme_is_short_and_maps_every_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= MAX_README_LINES, f"README.md has {len(readme.splitlines())} lines"
    missing = [page.name for page in DOCS[1:] if f"(docs/{page.name})" not in readme]
    assert not missing, f"README.md's map of docs/ lacks {missing}"


def test_every_shell_command_is_marked_and_no_command_hides_outside_a_bash_block():
    problems = []
    for path in DOCS:
        for block in blocks(path):
            language = block.info.split()[:1]
            if language == ["bash"]:
                problems += commands_of(block)[1]
            elif language in ([], ["text"], ["console"]):
                problems += [f"{path.relative_to(ROOT)}:{block.line}: a command in a block that is not ```bash: {line}"
                             for line in block.lines
                             if re.match(r"^\s*(\$ )?(python3?|pip|make|sbatch|torchrun|accelerate|bash) ", line)]
    assert not problems, "commands must sit in ```bash blocks and end with # CPU or # GPU-only:\n" + "\n".join(problems)
    assert len(all_commands()) > 40


def github_anchor(heading: str) -> str:
    text = heading.strip().replace("`", "").replace("*", "").lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@cache
def anchors(path: Path) -> set[str]:
    headings = [match.group(1) for match in re.finditer(r"^#{1,6} (.+)$", prose(path), flags=re.M)]
    return {github_anchor(heading) for heading in headings}


def test_links_resolve_inside_the_repository():
    problems = []
    for path in DOCS:
        for match in re.finditer(r"\[[^\]]*\]\(([^)\s]+)\)", re.sub(r"`[^`\n]*`", "", prose(path))):
            target = match.group(1)
            if re.match(r"^[a-z]+:", target):
                continue  # a web address
            file_part, _, anchor = target.partition("#")
            resolved = (path.parent / file_part).resolve() if file_part else path
            where = f"{path.relative_to(ROOT)}: ({target})"
            if not resolved.is_relative_to(ROOT) or not resolved.exists():
                problems.append(f"{where}: no such file in the repository")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                problems.append(f"{where}: no heading with that anchor (has {sorted(anchors(resolved))})")
    assert not problems, "\n".join(problems)


@cache
def tracked_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    return [name for name in listed if (ROOT / name).is_file()]


@cache
def prepared_patterns() -> list[str]:
    """Folders that `python data/prepare.py RECIPE` writes (the paper recipes' data), as fnmatch patterns."""
    spec = importlib.util.spec_from_file_location("docs_check_prepare", ROOT / "data" / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return [recipe.output_dir.format(subject="*") + "/*" for recipe in module.RECIPES.values()]


def made_by_a_documented_command(path: str) -> bool:
    path = path.removeprefix("./")
    return path.startswith(("outputs/", "logs/", "~/.cache/sdft")) or any(fnmatch.fnmatch(path, pattern)
                                                                  for pattern in prepared_patterns())


def is_placeholder(path: str) -> bool:
    return any(path == name or path.startswith(name) for name in PLACEHOLDERS)


def expand(word: str) -> list[str]:
    """Brace alternatives expanded, <placeholders> as wildcards."""
    word = re.sub(r"<[^>]+>", "*", word)
    braces = re.search(r"\{([^{}]*,[^{}]*)\}", word)
    if not braces:
        return [word]
    return [expanded for option in braces.group(1).split(",")
            for expanded in expand(word[:braces.start()] + option + word[braces.end():])]


def path_problem(word: str) -> str | None:
    """None when a path-like word names something real (or something a documented command makes)."""
    word = word.rstrip(".,;:)").removeprefix("(")
    word = re.sub(r"\.py:\w+$", ".py", word)  # file.py:function
    if (not re.fullmatch(r"[\w.~/{}<>*,+-]+", word) or word.startswith(("-", "~", "/")) or "://" in word
            or any(re.fullmatch(r"[A-Z][A-Z0-9_]+|.*STEP.*|\*", part) for part in word.split("/"))):
        return None  # not a path, a placeholder (OUTPUT_DIR/best), or outside the repository on purpose
    top = word.split("/", 1)[0]
    roots = {name.split("/", 1)[0] for name in tracked_files()}
    package = {name.removeprefix("sdft_utils/").split("/", 1)[0] for name in tracked_files()
               if name.startswith("sdft_utils/")}
    if "/" not in word:
        if word.endswith(tuple(TEXT_SUFFIXES)) and word not in FOREIGN_FILES and "*" not in word:
            names = {Path(name).name for name in tracked_files()}
            return None if word in names or word.endswith(".md") and word in MD_NAMES_ELSEWHERE else \
                f"`{word}`: no file of that name in the repository"
        return None
    if top not in roots | package:
        return None  # another project's path (e.g. SDPO/data/preprocess.py)
    if made_by_a_documented_command(word) or is_placeholder(word):
        return None
    for candidate in expand(word):
        bases = [ROOT, ROOT / "sdft_utils"]
        if not any(list(base.glob(candidate.rstrip("/"))) for base in bases):
            return f"`{word}`: no such path in the repository"
    return None


def dotted_name_problem(name: str) -> str | None:
    """`sdft_utils.a.b.name`: the module's file exists and defines each following name (read, not imported)."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        module = ROOT.joinpath(*parts[:cut])
        source = module.with_suffix(".py") if module.with_suffix(".py").is_file() else module / "__init__.py"
        if source.is_file():
            text = source.read_text()
            missing = [part for part in parts[cut:]
                       if not re.search(rf"^\s*(def|class) {part}\b|^\s*{part}\b[^=(]*=|\bimport .*\b{part}\b",
                                        text, flags=re.M)]
            return f"`{name}`: {source.relative_to(ROOT)} defines no {missing[0]}" if missing else None
    return f"`{name}`: no such module"


def test_paths_and_modules_named_in_the_docs_exist():
    problems = []
    for path in DOCS:
        text = prose(path)
        for span in re.findall(r"`([^`\n]+)`", text):
            for word in span.split():
                problem = path_problem(word)
                if problem:
                    problems.append(f"{path.relative_to(ROOT)}: {problem}")
        for name in set(re.findall(r"\bsdft_utils(?:\.\w+)+", text)):
            problem = dotted_name_problem(name)
            if problem:
                problems.append(f"{path.relative_to(ROOT)}: {problem}")
    assert not problems, "\n".join(sorted(set(problems)))


def test_nothing_points_outside_the_repository_or_to_moved_files():
    md_files = {Path(name).name for name in tracked_files() if name.endswith(".md")}
    problems = []
    for name in tracked_files():
        path = ROOT / name
        if path.suffix not in TEXT_SUFFIXES and path.name not in ("Makefile", "run", ".gitignore"):
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
            if OUTSIDE.search(line):
                problems.append(f"{name}:{number}: points outside the repository: {line.strip()}")
            for md in re.findall(r"(?<![\w-])([\w.-]+\.md)\b", line):
                if md not in md_files and md not in MD_NAMES_ELSEWHERE:
                    problems.append(f"{name}:{number}: names {md}, which is not in the repository")
            if name != "benchmarks/RESULTS.md":  # a dated record: it names files as they were then
                for module in re.findall(r"\bsdft_utils/[\w/]+\.py\b", line):
                    if not (ROOT / module).is_file():
                        problems.append(f"{name}:{number}: names {module}, which does not exist (moved?)")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------------- example rows
def example_rows(kind: str) -> str:
    found = [block for block in blocks(ROOT / "README.md") if block.info == f"json {kind}"]
    assert len(found) == 1, f"README.md should have one ```json {kind} block of example rows"
    return "\n".join(found[0].lines) + "\n"


def test_the_readme_sdft_rows_load(tmp_path):
    from sdft_utils.data.sdft import load_sdft_dataset

    (tmp_path / "rows.jsonl").write_text(example_rows("sdft"))
    examples = load_sdft_dataset(str(tmp_path / "rows.jsonl"))
    assert len(examples) == 4
    assert examples[2].teacher_prompt[-1]["content"].startswith("A good summary")  # the explicit teacher prompt
    trajectory = examples[3]
    assert trajectory.tools and trajectory.demonstration_messages[0]["tool_calls"]
    assert '"name": "triangle_area"' in trajectory.teacher_prompt[-1]["content"]  # written in the call syntax


def test_the_readme_sdpo_rows_load_and_the_bfcl_row_scores(tmp_path):
    from sdft_utils.sdpo.tasks import load_sdpo_tasks

    (tmp_path / "rows.jsonl").write_text(example_rows("sdpo"))
    tasks = load_sdpo_tasks(str(tmp_path / "rows.jsonl"))
    assert [task.verifier for task in tasks] == ["math", "mcq", "code", "code", "tool", "bfcl_multi_turn"]
    if importlib.util.find_spec("bfcl_eval") is None:
        pytest.skip("bfcl-eval is not installed (pip install --no-deps -r requirements-data.txt)")
    from sdft_utils.tools.bfcl import ground_truth_calls
    from sdft_utils.tools.rollout import Trajectory
    from sdft_utils.tools.verify import score_trajectory

    row = tasks[-1].row
    assert score_trajectory("bfcl_multi_turn", row, Trajectory(calls=[ground_truth_calls(row)])).score == 1.0
    assert score_trajectory("bfcl_multi_turn", row, Trajectory(calls=[[]])).score == 0.0


# ---------------------------------------------------------------------------------------------------- commands
def fail(command: Command, message: str):
    pytest.fail(f"{command.where}: `{command.text}`: {message}", pytrace=False)


@cache
def script_module(script: str):
    """train_sdft.py / train_sdpo.py / evaluate.py as a module (its Args dataclass, its checks)."""
    name = "docs_check_" + Path(script).stem
    spec = importlib.util.spec_from_file_location(name, ROOT / script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


class _Parsed(Exception):
    pass


def own_parser(run, argv0: str, argv: list[str]) -> argparse.Namespace:
    """What a script's own argparse parser makes of `argv`, stopped right after it parsed; argparse's error text on
    a bad flag."""
    original = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    stderr = io.StringIO()
    with mock.patch.object(argparse.ArgumentParser, "parse_args", parse_and_stop), \
            mock.patch.object(sys, "argv", [argv0, *argv]), contextlib.redirect_stderr(stderr):
        try:
            run()
        except _Parsed as parsed:
            return parsed.args[0]
        except SystemExit as exit_:
            raise AssertionError(f"the parser refused it (exit {exit_.code}): {stderr.getvalue().strip()}") from None
    raise AssertionError("the script finished without parsing any arguments")


def quietly(parse, program: str = "the script"):
    """`parse()`, with argparse's error text (and exit) turned into an AssertionError."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), mock.patch.object(sys, "argv", [program]):
        try:
            return parse()
        except SystemExit as exit_:
            raise AssertionError(f"the parser refused it (exit {exit_.code}): {stderr.getvalue().strip()}") from None


def run_in_process(run, argv0: str, argv: list[str], cwd: Path) -> str:
    """Execute a script's main as `python argv0 argv...` from `cwd`; its stdout. Exit status 0 or none is success."""
    stdout, stderr = io.StringIO(), io.StringIO()
    previous = Path.cwd()
    os.chdir(cwd)
    try:
        with mock.patch.object(sys, "argv", [argv0, *argv]), contextlib.redirect_stdout(stdout), \
                contextlib.redirect_stderr(stderr):
            try:
                run()
            except SystemExit as exit_:
                assert exit_.code in (0, None), f"exit {exit_.code}: {stderr.getvalue().strip()}"
    finally:
        os.chdir(previous)
    return stdout.getvalue()


def path_value_problem(value: str, cwd: Path, what: str) -> str | None:
    """A file or folder a command reads: it must exist, be made by a documented command, or be a placeholder."""
    if is_placeholder(value) or made_by_a_documented_command(value):
        return None
    path = Path(value).expanduser()
    return None if (path if path.is_absolute() else cwd / path).exists() else f"{what} {value}: no such file"


def model_problem(model: str, cwd: Path) -> str | None:
    """Hub ids pass; a local folder must exist, be a placeholder, or be written by a run of a recipe in this
    repository, with checkpoint-N matching that recipe's max_steps."""
    looks_local = model.startswith(("/", ".", "~", "outputs/")) or model.count("/") > 1
    if not looks_local:
        return None
    match = re.fullmatch(r"(outputs/[^/]+)/checkpoint-(\d+)", model)
    if match:
        for recipe in (ROOT / "recipes").glob("*.yaml"):
            values = yaml.safe_load(recipe.read_text())
            if values.get("output_dir") == match.group(1) and values.get("max_steps", -1) > 0 \
                    and values["max_steps"] != int(match.group(2)):
                return f"--model {model}: {recipe.relative_to(ROOT)} runs {values['max_steps']} steps"
    return path_value_problem(model, cwd, "--model")


def remaining_problems(problems: list[str], command: Command) -> list[str]:
    if command.gpu_only:
        problems = [problem for problem in problems if not any(text in problem for text in MACHINE_DEPENDENT)]
    return problems


def check_training(command: Command, script: str, argv: list[str], processes: int, cwd: Path) -> None:
    from sdft_utils.cli import parse_args
    from sdft_utils.training.backend import accumulation_steps
    from sdft_utils.training.config import require_dataset, runs_embedded_default

    module = script_module(script)
    if argv == ["--help"]:
        output = run_in_process(lambda: parse_args(module.Args, ["--help"]), script, [], cwd)
        assert "--model" in output and "--max_steps" in output
        return
    embedded = runs_embedded_default(argv)
    previous = Path.cwd()
    os.chdir(cwd)  # recipes and data are named relative to where the command runs
    try:
        args = quietly(lambda: parse_args(module.Args, argv, default_config=module.EMBEDDED_RECIPE if embedded
                                          else None), script)
    except (UserInputError, AssertionError) as error:
        fail(command, str(error))
    finally:
        os.chdir(previous)
    problems = remaining_problems(args.problems(), command)
    if not embedded:
        try:
            require_dataset(args)
        except UserInputError as error:
            problems.append(str(error))
    for value, what in [(args.dataset, "--dataset"), *((path, "--eval_datasets") for path in args.eval_datasets)]:
        if value and (Path(value).suffix or value.count("/") > 1):
            problems.append(path_value_problem(value, cwd, what))
    if getattr(args, "reward_fn", None) and ".py:" in args.reward_fn:
        problems.append(path_value_problem(args.reward_fn.split(":", 1)[0], cwd, "--reward_fn"))
    if args.model:
        problems.append(model_problem(args.model, cwd))
    world = processes
    if args.backend == "megatron":
        from sdft_utils.megatron.backend import MegatronBackend

        stand_in = args.model if args.model and not is_placeholder(args.model) else str(ROOT)  # a folder's
        try:  # existence is the user's; the rest of Megatron's limits are checked
            MegatronBackend.check_args(dataclasses.replace(args, model=stand_in))
        except UserInputError as error:
            problems.append(str(error))
        if processes % args.tensor_model_parallel_size:
            problems.append(f"{processes} processes do not split into TP groups of {args.tensor_model_parallel_size}")
        world = max(processes // args.tensor_model_parallel_size, 1)
    try:
        accumulation_steps(args, world, getattr(args, "mini_batches", 1))
    except UserInputError as error:
        problems.append(f"on {world} data-parallel processes: {error}")
    problems = [problem for problem in problems if problem]
    if problems:
        fail(command, "\n  ".join(problems))


def check_evaluate(command: Command, argv: list[str], cwd: Path) -> str:
    from sdft_utils.cli import parse_args
    from sdft_utils.evaluation.suites import is_prior_benchmark, is_tool_suite

    module = script_module("evaluate.py")
    only_plot = "--plot" in argv and "--model" not in argv
    if argv == ["--help"] or only_plot:
        scratch = Path(os.environ["DOCS_SCRATCH"])  # the plot is written there, never into a run of the checkout
        if only_plot:
            run = argv[argv.index("--plot") + 1]
            (scratch / run).mkdir(parents=True, exist_ok=True)
            if (cwd / run / "metrics.jsonl").is_file():
                shutil.copy(cwd / run / "metrics.jsonl", scratch / run / "metrics.jsonl")
            else:  # no such run here: a stand-in with the metrics a short SDFT run logs
                (scratch / run / "metrics.jsonl").write_text("".join(
                    json.dumps({"step": step, "loss": 1.0 / step, "kl": 0.5 / step, "learning_rate": 1e-4}) + "\n"
                    for step in range(1, 5)))
        output = run_in_process(lambda: runpy.run_path(str(ROOT / "evaluate.py"), run_name="__main__"),
                                "evaluate.py", argv, scratch)
        if only_plot:
            assert "plot:" in output and (scratch / run / "training_curves.png").stat().st_size > 0
        return "executed"
    try:
        args = quietly(lambda: parse_args(module.Args, argv), "evaluate.py")
    except (UserInputError, AssertionError) as error:
        fail(command, str(error))
    try:
        module.check_args(args)
        problems = []
    except UserInputError as error:
        problems = [line.strip() for line in str(error).splitlines()[1:]] or [str(error)]
    problems = remaining_problems(problems, command)
    for spec in [*args.tasks, *args.prior_files]:
        if not (is_prior_benchmark(spec) or is_tool_suite(spec)):
            problems.append(path_value_problem(spec, cwd, "task file"))
    problems += [model_problem(model, cwd) for model in args.model]
    problems = [problem for problem in problems if problem]
    if problems:
        fail(command, "\n  ".join(problems))
    return "parsed"


def check_python_file(command: Command, script: str, argv: list[str], cwd: Path) -> str:
    if script in ("train_sdft.py", "train_sdpo.py"):
        check_training(command, script, argv, 1, cwd)
        return "executed" if argv == ["--help"] else "parsed"
    if script == "evaluate.py":
        return check_evaluate(command, argv, cwd)
    path = ROOT / script
    if not path.is_file():
        fail(command, f"no script {script}")
    run = lambda: runpy.run_path(str(path), run_name="__main__")  # noqa: E731
    if argv == ["--help"] or script == "benchmarks/memory_sizing.py":
        output = run_in_process(run, script, argv, cwd)
        assert output.strip(), "it printed nothing"
        return "executed"
    try:
        own_parser(run, script, argv)
    except AssertionError as error:
        fail(command, str(error))
    return "parsed"


def check_module(command: Command, module: str, argv: list[str], cwd: Path) -> str:
    if module == "sdft_utils.cli":
        scratch = Path(os.environ["DOCS_SCRATCH"]) / "flags"
        (scratch / "docs").mkdir(parents=True, exist_ok=True)
        from sdft_utils import cli

        run_in_process(lambda: cli.main(argv), "sdft_utils.cli", argv, scratch)
        assert (scratch / argv[0]).read_text() == (ROOT / "docs" / "flags.md").read_text(), "docs/flags.md is stale"
        return "executed"
    if module == "sdft_utils.rollout.vllm_server":
        run = lambda: runpy.run_module(module, run_name="__main__", alter_sys=True)  # noqa: E731
        if "--print_command" in argv:
            assert "--worker-extension-cls" in run_in_process(run, module, argv, cwd)
            return "executed"
        try:
            own_parser(run, module, argv)
        except AssertionError as error:
            fail(command, str(error))
        return "parsed"
    if module == "torch.distributed.run":
        return check_torchrun(command, argv, cwd)
    if module == "pip":
        return check_pip(command, argv)
    if module == "pytest":
        markers = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]
        names = {marker.split(":")[0] for marker in markers}
        for index, word in enumerate(argv):
            if index and argv[index - 1] == "-m":
                unknown = set(re.findall(r"\w+", word)) - names - {"not", "and", "or"}
                assert not unknown, f"unknown markers {unknown}"
            elif not word.startswith("-"):
                assert (ROOT / word.split("::")[0]).exists(), f"no test path {word}"
        return "static"
    if module == "venv":
        assert importlib.util.find_spec("venv") is not None
        return "static"
    fail(command, f"no rule checks `python -m {module}`")


def check_accelerate(command: Command, argv: list[str], cwd: Path) -> str:
    from accelerate.commands.launch import launch_command_parser

    if argv[:1] != ["launch"]:
        fail(command, "only `accelerate launch` is documented")
    try:
        options = quietly(lambda: launch_command_parser().parse_args(argv[1:]), "accelerate launch")
    except AssertionError as error:
        fail(command, str(error))
    processes = options.num_processes
    if options.config_file:
        config = cwd / options.config_file
        if not config.is_file():
            fail(command, f"--config_file {options.config_file}: no such file")
        processes = processes or yaml.safe_load(config.read_text()).get("num_processes", 1)
    check_training(command, options.training_script, options.training_script_args, processes or 1, cwd)
    return "parsed"


def check_torchrun(command: Command, argv: list[str], cwd: Path) -> str:
    from torch.distributed.run import get_args_parser

    try:
        options = quietly(lambda: get_args_parser().parse_args(argv), "torchrun")
    except AssertionError as error:
        fail(command, str(error))
    nodes = int(str(options.nnodes).split(":")[-1])
    check_training(command, options.training_script, options.training_script_args,
                   nodes * int(options.nproc_per_node), cwd)
    return "parsed"


def check_pip(command: Command, argv: list[str]) -> str:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = set(pyproject["project"]["optional-dependencies"])
    pinned = {}
    for line in [*(ROOT / "requirements-data.txt").read_text().splitlines(),
                 *(item for items in pyproject["project"]["optional-dependencies"].values() for item in items)]:
        match = re.match(r"^\s*([\w.-]+)==([\w.]+)", line)
        if match:
            pinned[match.group(1).lower()] = match.group(2)
    words = argv[1:]
    for index, word in enumerate(words):
        if index and words[index - 1] == "-r":
            assert (ROOT / word).is_file(), f"no requirement file {word}"
        elif word.startswith(".["):
            assert set(word[2:-1].split(",")) <= extras, f"{word}: extras are {sorted(extras)}"
        elif "==" in word:
            name, version = word.split("==")
            assert pinned.get(name.lower(), version) == version, f"{word}: the repository pins {pinned[name.lower()]}"
    return "static"


def check_slurm(command: Command, argv: list[str], checkout: Path, fake_bin: Path) -> list[str]:
    """Run a documented `sbatch` or `DRY_RUN=1 bash` line with DRY_RUN=1 in a copy of the repository; the command
    each node would run."""
    env = {key: value for key, value in os.environ.items() if key != "HF_HUB_OFFLINE"}
    env.update(command.env, DRY_RUN="1", FAKE_RECORD=str(checkout / "record.jsonl"))
    if env.get("MODEL", "").startswith("/") and not Path(env["MODEL"]).exists():  # the user's own folder
        stand_in = checkout / "models" / Path(env["MODEL"]).name
        stand_in.mkdir(parents=True, exist_ok=True)
        env["MODEL"] = str(stand_in)
    if argv[0] == "sbatch":
        words, nodes = argv[1:], None
        while words[0].startswith("--"):
            option = words.pop(0)
            value = option.split("=", 1)[1] if "=" in option else words.pop(0)
            nodes = int(value) if option.startswith("--nodes") else nodes
        template = checkout / words[0]
        default = re.search(r"^#SBATCH --nodes=(\d+)", template.read_text(), flags=re.M)
        count = nodes or (int(default.group(1)) if default else 1)
        env.update(PATH=f"{fake_bin}:{os.environ['PATH']}", FAKE_NODES=" ".join(f"node{i}" for i in range(count)))
        run = ["sbatch", *words]
    else:
        run = argv
    result = subprocess.run(run, cwd=checkout, env=env, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        fail(command, f"exit {result.returncode} under DRY_RUN=1: {result.stderr.strip()}")
    printed = [line.split("] ", 1)[1] for line in result.stdout.splitlines() if re.match(r"^\[[\w.-]+\] ", line)]
    assert printed, f"DRY_RUN printed no node commands:\n{result.stdout}"
    return printed


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """A copy of the repository (what git knows) with recorders as its .venv's programs, and the fake Slurm."""
    root = repository_copy(tmp_path_factory.mktemp("docs_checkout"))
    write_programs(root / ".venv" / "bin", {"accelerate": RECORDER, "python": RECORDER})
    write_programs(root.parent / "fake_bin", {"sbatch": FAKE_SBATCH, "scontrol": FAKE_SCONTROL, "srun": FAKE_SRUN})
    return root


def check(command: Command, checkout: Path, cwd: Path = ROOT) -> str:
    """How the command was exercised: executed, parsed or static."""
    argv, env = command.argv, command.env
    program = Path(argv[0]).name if argv else ""
    if program in ("python", "python3"):
        if argv[1:2] == ["-m"]:
            return check_module(command, argv[2], argv[3:], cwd)
        return check_python_file(command, argv[1], argv[2:], cwd)
    if program == "accelerate":
        return check_accelerate(command, argv[1:], cwd)
    if program == "torchrun":
        return check_torchrun(command, argv[1:], cwd)
    if program == "pip":
        return check_pip(command, argv[1:])
    if program == "make":
        targets = [word for word in argv[1:] if not word.startswith("-")]
        env = {key: value for key, value in os.environ.items() if key not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
        result = subprocess.run(["make", "-n", *targets], cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=60)  # (the suite itself may run under `make test`)
        assert result.returncode == 0, f"make -n {' '.join(targets)}: {result.stderr}"
        return "executed"
    if program == "hf":
        assert shutil.which("hf") or (Path(sys.executable).parent / "hf").exists(), "no `hf` CLI here"
        assert argv[1:2] == ["download"], "only `hf download` is documented"
        return "static"
    if program == "sbatch" or (program == "bash" and argv[1].startswith("slurm/") and env.get("DRY_RUN") == "1"):
        for line in check_slurm(command, argv, checkout, checkout.parent / "fake_bin"):
            words = shlex.split(line)
            words[0] = Path(words[0]).name
            node = Command(command.path, command.line, f"{command.text} -> {line}", "GPU-only", argv=words)
            check(node, checkout, cwd=checkout)
        return "executed"
    if program == "bash":
        script = ROOT / argv[1]
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        if script.name == "gpu_check.sh" and len(argv) > 2:
            own_parser(lambda: runpy.run_path(str(ROOT / "benchmarks" / "gpu_check.py"), run_name="__main__"),
                       "gpu_check.py", argv[2:])
        return "parsed"
    fail(command, "no rule of tests/scripts/test_docs.py checks this command: add one, or write the command so that "
                  "an existing rule applies")


COMMANDS = all_commands()


@pytest.mark.parametrize("command", COMMANDS, ids=[command.where for command in COMMANDS])
def test_documented_command(command, checkout, tmp_path, monkeypatch):
    monkeypatch.setenv("DOCS_SCRATCH", str(tmp_path))
    try:
        how = check(command, checkout)
    except AssertionError as error:
        fail(command, str(error))
    assert how in ("executed", "parsed", "static")

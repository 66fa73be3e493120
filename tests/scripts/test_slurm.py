"""The Slurm templates, run for real under a fake `sbatch` / `srun` / `scontrol` put first on PATH.

There is no Slurm cluster here, so these three commands are small bash stand-ins: `sbatch` refuses a job whose
`#SBATCH --output` folder does not exist (real Slurm starts it, and it dies unable to open its log) and otherwise
runs the script with the job's variables, `scontrol show hostnames` lists the fake nodes, and `srun` records its
options and runs its command once per task with that task's SLURM_PROCID / SLURMD_NODENAME, as Slurm would on each
node. The launchers the templates call (`accelerate`, `python`) are recorders, so the test sees every command with
the variables it was expanded with.
"""

import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = ["slurm/sdft.sbatch", "slurm/sdpo.sbatch", "slurm/megatron.sbatch", "slurm/multinode.sh"]
JOB_ID = 4242

FAKE_SBATCH = """#!/usr/bin/env bash
script=$1; shift
log=$(sed -n 's/^#SBATCH --output=//p' "$script" | head -n 1)
if [[ -n "$log" && ! -d "$(dirname "$log")" ]]; then
    echo "fake sbatch: the job could not open its log $log: no folder $(dirname "$log") in $PWD" >&2; exit 1
fi
export SLURM_JOB_ID=@JOB@ SLURM_JOB_NODELIST="node-[a-c]" SLURM_SUBMIT_DIR="$PWD"
export SLURM_NNODES=$(echo "$FAKE_NODES" | wc -w)
exec bash "$script" "$@"
""".replace("@JOB@", str(JOB_ID))

FAKE_SCONTROL = """#!/usr/bin/env bash
[[ "$1 $2" == "show hostnames" ]] || { echo "fake scontrol: unsupported: $*" >&2; exit 1; }
for node in $FAKE_NODES; do echo "$node"; done
"""

FAKE_SRUN = """#!/usr/bin/env bash
# record the options, then run the command once per task, each with the variables Slurm gives a task on its node
ntasks=1; nodelist=""; options=()
while [[ $# -gt 0 && "$1" == --* ]]; do
    options+=("$1")
    case "$1" in
        --ntasks=*) ntasks=${1#*=} ;;
        --nodelist=*) nodelist=${1#*=} ;;
    esac
    shift
done
python3 -c 'import json, sys; print(json.dumps({"program": "srun", "args": sys.argv[1:]}))' "${options[@]}" \\
    >> "$FAKE_RECORD"
IFS=, read -ra nodes <<< "$nodelist"
for ((task = 0; task < ntasks; task++)); do
    SLURM_PROCID=$task SLURMD_NODENAME=${nodes[$task]} "$@" || exit $?
done
"""

RECORDER = """#!/usr/bin/env bash
python3 - "$0" "$@" <<'PY' >> "$FAKE_RECORD"
import json, os, sys
keys = ("SLURM_PROCID", "SLURMD_NODENAME", "HF_HUB_OFFLINE")
print(json.dumps({"program": os.path.basename(sys.argv[1]), "args": sys.argv[2:],
                  "env": {key: os.environ.get(key) for key in keys}}))
PY
"""


@pytest.mark.parametrize("template", TEMPLATES)
def test_templates_parse(template):
    subprocess.run(["bash", "-n", str(ROOT / template)], check=True)


def write_programs(folder: Path, files: dict[str, str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)


def repository_copy(destination: Path) -> Path:
    """The files git knows (committed or staged, and new ones not ignored): what a user's checkout holds."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    for name in listed:
        source = ROOT / name
        if source.is_file() and not source.is_symlink():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    return destination


@pytest.fixture
def fake_cluster(tmp_path):
    bin_dir = tmp_path / "fake_bin"
    write_programs(bin_dir, {"sbatch": FAKE_SBATCH, "scontrol": FAKE_SCONTROL, "srun": FAKE_SRUN})
    record = tmp_path / "record.jsonl"

    def submit(submit_dir: Path, template: str, nodes: list[str], *args: str, **env: str):
        record.unlink(missing_ok=True)
        environment = {key: value for key, value in os.environ.items() if key != "HF_HUB_OFFLINE"}
        environment.update({"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_NODES": " ".join(nodes),
                            "FAKE_RECORD": str(record), **env})
        result = subprocess.run(["sbatch", f"slurm/{template}", *args], cwd=submit_dir, env=environment,
                                capture_output=True, text=True, timeout=60)
        calls = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
        return result, calls

    return submit


@pytest.fixture
def checkout(tmp_path):
    """A copy of the repository with recorders in .venv/bin (the templates' default VENV)."""
    root = repository_copy(tmp_path / "repo")
    write_programs(root / ".venv" / "bin", {"accelerate": RECORDER, "python": RECORDER})
    return root


def recipe_data(root: Path, recipe: str) -> Path:
    """What `python data/prepare.py` would write at the recipe's `dataset:` path (contents do not matter here)."""
    path = root / yaml.safe_load((root / "recipes" / f"{recipe}.yaml").read_text())["dataset"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"prompt": "q", "answer": "A"}\n')
    return path


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def launched(calls: list[dict], program: str) -> list[dict]:
    return [call for call in calls if call["program"] == program]


# ---------------------------------------------------------------------------------------------------- as written
@pytest.mark.parametrize("template,recipe", [("sdft.sbatch", "sdft_science"), ("sdpo.sbatch", "sdpo_science"),
                                             ("megatron.sbatch", "sdft_science")])
def test_each_template_as_written_uses_only_paths_that_exist_or_are_created(fake_cluster, checkout, template,
                                                                             recipe):
    """Submitted from a fresh checkout with no variable changed: the log folder is in the repository, a missing
    piece (the recipe's data, Megatron's local model folder) stops the job before anything starts and names the
    fix; once it is there, every path the job's commands use exists, and the output folder is created in the
    repository."""
    assert (checkout / "logs" / ".gitkeep").is_file()  # committed: #SBATCH --output=logs/... opens at job start
    result, calls = fake_cluster(checkout, template, ["node-a", "node-b"])
    assert result.returncode == 2 and calls == [] and "Traceback" not in result.stderr
    if template == "megatron.sbatch":
        assert "MODEL=/path/to/Qwen2.5-7B-Instruct" in result.stderr and "hf download" in result.stderr
        (checkout / "models" / "qwen").mkdir(parents=True)
        result, calls = fake_cluster(checkout, template, ["node-a", "node-b"], MODEL="models/qwen")
        assert result.returncode == 2
    assert f"python data/prepare.py {recipe}" in result.stderr

    data = recipe_data(checkout, recipe)
    env = {"MODEL": "models/qwen"} if template == "megatron.sbatch" else {}
    result, calls = fake_cluster(checkout, template, ["node-a", "node-b"], **env)
    assert result.returncode == 0, result.stderr
    trainer = next(call for call in calls if "--output_dir" in call["args"])
    server = next(call for call in calls if "sdft_utils.rollout.vllm_server" in call["args"])
    assert trainer["env"]["SLURMD_NODENAME"] == "node-a" and server["env"]["SLURMD_NODENAME"] == "node-b"
    assert trainer["env"]["HF_HUB_OFFLINE"] == "1"  # the default: models come from HF_HOME
    args = trainer["args"]
    used = [flag(args, "--config")] + ([flag(args, "--config_file")] if "--config_file" in args else [])
    for path in used:
        assert (checkout / path).is_file(), path
    assert data.is_file()
    for call in launched(calls, "srun"):
        for option in call["args"]:
            if option.startswith("--output="):
                assert (checkout / option.split("=", 1)[1]).parent.is_dir(), option
    output_dir = checkout / flag(args, "--output_dir")
    assert output_dir.resolve().is_relative_to(checkout) and not output_dir.exists()  # the trainer creates it


def test_submitting_from_elsewhere_cannot_open_the_log(fake_cluster, checkout, tmp_path):
    """Slurm opens logs/%x-%j.out relative to the submission folder: docs/scale_out.md says to submit from the root."""
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "slurm").mkdir(parents=True)
    shutil.copy(checkout / "slurm" / "sdpo.sbatch", elsewhere / "slurm" / "sdpo.sbatch")
    result, calls = fake_cluster(elsewhere, "sdpo.sbatch", ["node-a", "node-b"], REPO_DIR=str(checkout))
    assert result.returncode == 1 and "no folder logs" in result.stderr and calls == []


# ---------------------------------------------------------------------------------------------------- behaviour
@pytest.mark.parametrize("template,script", [("sdft.sbatch", "train_sdft.py"), ("sdpo.sbatch", "train_sdpo.py")])
def test_every_node_gets_its_own_machine_rank(fake_cluster, checkout, template, script):
    recipe_data(checkout, f"{script[6:10]}_science")
    result, calls = fake_cluster(checkout, template, ["node-a", "node-b"], "--max_steps", "5", VLLM_SERVER_NODE="0")
    assert result.returncode == 0, result.stderr
    assert [call["program"] for call in calls] == ["srun", "accelerate", "accelerate"]
    expected_port = str(15000 + JOB_ID % 10000)
    for rank, (call, node) in enumerate(zip(launched(calls, "accelerate"), ["node-a", "node-b"], strict=True)):
        args = call["args"]
        assert call["env"]["SLURMD_NODENAME"] == node
        assert flag(args, "--machine_rank") == str(rank)  # expanded in the task, not in the batch shell
        assert flag(args, "--num_machines") == "2" and flag(args, "--num_processes") == "16"
        assert flag(args, "--main_process_ip") == "node-a" and flag(args, "--main_process_port") == expected_port
        assert flag(args, "--config_file") == "accelerate_configs/zero3.yaml"
        model = "Qwen/Qwen2.5-7B-Instruct" if script == "train_sdft.py" else "Qwen/Qwen3-8B"
        assert args[args.index(script) + 1:] == ["--config", f"recipes/{script[6:10]}_science.yaml", "--model", model,
                                                 "--output_dir", f"outputs/{script[6:10]}-{JOB_ID}", "--max_steps", "5"]


def test_last_node_serves_vllm_rollouts_by_default(fake_cluster, checkout):
    recipe_data(checkout, "sdpo_science")
    result, calls = fake_cluster(checkout, "sdpo.sbatch", ["node-a", "node-b", "node-c"], VLLM_TENSOR_PARALLEL_SIZE="8",
                                 GPUS_PER_NODE="4", EXTRA_ARGS="--save_steps 50")
    assert result.returncode == 0, result.stderr
    (server,), trainers = launched(calls, "python"), launched(calls, "accelerate")
    assert server["env"]["SLURMD_NODENAME"] == "node-c"
    assert server["args"][:2] == ["-m", "sdft_utils.rollout.vllm_server"]
    assert flag(server["args"], "--model") == "Qwen/Qwen3-8B"  # the recipe's model
    assert flag(server["args"], "--host") == "0.0.0.0" and flag(server["args"], "--tensor_parallel_size") == "8"
    assert [call["env"]["SLURMD_NODENAME"] for call in trainers] == ["node-a", "node-b"]
    for rank, call in enumerate(trainers):
        args = call["args"]
        assert flag(args, "--machine_rank") == str(rank)
        assert flag(args, "--num_machines") == "2" and flag(args, "--num_processes") == "8"
        assert flag(args, "--rollout") == "vllm" and flag(args, "--vllm_mode") == "server"
        assert flag(args, "--vllm_server_url") == "http://node-c:8000" and args[-2:] == ["--save_steps", "50"]


def test_dry_run_prints_exactly_what_each_node_runs(fake_cluster, checkout):
    recipe_data(checkout, "sdft_science")
    dry, calls = fake_cluster(checkout, "sdft.sbatch", ["node-a", "node-b", "node-c"], "--seed", "3", DRY_RUN="1")
    assert dry.returncode == 0 and calls == [], dry.stderr  # nothing started
    printed = {line.split("] ", 1)[0][1:]: shlex.split(line.split("] ", 1)[1])
               for line in dry.stdout.splitlines() if line.startswith("[")}
    _, calls = fake_cluster(checkout, "sdft.sbatch", ["node-a", "node-b", "node-c"], "--seed", "3")
    ran = {call["env"]["SLURMD_NODENAME"]: [f".venv/bin/{call['program']}", *call["args"]]
           for call in calls if call["program"] != "srun"}
    assert printed == ran and set(ran) == {"node-a", "node-b", "node-c"}


def test_dry_run_works_outside_slurm(checkout):
    result = subprocess.run(["bash", "slurm/sdpo.sbatch"], cwd=checkout, capture_output=True, text=True,
                            env={**os.environ, "DRY_RUN": "1", "PATH": os.environ["PATH"]}, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "python data/prepare.py sdpo_science" in result.stderr  # a warning only: the data is not there yet
    lines = [line for line in result.stdout.splitlines() if line.startswith("[")]
    assert len(lines) == 2 and lines[0].startswith("[node1]") and "--machine_rank 0" in lines[1]


def test_renamed_variables_are_refused(fake_cluster, checkout):
    result, calls = fake_cluster(checkout, "sdft.sbatch", ["node-a", "node-b"], VLLM_MODEL="Qwen/Qwen3-8B")
    assert result.returncode == 2 and "VLLM_MODEL is no longer read: use MODEL" in result.stderr and calls == []


def test_a_vllm_node_needs_two_nodes(fake_cluster, checkout):
    recipe_data(checkout, "sdft_science")
    result, calls = fake_cluster(checkout, "sdft.sbatch", ["node-a"])
    assert result.returncode == 2 and "VLLM_SERVER_NODE=1 needs at least 2 nodes" in result.stderr and calls == []

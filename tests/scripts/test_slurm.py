"""The Slurm templates, run for real under a fake `sbatch` / `srun` / `scontrol` put first on PATH.

There is no Slurm cluster here, so these three commands are small bash stand-ins: `sbatch` runs the script with
the job's variables, `scontrol show hostnames` lists the fake nodes, and `srun` runs its command once per task
with that task's SLURM_PROCID / SLURMD_NODENAME, as Slurm would on each node. The launchers the templates call
(`accelerate`, `python`) are recorders, so the test sees every command with the variables it was expanded with.
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = ["slurm/sdft.sbatch", "slurm/sdpo.sbatch", "slurm/multinode.sh"]
JOB_ID = 4242

FAKE_SBATCH = """#!/usr/bin/env bash
script=$1; shift
export SLURM_JOB_ID=@JOB@ SLURM_JOB_NODELIST="node-[a-c]" SLURM_SUBMIT_DIR="$PWD"
export SLURM_NNODES=$(echo "$FAKE_NODES" | wc -w)
exec bash "$script" "$@"
""".replace("@JOB@", str(JOB_ID))

FAKE_SCONTROL = """#!/usr/bin/env bash
[[ "$1 $2" == "show hostnames" ]] || { echo "fake scontrol: unsupported: $*" >&2; exit 1; }
for node in $FAKE_NODES; do echo "$node"; done
"""

FAKE_SRUN = """#!/usr/bin/env bash
# run the command once per task, each with the variables Slurm gives a task on its node
ntasks=1; nodelist=""
while [[ $# -gt 0 && "$1" == --* ]]; do
    case "$1" in
        --ntasks=*) ntasks=${1#*=} ;;
        --nodelist=*) nodelist=${1#*=} ;;
    esac
    shift
done
IFS=, read -ra nodes <<< "$nodelist"
for ((task = 0; task < ntasks; task++)); do
    SLURM_PROCID=$task SLURMD_NODENAME=${nodes[$task]} "$@" || exit $?
done
"""

RECORDER = """#!/usr/bin/env bash
python3 - "$0" "$@" <<'PY' >> "$FAKE_RECORD"
import json, os, sys
keys = ("SLURM_PROCID", "SLURMD_NODENAME", "MASTER_ADDR", "MASTER_PORT")
print(json.dumps({"program": os.path.basename(sys.argv[1]), "args": sys.argv[2:],
                  "env": {key: os.environ.get(key) for key in keys}}))
PY
"""


@pytest.mark.parametrize("template", TEMPLATES)
def test_templates_parse(template):
    subprocess.run(["bash", "-n", str(ROOT / template)], check=True)


@pytest.fixture
def fake_cluster(tmp_path):
    bin_dir, venv_bin = tmp_path / "fake_bin", tmp_path / "venv" / "bin"
    for folder, files in ((bin_dir, {"sbatch": FAKE_SBATCH, "scontrol": FAKE_SCONTROL, "srun": FAKE_SRUN}),
                          (venv_bin, {"accelerate": RECORDER, "python": RECORDER})):
        folder.mkdir(parents=True)
        for name, text in files.items():
            (folder / name).write_text(text)
            (folder / name).chmod(0o755)
    submit_dir = tmp_path / "submit"
    shutil.copytree(ROOT / "slurm", submit_dir / "slurm")
    record = tmp_path / "record.jsonl"

    def submit(template: str, nodes: list[str], *args: str, **env: str) -> tuple[subprocess.CompletedProcess, list]:
        record.unlink(missing_ok=True)
        environment = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_NODES": " ".join(nodes),
                       "FAKE_RECORD": str(record), "VENV": str(tmp_path / "venv"), **env}
        result = subprocess.run(["sbatch", f"slurm/{template}", *args], cwd=submit_dir, env=environment,
                                capture_output=True, text=True, timeout=60)
        calls = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
        return result, calls

    return submit, submit_dir


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


@pytest.mark.parametrize("template,script", [("sdft.sbatch", "train_sdft.py"), ("sdpo.sbatch", "train_sdpo.py")])
def test_every_node_gets_its_own_machine_rank(fake_cluster, template, script):
    submit, submit_dir = fake_cluster
    result, calls = submit(template, ["node-a", "node-b"], "--max_steps", "5")
    assert result.returncode == 0, result.stderr
    assert [call["program"] for call in calls] == ["accelerate", "accelerate"]
    expected_port = str(15000 + JOB_ID % 10000)
    for rank, (call, node) in enumerate(zip(calls, ["node-a", "node-b"], strict=True)):
        args = call["args"]
        assert call["env"]["SLURMD_NODENAME"] == node
        assert flag(args, "--machine_rank") == str(rank)  # expanded in the task, not in the batch shell
        assert flag(args, "--num_machines") == "2" and flag(args, "--num_processes") == "16"
        assert flag(args, "--main_process_ip") == "node-a" and flag(args, "--main_process_port") == expected_port
        assert flag(args, "--config_file") == "accelerate_configs/zero3.yaml"
        assert args[args.index(script) + 1:] == ["--config", f"recipes/{script[6:10]}_science.yaml", "--output_dir",
                                                 f"outputs/{script[6:10]}-{JOB_ID}", "--max_steps", "5"]
    assert (submit_dir / "logs").is_dir()


def test_last_node_can_serve_vllm_rollouts(fake_cluster):
    submit, _ = fake_cluster
    result, calls = submit("sdpo.sbatch", ["node-a", "node-b", "node-c"], VLLM_SERVER_NODE="1",
                           VLLM_MODEL="Qwen/Qwen3-8B", VLLM_TENSOR_PARALLEL_SIZE="8", GPUS_PER_NODE="4")
    assert result.returncode == 0, result.stderr
    server = [call for call in calls if call["program"] == "python"]
    trainers = [call for call in calls if call["program"] == "accelerate"]
    assert len(server) == 1 and server[0]["env"]["SLURMD_NODENAME"] == "node-c"
    assert server[0]["args"][:2] == ["-m", "sdft_utils.rollout.vllm_server"]
    assert flag(server[0]["args"], "--model") == "Qwen/Qwen3-8B" and flag(server[0]["args"], "--host") == "0.0.0.0"
    assert flag(server[0]["args"], "--tensor_parallel_size") == "8"
    assert [call["env"]["SLURMD_NODENAME"] for call in trainers] == ["node-a", "node-b"]
    for rank, call in enumerate(trainers):
        args = call["args"]
        assert flag(args, "--machine_rank") == str(rank)
        assert flag(args, "--num_machines") == "2" and flag(args, "--num_processes") == "8"
        assert flag(args, "--rollout") == "vllm" and flag(args, "--vllm_mode") == "server"
        assert flag(args, "--vllm_server_url") == "http://node-c:8000"


def test_vllm_node_without_a_model_is_refused(fake_cluster):
    submit, _ = fake_cluster
    result, calls = submit("sdft.sbatch", ["node-a", "node-b"], VLLM_SERVER_NODE="1")
    assert result.returncode == 2 and "VLLM_MODEL" in result.stderr and calls == []

"""slurm/megatron.sbatch: valid bash, and a run with fake `scontrol`/`srun`/python (no Slurm, no GPU here) shows the
torchrun command each node would run (TP within a node, rendezvous on the first node) and the vLLM server node (on by
default); a TP that does not divide the node's GPUs, or a model that is not a local folder, stops with exit 2."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SBATCH = ROOT / "slurm" / "megatron.sbatch"

FAKE_SCONTROL = '#!/usr/bin/env bash\n[[ "$1 $2" == "show hostnames" ]] && printf "node1\\nnode2\\nnode3\\n"\n'
# srun: log the options, then run the command (options start with --) once, as one task would
FAKE_SRUN = '''#!/usr/bin/env bash
echo "srun $*" >> "$FAKE_LOG"
while [[ "$1" == --* ]]; do shift; done
"$@"
'''
FAKE_PYTHON = '#!/usr/bin/env bash\necho "python $*" >> "$FAKE_LOG"\n'


def dry_run(tmp_path: Path, **variables: str) -> tuple[subprocess.CompletedProcess, str]:
    bin_dir, venv = tmp_path / "bin", tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    bin_dir.mkdir()
    for path, text in ((bin_dir / "scontrol", FAKE_SCONTROL), (bin_dir / "srun", FAKE_SRUN),
                       (venv / "bin" / "python", FAKE_PYTHON)):
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "log.txt"
    log.touch()
    shutil.copytree(ROOT / "slurm", tmp_path / "slurm")  # the template sources slurm/multinode.sh from REPO_DIR
    (tmp_path / "models" / "qwen").mkdir(parents=True)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(log), "SLURM_JOB_ID": "4321",
           "SLURM_JOB_NODELIST": "node[1-3]", "REPO_DIR": str(tmp_path), "VENV": str(venv), "CONFIG": "",
           "MODEL": str(tmp_path / "models" / "qwen"), **variables}
    result = subprocess.run(["bash", str(SBATCH)], env=env, capture_output=True, text=True, timeout=60)
    return result, log.read_text()


def test_sbatch_is_valid_bash():
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)


def test_fake_run_launches_torchrun_per_node_and_a_vllm_server(tmp_path):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "x.yaml").write_text("dataset: data/x/train.jsonl\n")
    (tmp_path / "data" / "x").mkdir(parents=True)
    (tmp_path / "data" / "x" / "train.jsonl").write_text("{}\n")
    result, log = dry_run(tmp_path, TENSOR_MODEL_PARALLEL_SIZE="4", CONFIG="recipes/x.yaml",
                          EXTRA_ARGS="--max_steps 5")
    assert result.returncode == 0, result.stderr
    lines = log.splitlines()
    model = tmp_path / "models" / "qwen"
    train = next(line for line in lines if line.startswith("python -m torch.distributed.run"))
    assert ("--nnodes 2 --nproc-per-node 8 --rdzv-id 4321 --rdzv-backend c10d --rdzv-endpoint node1:19321 "
            f"train_sdft.py --config recipes/x.yaml --model {model}") in train
    assert "--backend megatron --tensor_model_parallel_size 4" in train and train.endswith("--max_steps 5")
    assert "--rollout vllm --vllm_mode server --vllm_server_url http://node3:8000" in train  # the default
    assert any("--nodes=2 --ntasks=2 --ntasks-per-node=1 --nodelist=node1,node2" in line for line in lines)
    server = next(line for line in lines if line.startswith("python -m sdft_utils.rollout.vllm_server"))
    assert f"--model {model}" in server and "--tensor_parallel_size 8" in server


def test_fake_run_without_vllm_trains_on_every_node(tmp_path):
    result, log = dry_run(tmp_path, VLLM_SERVER_NODE="0")
    assert result.returncode == 0, result.stderr
    train = next(line for line in log.splitlines() if line.startswith("python -m torch.distributed.run"))
    assert "--nnodes 3" in train and "--rollout" not in train and "vllm_server" not in log


def test_tp_must_divide_the_gpus_of_a_node(tmp_path):
    result, log = dry_run(tmp_path, TENSOR_MODEL_PARALLEL_SIZE="3")
    assert result.returncode == 2 and "TENSOR_MODEL_PARALLEL_SIZE=3 must divide GPUS_PER_NODE=8" in result.stderr
    assert log == ""


def test_megatron_needs_a_local_model_folder(tmp_path):
    result, log = dry_run(tmp_path, MODEL="Qwen/Qwen2.5-7B-Instruct")
    assert result.returncode == 2 and "local Hugging Face folder" in result.stderr and log == ""

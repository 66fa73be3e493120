"""slurm/megatron.sbatch: valid bash, and a dry run with fake `scontrol`/`srun`/python (no Slurm, no GPU here) shows
the torchrun command each node would run (TP within a node, rendezvous on the first node) and the optional vLLM
server node; a TP that does not divide the node's GPUs stops with exit 2."""

from __future__ import annotations

import os
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
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(log), "SLURM_JOB_ID": "4321",
           "SLURM_JOB_NODELIST": "node[1-3]", "REPO_DIR": str(tmp_path), "VENV": str(venv), **variables}
    result = subprocess.run(["bash", str(SBATCH)], env=env, capture_output=True, text=True, timeout=60)
    return result, log.read_text()


def test_sbatch_is_valid_bash():
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)


def test_dry_run_launches_torchrun_per_node_and_a_vllm_server(tmp_path):
    result, log = dry_run(tmp_path, MODEL="/models/qwen", TP="4", VLLM_NODES="1", CONFIG="recipes/x.yaml",
                          EXTRA_ARGS="--max_steps 5")
    assert result.returncode == 0, result.stderr
    lines = log.splitlines()
    train = next(line for line in lines if line.startswith("python -m torch.distributed.run"))
    assert ("--nnodes 2 --nproc-per-node 8 --rdzv-id 4321 --rdzv-backend c10d --rdzv-endpoint node1:19321 "
            "train_sdft.py --backend megatron --tensor_model_parallel_size 4 --model /models/qwen") in train
    assert "--config recipes/x.yaml" in train and train.endswith("--max_steps 5")
    assert "--rollout vllm --vllm_mode server --vllm_server_url http://node3:8000" in train
    assert any("--nodes=2 --ntasks=2 --ntasks-per-node=1 --nodelist=node1,node2" in line for line in lines)
    server = next(line for line in lines if line.startswith("python -m sdft_utils.rollout.vllm_server"))
    assert "--model /models/qwen" in server and "--tensor_parallel_size 8" in server
    assert "data-parallel groups: 4" in result.stdout


def test_dry_run_without_vllm_trains_on_every_node(tmp_path):
    result, log = dry_run(tmp_path, TP="8")
    assert result.returncode == 0, result.stderr
    train = next(line for line in log.splitlines() if line.startswith("python -m torch.distributed.run"))
    assert "--nnodes 3" in train and "--rollout" not in train and "vllm_server" not in log


def test_tp_must_divide_the_gpus_of_a_node(tmp_path):
    result, log = dry_run(tmp_path, TP="3")
    assert result.returncode == 2 and "TP=3 must divide GPUS_PER_NODE=8" in result.stderr
    assert log == ""

# Shared body of slurm/sdft.sbatch and slurm/sdpo.sbatch (sourced from the repository root; not submitted itself).
# Expects the variables set at the top of those files, and SCRIPT (train_sdft.py or train_sdpo.py).
mkdir -p logs
mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
TRAIN_NODES=${#NODES[@]}
VLLM_FLAGS=""
if [[ "$VLLM_SERVER_NODE" == 1 ]]; then
    [[ -n "$VLLM_MODEL" ]] || { echo "VLLM_SERVER_NODE=1 needs VLLM_MODEL (the training --model)" >&2; exit 2; }
    (( TRAIN_NODES >= 2 )) || { echo "VLLM_SERVER_NODE=1 needs at least 2 nodes" >&2; exit 2; }
    TRAIN_NODES=$((TRAIN_NODES - 1))
    VLLM_HOST=${NODES[-1]}
    srun --nodes=1 --ntasks=1 --nodelist="$VLLM_HOST" --output="logs/%x-%j-vllm.out" \
        "$VENV/bin/python" -m sdft_utils.rollout.vllm_server --model "$VLLM_MODEL" --host 0.0.0.0 --port "$VLLM_PORT" \
        --tensor_parallel_size "$VLLM_TENSOR_PARALLEL_SIZE" &
    VLLM_PID=$!
    trap 'kill "$VLLM_PID" 2>/dev/null || true' EXIT
    # the trainer waits for /health itself (--vllm_server_timeout) before its first weight push
    VLLM_FLAGS="--rollout vllm --vllm_mode server --vllm_server_url http://$VLLM_HOST:$VLLM_PORT --vllm_server_timeout 1800"
fi

# exported so that the single-quoted command below expands them inside each task, on its own node
export VENV ACCELERATE_CONFIG TRAIN_ARGS VLLM_FLAGS TRAIN_NODES SCRIPT
export MASTER_ADDR=${NODES[0]}
export MASTER_PORT=$((15000 + SLURM_JOB_ID % 10000))               # one port per job: jobs can share a node
export NUM_PROCESSES=$((TRAIN_NODES * GPUS_PER_NODE))
TRAIN_NODELIST=$(IFS=,; echo "${NODES[*]:0:$TRAIN_NODES}")
echo "job $SLURM_JOB_ID: training on $TRAIN_NODELIST ($NUM_PROCESSES processes), master $MASTER_ADDR:$MASTER_PORT"

# SLURM_PROCID (0 .. TRAIN_NODES-1, one task per node) is this node's machine rank. Single quotes: it must be
# expanded by each task, not here (here it would be 0 on every node).
srun --nodes="$TRAIN_NODES" --ntasks="$TRAIN_NODES" --ntasks-per-node=1 --nodelist="$TRAIN_NODELIST" \
    --kill-on-bad-exit=1 bash -c 'exec "$VENV/bin/accelerate" launch --config_file "$ACCELERATE_CONFIG" \
        --num_machines "$TRAIN_NODES" --num_processes "$NUM_PROCESSES" --machine_rank "$SLURM_PROCID" \
        --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" --rdzv_backend c10d \
        "$SCRIPT" $TRAIN_ARGS $VLLM_FLAGS "$@"' bash "$@"

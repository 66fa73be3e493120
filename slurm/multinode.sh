# Shared body of slurm/sdft.sbatch, slurm/sdpo.sbatch and slurm/megatron.sbatch (sourced from the repository root
# after their variable block; not submitted itself). Expects SCRIPT, LAUNCHER (accelerate or torchrun) and the user
# variables of those files. One Slurm task per training node starts the launcher there; with VLLM_SERVER_NODE=1 the
# last node serves rollouts with vLLM instead. DRY_RUN=1 prints each node's command and starts nothing.

fail() { echo "error: $*" >&2; exit 2; }
field() { sed -n "s/^$1:[[:space:]]*\([^#[:space:]]*\).*/\1/p" "$2" | head -n 1; }  # a top-level key of a recipe

# ------------------------------------------------------------------------------ renamed variables say so
declare -A RENAMED=([TRAIN_ARGS]="CONFIG, DATASET, OUTPUT_DIR and EXTRA_ARGS" [VLLM_MODEL]="MODEL"
                    [VLLM_NODES]="VLLM_SERVER_NODE" [VLLM_TP]="VLLM_TENSOR_PARALLEL_SIZE"
                    [TP]="TENSOR_MODEL_PARALLEL_SIZE")
for old in "${!RENAMED[@]}"; do
    [[ -z "${!old:-}" ]] || fail "$old is no longer read: use ${RENAMED[$old]} (see docs/scale_out.md)"
done

# ------------------------------------------------------------------------------ nodes
if [[ -n "${SLURM_JOB_NODELIST:-}" ]]; then
    mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
elif [[ "$DRY_RUN" == 1 ]]; then  # outside Slurm: as many made-up nodes as the template's #SBATCH --nodes
    count=${DRY_RUN_NODES:-$(sed -n 's/^#SBATCH --nodes=\([0-9]*\).*/\1/p' "$0" | head -n 1)}
    NODES=()
    for ((i = 0; i < ${count:-1}; i++)); do NODES+=("node$i"); done
else
    fail "not inside a Slurm job: submit with \`sbatch $0\`, or run \`DRY_RUN=1 bash $0\` to see the commands"
fi
JOB=${SLURM_JOB_ID:-0}
TRAIN_NODES=${#NODES[@]}

# ------------------------------------------------------------------------------ inputs, checked before anything starts
[[ -z "$CONFIG" || -f "$CONFIG" ]] || fail "CONFIG=$CONFIG: no such recipe (run from the repository root, or give a path)"
[[ "$LAUNCHER" != accelerate || -f "$ACCELERATE_CONFIG" ]] || fail "ACCELERATE_CONFIG=$ACCELERATE_CONFIG: no such file"
if [[ -z "$MODEL" && -n "$CONFIG" ]]; then MODEL=$(field model "$CONFIG"); fi
if [[ "$LAUNCHER" == torchrun && ! -d "$MODEL" ]]; then
    fail "MODEL=${MODEL:-(unset)}: --backend megatron reads a local Hugging Face folder; download it first, e.g." \
         "\`hf download Qwen/Qwen2.5-7B-Instruct --local-dir /shared/models/Qwen2.5-7B-Instruct\`," \
         "and set MODEL to that folder"
fi
DATA=$DATASET
if [[ -z "$DATA" && -n "$CONFIG" ]]; then DATA=$(field dataset "$CONFIG"); fi
if [[ -n "$DATA" && ! -e "$DATA" && ( "$DATA" =~ ^[./~] || "$DATA" =~ /.*/ || "$DATA" =~ \.(jsonl|json|parquet|csv)$ ) ]]; then
    PREPARE=""
    if [[ -n "$CONFIG" ]]; then PREPARE=$(grep -o -m 1 'python data/prepare.py [a-z_]*' "$CONFIG" || true); fi
    message="the training data $DATA does not exist${PREPARE:+: make it first with \`$PREPARE\` (needs internet access; see docs/scale_out.md)}"
    if [[ "$DRY_RUN" == 1 ]]; then echo "warning: $message" >&2; else fail "$message"; fi
fi
if [[ "$DRY_RUN" != 1 && ! -x "$VENV/bin/python" ]]; then
    fail "VENV=$VENV has no bin/python: set VENV to the environment with the requirements installed"
fi

# ------------------------------------------------------------------------------ the vLLM rollout server
SERVER_COMMAND=()
ROLLOUT_FLAGS=()
case "$VLLM_SERVER_NODE" in
    0) ;;
    1)
        [[ -n "$MODEL" ]] || fail "VLLM_SERVER_NODE=1: the server needs the model; set MODEL (or a CONFIG with model:)"
        (( TRAIN_NODES >= 2 )) || fail "VLLM_SERVER_NODE=1 needs at least 2 nodes (the last one serves rollouts);" \
                                       "submit with --nodes 2 or more, or set VLLM_SERVER_NODE=0"
        TRAIN_NODES=$((TRAIN_NODES - 1))
        VLLM_HOST=${NODES[-1]}
        SERVER_COMMAND=("$VENV/bin/python" -m sdft_utils.rollout.vllm_server --model "$MODEL" --host 0.0.0.0
                        --port "$VLLM_PORT" --tensor_parallel_size "$VLLM_TENSOR_PARALLEL_SIZE"
                        --gpu_memory_utilization "$VLLM_GPU_MEMORY_UTILIZATION" --timeout "$VLLM_SERVER_TIMEOUT")
        # the trainer waits for the server's /health itself before its first weight push
        ROLLOUT_FLAGS=(--rollout vllm --vllm_mode server --vllm_server_url "http://$VLLM_HOST:$VLLM_PORT"
                       --vllm_server_timeout "$VLLM_SERVER_TIMEOUT")
        ;;
    *) fail "VLLM_SERVER_NODE must be 0 or 1, got '$VLLM_SERVER_NODE'" ;;
esac

# ------------------------------------------------------------------------------ the training command of each node
SCRIPT_ARGS=()
[[ -z "$CONFIG" ]] || SCRIPT_ARGS+=(--config "$CONFIG")
[[ -z "$MODEL" ]] || SCRIPT_ARGS+=(--model "$MODEL")
[[ -z "$DATASET" ]] || SCRIPT_ARGS+=(--dataset "$DATASET")
SCRIPT_ARGS+=(--output_dir "$OUTPUT_DIR")
if [[ "$LAUNCHER" == torchrun ]]; then
    (( GPUS_PER_NODE % TENSOR_MODEL_PARALLEL_SIZE == 0 )) || fail "TENSOR_MODEL_PARALLEL_SIZE=$TENSOR_MODEL_PARALLEL_SIZE" \
        "must divide GPUS_PER_NODE=$GPUS_PER_NODE (tensor parallelism stays within a node)"
    SCRIPT_ARGS+=(--backend megatron --tensor_model_parallel_size "$TENSOR_MODEL_PARALLEL_SIZE")
fi
read -ra EXTRA <<< "$EXTRA_ARGS"  # one word per flag or value; no quoting inside EXTRA_ARGS
SCRIPT_ARGS+=("${ROLLOUT_FLAGS[@]}" "${EXTRA[@]}" "$@")

MASTER_ADDR=${NODES[0]}
MASTER_PORT=$((15000 + JOB % 10000))  # one port per job: jobs may share a node
NUM_PROCESSES=$((TRAIN_NODES * GPUS_PER_NODE))
if [[ "$LAUNCHER" == torchrun ]]; then  # torchrun ranks the nodes itself through the c10d rendezvous
    LAUNCH=("$VENV/bin/python" -m torch.distributed.run --nnodes "$TRAIN_NODES" --nproc-per-node "$GPUS_PER_NODE"
            --rdzv-id "$JOB" --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT")
else
    LAUNCH=("$VENV/bin/accelerate" launch --config_file "$ACCELERATE_CONFIG" --num_machines "$TRAIN_NODES"
            --num_processes "$NUM_PROCESSES" --machine_rank __MACHINE_RANK__ --main_process_ip "$MASTER_ADDR"
            --main_process_port "$MASTER_PORT" --rdzv_backend c10d)
fi
# One string, quoted word by word; each task runs exactly this with its own SLURM_PROCID as the machine rank (0 ..
# TRAIN_NODES-1), which is also what DRY_RUN prints.
TRAIN_COMMAND=$(printf '%q ' "${LAUNCH[@]}" "$SCRIPT" "${SCRIPT_ARGS[@]}")
TRAIN_COMMAND=${TRAIN_COMMAND% }
TRAIN_NODELIST=$(IFS=,; echo "${NODES[*]:0:$TRAIN_NODES}")
ROLLOUTS="HF generate on the training GPUs"
[[ -z "${VLLM_HOST:-}" ]] || ROLLOUTS="vLLM server on $VLLM_HOST:$VLLM_PORT"
echo "job $JOB: training on $TRAIN_NODELIST ($NUM_PROCESSES processes), master $MASTER_ADDR:$MASTER_PORT;" \
     "rollouts: $ROLLOUTS; HF_HUB_OFFLINE=$HF_HUB_OFFLINE HF_HOME=$HF_HOME"

if [[ "$DRY_RUN" == 1 ]]; then
    echo "DRY_RUN=1: the command each node would run (nothing is started)"
    if [[ ${#SERVER_COMMAND[@]} -gt 0 ]]; then server=$(printf '%q ' "${SERVER_COMMAND[@]}"); echo "[$VLLM_HOST] ${server% }"; fi
    for ((rank = 0; rank < TRAIN_NODES; rank++)); do echo "[${NODES[$rank]}] ${TRAIN_COMMAND//__MACHINE_RANK__/$rank}"; done
    exit 0
fi

mkdir -p logs  # the job's own log needs logs/ before the job starts (it is committed); this is for the server's
if [[ ${#SERVER_COMMAND[@]} -gt 0 ]]; then
    srun --nodes=1 --ntasks=1 --nodelist="$VLLM_HOST" --kill-on-bad-exit=1 --output="logs/%x-%j-vllm.out" \
        "${SERVER_COMMAND[@]}" &
    VLLM_PID=$!
    trap 'kill "$VLLM_PID" 2>/dev/null || true' EXIT  # stop the server step when training ends
fi
export TRAIN_COMMAND
# shellcheck disable=SC2016  # expanded by each task, on its own node
srun --nodes="$TRAIN_NODES" --ntasks="$TRAIN_NODES" --ntasks-per-node=1 --nodelist="$TRAIN_NODELIST" \
    --kill-on-bad-exit=1 bash -c 'eval "exec ${TRAIN_COMMAND//__MACHINE_RANK__/$SLURM_PROCID}"'

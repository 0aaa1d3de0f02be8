#!/bin/bash
# One per node, started by train.sbatch through `srun --ntasks-per-node=1`: runs this node's
# trainer processes under torchrun and reports how they ended.
#
#   node.sh [hydra overrides...]
#
# Reads (exported by train.sbatch): MASTER_ADDR, MASTER_PORT, PRETRAIN_PYTHON, PRETRAIN_MODULE,
# NPROC_PER_NODE (optional), STOP_TIMEOUT_S, PRETRAIN_EXIT_FILE; and from Slurm: SLURM_NODEID,
# SLURM_NNODES, SLURM_GPUS_ON_NODE.
#
# Exit status: torchrun's, except after a stop signal (USR1/TERM): then 0. The trainers have
# saved a checkpoint and exited 75, torchrun reports that as a failure, and a non-zero task exit
# would make `srun --kill-on-bad-exit` SIGKILL the other nodes while their rank is still
# finishing (closing W&B, writing `latest`). Whether training completed is reported through
# PRETRAIN_EXIT_FILE instead (node 0 writes torchrun's exit status there).
set -uo pipefail

node_rank=${SLURM_NODEID:?node.sh runs as an srun task inside a Slurm job}
nnodes=${SLURM_NNODES:?}
python=${PRETRAIN_PYTHON:-python3}
module=${PRETRAIN_MODULE:-pretrain.train}

# Trainer processes on this node: one per GPU, or one on a CPU-only node.
if [[ -z ${NPROC_PER_NODE:-} ]]; then
    if [[ -n ${SLURM_GPUS_ON_NODE:-} && ${SLURM_GPUS_ON_NODE} -gt 0 ]]; then
        NPROC_PER_NODE=$SLURM_GPUS_ON_NODE
    elif command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
        NPROC_PER_NODE=$(nvidia-smi -L | grep -c '^GPU')
    else
        NPROC_PER_NODE=1
    fi
fi

# Slurm signals every process of the step (this script, torchrun, the trainers). This script
# must survive the signal to report the outcome; torchrun forwards it to the trainers again and
# waits up to STOP_TIMEOUT_S for them to save and exit (a second copy of the signal only sets the
# trainer's flag again).
stopped=""
trap 'stopped=USR1' USR1
trap 'stopped=TERM' TERM

echo "node.sh: node ${node_rank}/${nnodes} on $(hostname) (${SLURMD_NODENAME:-?}):" \
    "${NPROC_PER_NODE} process(es), rendezvous ${MASTER_ADDR}:${MASTER_PORT}"

# --max-restarts 0: a dead trainer fails this node at once (torchrun stops its other local
# trainers and exits non-zero; srun --kill-on-bad-exit then stops the other nodes).
"$python" -m torch.distributed.run \
    --nnodes="$nnodes" \
    --node-rank="$node_rank" \
    --nproc-per-node="$NPROC_PER_NODE" \
    --master-addr="$MASTER_ADDR" \
    --master-port="$MASTER_PORT" \
    --max-restarts=0 \
    --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
    --shutdown-timeout="${STOP_TIMEOUT_S:-150}" \
    -m "$module" "$@" &
agent=$!

# `wait` returns early (status > 128) whenever a trapped signal arrives: wait again until
# torchrun itself has exited.
wait "$agent"
rc=$?
while kill -0 "$agent" 2>/dev/null; do
    wait "$agent"
    rc=$?
done

if [[ $node_rank == 0 && -n ${PRETRAIN_EXIT_FILE:-} ]]; then
    echo "$rc" >"$PRETRAIN_EXIT_FILE"
fi
if [[ -n $stopped && $rc != 0 ]]; then
    echo "node.sh: node ${node_rank}: trainers stopped on SIG${stopped} (torchrun exit ${rc})"
    exit 0
fi
exit "$rc"

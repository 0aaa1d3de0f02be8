#!/bin/bash
# Train on this machine: one process on the CPU or a single GPU, one process per GPU (torchrun)
# when there are several.
#
#   launch/local.sh experiment=debug                          # CPU or 1 GPU
#   launch/local.sh experiment=gpt2-124m strategy=ddp         # every GPU of the machine
#   launch/local.sh --nproc 2 experiment=debug strategy=ddp   # 2 processes (on CPU: gloo)
#   launch/local.sh --auto-resume experiment=demo             # start again after a preemption
#
# Options (before the Hydra overrides, which are passed to pretrain.train unchanged):
#   --nproc N        processes (default: the visible GPUs, 1 without a GPU)
#   --auto-resume    start training again when it was preempted: it exited 75 after saving a
#                    checkpoint (SIGUSR1 or SIGTERM sent to the trainer), or this script was sent
#                    SIGUSR1 (passed on to the trainers). The new start resumes from the checkpoint.
#   --python PATH    interpreter (default: .venv/bin/python of this checkout, else python3)
# PRETRAIN_MODULE=<module> runs another entry point than pretrain.train.
#
# Signals to this script: USR1 = save and stop (and start again with --auto-resume);
# TERM or Ctrl-C = save and stop for good (the trainers finish their step and save first; a
# second Ctrl-C kills them at once).
set -uo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
nproc=""
auto_resume=0
python=""
while [[ $# -gt 0 ]]; do
    case $1 in
    --nproc) nproc=${2:?--nproc needs a number}; shift 2 ;;
    --nproc=*) nproc=${1#--nproc=}; shift ;;
    --auto-resume) auto_resume=1; shift ;;
    --python) python=${2:?--python needs a path}; shift 2 ;;
    --python=*) python=${1#--python=}; shift ;;
    -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    --) shift; break ;;
    -*) echo "local.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) break ;;
    esac
done
if [[ -z $python ]]; then
    python=python3
    [[ -x $repo/.venv/bin/python ]] && python=$repo/.venv/bin/python
fi

# Visible GPUs: CUDA_VISIBLE_DEVICES when set (empty means none), else what nvidia-smi lists.
gpu_count() {
    if [[ -n ${CUDA_VISIBLE_DEVICES+x} ]]; then
        [[ -z $CUDA_VISIBLE_DEVICES ]] && { echo 0; return; }
        tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c .
    elif command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
        nvidia-smi -L | grep -c '^GPU'
    else
        echo 0
    fi
}
gpus=$(gpu_count)
module=${PRETRAIN_MODULE:-pretrain.train}
if [[ -z $nproc ]]; then
    nproc=$((gpus > 1 ? gpus : 1))
fi
if ! [[ $nproc =~ ^[1-9][0-9]*$ ]]; then
    echo "local.sh: --nproc must be a positive integer, got '$nproc'" >&2
    exit 2
fi

if [[ $nproc == 1 ]]; then
    launcher=("$python" -m "$module")
else
    # --standalone: a private rendezvous on a free local port; --max-restarts 0: one dead
    # process stops them all (a restart is this script's business, after a checkpoint).
    # torchrun passes TERM/USR1 on to the trainers and waits for them; SIGINT is left out so
    # that a terminal's Ctrl-C, which reaches every process, stays ignored by torchrun and the
    # trainers (see below).
    # shellcheck disable=SC2054 # the commas belong to --signals-to-handle
    launcher=("$python" -m torch.distributed.run --standalone --nproc-per-node="$nproc"
        --max-restarts=0 --signals-to-handle=SIGTERM,SIGHUP,SIGQUIT,SIGUSR1
        --shutdown-timeout="${STOP_TIMEOUT_S:-150}" -m "$module")
fi
where=$([[ $gpus -gt 0 ]] && echo "GPU" || echo "CPU")
echo "local.sh: ${nproc} process(es) on ${where} (${gpus} GPU(s) visible)"

# Signals sent to this script go on to the trainer (under torchrun: to torchrun, which passes
# them on and waits for the trainers to save and exit). Ctrl-C becomes SIGTERM, on which the
# trainer saves: the SIGINT itself is ignored by the trainer, as by every background child of a
# script (a KeyboardInterrupt would stop it without a checkpoint).
stop=""
child=""
forward() {
    local sig=$1
    if [[ $sig == INT ]]; then
        sig=TERM
        [[ $stop == INT ]] && sig=KILL # second Ctrl-C: no more waiting
    fi
    stop=$1
    [[ -z $child ]] && return
    [[ $sig == KILL ]] && pkill -KILL -P "$child" 2>/dev/null # torchrun's trainers
    kill -s "$sig" "$child" 2>/dev/null
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM
trap 'forward INT' INT

# The checkout must be importable whatever the working directory (relative paths in the
# overrides stay relative to where this was started).
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
args=("$@")
start=1
while :; do
    "${launcher[@]}" "${args[@]}" &
    child=$!
    wait "$child"
    rc=$?
    while kill -0 "$child" 2>/dev/null; do # `wait` returns early when a trapped signal arrives
        wait "$child"
        rc=$?
    done
    child=""
    # 75: the trainer saved and stopped. torchrun reports any stop of its trainers as 1, so after
    # a USR1 passed on by us a failure counts as preempted too: a real crash would show again
    # on the next start, without a signal, and end the loop.
    preempted=$([[ $rc == 75 || ($stop == USR1 && $rc != 0) ]] && echo 1 || echo 0)
    if [[ $auto_resume == 1 && $preempted == 1 && $stop != TERM && $stop != INT ]]; then
        start=$((start + 1))
        echo "local.sh: training was preempted (exit $rc) after saving a checkpoint: start $start resumes it"
        stop=""
        # Whatever the first start said, the next one continues from the checkpoint.
        for i in "${!args[@]}"; do
            [[ ${args[$i]} == checkpoint.resume=* ]] && args[i]=checkpoint.resume=auto
        done
        continue
    fi
    exit "$rc"
done

#!/usr/bin/env bash
# One rank of a torchrun job, with something done to one rank only (tests of one rank's
# failure): the rank named by FAIL_RANK runs FAIL_SETUP in its shell first (e.g. a file-size
# limit) and gets FAIL_ARGS appended to its command line. Every rank appends
# "<rank> <exit status> <time>" to EXIT_LOG when its trainer ends, so a test can tell how long
# the last rank outlived the first.
# Signals are the trainer's business; this wrapper only reports (torchrun signals the group).
trap '' TERM USR1
extra=()
if [ "${RANK:-0}" = "${FAIL_RANK:--1}" ]; then
    eval "${FAIL_SETUP:-}"
    read -r -a extra <<< "${FAIL_ARGS:-}"
fi
"${PYTHON:-python}" -m pretrain.train "$@" "${extra[@]}"
code=$?
echo "${RANK:-0} $code $(date +%s.%N)" >> "${EXIT_LOG:-/dev/null}"
exit $code

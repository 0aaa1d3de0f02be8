#!/bin/bash
# Pre-install what tests/slurm needs (Debian/Ubuntu, as root): slurm-wlm and munge, without
# starting any daemon. The tests install these themselves when missing; this only moves the
# ~10 s install out of the test run (e.g. into a CI image build).
set -euo pipefail
if [[ $(id -u) != 0 ]]; then
    echo "install-slurm.sh: run as root (apt-get install)" >&2
    exit 1
fi
# policy-rc.d exiting 101 = "do not start services" for the packages' postinst scripts.
own_policy=0
if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    own_policy=1
fi
trap '[[ $own_policy == 1 ]] && rm -f /usr/sbin/policy-rc.d' EXIT
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q --no-install-recommends slurm-wlm munge ||
    { apt-get update -q && apt-get install -y -q --no-install-recommends slurm-wlm munge; }

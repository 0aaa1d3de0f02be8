"""The Slurm tier's cluster: one per test session, shared by the tier's tests."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.slurm_cluster import SlurmCluster, SlurmUnavailable


@pytest.fixture(scope="session")
def slurm() -> Iterator[SlurmCluster]:
    # At least 2 CPUs per node, whatever the host has (slurmd takes the configured count):
    # two one-CPU jobs can then share the nodes, as the sweep test needs.
    cluster = SlurmCluster(cpus_per_node=max(2, os.cpu_count() or 1))
    try:
        cluster.start()
    except SlurmUnavailable as e:
        pytest.skip(f"cannot run a Slurm cluster here: {e}")
    try:
        yield cluster
    finally:
        cluster.stop()

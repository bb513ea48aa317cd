"""Shared fixtures: real LocalClusters and real zarr stores under tmp_path."""

from __future__ import annotations

import faulthandler
import hashlib
import os
import sys

import pytest
from distributed import Client, LocalCluster

from kompot_dask._engine.cluster import worker_environment
from kompot_dask.testing import SyntheticSpec, write_synthetic_store


def pytest_configure(config):
    """A crash (SIGSEGV, SIGABRT) prints the Python stack of the thread that crashed only:
    with every thread's stack, as pytest's own faulthandler plugin prints (switched off in
    pyproject.toml), the crashing one is buried in the middle of a long log whose tail is
    all a CI summary shows. The stream is a duplicate of the terminal's stderr, taken
    before pytest captures it."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, ValueError, OSError):
        fd = sys.__stderr__.fileno()
    faulthandler.enable(file=os.dup(fd), all_threads=False)


SMALL = SyntheticSpec(n_obs=1200, n_vars=90, n_dims=8, seed=3)


def _cluster(n_workers: int) -> LocalCluster:
    return LocalCluster(
        n_workers=n_workers, threads_per_worker=1, processes=True, memory_limit="3GiB",
        host="127.0.0.1", dashboard_address=None, env=worker_environment(1),
    )


@pytest.fixture(scope="session")
def client():
    """Two worker processes, shared by the whole session."""
    with _cluster(2) as cluster, Client(cluster, set_as_default=False) as c:
        yield c


@pytest.fixture(scope="session")
def client_one_worker():
    with _cluster(1) as cluster, Client(cluster, set_as_default=False) as c:
        yield c


@pytest.fixture
def small_store(tmp_path):
    """A small synthetic store (1,200 cells × 90 genes, Age ∈ {Young, Old})."""
    return write_synthetic_store(tmp_path / "small.zarr", SMALL, cell_chunk=256, gene_chunk=32)


def tree_digest(path: str | os.PathLike) -> dict[str, str]:
    """Relative path → sha256 of every file under ``path`` (to prove a store is untouched)."""
    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            with open(full, "rb") as fh:
                out[os.path.relpath(full, path)] = hashlib.sha256(fh.read()).hexdigest()
    return out

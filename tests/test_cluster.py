"""Worker pinning: XLA sizes its thread pool by CPU affinity, so workers on one host get
disjoint cores, as many as their Dask threads."""

from __future__ import annotations

import os

import pytest
from distributed import Client, LocalCluster

import kompot_dask as kd
from kompot_dask._engine.cluster import worker_environment


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs Linux and 2 cores")
def test_pin_workers__disjoint_cores_per_worker():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, memory_limit="2GiB",
                      host="127.0.0.1", dashboard_address=None, env=worker_environment(1)) as cl, \
            Client(cl, set_as_default=False) as c:
        pinned = kd.pin_workers(c)
        assert len(pinned) == 2 and all(len(v) == 1 for v in pinned.values())
        assert len({tuple(v) for v in pinned.values()}) == 2
        # every thread of the worker process, including ones started later, stays on its core
        seen = c.run(lambda: sorted(os.sched_getaffinity(0)))
        assert seen == pinned
        later = c.submit(lambda: sorted(os.sched_getaffinity(0)), pure=False).result()
        assert later in pinned.values()


def test_pin_workers__more_threads_than_cores_are_left_alone():
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    with LocalCluster(n_workers=1, threads_per_worker=n + 1, processes=True, memory_limit="2GiB",
                      host="127.0.0.1", dashboard_address=None, env=worker_environment(1)) as cl, \
            Client(cl, set_as_default=False) as c:
        assert kd.pin_workers(c) == {}

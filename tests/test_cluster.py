"""Worker pinning: XLA sizes its thread pool by CPU affinity, so workers on one host get
disjoint cores, as many as their Dask threads."""

from __future__ import annotations

import os

import pytest
from dask.system import cpu_count as dask_cpu_count
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


def _mmapped_by_a_4mib_array() -> int:
    """Bytes that glibc served from fresh mmaps for one 4 MiB allocation (0: from the heap)."""
    import ctypes

    import numpy as np

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    mallinfo2.restype = MallInfo2
    before = mallinfo2().hblkhd
    a = np.ones(2**19)  # 4 MiB
    after = mallinfo2().hblkhd
    del a
    return int(after - before)


def _has_mallinfo2() -> bool:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallinfo2  # noqa: B018
        return True
    except (OSError, AttributeError):
        return False


@pytest.mark.skipif(not _has_mallinfo2(), reason="needs glibc ≥ 2.33")
def test_worker_runtime__heap_thresholds_for_the_run_then_the_workers_own():
    """Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, which pins glibc's mmap
    threshold at 128 KiB: each kernel block would be a fresh, kernel-zeroed mmap. During a
    run, large blocks come from the heap; afterwards the worker's own setting is back."""
    from kompot_dask._engine.cluster import worker_runtime

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, memory_limit="2GiB",
                      host="127.0.0.1", dashboard_address=None, env=worker_environment(1)) as cl, \
            Client(cl, set_as_default=False) as c:
        assert c.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_")).popitem()[1] is not None

        def mmapped() -> list[int]:
            # mallinfo2 is process-wide: a worker thread that frees or maps memory at the same
            # moment shifts one reading, so each check takes five
            return [c.submit(_mmapped_by_a_4mib_array, pure=False).result() for _ in range(5)]

        assert max(mmapped()) >= 2**22
        with worker_runtime(c):
            assert min(mmapped()) == 0
        assert max(mmapped()) >= 2**22


def test_malloc_arenas__capped_only_where_an_in_process_cluster_may_start(monkeypatch):
    """kd.de caps glibc's malloc arenas before it opens the store when its embedded
    cluster may run in this process, and leaves a user's MALLOC_ARENA_MAX alone."""
    import subprocess
    import sys

    from kompot_dask._engine.cluster import glibc, limit_malloc_arenas, may_run_in_process

    assert may_run_in_process(None, kd.ComputeSettings())
    assert not may_run_in_process(None, kd.ComputeSettings(processes=True))
    assert not may_run_in_process(None, kd.ComputeSettings(n_workers=2))
    assert not may_run_in_process(None, kd.ComputeSettings(memory_limit="2GB"))
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cl, \
            Client(cl) as c:
        assert not may_run_in_process(c, kd.ComputeSettings())
        assert not may_run_in_process(None, kd.ComputeSettings())  # a current client is used instead
    monkeypatch.setenv("MALLOC_ARENA_MAX", "8")
    assert not limit_malloc_arenas()
    if glibc() is None:
        pytest.skip("not glibc")
    # in a fresh process (the cap stays for the life of a process)
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    out = subprocess.run([sys.executable, "-c", "from kompot_dask._engine.cluster import limit_malloc_arenas as f;"
                          "print(f())"], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "True"


def test_worker_runtime__holds_blas_for_a_users_in_process_client():
    """A user's own Client(processes=False) runs its Dask threads in this process: BLAS is
    held at cores / Dask threads per call there, as for the embedded in-process cluster
    (left free, each thread's BLAS would start a thread per core). Worker processes are
    left to their environment."""
    from threadpoolctl import threadpool_info

    from kompot_dask._engine.cluster import in_process_threads, is_in_process, worker_runtime

    def blas_threads() -> set[int]:
        return {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}

    cores = max(1, int(dask_cpu_count()))
    with LocalCluster(n_workers=1, threads_per_worker=cores, processes=False, dashboard_address=None) as cl, \
            Client(cl, set_as_default=False) as c:
        assert is_in_process(c) and in_process_threads(c) == cores
        with worker_runtime(c):
            assert blas_threads() == {1}
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, memory_limit="2GiB", host="127.0.0.1",
                      dashboard_address=None, env=worker_environment(1)) as cl, \
            Client(cl, set_as_default=False) as c:
        assert not is_in_process(c) and in_process_threads(c) == 0


def test_client_preparation__every_core_for_blas_and_openmp(monkeypatch):
    """The fast path's neighbour search and k-means run in the client while the workers
    wait: they get every core of the process for BLAS and OpenMP even where the run holds
    BLAS at one thread per in-process Dask thread, or where Dask's nanny left
    OMP_NUM_THREADS=1 in this process's environment (a user's LocalCluster)."""
    import numpy as np
    from threadpoolctl import threadpool_info, threadpool_limits

    from kompot_dask._engine import graph
    from kompot_dask._layout import landmarks_for

    cores = len(os.sched_getaffinity(0))
    seen = {}

    def threads() -> dict[str, set[int]]:
        out: dict[str, set[int]] = {}
        for i in threadpool_info():
            out.setdefault(i["user_api"], set()).add(i["num_threads"])
        return out

    def length_scale(*args):
        seen["length scale"] = threads()
        return 1.0

    def landmarks(pooled, count, *args):
        seen["k-means"] = threads()
        return pooled[:count]

    monkeypatch.setattr(graph, "_length_scale_task", length_scale)
    monkeypatch.setattr(graph.gp_mod, "compute_landmarks", landmarks)
    X = np.random.default_rng(0).standard_normal((200, 3))
    with threadpool_limits(limits=1):
        ls, Z, source = graph.prepare_model(None, X[:100], X, ls=None, ls_factor=10.0,
                                            landmarks=landmarks_for(50, 200), given=None, random_state=0,
                                            neighbors="exact", landmark_sample=100)
        assert source == "kmeans" and Z.shape == (50, 3)
        assert seen["length scale"]["blas"] == {cores} and seen["k-means"]["blas"] == {cores}
        assert seen["k-means"]["openmp"] == {cores}  # scikit-learn's runtime, loaded first
        assert threads()["blas"] == {1}  # the run's limit again afterwards

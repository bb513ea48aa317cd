"""Resolve the Dask client a run uses: the one passed, the current one, or an embedded
LocalCluster whose worker processes get their JAX/BLAS environment before JAX starts."""

from __future__ import annotations

import ast
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

import dask
import psutil
from dask.system import cpu_count as dask_cpu_count
from distributed import Client, LocalCluster, get_client

from .._numerics.gp import numba_cache_dir
from .._settings import ComputeSettings

logger = logging.getLogger("kompot_dask")


def worker_environment(threads_per_worker: int) -> dict[str, str]:
    """Environment for worker processes: one XLA/BLAS thread per Dask thread, so that
    BLAS threads × Dask threads stays at the core count, and float64 JAX by default."""
    single = "1"
    return {
        "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
        "OMP_NUM_THREADS": single,
        "OPENBLAS_NUM_THREADS": single,
        "MKL_NUM_THREADS": single,
        "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"),
        "NUMBA_CACHE_DIR": numba_cache_dir(),
    }


IN_PROCESS_MAX_ELEMENTS = 50_000_000
"""Largest run (cells × genes of the store) that the embedded cluster runs in the client's
own process by default (``ComputeSettings.processes=None``)."""


def _asks_for_processes(compute: ComputeSettings) -> bool:
    return bool(compute.processes) or (
        compute.processes is None
        and (compute.n_workers not in (None, 1) or compute.threads_per_worker is not None
             or compute.memory_limit is not None)  # a memory limit is enforced by a nanny only
    )


def use_in_process(compute: ComputeSettings, n_elements: int | None) -> bool:
    """Whether the embedded LocalCluster runs its worker as threads of this process: small
    runs, and every run of a script that spawned workers would run again
    (:func:`unguarded_script`)."""
    if compute.processes is not None:
        return not compute.processes
    if _asks_for_processes(compute):
        return False
    return _small_run(n_elements) or unguarded_script() is not None


def _small_run(n_elements: int | None) -> bool:
    return n_elements is not None and n_elements <= IN_PROCESS_MAX_ELEMENTS


def _is_main_test(test: ast.expr) -> bool:
    """``__name__ == "__main__"`` (either way round)."""
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
        return False
    sides = [test.left, test.comparators[0]]
    names = [s.id for s in sides if isinstance(s, ast.Name)]
    consts = [s.value for s in sides if isinstance(s, ast.Constant)]
    return names == ["__name__"] and consts == ["__main__"]


def unguarded_script() -> str | None:
    """The path of the script this process runs when its top level has no
    ``if __name__ == "__main__":`` block, else ``None``.

    A spawned worker process imports the main script again (as ``__mp_main__``) and so runs
    every unguarded statement of it: a top-level ``kd.de(...)`` would start a second run in
    each worker. Interactive sessions, notebooks and ``python -c`` have no script to import.
    """
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if not path or not str(path).endswith(".py") or not os.path.isfile(path):
        return None
    return None if _has_main_block(str(path), os.stat(path).st_mtime_ns) else str(path)


@lru_cache(maxsize=8)
def _has_main_block(path: str, mtime_ns: int) -> bool:
    """Whether the script at ``path`` has a top-level ``if __name__ == "__main__":`` (parsed
    once per version of the file; an unreadable one counts as guarded)."""
    try:
        with open(path, encoding="utf-8") as fh:
            tree = ast.parse(fh.read(), filename=path)
    except (OSError, SyntaxError, ValueError, UnicodeDecodeError):
        return True
    return any(isinstance(node, ast.If) and _is_main_test(node.test) for node in tree.body)


def in_spawned_import() -> bool:
    """Whether this process is re-importing its parent's main script (a spawned process's
    start: multiprocessing names that module ``__mp_main__``)."""
    main = sys.modules.get("__main__")
    return getattr(main, "__name__", "__main__") == "__mp_main__"


class UnguardedScriptError(RuntimeError):
    """A call that would make worker processes re-run the user's script, or one made while
    a worker process re-runs it; raised before anything is read or written."""


def check_process_context(function: str, client: Client | None, compute: ComputeSettings) -> None:
    """Refuse, before touching any store, the two calls a process-based cluster cannot serve.

    Raises
    ------
    UnguardedScriptError
        The call runs while a spawned process re-imports the main script; or an unguarded
        script asks for worker processes (``ComputeSettings(processes=True)``, several
        workers, a thread count or a memory limit) from an embedded cluster.
    """
    if in_spawned_import():
        raise UnguardedScriptError(
            f"{function} was called while a new process re-imported the main script (multiprocessing's spawn), "
            "so it did nothing. Put the script's top-level code under `if __name__ == \"__main__\":`."
        )
    if client is not None or not _asks_for_processes(compute):
        return
    try:
        get_client()
        return  # a current client: no cluster is started
    except ValueError:
        pass
    script = unguarded_script()
    if script is not None:
        raise UnguardedScriptError(
            f"{script} has no `if __name__ == \"__main__\":` block, and the ComputeSettings ask for worker "
            "processes, each of which would run the whole script again. Put the script's top-level code under "
            "`if __name__ == \"__main__\":`, or drop processes=/n_workers=/threads_per_worker=/memory_limit= to "
            "compute in this process. Nothing was read or written."
        )


def default_local_cluster_kwargs(compute: ComputeSettings, in_process: bool = False) -> dict:
    # Dask's count: the CPU affinity and a cgroup's CPU quota (a container's share), not
    # the host's cores that os.cpu_count() reports.
    cores = max(1, int(dask_cpu_count()))
    if in_process:
        memory_limit = compute.memory_limit
        if memory_limit is None:
            memory_limit = int(0.9 * psutil.virtual_memory().total)
        return dict(n_workers=1, threads_per_worker=cores, processes=False, memory_limit=memory_limit,
                    dashboard_address="127.0.0.1:0", silence_logs=logging.ERROR)
    threads = compute.threads_per_worker
    if compute.n_workers is None:
        n_workers = 1 if threads is None else max(1, cores // threads)
    else:
        n_workers = compute.n_workers
    if threads is None:
        threads = max(1, cores // n_workers)
    memory_limit = compute.memory_limit
    if memory_limit is None:
        memory_limit = int(0.9 * psutil.virtual_memory().total / n_workers)
    return dict(
        n_workers=n_workers,
        threads_per_worker=threads,
        processes=True,
        memory_limit=memory_limit,
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
        env=worker_environment(threads),
        silence_logs=logging.ERROR,
    )


def cluster_workers(client: Client) -> dict[str, dict]:
    """Address → the scheduler's record of each worker, asked of the scheduler now.

    Not ``client.scheduler_info()["workers"]``: that returns the client's cached identity,
    which the client's own periodic refresh overwrites with a worker-less summary, so a
    call that races the refresh sees no workers at all.
    """
    return dict(client.sync(client.scheduler.identity, n_workers=-1).get("workers", {}))


def _process_cores() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def _pin_process(cores: list[int]) -> list[int]:
    """Restrict every thread of this process (and the threads it starts later) to ``cores``."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), set(cores))
        except OSError:  # the thread ended meanwhile
            pass
    return sorted(os.sched_getaffinity(0))


def pin_workers(client: Client) -> dict[str, list[int]]:
    """Give each worker process on a host cores of its own, as many as its Dask threads.

    JAX/XLA sizes its CPU thread pool by the process's CPU affinity and ignores
    ``XLA_FLAGS`` thread settings: two worker processes on a 2-core host would each run
    2-thread XLA kernels, 4 threads on 2 cores. Pinning keeps XLA threads × worker threads
    at the core count. Hosts whose workers ask for more threads than they have cores are
    left alone. Linux only (elsewhere nothing happens). Returns worker → cores.
    """
    if not hasattr(os, "sched_setaffinity") or not os.path.isdir("/proc/self/task"):
        return {}
    workers = cluster_workers(client)
    current = client.run(_process_cores)
    by_host: dict[str, list[str]] = {}
    for addr in sorted(workers):
        by_host.setdefault(workers[addr]["host"], []).append(addr)
    pinned: dict[str, list[int]] = {}
    for host, addrs in by_host.items():
        cores = current[addrs[0]]
        need = sum(int(workers[a]["nthreads"]) for a in addrs)
        if need > len(cores) or any(current[a] != cores for a in addrs):
            logger.debug("Not pinning workers on %s: %d threads for %d cores", host, need, len(cores))
            continue
        start = 0
        for a in addrs:
            n = int(workers[a]["nthreads"])
            pinned[a] = client.run(_pin_process, cores[start : start + n], workers=[a])[a]
            start += n
    return pinned


@contextmanager
def resolve_client(client: Client | None = None, compute: ComputeSettings | None = None,
                   n_elements: int | None = None) -> Iterator[Client]:
    """Yield the client to run on; an embedded LocalCluster is closed on exit.

    ``n_elements`` (cells × genes of the run's store) lets a small run's embedded cluster
    run in this process (see :func:`use_in_process`).
    """
    if client is not None:
        yield client
        return
    try:
        current = get_client()
    except ValueError:
        current = None
    if current is not None:
        yield current
        return
    compute = compute or ComputeSettings()
    in_process = use_in_process(compute, n_elements)
    kwargs = default_local_cluster_kwargs(compute, in_process)
    if in_process:
        script = None if compute.processes is not None or _small_run(n_elements) else unguarded_script()
        if script is not None:  # in this process only because of the script
            logger.info("%s has no `if __name__ == \"__main__\":` block: the workers run as threads of this "
                        "process (worker processes would run the script again); add the block for worker "
                        "processes with a memory limit", script)
        logger.info("Starting a LocalCluster in this process (1 worker × %d threads)", kwargs["threads_per_worker"])
    else:
        logger.info(
            "Starting a LocalCluster with %d worker processes × %d threads",
            kwargs["n_workers"], kwargs["threads_per_worker"],
        )
    # Dask's statistical profiler samples every thread's stack every 10 ms (holding the GIL)
    # and caches the source lines it shows: not wanted in a cluster that lives for one run
    with dask.config.set({"distributed.worker.profile.enabled": False}):
        cluster = LocalCluster(**kwargs)
    with cluster, Client(cluster) as new_client:
        logger.info("Dask dashboard: %s", new_client.dashboard_link)
        new_client.kompot_embedded = True  # workers live for this run only
        new_client.kompot_in_process = in_process
        if kwargs["n_workers"] > 1:
            pin_workers(new_client)
        yield new_client


def is_embedded(client: Client) -> bool:
    """Whether ``client`` belongs to a LocalCluster that kompot_dask started for one run."""
    return bool(getattr(client, "kompot_embedded", False))


def in_process_threads(client: Client) -> int:
    """How many Dask threads of ``client``'s workers run in this process: all of an embedded
    in-process cluster's, and those of a user's ``Client(processes=False)`` or
    ``LocalCluster(processes=False)``, found by asking each worker for its process id (once
    per client). 0 when every worker is a process of its own."""
    known = getattr(client, "kompot_in_process_threads", None)
    if known is not None:
        return int(known)
    threads = 0
    try:
        pids = client.run(os.getpid)
        if os.getpid() in pids.values():
            workers = cluster_workers(client)
            threads = sum(int(workers.get(a, {}).get("nthreads", 1)) for a, pid in pids.items()
                          if pid == os.getpid())
    except Exception as exc:  # a cluster that cannot answer is taken to be out of process
        logger.debug("Could not tell where the workers run: %s", exc)
    try:
        client.kompot_in_process_threads = threads
    except AttributeError:
        pass
    return threads


def is_in_process(client: Client) -> bool:
    """Whether ``client``'s workers (some of them) are threads of this process."""
    if getattr(client, "kompot_in_process", None) is not None:
        return bool(client.kompot_in_process)
    return in_process_threads(client) > 0


TASK_TRIM_THRESHOLD = 128 * 2**20
"""glibc ``M_TRIM_THRESHOLD`` while a run computes: the top of a malloc heap is handed back
to the OS only above this much free memory (each task ends with ``malloc_trim`` anyway)."""
TASK_MMAP_THRESHOLD = 32 * 2**20
"""glibc ``M_MMAP_THRESHOLD`` while a run computes (glibc's largest allowed): a kernel block
(``kernel_chunk × m`` ≈ 32 MB) comes from the heap, not from a fresh ``mmap``."""
_GLIBC_DEFAULT_THRESHOLD = 128 * 1024
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@lru_cache(maxsize=1)
def glibc() -> Any:
    """This process's C library when it is glibc (``malloc_trim``, ``mallopt``), else ``None``."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim, libc.mallopt  # noqa: B018 - glibc has both
        return libc
    except (OSError, AttributeError):
        return None


_M_ARENA_MAX = -8
IN_PROCESS_ARENAS = 2
"""glibc malloc arenas a process running an in-process cluster may use (``M_ARENA_MAX``).
By default glibc gives threads up to 8 × cores arenas; each keeps the memory its threads
freed. The run's threads (Dask's, XLA's pool, zarr's) then held 150–200 MiB more at
10k × 2k (peak 1.35 against 1.19 GiB, measured with ``MALLOC_ARENA_MAX=2``), at the same
speed."""


def limit_malloc_arenas() -> bool:
    """Cap this process's malloc arenas at :data:`IN_PROCESS_ARENAS` before an in-process
    cluster starts its threads (glibc only; left alone when ``MALLOC_ARENA_MAX`` is set).
    glibc fixes its arena limit the first time it needs one, so the cap then stays for the
    life of the process: it cannot be undone after the run, as the thresholds are."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    libc = glibc()
    done = libc is not None and bool(libc.mallopt(_M_ARENA_MAX, IN_PROCESS_ARENAS))
    if done:
        logger.debug("malloc arenas of this process capped at %d (set MALLOC_ARENA_MAX to choose)",
                     IN_PROCESS_ARENAS)
    return done


def may_run_in_process(client: Client | None, compute: ComputeSettings) -> bool:
    """Whether a call may start an embedded cluster in this process: no client given or
    current, and no setting that asks for worker processes (the store's size decides the
    rest, :func:`use_in_process`)."""
    if client is not None or compute.processes or _asks_for_processes(compute):
        return False
    try:
        get_client()
    except ValueError:
        return True
    return False


def _mallopt(trim: int, mmap: int) -> bool:
    """Set glibc's trim and mmap thresholds in this process; False where there is no glibc."""
    libc = glibc()
    return libc is not None and bool(libc.mallopt(_M_TRIM_THRESHOLD, int(trim))
                                     and libc.mallopt(_M_MMAP_THRESHOLD, int(mmap)))


def _started_thresholds() -> tuple[str | None, str | None]:
    return os.environ.get("MALLOC_TRIM_THRESHOLD_"), os.environ.get("MALLOC_MMAP_THRESHOLD_")


def _tune_heap() -> bool:
    """The run's thresholds, in a process started with fixed ones (a nanny's worker). A
    process started without them (the user's own, with an in-process cluster) runs glibc's
    dynamic thresholds, which grow to about these values by themselves: it is left alone."""
    if _started_thresholds() == (None, None):
        return False
    return _mallopt(TASK_TRIM_THRESHOLD, TASK_MMAP_THRESHOLD)


def _restore_heap() -> bool:
    """Back to the thresholds this process was started with (see :func:`_tune_heap`), and
    the free heap the run's thresholds kept handed back to the OS: the worker idles at its
    own size, and its next large arrays come from fresh mmaps again, as before the run."""
    trim, mmap = _started_thresholds()
    if trim is None and mmap is None:
        return False
    done = _mallopt(int(trim or _GLIBC_DEFAULT_THRESHOLD), int(mmap or _GLIBC_DEFAULT_THRESHOLD))
    libc = glibc()
    if libc is not None:
        libc.malloc_trim(0)
    return done


def _run_everywhere(client: Client, fn) -> None:
    try:
        client.run(fn)
    except Exception as exc:  # a worker that cannot run it computes as it is
        logger.debug("Worker heap settings not applied: %s", exc)


@contextmanager
def client_cores(openmp_libraries: bool = True) -> Iterator[None]:
    """BLAS and OpenMP on every core of this process, for work the client does while the
    workers wait (the fast path's neighbour search and k-means).

    Two things lower them otherwise:

    - :func:`worker_runtime` holds BLAS at one thread per in-process Dask thread for the
      whole run, the client's preparation included (measured at 200k cells, m = 5,000:
      exact neighbours 17.0 against 14.4 s, k-means of 50,000 cells 23.4 against 18.6 s);
    - Dask's nanny puts ``OMP_NUM_THREADS=1`` into this process's environment when it
      starts worker processes (its ``pre-spawn-environ``), so an OpenMP runtime loaded
      after a user's ``LocalCluster`` (scikit-learn's, for k-means) starts with one thread:
      k-means of 50k cells, m = 1,000, took 6.9 instead of 4.7 s on 2 cores.

    ``openmp_libraries`` loads scikit-learn's OpenMP runtime first, so the limit reaches it.
    """
    from threadpoolctl import threadpool_limits

    if openmp_libraries:
        import sklearn.cluster  # noqa: F401  (its OpenMP runtime, loaded before the limit)
    with threadpool_limits(limits=len(_process_cores())):
        yield


@contextmanager
def worker_runtime(client: Client) -> Iterator[None]:
    """The process settings a run computes under, on every worker and restored after it.

    - **Heap.** Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which also
      switches off glibc's dynamic mmap threshold: every allocation over 128 KiB (each
      32 MB kernel block) is then a fresh ``mmap`` that the kernel zeroes page by page.
      Measured: the Matérn kernel of the projections ran 3.5× slower in a worker process
      than in this one. The run sets the thresholds to :data:`TASK_TRIM_THRESHOLD` and
      :data:`TASK_MMAP_THRESHOLD` (``mallopt``, glibc only) and restores the worker's own
      afterwards; memory stays bounded because every task ends with ``malloc_trim``.
    - **BLAS threads.** An in-process cluster's Dask threads are this process's threads,
      and each would otherwise start a BLAS thread per core: BLAS is held at the cores
      divided by those threads (at least one) per call. That holds for a user's
      ``Client(processes=False)`` too (measured at 10k × 2k on 2 cores: 72 s with BLAS
      free, 51 s held). Worker processes get that from their environment.
    """
    _run_everywhere(client, _tune_heap)
    try:
        if is_in_process(client):
            from threadpoolctl import threadpool_limits

            limit = max(1, int(dask_cpu_count()) // max(1, in_process_threads(client)))
            with threadpool_limits(limits=limit, user_api="blas"):
                yield
        else:
            yield
    finally:
        _run_everywhere(client, _restore_heap)

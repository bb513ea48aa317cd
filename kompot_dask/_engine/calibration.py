"""The planner's measurements on the workers: one probe or timing task per worker.

The planner owns what the numbers mean (its cost model and report); this module only runs
the tasks that measure them and hands back each worker's raw figures.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import psutil
from distributed import Client

from .._io.commit import scratch_write_seconds
from .._numerics import gp
from .cluster import cluster_workers


def _rss() -> int:
    return int(psutil.Process().memory_info().rss)


def _probe_task() -> dict:
    """The worker's resident memory, and whether it has compiled pynndescent already."""
    return {"rss": _rss(), "nn_compiled": "pynndescent" in sys.modules}


def _best_time(fn, reps: int = 3) -> float:
    fn()  # the first call compiles / warms caches: not what a run's many calls cost
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def _calibration_task(d: int, m: int, width: int, kc: int, reader, tile_rows: int, tile_cols: int,
                      seed: int = 0) -> dict:
    """Time the run's kernels at (reduced) run shapes on this worker, one thread."""
    out = {"nn_compiled": "pynndescent" in sys.modules}
    rng = np.random.default_rng(seed)
    mc = int(min(m, 768))
    rows = int(min(kc, 1024))
    Z = rng.normal(size=(mc, d))
    X = rng.normal(size=(2 * rows, d))
    Y = rng.normal(size=(2 * rows, width))
    ls = float(np.sqrt(d))

    t_kern = _best_time(lambda: gp.kernel_column_sum(Z, X, ls, chunk=rows))
    acc = gp.ProjectionAccumulator(Z, ls, width, rows)
    t_proj = _best_time(lambda: (acc.add(X, Y), acc.result()))
    t_gram = _best_time(lambda: gp.cross_gram(Z, X, ls, chunk=rows))
    a = rng.normal(size=(mc, mc))
    spd = np.asfortranarray(a @ a.T + mc * np.eye(mc))
    from scipy.linalg import lapack

    t_chol = _best_time(lambda: lapack.dpotrf(spd.copy(order="F"), lower=1))
    n_cells = 2 * rows
    out["kernel_s"] = t_kern / (n_cells * mc)
    # The kernel evaluation inside a projection / rank-k step is timed apart: subtract it,
    # but never below 5 % of the step, so that timer noise cannot make a speed infinite.
    out["gemm_flops"] = 2.0 * n_cells * mc * width / max(t_proj - t_kern, 0.05 * t_proj)
    out["syrk_flops"] = 1.0 * n_cells * mc * mc / max(t_gram - t_kern, 0.05 * t_gram)
    out["chol_flops"] = (mc**3 / 3.0) / t_chol
    # I/O: one tile of the run's expression element, and one written to a scratch array.
    if reader is not None:
        r1 = min(tile_rows, reader.info.shape[0])
        c1 = min(tile_cols, reader.info.shape[1])
        t = time.perf_counter()
        tile = reader.read(0, r1, slice(0, c1))
        elapsed = time.perf_counter() - t
        out["read_bytes_s"] = tile.size * reader.info.dtype.itemsize / max(elapsed, 1e-4)
        data = rng.normal(size=tile.shape).astype("float32")
        out["write_bytes_s"] = data.nbytes / max(scratch_write_seconds(data), 1e-4)
    out["rss"] = _rss()
    return out


def measure_workers(client: Client, *, d: int, m: int, width: int, kernel_chunk: int, reader,
                    tile_rows: int, tile_cols: int, timed: bool) -> list[dict]:
    """One dict of raw figures per worker (sorted by address): ``rss`` and ``nn_compiled``
    always; with ``timed``, also ``kernel_s``, ``gemm_flops``, ``syrk_flops``, ``chol_flops``
    and, given a ``reader``, ``read_bytes_s`` and ``write_bytes_s``."""
    workers = sorted(cluster_workers(client))
    # Pinned to each worker, since the figures describe the worker that ran them.
    pin = {"pure": False, "allow_other_workers": False}
    if timed:
        futs = [client.submit(_calibration_task, d, m, width, kernel_chunk, reader, tile_rows, tile_cols,
                              workers=[w], **pin) for w in workers]
    else:
        futs = [client.submit(_probe_task, workers=[w], **pin) for w in workers]
    return client.gather(futs)

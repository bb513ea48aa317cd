"""Run a Python snippet in a fresh process and sample the RSS of its whole process tree.

The peak is the largest sum, over one sample, of the RSS of the process and all of its
descendants (Dask worker processes included); samples every 0.1 s.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import psutil


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run_measured(code: str, *, env: dict | None = None, interval: float = 0.1, timeout: float = 7200,
                 argv: list[str] | None = None) -> dict:
    """Run ``code`` with ``python -c`` (and ``argv``); it must print one JSON line prefixed
    'RESULT '."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code, *(argv or [])], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    ps = psutil.Process(proc.pid)
    peak = 0
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_rss(ps))
            time.sleep(interval)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = proc.communicate(timeout=timeout)
    done.set()
    th.join()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark process failed ({proc.returncode}):\n{err[-4000:]}")
    result = {}
    for line in out.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
    result.update(process_wall_s=wall, peak_rss_bytes=peak)
    return result


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def store_arguments(parser) -> None:
    """``--n-obs``, ``--n-vars`` and ``--workdir``: the synthetic store a benchmark runs on."""
    parser.add_argument("--n-obs", type=int, default=10_000)
    parser.add_argument("--n-vars", type=int, default=2_000)
    parser.add_argument("--workdir", default=None)


def synthetic_store(args, name: str) -> str:
    """The store ``--n-obs`` × ``--n-vars`` (d = 20, seed 0) named ``name`` in ``--workdir``
    (a new temporary directory by default), written unless it is there."""
    import os
    import tempfile

    from kompot_dask.testing import SyntheticSpec, write_synthetic_store

    work = args.workdir or tempfile.mkdtemp(prefix=f"kd_{name}_")
    path = os.path.join(work, f"{name}_{args.n_obs}x{args.n_vars}.zarr")
    if os.path.exists(path):
        return path
    return write_synthetic_store(path, SyntheticSpec(n_obs=args.n_obs, n_vars=args.n_vars, n_dims=20, seed=0))

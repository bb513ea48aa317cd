"""Where a run's time goes, phase by phase, and how close each compute phase gets to GEMM.

Two parts, each in fresh processes:

1. **Kernels** (``--kernels``): the engine's own numerics, one core, one phase at a time, at
   m landmarks: numpy's GEMM rate measured first, then each phase's achieved GFLOP/s and
   its share of that rate.
2. **A run** (``--n-obs``, ``--n-vars``): ``kd.de`` with default settings on a generated
   store, cold, in a fresh process (the embedded cluster). Prints the wall time of each
   step (from the run record's ``phase_seconds``), the workers' thread-seconds per task
   phase (``task_seconds``) with the GFLOP/s each reached per thread, next to the one-core
   GEMM rate of part 1, and the peak RSS of the process tree.

    .venv/bin/python benchmarks/phases.py --kernels
    .venv/bin/python benchmarks/phases.py --n-obs 10000 --n-vars 2000
    .venv/bin/python benchmarks/phases.py --n-obs 10000 --processes yes   # worker process
    .venv/bin/python benchmarks/phases.py --n-obs 200000 --n-vars 2000 --workdir /data/bench

FLOP counts (multiply-adds count 2): cross-gram n·m² (syrk), projection 2·m·n·genes, scoring
7·m²·genes in a run (two pairs of triangular solves, K_zz's product and the metric factor's
solve; 6·m²·genes with R formed, as part 1 times it), posterior std 3·m²·n (three triangular
solves, the Lp part in tasks of its own whose seconds the std tasks report), layer
prediction 4·m·n·genes (two conditions), metric with R formed ≈ 6·m³ (its prior part by
``pftri``, 2m³/3).
The kernel evaluations (a d-wide product plus an exp and a sqrt per element) are not counted:
they are what keeps a phase below the GEMM rate.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from _measure import gib, run_measured  # noqa: E402

KERNELS = r"""
import os, json, time
os.sched_setaffinity(0, {{sorted(os.sched_getaffinity(0))[0]}})
os.environ["OPENBLAS_NUM_THREADS"] = "1"
os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false"
import numpy as np
from kompot_dask._layout import kernel_chunk_for, MAX_GENE_BLOCK
from kompot_dask._numerics import gp

m, d, n, g = {m}, {d}, {n}, MAX_GENE_BLOCK
kc = kernel_chunk_for(m)
rng = np.random.default_rng(0)
Z = rng.standard_normal((m, d)) * 3
X = rng.standard_normal((n, d)) * 3
Y = rng.standard_normal((n, g)).astype(np.float32)
ls = 5.0

def best(f, repeat=3):
    f()
    times = []
    for _ in range(repeat):
        t = time.perf_counter(); f(); times.append(time.perf_counter() - t)
    return min(times)

A = rng.standard_normal((m, kc)); B = rng.standard_normal((kc, g))
gemm = 2 * m * kc * g / best(lambda: A @ B)
out = {{"gemm": gemm, "m": m, "d": d, "n": n, "genes": g, "kernel_chunk": kc}}
S = gp.PackedLower.zeros(m)
out["cross-gram"] = n * m * m / best(lambda: gp.cross_gram(Z, X, ls, chunk=kc, out=S), 1)
def project():
    acc = gp.ProjectionAccumulator(Z, ls, g, kc)
    acc.add(X, Y)
out["projection"] = 2 * m * n * g / best(project, 1)
Lp = gp.landmark_cholesky(Z, ls)
S1 = gp.cross_gram(Z, X, ls, chunk=kc)
C1 = gp.condition_factor(Z, ls, S1, 1.0)
t = time.perf_counter(); R = gp.landmark_metric(Z, ls, Lp, C1, C1, 1e-8, allow_diagonal=False)[0]; t = time.perf_counter() - t
factors = {{"Lp": Lp, "C1": C1, "C2": C1, "R": R}}
out["metric (m × m chain)"] = (2 / 3 + 4 + 1 / 3 + 1) * m**3 / t
Bm = rng.standard_normal((m, g))
kbar = rng.standard_normal(m)
out["scoring"] = 6 * m * m * g / best(lambda: gp.block_scores(factors, kbar, Bm, Bm, 1.0), 1)
Xc = X[:kc]
out["posterior std"] = 3 * m * m * kc / best(lambda: gp.posterior_variances(Xc, Z, factors, ls), 1)
W = rng.standard_normal((m, g))
Zd = gp.as_device(Z)
out["layer prediction"] = 4 * m * kc * g / best(lambda: gp.predict_pair(Xc, Zd, W, W, ls))
print("RESULT " + json.dumps(out))
"""

RUN = """
if __name__ == "__main__":
    import json, time, kompot_dask as kd
    t = time.perf_counter()
    kd.de({store!r}, groupby="Age", condition1="Young", condition2="Old", layer="logged_counts", obsm_key="X_pca",
          output=kd.OutputSettings(progress=False), storage=kd.StorageSettings(overwrite=True),
          compute=kd.ComputeSettings(processes={processes!r}))
    wall = time.perf_counter() - t
    info = kd.RunInfo({store!r}, -1)
    r = info.run_record
    print("RESULT " + json.dumps({{"de_wall_s": wall, "phase_seconds": r.phase_seconds, "task_seconds": r.task_seconds,
                                  "record_wall_s": r.wall_seconds, "m": r.model.n_landmarks, "n1": r.model.n_cells_condition1,
                                  "n2": r.model.n_cells_condition2, "n_null": r.model.n_null_genes,
                                  "layout": r.layout.to_dict()}}))
"""


def kernels(m: int, d: int, n: int) -> dict:
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", KERNELS.format(m=m, d=d, n=n)],
                         capture_output=True, text=True, check=True)
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def print_kernels(k: dict) -> None:
    gemm = k["gemm"]
    print(f"one core, m={k['m']}, d={k['d']}, {k['n']:,} cells, {k['genes']} genes per block, "
          f"kernel chunk {k['kernel_chunk']}")
    print(f"{'phase':28s}{'GFLOP/s':>10s}{'of GEMM':>10s}")
    print(f"{'numpy GEMM (reference)':28s}{gemm / 1e9:>10.1f}{'100 %':>10s}")
    for name, rate in k.items():
        if name in ("gemm", "m", "d", "n", "genes", "kernel_chunk"):
            continue
        print(f"{name:28s}{rate / 1e9:>10.1f}{100 * rate / gemm:>8.0f} %")


def run(n_obs: int, n_vars: int, workdir: str, gemm_one_core: float, processes: bool | None = None) -> None:
    import kompot_dask as kd
    from kompot_dask.testing import SyntheticSpec, write_synthetic_store

    store = os.path.join(workdir, f"phases_{n_obs}x{n_vars}.zarr")
    if not os.path.exists(store):
        write_synthetic_store(store, SyntheticSpec(n_obs=n_obs, n_vars=n_vars, n_dims=20, seed=0))
    del kd
    res = run_measured(RUN.format(store=store, processes=processes))
    m, n12, n_null = res["m"], res["n1"] + res["n2"], res["n_null"]
    genes = n_vars
    flops = {
        "projection": 2 * m * n12 * genes,
        "null-gene projection": 2 * m * n12 * n_null,
        "scoring": 7 * m * m * genes,  # the metric kept as its packed factor (KernelMetric)
        "null-gene scoring": 7 * m * m * n_null,
        "posterior std": 3 * m * m * n_obs,
        "layer prediction": 4 * m * n_obs * genes,
    }
    print(f"\nkd.de, defaults, {n_obs:,} cells × {n_vars:,} genes (+{n_null:,} null genes), m={m}, "
          f"layout {res['layout']}")
    print(f"de() wall {res['de_wall_s']:.1f} s; process wall {res['process_wall_s']:.1f} s; "
          f"peak RSS (process tree) {gib(res['peak_rss_bytes'])}")
    print("wall time per step:")
    for name, sec in res["phase_seconds"].items():
        print(f"  {name:34s}{sec:>8.1f} s")
    rest = res["de_wall_s"] - res["record_wall_s"]
    print(f"  {'commit (de wall − record)':34s}{rest:>8.1f} s")
    print(f"task phases (thread-seconds; GFLOP/s per thread vs one-core GEMM {gemm_one_core / 1e9:.1f}):")
    for name, sec in res["task_seconds"].items():
        f = flops.get(name)
        rate = f"{f / sec / 1e9:>8.1f} GFLOP/s {100 * f / sec / gemm_one_core:>4.0f} %" if f and sec > 0 else ""
        print(f"  {name:34s}{sec:>8.1f} s {rate}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kernels", action="store_true", help="only the one-core kernel rates")
    p.add_argument("--n-obs", type=int, default=10_000)
    p.add_argument("--n-vars", type=int, default=2_000)
    p.add_argument("--m", type=int, default=5000)
    p.add_argument("--workdir", default=None)
    p.add_argument("--processes", choices=("auto", "yes", "no"), default="auto",
                   help="the embedded cluster's workers: the default's choice, processes, or threads of the run's process")
    args = p.parse_args()
    k = kernels(args.m, 20, 20_000)
    print_kernels(k)
    if args.kernels:
        return
    processes = {"auto": None, "yes": True, "no": False}[args.processes]
    run(args.n_obs, args.n_vars, args.workdir or tempfile.mkdtemp(prefix="kd_phases_"), k["gemm"], processes)


if __name__ == "__main__":
    main()

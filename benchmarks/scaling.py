"""Scaling out: the same run on 1 and on 2 worker processes (one thread each).

Writes one synthetic store, then for each cluster shape starts a fresh process with a
LocalCluster of that many single-threaded workers and times ``kd.de`` (plan included).
The length scale is passed (``--ls``, default on) so that pynndescent's one-off ~21 s
numba compile — serial, and paid once per long-lived cluster — does not hide the scaling
of the run itself; ``--no-ls`` measures it with the compile. Target: speed-up ≥ 1.6× on
2 cores.

    .venv/bin/python benchmarks/scaling.py [--n-obs 40000] [--genes 2000] [--n-landmarks 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

RUN = r"""
import json, sys, time
def main(store, n_workers, m, ls):
    import kompot_dask as kd
    from distributed import Client, LocalCluster
    from kompot_dask._engine.cluster import worker_environment
    with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, memory_limit="6GiB",
                      env=worker_environment(1), dashboard_address=None, host="127.0.0.1") as cl, Client(cl) as c:
        pinned = kd.pin_workers(c)  # one core per single-threaded worker: XLA sizes its pool by affinity
        t = time.perf_counter()
        kd.de(store, groupby="Age", condition1="Young", condition2="Old", layer="logged_counts",
              obsm_key="X_pca", gp=kd.GPSettings(n_landmarks=m, ls=ls), fdr=kd.FDRSettings(null_genes=2000),
              storage=kd.StorageSettings(overwrite=True), output=kd.OutputSettings(progress=False), client=c)
        wall = time.perf_counter() - t
    print("RESULT " + json.dumps({"wall": wall, "pinned": pinned}))
if __name__ == "__main__":
    a = sys.argv
    main(a[1], int(a[2]), int(a[3]), None if a[4] == "none" else float(a[4]))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-obs", type=int, default=40_000)
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--n-landmarks", type=int, default=2000)
    p.add_argument("--no-ls", action="store_true", help="estimate the length scale (includes the numba compile)")
    p.add_argument("--workdir", default=None)
    args = p.parse_args()

    from kompot_dask.testing import SyntheticSpec, write_synthetic_store

    work = args.workdir or tempfile.mkdtemp(prefix="kd_scaling_")
    store = write_synthetic_store(os.path.join(work, "scaling.zarr"),
                                  SyntheticSpec(n_obs=args.n_obs, n_vars=args.genes, n_dims=20, seed=0),
                                  cell_chunk=4096, gene_chunk=256)
    ls = "none" if args.no_ls else "12.0"
    walls = {}
    for n in (1, 2):
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", RUN, store, str(n), str(args.n_landmarks), ls],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{n} worker(s) failed:\n{proc.stderr[-3000:]}")
        res = next(json.loads(x[7:]) for x in proc.stdout.splitlines() if x.startswith("RESULT "))
        walls[n] = res["wall"]
        print(f"{n} worker process(es) × 1 thread: de() {res['wall']:.1f} s "
              f"(process {time.perf_counter() - t:.1f} s); cores {sorted(res['pinned'].values())}", flush=True)
    shutil.rmtree(store, ignore_errors=True)
    print(f"\n{args.n_obs:,} cells × {args.genes:,} genes, m = {args.n_landmarks:,}, 2,000 null genes, layers written, "
          f"length scale {'estimated' if args.no_ls else 'given'}")
    print(f"{'workers':>8}{'de() wall':>12}{'speed-up':>10}")
    for n, w in walls.items():
        print(f"{n:>8}{w:>10.1f} s{walls[1] / w:>9.2f}×")


if __name__ == "__main__":
    main()

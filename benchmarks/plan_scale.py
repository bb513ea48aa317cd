"""The planner's time and memory model at sizes we cannot run here, checked first at sizes we
ran.

1. ``kd.plan`` on a small store, on the cluster ``de`` would start (worker processes),
   gives this machine's calibration (kernel, GEMM, syrk, Cholesky rates, tile I/O).
2. The same model (``make_plan``, no new calibration) predicts the wall time and the peak
   worker memory of each measured run given with ``--measured`` (stores that
   ``benchmarks/phases.py`` ran; their run records hold the measured wall time and phases),
   and prints the prediction next to the measurement.
3. It then predicts a run on a cluster you describe, by default 10M cells × 20k genes on
   16 workers × 8 threads × 64 GiB, assuming cores as fast as this machine's.

    .venv/bin/python benchmarks/plan_scale.py --measured /tmp/prof/phases_10000x2000.zarr \\
        /tmp/prof/phases_200000x2000.zarr /tmp/prof/phases_1000000x2000.zarr
    .venv/bin/python benchmarks/plan_scale.py --cells 10000000 --genes 20000 --cluster 16x8x64GiB
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import tempfile

import numpy as np
from dask.utils import format_bytes, format_time, parse_bytes

if __name__ == "__main__":
    import kompot_dask as kd
    from kompot_dask._io.store import Store
    from kompot_dask._layout import LandmarkSource
    from kompot_dask._planner import make_plan
    from kompot_dask.testing import SyntheticSpec, write_synthetic_store


def _scaled(inp, n_obs: int, n_vars: int, frac1: float):
    """The inputs of the same kind of run at another size (every cell in one of the two
    conditions in the proportion of the calibration store, every gene tested)."""
    n1 = int(round(frac1 * n_obs))
    return dataclasses.replace(
        inp, n_obs=n_obs, n_vars=n_vars, n_selected=n_vars, n1=n1, n2=n_obs - n1, n_pred=n_obs,
        landmark_source=LandmarkSource.KMEANS if n_obs > inp.m else inp.landmark_source,
    )


def _describe(text: str) -> tuple[int, int, int]:
    m = re.fullmatch(r"(\d+)x(\d+)x(.+)", text)
    if not m:
        raise SystemExit(f"--cluster {text!r}: expected WORKERSxTHREADSxMEMORY, e.g. 16x8x64GiB")
    return int(m.group(1)), int(m.group(2)), parse_bytes(m.group(3))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--measured", nargs="*", default=[], help="stores that benchmarks/phases.py ran")
    p.add_argument("--cells", type=int, default=10_000_000)
    p.add_argument("--genes", type=int, default=20_000)
    p.add_argument("--cluster", default="16x8x64GiB", help="WORKERSxTHREADSxMEMORY per worker")
    p.add_argument("--workdir", default=None)
    args = p.parse_args()

    workdir = args.workdir or tempfile.mkdtemp(prefix="kd_plan_scale_")
    small = os.path.join(workdir, "calibration_10000x2000.zarr")
    if not os.path.exists(small):
        write_synthetic_store(small, SyntheticSpec(n_obs=10_000, n_vars=2_000, n_dims=20, seed=0))
    kw = dict(groupby="Age", condition1="Young", condition2="Old", layer="logged_counts", obsm_key="X_pca")
    base = kd.plan(small, **kw, compute=kd.ComputeSettings(processes=True))
    cal, res, inp = base.calibration, base.resources, base.inputs
    frac1 = inp.n1 / inp.n12
    print(f"calibration ({res.n_workers} worker × {res.threads_per_worker} threads): "
          f"GEMM {cal.gemm_flops / 1e9:.1f} GFLOP/s per thread, kernel {cal.kernel_s * 1e9:.2f} ns per cell × landmark, "
          f"worker RSS {format_bytes(cal.worker_rss)}")

    def predict(i, r):
        return make_plan(i, r, cal, selected=np.arange(i.n_vars), cell_chunk=None, gene_block=None,
                         null_gene_block=None, current_client_rss=400 << 20, embedded=True)

    if args.measured:
        print("\nmeasured runs on this machine against the model (same calibration):")
        print(f"{'run':28s}{'predicted wall':>16s}{'measured wall':>15s}{'ratio':>8s}"
              f"{'predicted peak/worker':>24s}")
        for store in args.measured:
            rec = kd.RunInfo(store, -1).run_record
            shape = Store(store)
            i = _scaled(inp, shape.n_obs, shape.n_vars, frac1)
            i = dataclasses.replace(i, n1=rec.model.n_cells_condition1, n2=rec.model.n_cells_condition2)
            plan = predict(i, res)
            measured = rec.wall_seconds
            print(f"{os.path.basename(store):28s}{format_time(plan.wall_seconds):>16s}{format_time(measured):>15s}"
                  f"{plan.wall_seconds / measured:>8.2f}{format_bytes(plan.peak_worker_bytes):>24s}")
            for name, sec in plan.phase_seconds.items():
                print(f"    predicted {name:32s}{format_time(sec):>12s}")
            for name, sec in rec.phase_seconds.items():
                print(f"    measured  {name:32s}{format_time(sec):>12s}")

    workers, threads, memory = _describe(args.cluster)
    big_res = dataclasses.replace(res, source="described", n_workers=workers, threads_per_worker=threads,
                                  memory_limit=memory, memory_limit_set=True,
                                  host_memory_total=memory * workers, host_memory_available=memory * workers,
                                  disk_free=1 << 50)
    big = predict(_scaled(inp, args.cells, args.genes, frac1), big_res)
    print(f"\n{args.cells:,} cells × {args.genes:,} genes on {workers} workers × {threads} threads × "
          f"{format_bytes(memory)} (cores as fast as this machine's):")
    print(big)


if __name__ == "__main__":
    sys.exit(main())

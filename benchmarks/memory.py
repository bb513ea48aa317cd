"""Out-of-core check: peak memory is set by chunk sizes, not by the data size.

Runs kompot_dask on synthetic stores of 200,000 cells × {1,000, 2,000, 4,000} genes with
2,000 null genes (imputed and fold-change layers written), each in a fresh process on the
embedded LocalCluster, and prints the peak RSS summed over the client and all worker
processes (sampled every 0.1 s). Targets: ≤ 4 GiB, and peak(4k) / peak(1k) ≤ 1.25.
For scale: kompot 0.8.0's own memory model (shared/reference/kompot_baseline.md) puts it
at 1.8 GiB + 44 B·n·G′ + 76 B·n·G + 56 B·m² — about 67 GB at 200k × 2k.

    .venv/bin/python benchmarks/memory.py [--n-obs 200000] [--genes 1000 2000 4000] [--n-landmarks 1000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from _measure import gib, run_measured  # noqa: E402

RUN = """
if __name__ == "__main__":
    import time, json, kompot_dask as kd
    t = time.perf_counter()
    kd.de({store!r}, groupby="Age", condition1="Young", condition2="Old", layer="logged_counts", obsm_key="X_pca",
          gp=kd.GPSettings(n_landmarks={m}), fdr=kd.FDRSettings(null_genes=2000),
          output=kd.OutputSettings(progress=False))
    print("RESULT " + json.dumps({{"de_wall_s": time.perf_counter() - t}}))
"""


def reference_model_bytes(n: int, g: int, n_null: int, m: int) -> float:
    return 1.8 * 2**30 + 44 * n * (g + n_null) + 76 * n * g + 56 * m * m


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-obs", type=int, default=200_000)
    p.add_argument("--genes", type=int, nargs="+", default=[1000, 2000, 4000])
    p.add_argument("--n-landmarks", type=int, default=1000)
    p.add_argument("--workdir", default=None)
    args = p.parse_args()

    from kompot_dask.testing import SyntheticSpec, write_synthetic_store

    work = args.workdir or tempfile.mkdtemp(prefix="kd_memory_")
    rows = []
    for g in args.genes:
        t = time.perf_counter()
        store = write_synthetic_store(os.path.join(work, f"atlas_{g}.zarr"), SyntheticSpec(n_obs=args.n_obs, n_vars=g, n_dims=20, seed=0),
                                      cell_chunk=8192, gene_chunk=256)
        print(f"store {args.n_obs:,} × {g:,} written in {time.perf_counter() - t:.0f} s", flush=True)
        res = run_measured(RUN.format(store=store, m=args.n_landmarks))
        rows.append((g, res))
        print(f"  genes={g}: peak {gib(res['peak_rss_bytes'])}, de() {res['de_wall_s']:.0f} s", flush=True)
        shutil.rmtree(store, ignore_errors=True)
    print(f"\n{args.n_obs:,} cells, {args.n_landmarks} landmarks, 2,000 null genes, layers written, embedded LocalCluster (defaults)")
    print(f"{'genes':>6s}{'peak RSS (all processes)':>28s}{'de() wall':>12s}{'kompot 0.8.0 model':>22s}")
    for g, res in rows:
        model = reference_model_bytes(args.n_obs, g, 2000, args.n_landmarks)
        print(f"{g:>6d}{gib(res['peak_rss_bytes']):>28s}{res['de_wall_s']:>10.0f} s{model / 1e9:>19.1f} GB")
    if len(rows) >= 2:
        print(f"peak({rows[-1][0]}) / peak({rows[0][0]}) = {rows[-1][1]['peak_rss_bytes'] / rows[0][1]['peak_rss_bytes']:.2f}")


if __name__ == "__main__":
    main()

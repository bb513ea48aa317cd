"""kompot 0.8.0 and kompot_dask on the same synthetic data, in one invocation.

Defaults (all settings at their defaults: 5,000 landmarks, 2,000 null genes), 10,000 cells ×
2,000 genes, or with ``--pbmc`` scanpy's pbmc68k_reduced (G1 against S cells, as in
tests/test_parity.py). Each tool runs in a fresh process; the figures are the ``de`` call's
wall time (cold: it includes numba compiling in kompot, and whatever start-up kompot_dask
pays), the whole process's wall time and the peak RSS summed over the process tree (client
+ Dask workers for kompot_dask).

    .venv/bin/python benchmarks/compare_kompot.py [--n-obs 10000] [--n-vars 2000]
    .venv/bin/python benchmarks/compare_kompot.py --pbmc
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from _measure import gib, run_measured  # noqa: E402

KOMPOT = """
import time, json, anndata as ad, kompot
a = ad.read_h5ad({h5ad!r})
t = time.perf_counter()
kompot.de(a, groupby={groupby!r}, condition1={c1!r}, condition2={c2!r}, layer={layer!r}, obsm_key="X_pca",
          output=kompot.OutputSettings(progress=False))
print("RESULT " + json.dumps({{"de_wall_s": time.perf_counter() - t}}))
"""

KOMPOT_DASK = """
if __name__ == "__main__":
    import time, json, kompot_dask as kd
    t = time.perf_counter()
    kd.de({store!r}, groupby={groupby!r}, condition1={c1!r}, condition2={c2!r}, layer={layer!r}, obsm_key="X_pca",
          output=kd.OutputSettings(progress=False))
    print("RESULT " + json.dumps({{"de_wall_s": time.perf_counter() - t}}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-obs", type=int, default=10_000)
    p.add_argument("--n-vars", type=int, default=2_000)
    p.add_argument("--pbmc", action="store_true", help="scanpy's pbmc68k_reduced, G1 against S")
    p.add_argument("--workdir", default=None)
    args = p.parse_args()

    import kompot_dask as kd
    from kompot_dask.testing import SyntheticSpec, make_synthetic_adata

    work = args.workdir or tempfile.mkdtemp(prefix="kd_compare_")
    if args.pbmc:
        import anndata as ad
        import scanpy as sc

        pbmc = sc.datasets.pbmc68k_reduced()
        adata = ad.AnnData(obs=pbmc.obs[["phase"]].copy(), var=pbmc.raw.var[[]].copy(),
                           obsm={"X_pca": pbmc.obsm["X_pca"]}, layers={"logged": pbmc.raw.X.copy()})
        call = {"groupby": "phase", "c1": "G1", "c2": "S", "layer": "logged"}
        label = f"pbmc68k_reduced: {adata.n_obs:,} cells × {adata.n_vars:,} genes, G1 vs S, defaults"
    else:
        spec = SyntheticSpec(n_obs=args.n_obs, n_vars=args.n_vars, n_dims=20, seed=0)
        adata = make_synthetic_adata(spec)
        call = {"groupby": "Age", "c1": "Young", "c2": "Old", "layer": "logged_counts"}
        label = (f"data: {spec.n_obs:,} cells × {spec.n_vars:,} genes, d={spec.n_dims}, "
                 "defaults (m=5000, 2000 null genes)")
    h5ad = os.path.join(work, "data.h5ad")
    adata.write_h5ad(h5ad)
    store = kd.ingest(adata, os.path.join(work, "data.zarr"), overwrite=True, progress=False)
    del adata
    print(label)

    ref = run_measured(KOMPOT.format(h5ad=h5ad, **call))
    ours = run_measured(KOMPOT_DASK.format(store=store, **call))
    print(f"{'':24s}{'kompot 0.8.0':>16s}{'kompot_dask':>16s}{'ratio':>10s}")
    print(f"{'de() wall time':24s}{ref['de_wall_s']:>14.1f} s{ours['de_wall_s']:>14.1f} s{ours['de_wall_s'] / ref['de_wall_s']:>10.2f}")
    print(f"{'process wall time':24s}{ref['process_wall_s']:>14.1f} s{ours['process_wall_s']:>14.1f} s"
          f"{ours['process_wall_s'] / ref['process_wall_s']:>10.2f}")
    print(f"{'peak RSS (process tree)':24s}{gib(ref['peak_rss_bytes']):>16s}{gib(ours['peak_rss_bytes']):>16s}"
          f"{ours['peak_rss_bytes'] / ref['peak_rss_bytes']:>10.2f}")


if __name__ == "__main__":
    main()

"""Mixed precision: the speed-up of float32 tile arithmetic and how far it moves the results.

Runs ``kd.de`` on a generated store with ``ComputeSettings(dtype="float32")`` (cells × genes
tiles, kernel blocks, projections and predictions in float32; the m × m factors, solves and
scores stay float64) and with the float64 default, each into its own ``result_key``, in one
process (a first small run compiles the kernels for both). Prints the wall time of each and
the float32 run's Mahalanobis distances against the float64 run's: Spearman correlation,
median and largest relative difference, and the share of genes whose ``is_de`` call agrees.

    .venv/bin/python benchmarks/mixed_precision.py [--n-obs 10000] [--n-vars 2000]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from _measure import store_arguments, synthetic_store  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    store_arguments(p)
    args = p.parse_args()

    import anndata as ad
    import numpy as np
    from scipy.stats import spearmanr

    import kompot_dask as kd

    store = synthetic_store(args, "mixed")
    common = dict(groupby="Age", condition1="Young", condition2="Old", layer="logged_counts", obsm_key="X_pca",
                  output=kd.OutputSettings(progress=False))
    for dtype in ("float32", "float64"):  # warm-up: compile both precisions' kernels
        kd.de(store, **common, genes=["gene_0", "gene_1"], gp=kd.GPSettings(n_landmarks=200),
              fdr=kd.FDRSettings(null_genes=0), compute=kd.ComputeSettings(dtype=dtype),
              storage=kd.StorageSettings(result_key=f"warm_{dtype}", store_layers=False, overwrite=True))
    walls = {}
    for dtype in ("float64", "float32"):
        kd.de(store, **common, compute=kd.ComputeSettings(dtype=dtype),
              storage=kd.StorageSettings(result_key=dtype, overwrite=True))
        walls[dtype] = kd.RunInfo(store, -1).run_record.wall_seconds
    a = ad.read_zarr(store)

    def column(key: str, what: str) -> np.ndarray:
        return a.var[f"{key}_Young_to_Old_{what}"].to_numpy()

    ref, got = column("float64", "mahalanobis").astype(float), column("float32", "mahalanobis").astype(float)
    rel = np.abs(got - ref) / np.abs(ref)
    agree = np.mean(column("float64", "is_de").astype(bool) == column("float32", "is_de").astype(bool))
    print(f"{args.n_obs:,} cells × {args.n_vars:,} genes, defaults otherwise")
    print(f"wall: float64 {walls['float64']:.1f} s, float32 {walls['float32']:.1f} s "
          f"(speed-up {walls['float64'] / walls['float32']:.2f}×)")
    print(f"Mahalanobis, float32 against float64: Spearman {spearmanr(got, ref).statistic:.6f}, "
          f"median relative difference {np.median(rel):.2e}, largest {rel.max():.2e}; "
          f"is_de agreement {agree:.2%} ({int(column('float32', 'is_de').sum())} / "
          f"{int(column('float64', 'is_de').sum())} DE)")


if __name__ == "__main__":
    main()

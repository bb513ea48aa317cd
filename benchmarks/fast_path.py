"""How far the default (fast) path is from kompot 0.8.0's exact path, on one store.

Runs ``kd.de`` three times on a generated store, each into its own ``result_key``:

- ``parity``: ``GPSettings.kompot()`` — pynndescent's nearest neighbours over all condition-1
  cells and k-means over all pooled cells (kompot 0.8.0 to the last bit: tests/test_parity.py);
- ``fast``: the defaults — exact nearest neighbours of a seeded sample of condition-1 cells,
  k-means over a seeded sample of pooled cells (at most ``landmark_sample``);
- ``fast-sampled``: the defaults with ``landmark_sample`` and ``neighbor_sample`` a quarter
  of the cells, so that both samples act even on a store this small.

For each fast run it prints the length scale's relative change, the Spearman correlation
and largest relative difference of the Mahalanobis distances, and the share of genes whose
``is_de`` call agrees, against the parity run; and the wall time of each run's model
preparation (length scale and landmarks) and of the whole call.

    .venv/bin/python benchmarks/fast_path.py [--n-obs 10000] [--n-vars 2000]
"""

from __future__ import annotations

import argparse
import os
import tempfile


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-obs", type=int, default=10_000)
    p.add_argument("--n-vars", type=int, default=2_000)
    p.add_argument("--workdir", default=None)
    args = p.parse_args()

    import anndata as ad
    import numpy as np
    from scipy.stats import spearmanr

    import kompot_dask as kd
    from kompot_dask.testing import SyntheticSpec, write_synthetic_store

    work = args.workdir or tempfile.mkdtemp(prefix="kd_fast_path_")
    store = write_synthetic_store(os.path.join(work, "fast_path.zarr"),
                                  SyntheticSpec(n_obs=args.n_obs, n_vars=args.n_vars, n_dims=20, seed=0))
    quarter = max(2, args.n_obs // 4)
    runs = {
        "parity": kd.GPSettings.kompot(),
        "fast": kd.GPSettings(),
        "fast-sampled": kd.GPSettings(landmark_sample=quarter, neighbor_sample=quarter),
    }
    info = {}
    for key, gp in runs.items():
        kd.de(store, groupby="Age", condition1="Young", condition2="Old", layer="logged_counts", obsm_key="X_pca",
              gp=gp, storage=kd.StorageSettings(result_key=key, store_layers=False),
              output=kd.OutputSettings(progress=False))
        info[key] = kd.RunInfo(store, -1).run_record
    a = ad.read_zarr(store)

    def column(key: str, what: str) -> np.ndarray:
        return a.var[f"{key}_Young_to_Old_{what}"].to_numpy()

    print(f"{args.n_obs:,} cells × {args.n_vars:,} genes, defaults otherwise; samples of "
          f"{quarter:,} cells in 'fast-sampled'")
    print(f"{'run':14s}{'ls':>10s}{'ls change':>11s}{'Spearman':>12s}{'max rel':>10s}{'is_de agree':>13s}"
          f"{'n DE':>7s}{'prep s':>8s}{'de s':>8s}")
    ref_d = column("parity", "mahalanobis").astype(float)
    ref_de = column("parity", "is_de").astype(bool)
    ref_ls = info["parity"].model.ls
    for key, rec in info.items():
        d = column(key, "mahalanobis").astype(float)
        de = column(key, "is_de").astype(bool)
        prep = rec.phase_seconds.get("length scale and landmarks", float("nan"))
        print(f"{key:14s}{rec.model.ls:>10.4g}{rec.model.ls / ref_ls - 1:>+11.2%}"
              f"{spearmanr(d, ref_d).statistic:>12.7f}{np.max(np.abs(d - ref_d) / np.abs(ref_d)):>10.2e}"
              f"{np.mean(de == ref_de):>13.2%}{int(de.sum()):>7d}{prep:>8.1f}{rec.wall_seconds:>8.1f}")


if __name__ == "__main__":
    main()

"""Sparse expression in place: a CSR layer against dense tiles of the same values.

Writes one store with two layers holding the same values: ``logged_counts`` as dense tiles
and ``csr`` as anndata's CSR element (the synthetic expression with all but ``--density``
of its values set to 0). Then, each in a fresh process with an in-process cluster (one
worker, two threads), ``kd.de`` with default settings except ``--n-landmarks``:

- **dense**: the dense tiles;
- **csr, re-read**: the CSR layer read in place once per gene block and null-gene block,
  products dense (the engine before the transposition);
- **csr, transposed**: transposed once into column-major row groups, products dense;
- **csr, transposed + sparse**: the default: transposed, and tiles under 12 % stored
  values multiplied sparse (m · nnz).

Prints de() wall, the workers' thread-seconds per phase, peak RSS of the process, and the
largest difference of each CSR run's per-gene results and a sample of layer rows from
the dense run's.

    .venv/bin/python benchmarks/sparse_layers.py [--n-obs 200000] [--genes 2000] [--density 0.1] [--n-landmarks 2000]
    .venv/bin/python benchmarks/sparse_layers.py --n-obs 50000 --genes 16000 --density 0.05 --n-landmarks 1000 --no-layers
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from _measure import run_measured  # noqa: E402

RUN = r"""
import json, time, sys
import numpy as np
def main(store, layer, mode, m, out, layers):
    import kompot_dask as kd
    from kompot_dask import _layout
    from distributed import Client, LocalCluster
    if mode in ("reread", "transposed"):
        _layout.SPARSE_MAX_DENSITY = 0.0  # every tile multiplied dense
    if mode == "reread":
        _layout.transposes = lambda kind, n_passes: False
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cl, Client(cl) as c:
        t = time.perf_counter()
        kd.de(store, groupby="Age", condition1="Young", condition2="Old", layer=layer, obsm_key="X_pca",
              gp=kd.GPSettings(n_landmarks=m), storage=kd.StorageSettings(overwrite=True, store_layers=layers),
              output=kd.OutputSettings(progress=False), client=c)
        wall = time.perf_counter() - t
    import zarr
    g = zarr.open_group(store, mode="r")
    pair = "kompot_de_Young_to_Old"
    var = {k: np.asarray(g["var"][f"{pair}_{k}"][...], dtype=float) for k in ("mahalanobis", "mean_lfc")}
    rows = np.arange(0, g["layers"][layer].attrs["shape"][0] if "shape" in g["layers"][layer].attrs
                     else g["layers"][layer].shape[0], 997)
    lay = {k: np.asarray(g["layers"][k].oindex[rows, :], dtype=float)
           for k in (f"{pair}_fold_change", "kompot_de_Old_imputed")} if layers else {}
    np.savez(out, **var, **lay)
    rec = kd.RunInfo(store).run_record
    print("RESULT " + json.dumps({"wall": wall, "tasks": rec.task_seconds, "phases": rec.phase_seconds}))
if __name__ == "__main__":
    a = sys.argv
    main(a[1], a[2], a[3], int(a[4]), a[5], a[6] == "1")
"""

GENE_KEYS = ("mahalanobis", "mean_lfc")
MODES = [("dense", "logged_counts", "dense"), ("csr, re-read", "csr", "reread"),
         ("csr, transposed", "csr", "transposed"), ("csr, transposed + sparse", "csr", "sparse")]


def write_store(path: str, n_obs: int, genes: int, density: float) -> tuple[int, float]:
    """The synthetic store with its layer thinned to ``density``, plus the same values as a
    CSR layer; returns the stored values and the seconds it took."""
    import numpy as np
    import scipy.sparse as sp
    import zarr

    from kompot_dask._io.ingest import write_sparse_element
    from kompot_dask.testing import SyntheticSpec, write_synthetic_store

    t = time.perf_counter()
    write_synthetic_store(path, SyntheticSpec(n_obs=n_obs, n_vars=genes, n_dims=20, seed=0),
                          cell_chunk=4096, gene_chunk=256)
    root = zarr.open_group(path, mode="r+", use_consolidated=False)
    dense = root["layers/logged_counts"]
    parts = []
    for r0 in range(0, n_obs, 4096):
        y = np.asarray(dense[r0 : r0 + 4096])
        keep = min(1.0, density * y.size / max(1, np.count_nonzero(y)))  # of the values not already 0
        y[np.random.default_rng(r0).random(y.shape) >= keep] = 0
        dense[r0 : r0 + 4096] = y
        parts.append(sp.csr_matrix(y))
    csr = sp.vstack(parts, format="csr")
    del parts
    write_sparse_element(root, "layers/csr", csr, (n_obs, genes), "csr", np.dtype(np.float32), progress=False)
    zarr.consolidate_metadata(path)
    return int(csr.nnz), time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-obs", type=int, default=200_000)
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--density", type=float, default=0.1)
    p.add_argument("--n-landmarks", type=int, default=2000)
    p.add_argument("--no-layers", action="store_true", help="StorageSettings(store_layers=False)")
    p.add_argument("--workdir", default=None)
    args = p.parse_args()

    import numpy as np

    work = args.workdir or tempfile.mkdtemp(prefix="kd_sparse_")
    store = os.path.join(work, "sparse.zarr")
    nnz, t_write = write_store(store, args.n_obs, args.genes, args.density)
    print(f"{args.n_obs:,} cells × {args.genes:,} genes, {nnz:,} stored values "
          f"({nnz / (args.n_obs * args.genes):.1%}); m = {args.n_landmarks:,}; store written in {t_write:.0f} s")
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    rows, ref = [], None
    try:
        for label, layer, mode in MODES:
            out = os.path.join(work, f"{mode}.npz")
            r = run_measured(RUN, env=env, argv=[store, layer, mode, str(args.n_landmarks), out,
                                                 "0" if args.no_layers else "1"])
            got = dict(np.load(out))
            if ref is None:
                ref = got
            diff = {part: max((float(np.max(np.abs(got[k] - ref[k]) / (np.abs(ref[k]).max() + 1e-300))) for k in keys),
                              default=float("nan"))
                    for part, keys in (("per-gene", GENE_KEYS), ("layers", [k for k in ref if k not in GENE_KEYS]))}
            rows.append((label, r, diff))
            print(json.dumps({"mode": label, "wall": round(r["wall"], 1), "peak_rss_gib": round(r["peak_rss_bytes"] / 2**30, 2),
                              "tasks": r["tasks"], "max_rel_diff": diff}), flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    phases = ["tile read", "projection", "null-gene read", "null-gene projection", "layer prediction"]
    print()
    print("| layer read as | de() wall | " + " | ".join(phases)
          + " | peak RSS | max rel. diff vs dense: per gene / layer rows |")
    print("|---" * (len(phases) + 4) + "|")
    for label, r, diff in rows:
        cells = [f"{r['tasks'].get(ph, 0.0) + r['tasks'].get(ph.replace('projection', 'sparse projection'), 0.0):.1f} s"
                 if ph.endswith("projection") else f"{r['tasks'].get(ph, 0.0):.1f} s" for ph in phases]
        print(f"| {label} | {r['wall']:.1f} s | " + " | ".join(cells)
              + f" | {r['peak_rss_bytes'] / 2**30:.2f} GiB | {diff['per-gene']:.1e} / {diff['layers']:.1e} |")
    print("(projection columns: dense and sparse products together; layers are float32)")


if __name__ == "__main__":
    main()

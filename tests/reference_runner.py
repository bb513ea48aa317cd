"""Runs kompot 0.8.0 (the reference oracle) in a separate process.

Importing kompot (through mellon) switches JAX to float64 on CPU for the whole process,
so reference numbers are produced here, in a subprocess, never inside the test process.

Usage: python reference_runner.py INPUT.h5ad KWARGS.json OUTPUT.npz
"""

from __future__ import annotations

import json
import sys
import time


def main(inp: str, kwargs_path: str, out: str) -> None:
    import anndata as ad
    import kompot
    import numpy as np

    adata = ad.read_h5ad(inp)
    with open(kwargs_path) as fh:
        spec = json.load(fh)
    gp = dict(spec.pop("gp", {}))
    if "landmarks_npy" in gp:
        gp["landmarks"] = np.load(gp.pop("landmarks_npy"))
    fdr = dict(spec.pop("fdr", {}))
    if "null_mahalanobis_npy" in fdr:
        fdr["null_mahalanobis"] = np.load(fdr.pop("null_mahalanobis_npy"))
    if "null_expression_npy" in fdr:
        fdr["null_expression"] = tuple(np.load(p) for p in fdr.pop("null_expression_npy"))
    storage = spec.pop("storage", {})
    filt = spec.pop("filter", {})
    output = dict(spec.pop("output", {}), return_full_results=True, progress=False)
    t0 = time.perf_counter()
    res = kompot.de(
        adata,
        gp=kompot.GPSettings(**gp),
        fdr=kompot.FDRSettings(**fdr),
        storage=kompot.StorageSettings(**storage),
        output=kompot.OutputSettings(**output),
        filter=kompot.FilterSettings(**filt),
        **spec,
    )
    wall = time.perf_counter() - t0
    model = res["model"]
    payload = {"wall": np.float64(wall), "table_columns": np.asarray(list(res["table"].columns))}
    for k in adata.var.columns:
        if k.startswith("kompot"):
            payload[f"var/{k}"] = adata.var[k].to_numpy()
    for k in adata.obs.columns:
        if k.startswith("kompot"):
            payload[f"obs/{k}"] = adata.obs[k].to_numpy(dtype=float)
    for k in adata.layers.keys():
        if k.startswith("kompot"):
            payload[f"layers/{k}"] = np.asarray(adata.layers[k])
    for k in adata.obsp.keys():
        if k.startswith("kompot"):
            payload[f"obsp/{k}"] = np.asarray(adata.obsp[k].toarray() if hasattr(adata.obsp[k], "toarray")
                                              else adata.obsp[k], dtype=float)
    for k in adata.varm.keys():
        if k.startswith("kompot"):  # per-group tables: values and their column names
            payload[f"varm/{k}"] = adata.varm[k].to_numpy(dtype=float)
            payload[f"varm_columns/{k}"] = np.asarray([str(c) for c in adata.varm[k].columns])
    ls = getattr(model.model1, "ls", None)
    if ls is not None:
        payload["ls"] = np.float64(ls)
    lm = getattr(model, "computed_landmarks", None)
    if lm is not None:
        payload["landmarks"] = np.asarray(lm)
    np.savez(out, **payload)


if __name__ == "__main__":
    main(*sys.argv[1:4])

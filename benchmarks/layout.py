"""Which on-disk layout serves gene-block tasks best: dense tiles, CSC or CSR?

Writes one sparse-ish log-expression matrix (default 50,000 cells × 2,000 genes, ~10 % non-zero)
three ways — ingest's dense float32 tiles (4096 × 256), anndata's CSC and CSR — and times what
a gene-block task does: read all cells of a block of 256 genes in row chunks of 8,192 cells,
through the same reader the engine uses. Prints read time per block and size on disk.

    .venv/bin/python benchmarks/layout.py [--n-obs 50000] [--n-vars 2000] [--density 0.1]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time

import anndata as ad
import numpy as np
import scipy.sparse as sp

import kompot_dask as kd
from kompot_dask._io.store import Store


def du(path: str) -> int:
    return int(subprocess.run(["du", "-sb", path], capture_output=True, text=True).stdout.split()[0])


def time_blocks(path: str, n_blocks: int, block: int = 256, rows: int = 8192) -> float:
    st = Store(path)
    reader = st.tile_reader(st.layer_info("x"))
    n_obs = st.n_obs
    t = time.perf_counter()
    for j in range(n_blocks):
        for r0 in range(0, n_obs, rows):
            reader.read(r0, min(r0 + rows, n_obs), slice(j * block, (j + 1) * block))
    return (time.perf_counter() - t) / n_blocks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-obs", type=int, default=50_000)
    p.add_argument("--n-vars", type=int, default=2_000)
    p.add_argument("--density", type=float, default=0.1)
    p.add_argument("--blocks", type=int, default=3)
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="kd_layout_")
    rng = np.random.default_rng(0)
    mat = sp.random(args.n_obs, args.n_vars, density=args.density, format="csr", dtype=np.float32, random_state=rng)
    mat.data = np.log1p(rng.poisson(3.0, size=mat.nnz).astype(np.float32) + 1)
    base = ad.AnnData(obs={"c": np.zeros(args.n_obs)}, var={"g": np.zeros(args.n_vars)}, layers={"x": mat})
    paths = {}
    paths["dense tiles (ingest)"] = kd.ingest(base, os.path.join(work, "dense.zarr"), progress=False)
    base.write_zarr(os.path.join(work, "csr.zarr"))
    paths["CSR (anndata)"] = os.path.join(work, "csr.zarr")
    csc = base.copy()
    csc.layers["x"] = mat.tocsc()
    csc.write_zarr(os.path.join(work, "csc.zarr"))
    paths["CSC (anndata)"] = os.path.join(work, "csc.zarr")
    print(f"{args.n_obs:,} cells × {args.n_vars:,} genes, density {args.density}; one gene block = all cells × 256 genes")
    print(f"{'layout':24s}{'s per gene block':>18s}{'on disk':>12s}")
    for name, path in paths.items():
        per = time_blocks(path, args.blocks)
        layer_dir = os.path.join(path, "layers", "x")
        print(f"{name:24s}{per:>16.3f} s{du(layer_dir) / 2**20:>9.0f} MiB")


if __name__ == "__main__":
    main()

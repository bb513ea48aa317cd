"""What pynndescent's numba compilation costs, and when it is paid.

1. A fresh process computing the length scale (kompot's way) — with kompot_dask's on-disk
   numba cache populated by an earlier run.
2. The same call again in that process (what a long-lived worker pays for later runs).
3. Two kd.de runs on one long-lived LocalCluster: the pinned worker compiles once.

    .venv/bin/python benchmarks/cold_start.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time

FRESH = """
import time, numpy as np
t = time.perf_counter()
from kompot_dask import gp
X = np.random.default_rng(0).normal(size=(5000, 20)).astype(np.float32)
gp.length_scale_from_distances(gp.nearest_neighbour_distances(X), 10.0)
first = time.perf_counter() - t
t = time.perf_counter()
gp.length_scale_from_distances(gp.nearest_neighbour_distances(X), 10.0)
print(f"{first:.1f} {time.perf_counter() - t:.2f}")
"""


def main() -> None:
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", FRESH], capture_output=True, text=True, check=True)
    first, again = out.stdout.split()
    print(f"fresh process, first length scale (imports + numba): {first} s; same process again: {again} s")

    from distributed import Client, LocalCluster

    import kompot_dask as kd
    from kompot_dask._engine.cluster import worker_environment
    from kompot_dask.testing import SyntheticSpec, write_synthetic_store

    store = write_synthetic_store(tempfile.mkdtemp() + "/s.zarr", SyntheticSpec(n_obs=5000, n_vars=50, n_dims=20))
    with LocalCluster(n_workers=2, threads_per_worker=1, env=worker_environment(1), dashboard_address=None) as cluster, \
            Client(cluster) as client:
        for i in (1, 2):
            t = time.perf_counter()
            kd.de(store, groupby="Age", condition1="Young", condition2="Old", layer="logged_counts", obsm_key="X_pca",
                  gp=kd.GPSettings(n_landmarks=500), fdr=kd.FDRSettings(null_genes=50),
                  storage=kd.StorageSettings(overwrite=True, store_layers=False),
                  output=kd.OutputSettings(progress=False), client=client)
            print(f"long-lived cluster, kd.de run {i}: {time.perf_counter() - t:.1f} s")


if __name__ == "__main__":
    main()

"""Planner accuracy: predicted vs measured peak memory per worker and wall time.

Each configuration (cells, genes, landmarks, worker count × threads, memory limit) runs in
a fresh process: it writes a synthetic store, starts a LocalCluster of that shape, calls
``kd.plan`` (which calibrates on the workers), then ``kd.de(..., plan=plan)`` while a thread
samples the resident memory of every worker process (and the client) every 0.1 s.
Targets: peak memory within ±25 %, wall time within 2×.

    .venv/bin/python benchmarks/plan_accuracy.py [--only A C] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

CONFIGS = {
    # name: cells, genes, landmarks, workers, threads per worker, memory limit per worker
    "A": dict(n_obs=20_000, n_vars=500, m=1000, workers=1, threads=2, limit="4GiB"),
    "B": dict(n_obs=50_000, n_vars=1000, m=2000, workers=2, threads=1, limit="3GiB"),
    "C": dict(n_obs=10_000, n_vars=1000, m=5000, workers=1, threads=2, limit="8GiB"),
    "D": dict(n_obs=100_000, n_vars=500, m=1000, workers=2, threads=1, limit="1.6GiB"),
    # a CSR layer with 5 % stored values, as anndata writes it: transposed, projected sparse
    "E": dict(n_obs=60_000, n_vars=6000, m=1000, workers=2, threads=1, limit="2GiB", density=0.05),
    # sample_col (4 donors per condition): the std layers with the sample variance; then the
    # calibrated FDR (whole donors relabelled) with null genes fitted with the donors' models
    "F": dict(n_obs=30_000, n_vars=1000, m=1000, workers=2, threads=1, limit="3GiB", samples=4),
    "G": dict(n_obs=30_000, n_vars=1000, m=1000, workers=2, threads=1, limit="3GiB", samples=4,
              fdr=dict(mode="calibrated", null_genes=1000), store_layers=False),
    # sample_col with the empirical variance: every donor's weights kept through a second
    # read, one Cholesky per gene
    "H": dict(n_obs=30_000, n_vars=1000, m=1000, workers=2, threads=1, limit="3GiB", samples=4, empirical=True),
}

RUN = r"""
import json, os, threading, time
import psutil

def main(cfg, store):
    import kompot_dask as kd
    from distributed import Client, LocalCluster
    from kompot_dask._engine.cluster import worker_environment
    from kompot_dask.testing import SyntheticSpec, write_synthetic_store

    write_synthetic_store(store, SyntheticSpec(n_obs=cfg["n_obs"], n_vars=cfg["n_vars"], n_dims=20, seed=0,
                                               samples_per_condition=cfg.get("samples", 0)),
                          cell_chunk=4096, gene_chunk=256)
    layer = "logged_counts"
    if cfg.get("density"):  # the same values thinned, as a CSR element
        import numpy as np, scipy.sparse as sp, zarr
        from kompot_dask._io.ingest import write_sparse_element
        root = zarr.open_group(store, mode="r+", use_consolidated=False)
        dense, parts = root["layers/logged_counts"], []
        for r0 in range(0, cfg["n_obs"], 4096):
            y = np.asarray(dense[r0 : r0 + 4096])
            keep = min(1.0, cfg["density"] * y.size / max(1, np.count_nonzero(y)))
            y[np.random.default_rng(r0).random(y.shape) >= keep] = 0
            parts.append(sp.csr_matrix(y))
        write_sparse_element(root, "layers/csr", sp.vstack(parts, format="csr"), (cfg["n_obs"], cfg["n_vars"]), "csr",
                             np.dtype(np.float32), progress=False)
        del parts
        zarr.consolidate_metadata(store)
        layer = "csr"
    with LocalCluster(n_workers=cfg["workers"], threads_per_worker=cfg["threads"], memory_limit=cfg["limit"],
                      processes=True, env=worker_environment(cfg["threads"]), dashboard_address=None,
                      host="127.0.0.1") as cluster, Client(cluster) as client:
        pids = client.run(os.getpid)
        procs = {addr: psutil.Process(pid) for addr, pid in pids.items()}
        me = psutil.Process()
        peaks = {addr: 0 for addr in procs}
        client_peak = [0]
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                for addr, p in procs.items():
                    try:
                        peaks[addr] = max(peaks[addr], p.memory_info().rss)
                    except psutil.NoSuchProcess:
                        pass
                client_peak[0] = max(client_peak[0], me.memory_info().rss)
                time.sleep(0.1)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        args = dict(groupby="Age", condition1="Young", condition2="Old", layer=layer,
                    obsm_key="X_pca", gp=kd.GPSettings(n_landmarks=cfg["m"], use_empirical_variance=cfg.get("empirical", False)),
                    output=kd.OutputSettings(progress=False), client=client,
                    sample_col="sample" if cfg.get("samples") else None, fdr=kd.FDRSettings(**cfg.get("fdr", {})),
                    storage=kd.StorageSettings(store_layers=cfg.get("store_layers", True)))
        t = time.perf_counter()
        plan = kd.plan(store, **args)
        plan_s = time.perf_counter() - t
        print(plan, flush=True)
        t = time.perf_counter()
        kd.de(store, plan=plan, **args)
        wall = time.perf_counter() - t
        stop.set()
        th.join()
    print("RESULT " + json.dumps({"plan": plan.to_dict(), "plan_s": plan_s, "de_wall_s": wall,
                                  "worker_peaks": list(peaks.values()), "client_peak": client_peak[0]}))

if __name__ == "__main__":
    import sys
    main(json.loads(sys.argv[1]), sys.argv[2])
"""


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="*", default=list(CONFIGS))
    p.add_argument("--workdir", default=None)
    p.add_argument("--show-plans", action="store_true")
    args = p.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="kd_plan_")
    rows = []
    for name in args.only:
        cfg = CONFIGS[name]
        store = os.path.join(work, f"config_{name}.zarr")
        proc = subprocess.run([sys.executable, "-c", RUN, json.dumps(cfg), store], capture_output=True, text=True)
        shutil.rmtree(store, ignore_errors=True)
        if proc.returncode != 0:
            print(f"config {name} failed:\n{proc.stderr[-3000:]}")
            continue
        res = next(json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT "))
        if args.show_plans:
            print(proc.stdout.split("RESULT ")[0])
            print("\n".join(line for line in proc.stderr.splitlines() if "] [" in line))
        rows.append((name, cfg, res))
        pl = res["plan"]
        meas = max(res["worker_peaks"])
        print(f"{name}: {cfg}  plan {pl['status']}, cell_chunk={pl['cell_chunk']} gene_block={pl['gene_block']} "
              f"null_gene_block={pl['null_gene_block']}: worker peak predicted {gib(pl['peak_worker_bytes'])} "
              f"measured {gib(meas)} ({pl['peak_worker_bytes'] / meas - 1:+.0%}); wall predicted "
              f"{pl['wall_seconds']:.0f} s measured {res['de_wall_s']:.0f} s "
              f"(×{pl['wall_seconds'] / res['de_wall_s']:.2f})", flush=True)
    print()
    print(f"{'cfg':<4}{'cells':>8}{'genes':>7}{'m':>6}{'workers':>9}{'limit':>8}"
          f"{'peak/worker pred':>18}{'measured':>10}{'err':>7}{'client pred':>13}{'measured':>10}"
          f"{'wall pred':>11}{'measured':>10}{'ratio':>7}")
    for name, cfg, res in rows:
        pl = res["plan"]
        meas = max(res["worker_peaks"])
        print(f"{name:<4}{cfg['n_obs']:>8,}{cfg['n_vars']:>7,}{cfg['m']:>6,}{cfg['workers']:>5}×{cfg['threads']:<3}"
              f"{cfg['limit']:>8}{gib(pl['peak_worker_bytes']):>18}{gib(meas):>10}"
              f"{pl['peak_worker_bytes'] / meas - 1:>+7.0%}{gib(pl['peak_client_bytes']):>13}{gib(res['client_peak']):>10}"
              f"{pl['wall_seconds']:>9.0f} s{res['de_wall_s']:>8.0f} s{pl['wall_seconds'] / res['de_wall_s']:>7.2f}")
    print("\nper-worker peaks measured:", {name: [gib(x) for x in res["worker_peaks"]] for name, _, res in rows})


if __name__ == "__main__":
    main()

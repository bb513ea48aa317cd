"""Plots on an atlas-sized store stay small in memory: heatmap and plot_gene_expression.

Writes a synthetic store of 200,000 cells (1,000 genes by default) with a ``cell_type``
obs column and an ``X_umap`` embedding, runs ``kd.de`` on it once (500 landmarks, 500 null
genes, layers written; several minutes), then draws each plot in a fresh process and
prints its wall time and the peak RSS of that process tree (sampled every 0.1 s; the
group means run on the threaded scheduler, inside the process). Target: every plot
under 1.5 GiB.

    .venv/bin/python benchmarks/plots.py [--n-obs 200000] [--n-vars 1000] [--workdir DIR] [--keep]

``--workdir`` with an existing ``atlas.zarr`` that already holds a DE run skips the
store and the DE run.
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

TARGET_BYTES = 1.5 * 2**30

DE = """
if __name__ == "__main__":
    import time, json, kompot_dask as kd
    t = time.perf_counter()
    kd.de({store!r}, groupby="Age", condition1="Young", condition2="Old", layer="logged_counts",
          obsm_key="X_pca", gp=kd.GPSettings(n_landmarks=500), fdr=kd.FDRSettings(null_genes=500),
          output=kd.OutputSettings(progress=False))
    print("RESULT " + json.dumps({{"wall_s": time.perf_counter() - t}}))
"""

PLOT = """
if __name__ == "__main__":
    import json, os, time
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import kompot_dask as kd
    store, out = {store!r}, {out!r}
    t = time.perf_counter()
    {call}
    print("RESULT " + json.dumps({{"wall_s": time.perf_counter() - t}}))
"""

CALLS = {
    "heatmap (20 top genes, split)":
        "kd.plot.heatmap(store, n_top_genes=20, groupby='cell_type', vmax='p99', "
        "save=os.path.join(out, 'heatmap.png'))",
    "heatmap (20 top genes, fold change)":
        "kd.plot.heatmap(store, n_top_genes=20, groupby='cell_type', fold_change_mode=True, "
        "standard_scale=None, save=os.path.join(out, 'heatmap_fc.png'))",
    "plot_gene_expression":
        "kd.plot.plot_gene_expression(store, 'gene_4', basis='X_umap', "
        "save=os.path.join(out, 'gene.png'))",
    "embedding (gene, 2 mgroups)":
        "kd.plot.embedding(store, 'X_umap', color='gene_4', layer='logged_counts', "
        "mgroups=[{'Age': 'Young'}, {'Age': 'Old'}], save=os.path.join(out, 'embedding.png'))",
    "volcano_de":
        "kd.plot.volcano_de(store, save=os.path.join(out, 'volcano.png'))",
}


def has_de_run(path: str) -> bool:
    from kompot_dask._runs.history import read_history

    return os.path.exists(path) and len(read_history(path)) > 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-obs", type=int, default=200_000)
    p.add_argument("--n-vars", type=int, default=1_000)
    p.add_argument("--workdir", default=None)
    p.add_argument("--keep", action="store_true", help="keep the store and the PNGs")
    args = p.parse_args()

    from kompot_dask.testing import SyntheticSpec, write_synthetic_store

    work = args.workdir or tempfile.mkdtemp(prefix="kd_plots_")
    os.makedirs(work, exist_ok=True)
    store = os.path.join(work, "atlas.zarr")
    if has_de_run(store):
        print(f"reusing {store} and its DE run", flush=True)
    else:
        t = time.perf_counter()
        write_synthetic_store(store, SyntheticSpec(n_obs=args.n_obs, n_vars=args.n_vars, n_dims=20, seed=0,
                                                          cell_types=tuple(f"Type {c}" for c in "ABCDEF"),
                                                          umap=True),
                              cell_chunk=8192, gene_chunk=256)
        print(f"store {args.n_obs:,} × {args.n_vars:,} written in {time.perf_counter() - t:.0f} s", flush=True)
        res = run_measured(DE.format(store=store))
        print(f"de(): {res['wall_s']:.0f} s, peak {gib(res['peak_rss_bytes'])} (client + workers)", flush=True)

    rows = []
    for name, call in CALLS.items():
        res = run_measured(PLOT.format(store=store, out=work, call=call))
        rows.append((name, res))
        print(f"  {name}: {res['wall_s']:.1f} s, peak {gib(res['peak_rss_bytes'])}", flush=True)

    print(f"\n{args.n_obs:,} cells × {args.n_vars:,} genes; one fresh process per plot (import included "
          "in the peak, not in the time)")
    print(f"{'plot':<38s}{'wall':>9s}{'peak RSS':>12s}  under 1.5 GiB")
    for name, res in rows:
        ok = "yes" if res["peak_rss_bytes"] < TARGET_BYTES else "NO"
        print(f"{name:<38s}{res['wall_s']:>7.1f} s{gib(res['peak_rss_bytes']):>12s}  {ok}")
    if args.keep:
        print(f"store and PNGs kept in {work}")
    elif args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    if any(res["peak_rss_bytes"] >= TARGET_BYTES for _, res in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()

"""sample_col (kompot's sample variance): kompot 0.8.0 and kompot_dask side by side, then
kompot_dask alone at scale.

Part 1 (``--compare``): 5,000 cells × 2,000 genes, 3 donors per condition, the same k-means
landmarks given to both tools (``--m``, default 300: kompot keeps an m × m × genes tensor
per condition and a third for their sum, 3 × m² × G × 8 bytes — 4.3 GB at m = 300, 600 GB
at its default m = 5,000). Each tool in a fresh process: the ``de`` call's wall time, the
peak RSS of the process tree, and how far apart the Mahalanobis distances are. With
``--empirical`` both tools add the empirical variance (kompot's per-gene Cholesky with a
diagonal term; kompot_dask the same, in its gene blocks).

Part 2 (``--scale``): 200,000 cells × 2,000 genes, 10 donors per condition, defaults
(m = 5,000), kompot_dask alone: the same run without sample_col and without layers
(null_genes=0, as sample_col implies), then with sample_col without layers and with them.
Prints wall time and peak RSS of each, the ratio to the run without sample_col, the layer
pass's time and GFLOP/s, each run's own plan (wall time; worker + client peak), and
kompot's own memory estimate for that size (``kompot.resource_estimation``, in a subprocess).

    .venv/bin/python benchmarks/sample_variance.py --compare [--empirical]
    .venv/bin/python benchmarks/sample_variance.py --scale [--n-obs 200000]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from _measure import gib, run_measured  # noqa: E402

CALL = dict(groupby="Age", c1="Young", c2="Old", layer="logged_counts")

KOMPOT = """
import time, json, numpy as np, anndata as ad, kompot
a = ad.read_h5ad({h5ad!r})
t = time.perf_counter()
kompot.de(a, groupby={groupby!r}, condition1={c1!r}, condition2={c2!r}, layer={layer!r}, obsm_key="X_pca",
          sample_col="sample", gp=kompot.GPSettings(landmarks=np.load({landmarks!r}), use_empirical_variance={empirical!r}),
          output=kompot.OutputSettings(progress=False))
wall = time.perf_counter() - t
np.save({out!r}, a.var["kompot_de_Young_to_Old_mahalanobis_sample_var"].to_numpy(float))
print("RESULT " + json.dumps({{"de_wall_s": wall}}))
"""

KOMPOT_DASK = """
if __name__ == "__main__":
    import time, json, numpy as np, anndata as ad, kompot_dask as kd
    # with kompot's own length-scale search for the side-by-side run (the same ls, so the same answers)
    gp = (kd.GPSettings(use_empirical_variance={empirical!r}) if {landmarks!r} is None else
          kd.GPSettings.kompot(landmarks=np.load({landmarks!r}), use_empirical_variance={empirical!r}))
    t = time.perf_counter()
    kd.de({store!r}, groupby={groupby!r}, condition1={c1!r}, condition2={c2!r}, layer={layer!r}, obsm_key="X_pca",
          sample_col={sample_col!r}, gp=gp, fdr=kd.FDRSettings(null_genes=0),
          storage=kd.StorageSettings(store_layers={layers!r}, overwrite=True),
          output=kd.OutputSettings(progress=False))
    wall = time.perf_counter() - t
    info = kd.RunInfo({store!r}, run_id=-1)
    rec = info.record
    name = "kompot_de_Young_to_Old_mahalanobis" + ("_sample_var" if {sample_col!r} else "")
    if {out!r}:
        np.save({out!r}, ad.read_zarr({store!r}).var[name].to_numpy(float))
    print("RESULT " + json.dumps({{"de_wall_s": wall, "task_seconds": rec.get("task_seconds", {{}}),
                                   "phase_seconds": rec.get("phase_seconds", {{}}),
                                   "plan": rec.get("plan", {{}})}}))
"""

KOMPOT_ESTIMATE = """
import json, numpy as np, pandas as pd, anndata as ad, scipy.sparse as sp
from kompot.resource_estimation import estimate_differential_expression_resources
n, g, donors = {n_obs}, {n_vars}, {donors}
rng = np.random.default_rng(0)
cond = np.where(rng.random(n) < 0.5, "Young", "Old")
obs = pd.DataFrame({{"Age": cond, "sample": [f"{{c}}_d{{k}}" for c, k in zip(cond, rng.integers(0, donors, n))]}},
                   index=[str(i) for i in range(n)])
a = ad.AnnData(X=sp.csr_matrix((n, g)), obs=obs)
a.obsm["X_pca"] = np.zeros((n, 20), dtype=np.float32)
plan = estimate_differential_expression_resources(a, "Young", "Old", "Age", use_sample_variance=True,
                                                  n_landmarks={m}, obsm_key="X_pca", null_genes=0,
                                                  sample_col="sample")
print("RESULT " + json.dumps({{"memory_bytes": int(plan.total_memory_required),
                               "report": plan.format_report()}}))
"""


def _store(work: str, n_obs: int, n_vars: int, donors: int) -> tuple[str, object]:
    import kompot_dask as kd  # noqa: F401
    from kompot_dask.testing import SyntheticSpec, write_synthetic_store

    spec = SyntheticSpec(n_obs=n_obs, n_vars=n_vars, n_dims=20, seed=0, samples_per_condition=donors)
    path = os.path.join(work, f"samples_{n_obs}x{n_vars}_{donors}.zarr")
    if not os.path.exists(path):
        write_synthetic_store(path, spec)
    return path, spec


def compare(args, work: str) -> None:
    import anndata as ad
    import numpy as np
    from sklearn.cluster import k_means

    store, _ = _store(work, args.n_obs, args.n_vars, 3)
    adata = ad.read_zarr(store)
    h5ad = os.path.join(work, "compare.h5ad")
    adata.write_h5ad(h5ad)
    landmarks = os.path.join(work, "landmarks.npy")
    np.save(landmarks, k_means(adata.obsm["X_pca"].astype(np.float64), args.m, n_init=1, random_state=0)[0])
    del adata
    print(f"data: {args.n_obs:,} cells × {args.n_vars:,} genes, 3 donors per condition, m = {args.m} "
          "(the same k-means landmarks for both), no null genes (sample_col's default)"
          + (", with the empirical variance" if args.empirical else ""))
    ref_out, our_out = os.path.join(work, "ref_d.npy"), os.path.join(work, "our_d.npy")
    ref = run_measured(KOMPOT.format(h5ad=h5ad, landmarks=landmarks, out=ref_out, empirical=args.empirical, **CALL))
    ours = run_measured(KOMPOT_DASK.format(store=store, landmarks=landmarks, sample_col="sample", layers=True,
                                           out=our_out, empirical=args.empirical, **CALL))
    d_ref, d = np.load(ref_out), np.load(our_out)
    print(f"{'':24s}{'kompot 0.8.0':>16s}{'kompot_dask':>16s}{'ratio':>10s}")
    print(f"{'de() wall time':24s}{ref['de_wall_s']:>14.1f} s{ours['de_wall_s']:>14.1f} s"
          f"{ours['de_wall_s'] / ref['de_wall_s']:>10.2f}")
    print(f"{'peak RSS (process tree)':24s}{gib(ref['peak_rss_bytes']):>16s}{gib(ours['peak_rss_bytes']):>16s}"
          f"{ours['peak_rss_bytes'] / ref['peak_rss_bytes']:>10.2f}")
    rel = np.abs(d - d_ref) / np.abs(d_ref)
    print(f"Mahalanobis (sample variance), relative difference: median {np.median(rel):.1e}, max {rel.max():.1e}")


def scale(args, work: str) -> None:
    store, spec = _store(work, args.n_obs, args.n_vars, args.donors)
    n, g, m = args.n_obs, args.n_vars, args.m
    print(f"data: {n:,} cells × {g:,} genes, {args.donors} donors per condition, m = {m}, no null genes")
    est = run_measured(KOMPOT_ESTIMATE.format(n_obs=n, n_vars=g, donors=args.donors, m=m))
    runs = {}
    for label, sample_col, layers in (("without sample_col, no layers", None, False),
                                      ("sample_col, no layers", "sample", False),
                                      ("sample_col, layers", "sample", True)):
        if label == "sample_col, layers" and args.skip_layers:
            continue
        r = run_measured(KOMPOT_DASK.format(store=store, landmarks=None, sample_col=sample_col, layers=layers,
                                            out="", empirical=False, **CALL))
        plan = r["plan"]  # the run's own (timed) plan, from its record
        r["predicted_peak"] = (plan.get("peak_worker_bytes") or 0) + (plan.get("peak_client_bytes") or 0)
        r["predicted_wall"] = plan.get("wall_seconds")
        runs[label] = r
        print(f"  {label}: de() {r['de_wall_s']:.1f} s (plan {r['predicted_wall'] or float('nan'):.1f} s), "
              f"peak RSS {gib(r['peak_rss_bytes'])} (plan, worker + client: {gib(r['predicted_peak'])})", flush=True)
    base = runs["without sample_col, no layers"]
    print(f"\n{'run':34s}{'de() wall':>12s}{'× no sample_col':>17s}{'peak RSS':>12s}{'plan wall':>11s}{'plan peak':>11s}")
    for label, r in runs.items():
        pw = r["predicted_wall"]
        print(f"{label:34s}{r['de_wall_s']:>10.1f} s{r['de_wall_s'] / base['de_wall_s']:>17.2f}"
              f"{gib(r['peak_rss_bytes']):>12s}{(f'{pw:.0f} s' if pw else '—'):>11s}"
              f"{gib(r['predicted_peak']):>11s}")
    if "sample_col, layers" in runs:
        r = runs["sample_col, layers"]
        t = r["task_seconds"].get("layer prediction", 0.0)
        S = 2 * args.donors
        # both means and each condition's Helmert contrasts (S − 2 in all) at every cell;
        # predicting every donor's model as well as both means would be S + 2
        flops = 2.0 * n * m * g * S
        print(f"\nlayers with the sample variance: 'layer prediction' {t:.0f} thread-seconds for "
              f"{flops / 1e12:.1f} TFLOP (n·m·G·S multiply-adds; each donor's own prediction as well would be "
              f"S + 2): {flops / t / 1e9:.1f} GFLOP/s per thread")
        print("task thread-seconds:", json.dumps({k: round(v) for k, v in r["task_seconds"].items()}))
    print(f"\nkompot 0.8.0's own memory estimate for this run (sample variance, m = {m}): "
          f"{gib(est['memory_bytes'])}")
    print("  its report:\n    " + "\n    ".join(est["report"].splitlines()[:25]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--compare", action="store_true")
    p.add_argument("--scale", action="store_true")
    p.add_argument("--n-obs", type=int, default=None)
    p.add_argument("--n-vars", type=int, default=2_000)
    p.add_argument("--m", type=int, default=None)
    p.add_argument("--donors", type=int, default=10, help="donors per condition (--scale)")
    p.add_argument("--skip-layers", action="store_true", help="--scale without the run that writes layers")
    p.add_argument("--empirical", action="store_true",
                   help="--compare with GPSettings(use_empirical_variance=True) in both tools")
    p.add_argument("--workdir", default=None)
    args = p.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="kd_samples_")
    os.makedirs(work, exist_ok=True)
    if args.compare or not args.scale:
        args_c = argparse.Namespace(**{**vars(args), "n_obs": args.n_obs or 5_000, "m": args.m or 300})
        compare(args_c, work)
    if args.scale:
        args_s = argparse.Namespace(**{**vars(args), "n_obs": args.n_obs or 200_000, "m": args.m or 5_000})
        scale(args_s, work)


if __name__ == "__main__":
    main()

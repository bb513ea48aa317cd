"""FDR calibration on planted truth: how many of the genes called DE are not.

Synthetic atlases (``kompot_dask.testing.SyntheticSpec``) with known DE genes, varied one
knob at a time from a base scenario: cell count, DE fraction, effect size, a density skew
between the conditions (cluster 0 three times as common in one condition, no expression
change of its own), a spread of gene variances, and donors. Each scenario is run once
with ``FDRSettings(mode="variance_stratified")``, which writes kompot 0.8.0's raw columns
unchanged beside its own, so both modes are scored on the same distances; then with
``FDRSettings(mode="calibrated", null_genes=0)``, kompot_dask's own mode; on the donor
scenarios also with ``sample_col``, ``mode="calibrated"`` (whole donors relabelled) and
2,000 null genes (kompot's raw FDR with the sample variance, written beside). (The raw mode
is kompot 0.8.0's FDR: ``tests/test_parity.py`` and ``tests/test_fdr.py`` hold it to kompot
at 1e-8 in local FDR with identical ``is_de`` calls.)

For each mode it prints, against the planted truth:

* FDP: false discoveries / discoveries at the 0.05 local-FDR target (``is_de``);
* power: true discoveries / planted DE genes;
* AUROC and AUPRC of the mode's score (raw: the Mahalanobis distance; stratified: the
  residual z; calibrated: log(1 + D²) − log(1 + D_perm²)), which do not depend on any
  threshold.

It saves a calibration plot (FDP against the target over 0.01–0.2, one panel per mode)
and every figure as JSON.

    .venv/bin/python benchmarks/calibration.py                     # the scenario table (~20 min)
    .venv/bin/python benchmarks/calibration.py --quick             # 3 small scenarios (~3 min)
    .venv/bin/python benchmarks/calibration.py --only skew,base    # some scenarios
    .venv/bin/python benchmarks/calibration.py --scale             # adds 50k and 200k cells
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace

import numpy as np

BASE = dict(n_obs=10_000, n_vars=1_000, n_dims=10, n_clusters=6, de_fraction=0.05, effect_size=(0.5, 1.5),
            dropout=0.3, seed=11)
"""The base scenario: every other scenario changes one or two of these."""

SCENARIOS: dict[str, dict] = {
    "base": {},
    "5k cells": dict(n_obs=5_000),
    "1% DE": dict(de_fraction=0.01),
    "10% DE": dict(de_fraction=0.10),
    "small effects": dict(effect_size=(0.2, 0.6)),
    "density skew 3x": dict(density_skew=3.0),
    "variance spread": dict(variance_spread=0.6),
    "skew + spread": dict(density_skew=3.0, variance_spread=0.6),
    "donors (3 per condition)": dict(samples_per_condition=3),
    "donors (6 per condition)": dict(samples_per_condition=6),
    "donors + density skew": dict(samples_per_condition=4, density_skew=3.0),
}
SCALE = {"50k cells": dict(n_obs=50_000), "200k cells": dict(n_obs=200_000)}
QUICK = {"5k cells": dict(n_obs=5_000, n_vars=400), "density skew 3x": dict(n_obs=5_000, n_vars=400, density_skew=3.0),
         "variance spread": dict(n_obs=5_000, n_vars=400, variance_spread=0.6)}

TARGETS = np.round(np.linspace(0.01, 0.2, 20), 3)
MODES = {  # mode → (local FDR role, score role)
    "raw (kompot 0.8.0)": ("local_fdr", "mahalanobis"),
    "variance_stratified": ("residual_local_fdr", "residual_z"),
    "calibrated": ("calibrated_local_fdr", "calibrated_score"),
    "raw + sample_col (kompot 0.8.0)": ("sample_local_fdr", "sample_mahalanobis"),
    "calibrated + sample_col": ("sample_calibrated_local_fdr", "sample_calibrated_score"),
}
"""The last two modes run on the donor scenarios only, in one run with the sample variance:
kompot 0.8.0's raw FDR with null genes (2,000 given explicitly: kompot's default with
sample_col is none, and no FDR), and the calibrated mode, its null whole donors relabelled
between the conditions."""


def auroc(score: np.ndarray, truth: np.ndarray) -> float:
    """Mann–Whitney AUROC (ties count half)."""
    from scipy.stats import rankdata

    ranks = rankdata(score)
    n_pos, n_neg = int(truth.sum()), int((~truth).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float((ranks[truth].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auprc(score: np.ndarray, truth: np.ndarray) -> float:
    """Average precision: precision at each true gene, genes sorted by decreasing score."""
    order = np.argsort(-score, kind="stable")
    hits = truth[order]
    if not hits.any():
        return float("nan")
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision[hits].mean())


def scores(lfdr: np.ndarray, score: np.ndarray, truth: np.ndarray, target: float = 0.05) -> dict:
    called = lfdr < target
    n_called = int(called.sum())
    false = int((called & ~truth).sum())
    curve = []
    for t in TARGETS:
        c = lfdr < t
        curve.append(float((c & ~truth).sum() / c.sum()) if c.any() else 0.0)
    return {"called": n_called, "false": false, "fdp": false / n_called if n_called else 0.0,
            "power": float((called & truth).sum() / truth.sum()) if truth.any() else float("nan"),
            "auroc": auroc(score, truth), "auprc": auprc(score, truth), "fdp_curve": curve}


def run_scenario(name: str, overrides: dict, workdir: str, args) -> dict:
    import anndata as ad

    import kompot_dask as kd
    from kompot_dask.testing import SyntheticSpec, write_synthetic_store

    spec = replace(SyntheticSpec(), **{**BASE, **overrides})
    store = os.path.join(workdir, "calibration.zarr")
    t0 = time.perf_counter()
    write_synthetic_store(store, spec, cell_chunk=4096, gene_chunk=256)
    gp = kd.GPSettings() if args.m is None else kd.GPSettings(n_landmarks=args.m)
    t1 = time.perf_counter()
    walls, names = [], {}
    # run 0: null genes, kompot's raw columns and the variance-stratified ones; run 1: the
    # calibrated mode (no null genes: its null is the permuted labels); with donors, run 2:
    # the calibrated mode with the sample variance
    runs = [("rs", kd.FDRSettings(mode="variance_stratified"), None),
            ("cal", kd.FDRSettings(mode="calibrated", null_genes=0), None)]
    if spec.samples_per_condition:
        runs.append(("cs", kd.FDRSettings(mode="calibrated", null_genes=2000), "sample"))
    for key, fdr, sample_col in runs:
        t = time.perf_counter()
        kd.de(store, groupby="Age", condition1="Young", condition2="Old", layer="logged_counts", obsm_key="X_pca",
              gp=gp, fdr=fdr, sample_col=sample_col,
              storage=kd.StorageSettings(result_key=key, store_layers=False, overwrite=True),
              output=kd.OutputSettings(progress=False))
        walls.append(round(time.perf_counter() - t, 1))
        roles = kd.RunInfo(store).run_record.role_names()
        if key == "cs":
            names.update({f"sample_{r}": roles[r] for r in ("calibrated_local_fdr", "calibrated_score", "local_fdr",
                                                             "mahalanobis")})
            continue
        names.update(roles)  # disjoint roles, except the shared ones
        if key == "rs":
            names["raw_mahalanobis"] = names["mahalanobis"]
    names["mahalanobis"] = names.pop("raw_mahalanobis")
    var = ad.read_zarr(store).var
    truth = var["true_de"].to_numpy(bool)
    out = {"scenario": name, "spec": {k: v for k, v in spec.__dict__.items() if k in {**BASE, **overrides}},
           "n_true": int(truth.sum()), "de_wall_s": walls, "write_s": round(t1 - t0, 1), "modes": {}}
    for mode, (fdr_role, score_role) in MODES.items():
        if fdr_role not in names:
            continue
        lfdr = var[names[fdr_role]].to_numpy(float)
        score = var[names[score_role]].to_numpy(float)
        score = np.where(np.isfinite(score), score, -np.inf)
        out["modes"][mode] = scores(np.where(np.isfinite(lfdr), lfdr, 1.0), score, truth)
    shutil.rmtree(store, ignore_errors=True)
    return out


def print_table(results: list[dict]) -> None:
    head = f"{'scenario':26s} {'true':>5s}  " + "  ".join(f"{m[:19]:>40s}" for m in MODES)
    sub = f"{'':26s} {'':>5s}  " + "  ".join(f"{'called':>7s} {'FDP':>6s} {'power':>6s} {'AUROC':>6s} {'AUPRC':>6s}"
                                            for _ in MODES)
    print(head)
    print(sub)
    for r in results:
        cells = []
        for m in MODES:
            s = r["modes"].get(m)
            if s is None:
                cells.append(f"{'—':>7s}")
                continue
            cells.append(f"{s['called']:7d} {s['fdp']:6.3f} {s['power']:6.3f} {s['auroc']:6.3f} {s['auprc']:6.3f}")
        print(f"{r['scenario']:26s} {r['n_true']:5d}  " + "  ".join(f"{c:>40s}" for c in cells), flush=True)


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(MODES), figsize=(5 * len(MODES), 4.2), sharey=True)
    colors = plt.get_cmap("tab20")(np.linspace(0, 1, 20))
    handles = {}  # one colour per scenario in every panel; the legend lists them all
    for ax, mode in zip(np.atleast_1d(axes), MODES, strict=True):
        for i, r in enumerate(results):
            if mode not in r["modes"]:
                continue
            (line,) = ax.plot(TARGETS, r["modes"][mode]["fdp_curve"], marker=".", color=colors[i % 20],
                              label=r["scenario"])
            handles.setdefault(r["scenario"], line)
        handles["FDP = target"] = ax.plot(TARGETS, TARGETS, color="black", linestyle="--", linewidth=0.8)[0]
        ax.set_title(mode)
        ax.set_xlabel("local-FDR target")
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("false discovery proportion (planted truth)")
    np.atleast_1d(axes)[-1].legend(list(handles.values()), list(handles), fontsize=7, loc="upper left",
                                   bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"calibration plot: {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="3 small scenarios (5k cells × 400 genes)")
    p.add_argument("--scale", action="store_true", help="also 50k and 200k cells")
    p.add_argument("--only", help="comma-separated scenario names (substrings)")
    p.add_argument("--m", type=int, default=None, help="landmarks (default: kompot's 5,000)")
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default="calibration", help="prefix of the .json and .png written")
    args = p.parse_args()
    chosen = dict(QUICK) if args.quick else {**SCENARIOS, **(SCALE if args.scale else {})}
    if args.only:
        keys = [k.strip() for k in args.only.split(",")]
        chosen = {n: o for n, o in chosen.items() if any(k in n for k in keys)}
    workdir = args.workdir or tempfile.mkdtemp(prefix="kd_calibration_")
    os.makedirs(workdir, exist_ok=True)
    results = []
    for name, overrides in chosen.items():
        print(f"--- {name}", flush=True)
        results.append(run_scenario(name, overrides, workdir, args))
        print_table(results[-1:])
    print("\nAll scenarios (FDP and power at the 0.05 local-FDR target):")
    print_table(results)
    with open(args.out + ".json", "w") as fh:
        json.dump(results, fh, indent=1)
    plot(results, args.out + ".png")
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

"""Write ``docs/kompot_compat.md``: every argument of kompot 0.8.0's ``de``, its settings
classes and its plot functions, and what kompot_dask does with it.

The table is built from the two packages' own signatures (kompot is a test extra), so it
cannot leave an argument out; the reasons are kept here. ``tests/test_kompot_compat.py``
checks that the committed file is what this script writes.

    .venv/bin/python docs/kompot_compat.py            # rewrite docs/kompot_compat.md
    .venv/bin/python docs/kompot_compat.py --check    # exit 1 if it is stale
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "kompot_compat.md")

# de() arguments kompot has and kompot_dask maps or refuses (the rest are supported as is).
DE_NOTES = {
    "adata": "mapped: `data`, an in-memory AnnData (as kompot) or the path of a zarr AnnData store",
    "sample_col": "supported: per-sample models on the shared landmarks, the gene-specific covariance as a "
                  "low-rank term (no m × m × genes tensor), std layers; FDR from null genes given explicitly "
                  "(`null_genes=2000`: kompot's default with `sample_col` is none), each fitted with the samples' "
                  "models as kompot does, from given null distances, or from `FDRSettings(mode=\"calibrated\")` "
                  "(whole donors relabelled between the conditions; kompot has no such mode); with the empirical "
                  "variance as kompot combines them (each cell's residual from its own sample's model, one "
                  "Cholesky per gene of the full covariance: m³/3 flops per gene; with `groups`, one per gene at "
                  "each subset's points)",
    "model": "refused: kompot's prefitted predictors cannot be distributed (a value raises `SettingsError`)",
    "function_kwargs": "refused: no pass-through keywords; an unknown keyword is a `TypeError` naming it",
}
# Settings classes kompot has that kompot_dask does not.
MISSING_CLASSES = {
    "ModelSettings": "refused: kompot_dask fits its own model (see `model` above)",
    "DAThresholdSettings": "not applicable: differential abundance is not part of kompot_dask",
}
SETTINGS_NOTES = {
    ("FDRSettings", "null_genes"): "supported: `\"auto\"` (2,000; 0 with `sample_col`, as kompot), an integer, "
                                   "or `None`; kompot's list of gene indices is refused",
    ("FDRSettings", "null_expression"): "supported: `(expr1, expr2)` fitted and scored as null genes after the drawn "
                                        "ones; numpy arrays travel with the tasks (each carries its block's "
                                        "columns), a dask array (e.g. `dask.array.from_zarr`) is read by each "
                                        "task (never whole in memory); recorded by its column count",
    ("GPSettings", "random_state"): "supported; the default is 0 (kompot's is `None`, not reproducible)",
    ("GPSettings", "n_landmarks"): "supported (kompot's default, 5,000)",
    ("OutputSettings", "copy"): "supported for an in-memory AnnData (the copy with the results is returned); "
                                "refused for a store, which is written in place",
    ("OutputSettings", "inplace"): "supported for an in-memory AnnData (`False`: it stays unchanged, the full "
                                   "results are returned); refused for a store",
    ("FilterSettings", "groups"): "supported: kompot's varm tables (`..._groups`, genes × subsets) from the run's own "
                                  "models, with each subset's own landmarks or cells, null-gene FDR and sample "
                                  "variance; kompot's forms and subset names (not its test-shaped list-of-arrays "
                                  "special cases); subsets of fewer than 2 cells are left out of the tables (kompot "
                                  "keeps them as columns of zeros); with the empirical variance, kompot's factor trick at each "
                                  "subset's points",
    ("StorageSettings", "store_posterior_covariance"): "supported: obsp cells × cells (zero outside the cell "
                                                       "filter), written by one task; the plan refuses it above the "
                                                       "cell count one worker holds and names that count; refused "
                                                       "with `sample_col` (the covariance is then per gene)",
    ("FilterSettings", "check_representation"): "supported: `True` leaves each underrepresented (subset, condition) "
                                                "pair's cells out of the run (kompot's documented behaviour)",
}
PLOT_NOTES = {
    "adata": "mapped: `data`, an AnnData, a store path or an opened store",
    "kwargs": "not yet: no pass-through keywords",
}
# Per plot function, where the same name means something else from one plot to another.
PLOT_FUNCTION_NOTES = {
    "volcano_de": {
        "kwargs": "supported: further `Axes.scatter` arguments for the not-significant genes",
        "group": "supported: one subset's columns of the run's varm tables (`FilterSettings(groups=...)`): mean "
                 "log fold change, distance, local FDR and `is_de`",
        "update_de_classification": "refused: a plot never writes to the data; re-run `kd.de` with "
                                    "`FDRSettings(threshold=...)` (`True` raises `ValueError`)",
        "direction_column": "refused: only used with `update_de_classification`",
    },
    "plot_gene_expression": {
        "kwargs": "supported: further `Axes.scatter` arguments for the cells of every panel",
    },
    "embedding": {
        "kwargs": "not yet: kompot passes them to `scanpy.pl.embedding`; here only the named arguments "
                  "(scanpy's `size` is `point_size`, `palette`, `legend_loc`, `vmin`/`vmax`, … are named)",
    },
    "heatmap": {
        "var_names": "mapped: `genes` (kompot's other name for it)",
        "cluster_rows": "supported; default `False` (kompot clusters by default): genes stay in score order",
        "cluster_cols": "supported; default `False` (kompot clusters by default): groups stay in category order",
        "observed": "accepted, no effect: groups without cells are always left out",
        "dendrogram": "not yet: `True` raises `ValueError` (`cluster_rows`/`cluster_cols` order the tiles)",
        "dendrogram_color": "not yet (with `dendrogram`)",
        "layout_config": "not yet: a value raises `ValueError`; `figsize`, `tile_size` and the label sizes set the layout",
        "split_dot_mode": "not yet: `True` raises `ValueError`",
        "max_cell_count": "not yet (with `split_dot_mode`)",
        "kwargs": "not yet: no pass-through keywords",
    },
}
PLOT_DEFAULT = "not yet"


def _params(fn) -> list[str]:
    return [p for p in inspect.signature(fn).parameters if p not in ("self",)]


def _rows(ours: set[str], theirs: list[str], notes: dict[str, str], default: str,
          kompot_only: dict[str, str] | None = None) -> list[str]:
    rows = []
    for name in theirs:
        if name in notes:
            status = notes[name]
        elif kompot_only and name in kompot_only:
            status = kompot_only[name]
        elif name in ours:
            status = "supported"
        else:
            status = default
        rows.append(f"| `{name}` | {status} |")
    return rows


def render() -> str:
    import kompot
    import kompot.plot as kplot

    import kompot_dask as kd
    import kompot_dask.plot as kdplot

    lines = [
        "# kompot 0.8.0 compatibility",
        "",
        "Every argument of kompot 0.8.0's `de`, of its settings classes and of its plot functions, and",
        "what kompot_dask does with it: **supported** (same name, same meaning), **mapped** (another",
        "form of the same thing), **accepted, no effect** (a memory or storage knob that kompot_dask",
        "does not need; logged at INFO when set), **refused** (a value other than kompot's default",
        "raises `SettingsError` naming the field and the reason), or **not yet**.",
        "",
        "Generated by `docs/kompot_compat.py` from both packages' signatures; "
        "`tests/test_kompot_compat.py` keeps it current.",
        "",
        "kompot_dask's own additions (`ComputeSettings`, `client`, `plan`, `dry_run`, `resume`,",
        "`GPSettings.neighbors/neighbor_sample/landmark_sample`, `StorageSettings.store_layers/",
        "layer_dtype/results_store`, `de(..., output='results.zarr')`) are described in the README,",
        "`docs/runs.md` and `docs/performance.md`.",
        "",
        "## `de`",
        "",
        "| argument | kompot_dask |",
        "|---|---|",
    ]
    ours = set(_params(kd.de)) | {"adata"}
    lines += _rows(ours, _params(kompot.de), DE_NOTES, "not yet")
    lines += ["", "Positional order is kompot's: `de(data, groupby, condition1, condition2, obsm_key, layer, genes, "
              "sample_col)`."]
    for name in sorted(n for n in dir(kompot) if n.endswith("Settings")):
        theirs = [f.name for f in dataclasses.fields(getattr(kompot, name))]
        lines += ["", f"## `{name}`", ""]
        if not hasattr(kd, name):
            lines += [MISSING_CLASSES.get(name, "not yet"), ""]
            continue
        ours_cls = getattr(kd, name)
        lines += ["| field | kompot_dask |", "|---|---|"]
        notes = {field: text for (cls, field), text in SETTINGS_NOTES.items() if cls == name}
        lines += _rows({f.name for f in dataclasses.fields(ours_cls)}, theirs, notes, "not yet",
                       ours_cls.kompot_only_fields())
    for name in ("volcano_de", "heatmap", "plot_gene_expression", "embedding"):
        lines += ["", f"## `plot.{name}`", "", "| argument | kompot_dask |", "|---|---|"]
        notes = {**PLOT_NOTES, **PLOT_FUNCTION_NOTES.get(name, {})}
        lines += _rows(set(_params(getattr(kdplot, name))), _params(getattr(kplot, name)), notes, PLOT_DEFAULT)
    return "\n".join(lines) + "\n"


def check() -> list[str]:
    """What is wrong with the committed table: stale, or a kompot field kompot_dask's settings
    class does not take by name."""
    import kompot

    import kompot_dask as kd

    problems = []
    with open(OUT, encoding="utf-8") as fh:
        if fh.read() != render():
            problems.append(f"{OUT} is stale: run .venv/bin/python docs/kompot_compat.py")
    for name in ("GPSettings", "FDRSettings", "FilterSettings", "StorageSettings", "OutputSettings"):
        theirs = {f.name for f in dataclasses.fields(getattr(kompot, name))}
        ours = {f.name for f in dataclasses.fields(getattr(kd, name))}
        if theirs - ours:
            problems.append(f"{name} does not take kompot's {sorted(theirs - ours)}")
    return problems


def main() -> int:
    if "--check" in sys.argv[1:]:  # kompot sets JAX's global x64 flag: tests run this in a subprocess
        problems = check()
        print("\n".join(problems) or "docs/kompot_compat.md is current")
        return 1 if problems else 0
    with open(OUT, "w", encoding="utf-8") as fh:
        fh.write(render())
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One gene on an embedding: observed, imputed per condition, and fold change."""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from ._common import (
    PlotData,
    check_output_options,
    default_point_size,
    describe_run,
    finish,
    output_options_doc,
    resolve_limit,
    run_note,
)
from ._embedding import draw_cells, style_axes

logger = logging.getLogger("kompot_dask")

_LAYER_ROLES = ("imputed1", "imputed2", "fold_change")


@output_options_doc
def plot_gene_expression(
    data: Any,
    gene: str,
    *,
    run_id: int = -1,
    basis: str = "X_umap",
    layer: str | None = None,
    vmin: float | str | None = "p2",
    vmax: float | str | None = "p98",
    cmap: str = "viridis",
    fold_change_cmap: str = "RdBu_r",
    point_size: float | None = None,
    frameon: bool = True,
    ncols: int = 2,
    figsize: tuple[float, float] | None = None,
    save: str | os.PathLike | None = None,
    title: str | None = None,
    lfc_key: str | None = None,
    score_key: str | None = None,
    condition1: str | None = None,
    condition2: str | None = None,
    cmap_expression: str | None = None,
    cmap_fold_change: str | None = None,
    return_fig: bool = False,
    show: bool | None = None,
    dpi: float | None = None,
    **kwargs: Any,
) -> Any:
    """A gene on an embedding in four panels: observed expression, imputed expression in
    each condition, and the imputed fold change (condition2 − condition1).

    Only the gene's column of each of the four layers is read, a block of cells at a time.

    Parameters
    ----------
    data
        Store path (or ``file://`` URL), :class:`~kompot_dask.store.Store` or AnnData
        holding a DE run with its layers (``StorageSettings(store_layers=True)``).
    gene
        A name of var_names.
    run_id
        Run to plot (``-1``: the latest).
    basis
        obsm key of the embedding (``"umap"`` finds ``"X_umap"``).
    layer
        Observed expression layer; ``None`` takes the run's layer.
    vmin, vmax
        Colour limits, numbers or ``"pNN"`` percentiles. The observed panel resolves them
        over its values, the two imputed panels over both imputed columns together (one
        shared scale), and the fold-change panel over the fold changes, made symmetric
        around 0 (±max(|vmin|, |vmax|)).
    cmap, fold_change_cmap
        Colormaps of the expression panels and of the fold-change panel.
    point_size
        Marker area (default from the number of cells).
    frameon
        Draw the axes frames and axis labels.
    ncols
        Panels per row.
    figsize
        Figure size (default 4 × 4 per panel).
    save
        Path to save the figure to.
    title
        Figure title (default: the gene, the run, its fold change and distance).
    lfc_key, score_key
        var columns of the fold change and the distance in the title (default: the run's).
    condition1, condition2
        Names of the conditions in the panel titles (default: the run's).
    cmap_expression, cmap_fold_change
        kompot's names for ``cmap`` and ``fold_change_cmap``.
    **kwargs
        Further ``Axes.scatter`` arguments for the cells of every panel (e.g. ``alpha``).
    {output_options}

    Returns
    -------
    ``None``; with ``return_fig=True`` the matplotlib Figure, with ``fig.kompot_data``:
    ``gene``, ``run_id``, ``basis``,
    ``coords`` (cells × 2), ``panels`` (``{"observed", "imputed1", "imputed2",
    "fold_change"}`` → the gene's values per cell, in obs order), ``layers`` (panel →
    layer name), ``limits`` (panel → (vmin, vmax)), ``mean_lfc``, ``mahalanobis``,
    ``overwritten`` (role → the later run whose values a field holds).
    """
    check_output_options(return_fig, show, dpi)
    cmap = _alias(cmap_expression, "cmap_expression", cmap, "cmap", "viridis")
    fold_change_cmap = _alias(cmap_fold_change, "cmap_fold_change", fold_change_cmap, "fold_change_cmap", "RdBu_r")
    source = PlotData(data)
    if not isinstance(gene, str):
        raise TypeError(f"gene={gene!r} must be one gene name (a string)")
    j = int(source.gene_indices([gene], what="gene")[0])
    fields = _layer_fields(source, run_id)
    describe_run(fields)
    lfc_key = lfc_key or fields["mean_lfc"]
    score_key = score_key or fields["mahalanobis"]
    logger.info("Using fields for gene expression plot - lfc_key: %r, score_key: %r", lfc_key, score_key)
    c1 = condition1 if condition1 is not None else fields.condition1
    c2 = condition2 if condition2 is not None else fields.condition2
    note, overwritten = run_note(fields, ("mean_lfc", "mahalanobis", *_LAYER_ROLES))
    lfc = float(source.var_column(lfc_key, "lfc_key")[j])
    score = float(source.var_column(score_key, "score_key")[j])
    if not np.isfinite(lfc):
        raise ValueError(
            f"gene {gene!r} was not tested in run {fields.run_id} (its {lfc_key!r} is "
            f"NaN; the run's genes= left it out). Pick a tested gene or re-run kompot_dask.de."
        )
    if layer is None:
        layer = fields.layer
        logger.info("Using layer %r inferred from run information", layer)
    layers = {"observed": layer, "imputed1": fields["imputed1"], "imputed2": fields["imputed2"],
              "fold_change": fields["fold_change"]}
    logger.info("Using imputed layer %r for %r", layers["imputed1"], c1)
    logger.info("Using imputed layer %r for %r", layers["imputed2"], c2)
    logger.info("Using fold_change layer %r from run_info", layers["fold_change"])
    for panel, name in layers.items():
        source.check_layer(name, what=f"layer ({panel})")
    key, xy = source.embedding(basis)
    panels = {panel: source.read_columns(name, [j])[:, 0] for panel, name in layers.items()}

    limits = {"observed": _limits(panels["observed"], vmin, vmax)}
    both = np.concatenate([panels["imputed1"], panels["imputed2"]])
    limits["imputed1"] = limits["imputed2"] = _limits(both, vmin, vmax)
    lo, hi = _limits(panels["fold_change"], vmin, vmax)
    ends = [abs(v) for v in (lo, hi) if v is not None]
    bound = max(ends) if ends else None
    limits["fold_change"] = (-bound, bound) if bound else (None, None)

    titles = {
        "observed": f"{gene}: observed ({layer})",
        "imputed1": f"{gene}: imputed {c1}",
        "imputed2": f"{gene}: imputed {c2}",
        "fold_change": f"{gene}: fold change {c2} − {c1}",
    }
    units = {"observed": f"expression ({'X' if layer is None else layer})", "imputed1": "imputed expression",
             "imputed2": "imputed expression", "fold_change": f"log fold change ({c2} − {c1})"}
    import matplotlib.pyplot as plt

    ncols = max(1, min(int(ncols), 4))
    nrows = -(-4 // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=figsize or (4.6 * ncols, 4.0 * nrows), squeeze=False)
    size = point_size if point_size is not None else default_point_size(source.n_obs)
    everyone = np.ones(source.n_obs, dtype=bool)
    for (panel, values), ax in zip(panels.items(), axes.ravel(), strict=False):
        is_fc = panel == "fold_change"
        coll = draw_cells(ax, xy, everyone, "numeric", values, cmap=fold_change_cmap if is_fc else cmap,
                          lo=limits[panel][0], hi=limits[panel][1], size=size, order="abs" if is_fc else "value",
                          cell_kwargs=kwargs)
        coll.set_gid(panel)
        ax.set_title(titles[panel], fontsize=10)
        style_axes(ax, key, frameon)
        fig.colorbar(coll, ax=ax, shrink=0.8, label=units[panel])
    for ax in axes.ravel()[4:]:
        ax.set_visible(False)
    fig.suptitle(title if title is not None else
                 f"{gene} — run {fields.run_id}, {c1} to {c2}: mean log fold change {lfc:+.3f}, "
                 f"Mahalanobis distance {score:.2f}{note}", fontsize=11)

    return finish(fig, {
        "gene": gene, "run_id": fields.run_id, "basis": key, "coords": xy, "panels": panels,
        "layers": layers, "limits": limits, "mean_lfc": lfc, "mahalanobis": score, "overwritten": overwritten,
    }, save, return_fig=return_fig, show=show, dpi=dpi)


def _alias(kompot_value: Any, kompot_name: str, value: Any, name: str, default: Any) -> Any:
    """kompot's name of an argument, or ours; both given and different is an error."""
    if kompot_value is None:
        return value
    if value != default and value != kompot_value:
        raise ValueError(f"{kompot_name}={kompot_value!r} and {name}={value!r} name the same setting; pass one.")
    return kompot_value


def _layer_fields(source: PlotData, run_id: int) -> Any:
    from ._common import run_fields

    try:
        return run_fields(source, run_id, ["mean_lfc", "mahalanobis", *_LAYER_ROLES])
    except KeyError as exc:
        if "wrote no field" not in str(exc):
            raise
        raise KeyError(
            f"run {run_id} wrote no imputed or fold-change layers (it ran with "
            "StorageSettings(store_layers=False)), so plot_gene_expression has nothing to "
            "show beyond the observed values. Re-run kompot_dask.de with store_layers=True, or "
            "draw the observed expression with kompot_dask.plot.embedding(data, basis, "
            "color=gene, layer=...)."
        ) from None


def _limits(values: np.ndarray, vmin: Any, vmax: Any) -> tuple[float | None, float | None]:
    return resolve_limit(vmin, values, "vmin"), resolve_limit(vmax, values, "vmax")

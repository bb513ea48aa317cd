"""Heatmap of mean observed expression per (group, condition), from Dask reductions over
the store: only the plotted genes' columns are read, a block of cells at a time."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from ._common import (
    PlotData,
    check_legend_loc,
    check_output_options,
    describe_run,
    finish,
    new_axes,
    output_options_doc,
    place_legend,
    resolve_limit,
    run_fields,
    run_note,
)

logger = logging.getLogger("kompot_dask")

_SCALES = ("var", "group", None)


@output_options_doc
def heatmap(
    data: Any,
    *,
    n_top_genes: int = 20,
    genes: Sequence[str] | None = None,
    groupby: str | None = None,
    exclude_groups: str | Sequence[Any] | None = None,
    standard_scale: str | None = "var",
    vmin: float | str | None = None,
    vmax: float | str | None = None,
    fold_change_mode: bool = False,
    run_id: int = -1,
    score_key: str | None = None,
    condition_column: str | None = None,
    condition1: Any = None,
    condition2: Any = None,
    layer: str | None = None,
    cmap: str | None = None,
    title: str | None = None,
    figsize: tuple[float, float] | None = None,
    ax: Any = None,
    save: str | os.PathLike | None = None,
    client: Any = None,
    vcenter: float | None = None,
    colorbar_title: str | None = None,
    legend_loc: str | None = "top",
    return_fig: bool = False,
    show: bool | None = None,
    dpi: float | None = None,
    var_names: Sequence[str] | None = None,
    cluster_rows: bool = False,
    cluster_cols: bool = False,
    sort_genes: bool | None = None,
    tile_size: float | None = None,
    tile_aspect_ratio: float = 1.0,
    show_gene_labels: bool = True,
    show_group_labels: bool = True,
    gene_labels_size: float | None = None,
    group_labels_size: float | None = None,
    colorbar_kwargs: dict[str, Any] | None = None,
    n_colorbar_ticks: int | None = None,
    draw_values: bool = False,
    return_data: bool = False,
    observed: bool = True,
    condition1_name: str | None = None,
    condition2_name: str | None = None,
    dendrogram: bool = False,
    dendrogram_color: str | None = None,
    layout_config: dict[str, float] | None = None,
    split_dot_mode: bool = False,
    max_cell_count: int | None = None,
) -> Any:
    """Mean observed expression of genes per group, one tile per (gene, group).

    Each tile is split along its diagonal: the lower-left triangle is the mean in
    condition1, the upper-right one the mean in condition2. With
    ``fold_change_mode=True`` each tile is one square holding the difference
    (condition2 − condition1), the log fold change for log-scale data.

    Parameters
    ----------
    data
        Store path (or ``file://`` URL), :class:`~kompot_dask.store.Store` or AnnData.
    n_top_genes
        Without ``genes``: the genes with the largest score (the run's Mahalanobis
        distance, or ``score_key``), in decreasing order.
    genes
        Genes to show, in this order (overrides ``n_top_genes``).
    groupby
        obs column of the groups (e.g. cell types); ``None``: all cells as one group.
    exclude_groups
        Group(s) to leave out.
    standard_scale
        ``"var"``: z-score each gene over all its tiles (every group, both conditions);
        ``"group"``: z-score each group over all its tiles (every gene, both
        conditions); ``None``: the means as they are. Ignored, with a warning, in
        fold-change mode.
    vmin, vmax
        Colour limits: numbers, or ``"pNN"`` for the NNth percentile (``np.percentile``)
        of the plotted tile values. By default the data range. Z-scores and fold changes
        are coloured on a scale symmetric around ``vcenter``: the limit further from it
        sets both ends, so that equal distances from it are equally saturated.
    fold_change_mode
        Show condition2 − condition1 as one square per tile.
    run_id
        Run whose conditions, layer and scores are used (``-1``: the latest).
    score_key, condition_column, condition1, condition2, layer
        Overrides of what the run says (var score column, obs condition column, the
        two conditions, expression layer; ``layer=None`` takes the run's layer).
    cmap
        Colormap; default ``"viridis"`` for means, ``"RdBu_r"`` for z-scores and fold
        changes.
    title
        Axes title.
    figsize
        Figure size when ``ax`` is not given (default from the number of tiles).
    ax
        Axes to draw into.
    save
        Path to save the figure to.
    client
        Dask client for the group means on a store; by default the current client, else
        the threaded scheduler.
    vcenter
        Centre of the colour scale of z-scores and fold changes (default 0).
    colorbar_title
        Label of the colour bar (default: what the tiles hold, and the layer).
    legend_loc
        Legend of the split tiles' triangles: ``"top"`` (above the tiles, under the
        title), ``"right margin"``, a matplotlib location, or ``"none"``/``None``.
    var_names
        kompot's name for ``genes``.
    cluster_rows, cluster_cols
        Order the genes / groups by hierarchical clustering (average linkage) of the
        plotted values (kompot clusters both by default; here the default keeps the
        genes by score and the groups in category order).
    sort_genes
        ``True``: the genes given in ``genes`` by decreasing score; default: as given.
    tile_size, tile_aspect_ratio
        Without ``figsize``: inches per tile (height) and width/height of a tile.
    show_gene_labels, show_group_labels, gene_labels_size, group_labels_size
        The axis labels of genes and groups, and their font sizes.
    colorbar_kwargs, n_colorbar_ticks
        Further ``Figure.colorbar`` arguments, and this many evenly spaced colour-bar ticks.
    draw_values
        Write each tile's value in it (both triangles' in split mode).
    return_data
        Return the plotted data (``fig.kompot_data``); with ``return_fig`` too,
        ``(fig, data)``.
    observed
        Accepted (kompot's pandas option): groups without cells are always left out.
    condition1_name, condition2_name
        Names of the conditions in the legend and the title (default: their values).
    dendrogram, dendrogram_color, layout_config, split_dot_mode, max_cell_count
        Not supported yet: a value other than kompot's default raises ``ValueError``.
    {output_options}

    Returns
    -------
    ``None``; with ``return_fig=True`` the matplotlib Figure, with ``fig.kompot_data``: ``genes``, ``groups`` (plotted
    order), ``condition1``, ``condition2``, ``means`` (``{condition: DataFrame genes ×
    groups}`` of mean observed expression, NaN where a group has no cells of that
    condition), ``n_cells`` (DataFrame groups × conditions), ``tiles`` (the plotted
    values: ``{condition: DataFrame}`` after scaling, or one DataFrame of differences in
    fold-change mode), ``vmin``, ``vmax`` (resolved), ``standard_scale`` (as applied),
    ``layer``, ``fold_change_mode``.
    """
    if standard_scale not in _SCALES:
        raise ValueError(f"standard_scale={standard_scale!r} is not supported; pass one of {list(_SCALES)}.")
    check_output_options(return_fig, show, dpi)
    check_legend_loc(legend_loc, extra=("top",))
    unsupported = {k: v for k, v in (("dendrogram", dendrogram), ("split_dot_mode", split_dot_mode),
                                     ("layout_config", layout_config), ("max_cell_count", max_cell_count),
                                     ("dendrogram_color", dendrogram_color)) if v not in (None, False)}
    if unsupported:
        raise ValueError(f"{unsupported} not supported yet by kompot_dask.plot.heatmap; drop "
                         f"{', '.join(unsupported)} (cluster_rows=/cluster_cols= order the tiles without a dendrogram).")
    if var_names is not None:
        if genes is not None and list(genes) != list(var_names):
            raise ValueError("genes= and var_names= name the same setting (kompot calls it var_names); pass one.")
        genes = var_names
    source = PlotData(data)
    needs_run = (
        (genes is None and score_key is None) or condition_column is None or condition1 is None
        or condition2 is None or layer is None
    )
    fields = None
    if needs_run:
        fields = run_fields(source, run_id, ["mahalanobis"] if genes is None and score_key is None else [])
        describe_run(fields, "heatmap")
    score_key = _inferred(score_key, fields and fields.get("mahalanobis"), "score_key") if genes is None else score_key
    condition_column = _inferred(condition_column, fields and fields.groupby, "condition_column")
    condition1 = _inferred(condition1, fields and fields.condition1, "condition1")
    condition2 = _inferred(condition2, fields and fields.condition2, "condition2")
    layer = _inferred(layer, fields and fields.layer, "layer")

    gene_names = _choose_genes(source, genes, n_top_genes, score_key)
    if sort_genes and genes is not None:
        key = score_key or (fields.get("mahalanobis") if fields is not None else None)
        if key is None:
            fields = fields or run_fields(source, run_id, ["mahalanobis"])
            key = fields["mahalanobis"]
        score = source.var_column(key, "score_key").astype(np.float64)[source.gene_indices(gene_names)]
        gene_names = [gene_names[k] for k in np.argsort(np.where(np.isfinite(score), -score, np.inf),
                                                         kind="stable")]
    cols = source.gene_indices(gene_names, what="genes")
    mode = "fold change" if fold_change_mode else "split"
    logger.info("Creating %s heatmap with %d genes/features", mode, len(gene_names))
    logger.info("Using expression data from layer: %r", layer)

    conditions = source.obs_column(condition_column, what="condition_column")
    cond_code = np.full(source.n_obs, -1, dtype=np.int64)
    for k, cond in enumerate((condition1, condition2)):
        hit = (conditions == cond).to_numpy()
        if not hit.any():
            raise ValueError(
                f"condition {cond!r} has no cells in obs column {condition_column!r} (values: "
                f"{list(pd.unique(conditions.astype(object)))[:10]}); pass condition1=/condition2=."
            )
        cond_code[hit] = k
    group_names, group_code = _groups(source, groupby, exclude_groups)
    codes = np.where((cond_code >= 0) & (group_code >= 0), group_code * 2 + cond_code, -1)

    sums, counts = source.group_sums(layer, cols, codes, 2 * len(group_names), client=client)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = sums / counts
    n_cells = np.bincount(codes[codes >= 0], minlength=2 * len(group_names)).reshape(-1, 2)
    present = n_cells.sum(axis=1) > 0
    if not present.any():
        raise ValueError(
            f"no cells of {condition1!r} or {condition2!r} are left in any group of "
            f"{groupby!r} after exclude_groups={exclude_groups!r}."
        )
    group_names = [g for g, p in zip(group_names, present, strict=True) if p]
    mean = mean.reshape(-1, 2, len(cols))[present]  # groups × condition × genes
    n_cells = n_cells[present]
    means = {
        cond: pd.DataFrame(mean[:, k, :].T, index=gene_names, columns=group_names)
        for k, cond in enumerate((condition1, condition2))
    }

    applied_scale = standard_scale
    if fold_change_mode:
        if standard_scale is not None:
            logger.warning(
                "standard_scale=%r is ignored in fold_change_mode: z-scoring would hide the "
                "size and sign of the fold changes. Pass standard_scale=None to silence this.",
                standard_scale,
            )
        applied_scale = None
        tiles: Any = means[condition2] - means[condition1]
        plotted = tiles.to_numpy()
    else:
        scaled = _scale(mean, standard_scale)
        tiles = {cond: pd.DataFrame(scaled[:, k, :].T, index=gene_names, columns=group_names)
                 for k, cond in enumerate((condition1, condition2))}
        plotted = np.stack([t.to_numpy() for t in tiles.values()])
    if cluster_rows or cluster_cols:
        features = plotted if plotted.ndim == 2 else np.concatenate(list(plotted), axis=1)  # genes × …
        rows = _cluster_order(features) if cluster_rows else np.arange(len(gene_names))
        by_group = plotted.T if plotted.ndim == 2 else np.concatenate(list(plotted), axis=0).T  # groups × …
        cols = _cluster_order(by_group) if cluster_cols else np.arange(len(group_names))
        gene_names = [gene_names[k] for k in rows]
        group_names = [group_names[k] for k in cols]
        n_cells = n_cells[cols]
        means = {c: m.loc[gene_names, group_names] for c, m in means.items()}
        tiles = (tiles.loc[gene_names, group_names] if fold_change_mode
                 else {c: t.loc[gene_names, group_names] for c, t in tiles.items()})
        plotted = (tiles.to_numpy() if fold_change_mode else np.stack([t.to_numpy() for t in tiles.values()]))
    name1 = str(condition1) if condition1_name is None else condition1_name
    name2 = str(condition2) if condition2_name is None else condition2_name
    centred = fold_change_mode or applied_scale is not None
    lo = resolve_limit(vmin, plotted, "vmin")
    hi = resolve_limit(vmax, plotted, "vmax")
    finite = plotted[np.isfinite(plotted)]
    centre = 0.0 if vcenter is None else float(vcenter)
    if finite.size and (lo is None or hi is None):
        bound = float(np.abs(finite - centre).max()) if centred else None
        lo = lo if lo is not None else (centre - bound if centred else float(finite.min()))
        hi = hi if hi is not None else (centre + bound if centred else float(finite.max()))
    if centred and lo is not None and hi is not None:
        # one distance from the centre is one colour on both sides
        half = max(abs(lo - centre), abs(hi - centre))
        lo, hi = centre - half, centre + half
    cmap = cmap or ("RdBu_r" if centred else "viridis")
    layer_name = "X" if layer is None else layer

    n_genes, n_groups = len(gene_names), len(group_names)
    own_figure = ax is None
    if figsize is None and tile_size is not None:
        figsize = (n_groups * tile_size * tile_aspect_ratio + 3.0, n_genes * tile_size + 2.2)
    fig, ax = new_axes(ax, figsize or (max(4.0, 0.5 * n_groups + 3.0), max(3.0, 0.32 * n_genes + 2.2)))
    if fold_change_mode:
        mappable = _draw_squares(ax, tiles.to_numpy(), cmap, _norm(lo, hi))
        label = f"mean {name2} − mean {name1} ({layer_name})"
    else:
        mappable = _draw_split(ax, tiles[condition1].to_numpy(), tiles[condition2].to_numpy(), cmap,
                               _norm(lo, hi))
        label = {"var": f"z-score of the mean per gene ({layer_name})",
                 "group": f"z-score of the mean per group ({layer_name})",
                 None: f"mean expression ({layer_name})"}[applied_scale]
        _split_legend(ax, name1, name2, legend_loc)
    if draw_values:
        _draw_values(ax, tiles, fold_change_mode, plotted, lo, hi)
    note, overwritten = run_note(fields, ("mahalanobis",) if genes is None and fields is not None else ())
    ax.set_xlim(0, n_groups)
    ax.set_ylim(n_genes, 0)
    if show_group_labels:
        ax.set_xticks(np.arange(n_groups) + 0.5, [str(g) for g in group_names], rotation=90,
                      fontsize=group_labels_size)
    else:
        ax.set_xticks([])
    if show_gene_labels:
        ax.set_yticks(np.arange(n_genes) + 0.5, gene_names, fontsize=gene_labels_size)
    else:
        ax.set_yticks([])
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    default_title = f"{name1} vs {name2}" + (f" by {groupby}" if groupby else "") + note
    has_top_legend = not fold_change_mode and legend_loc == "top"
    ax.set_title(title if title is not None else default_title, pad=30 if has_top_legend else 6)
    bar = fig.colorbar(mappable, ax=ax, **{"label": colorbar_title if colorbar_title is not None else label,
                                           "shrink": 0.8, **(colorbar_kwargs or {})})
    if n_colorbar_ticks is not None and lo is not None and hi is not None:
        bar.set_ticks(np.linspace(lo, hi, max(2, int(n_colorbar_ticks))))

    plotted_data = {
        "genes": gene_names, "groups": group_names, "condition1": condition1,
        "condition2": condition2, "means": means,
        "n_cells": pd.DataFrame(n_cells, index=group_names, columns=[condition1, condition2]),
        "tiles": tiles, "vmin": lo, "vmax": hi, "standard_scale": applied_scale,
        "layer": layer, "fold_change_mode": bool(fold_change_mode), "overwritten": overwritten,
    }
    returned = finish(fig, plotted_data, save, return_fig=return_fig or return_data, show=show, dpi=dpi,
                      own_figure=own_figure)
    if return_data:
        return (fig, plotted_data) if return_fig else plotted_data
    return returned


def _cluster_order(features: np.ndarray) -> np.ndarray:
    """Leaf order of an average-linkage clustering of the rows (NaN as 0)."""
    if len(features) < 3:
        return np.arange(len(features))
    from scipy.cluster.hierarchy import leaves_list, linkage

    return leaves_list(linkage(np.nan_to_num(features), method="average", metric="euclidean"))


def _draw_values(ax: Any, tiles: Any, fold_change_mode: bool, plotted: np.ndarray, lo: Any, hi: Any) -> None:
    """Each tile's value as text (split tiles: one per triangle, at its centroid), dark or
    light against the tile's colour."""
    middle = None if lo is None or hi is None else (lo + hi) / 2
    frames = [(tiles, 0.5, 0.5)] if fold_change_mode else [
        (list(tiles.values())[0], 1 / 3, 2 / 3), (list(tiles.values())[1], 2 / 3, 1 / 3)]
    size = 7 if fold_change_mode else 5.5
    for frame, fx, fy in frames:
        values = frame.to_numpy()
        for i in range(values.shape[0]):
            for j in range(values.shape[1]):
                v = values[i, j]
                if np.isfinite(v):
                    dark = middle is None or abs(v - middle) < 0.3 * (hi - lo)
                    ax.text(j + fx, i + fy, f"{v:.2g}", ha="center", va="center", fontsize=size,
                            color="black" if dark else "white")


def _inferred(value: Any, from_run: Any, name: str) -> Any:
    if value is not None:
        return value
    if from_run is None:
        raise ValueError(f"{name} is not given and the run does not record it; pass {name}=.")
    logger.info("Inferred %s=%r from run information", name, from_run)
    return from_run


def _choose_genes(source: PlotData, genes: Sequence[str] | None, n_top: int,
                  score_key: str | None) -> list[str]:
    if genes is not None:
        genes = [genes] if isinstance(genes, str) else [str(g) for g in genes]
        if not genes:
            raise ValueError("genes=[] selects nothing; pass gene names or genes=None with n_top_genes=")
        repeated = sorted({g for g in genes if genes.count(g) > 1})
        if repeated:
            raise ValueError(f"genes lists {repeated} more than once; pass each gene once.")
        source.gene_indices(genes, what="genes")
        return genes
    if isinstance(n_top, bool) or not isinstance(n_top, int | np.integer) or n_top < 1:
        raise ValueError(f"n_top_genes={n_top!r} must be a positive integer")
    score = source.var_column(score_key, "score_key").astype(np.float64)
    order = np.argsort(np.where(np.isfinite(score), -score, np.inf), kind="stable")
    order = [j for j in order[:n_top] if np.isfinite(score[j])]
    return source.var_names[order].astype(str).tolist()


def _groups(source: PlotData, groupby: str | None, exclude: Any) -> tuple[list[Any], np.ndarray]:
    """Group labels (in category order) and each cell's group code (-1: excluded)."""
    if groupby is None:
        if exclude is not None:
            raise ValueError("exclude_groups needs groupby=; pass the obs column of the groups.")
        return ["all cells"], np.zeros(source.n_obs, dtype=np.int64)
    column = source.obs_column(groupby, what="groupby")
    cat = column.astype("category") if not isinstance(column.dtype, pd.CategoricalDtype) else column
    names = list(cat.cat.categories)
    codes = cat.cat.codes.to_numpy().astype(np.int64)
    if exclude is not None:
        excluded = [exclude] if isinstance(exclude, str) or not isinstance(exclude, Sequence) else list(exclude)
        unknown = [g for g in excluded if g not in names]
        if unknown:
            raise ValueError(
                f"exclude_groups: {unknown} are not groups of {groupby!r}; its groups are {names[:20]}."
            )
        drop = np.isin(codes, [names.index(g) for g in excluded])
        logger.info("Excluded %s cells from groups: %s", f"{int(drop.sum()):,}",
                    ", ".join(map(str, excluded)))
        codes[drop] = -1
    return names, codes


def _scale(mean: np.ndarray, how: str | None) -> np.ndarray:
    """z-scores of (groups × 2 × genes) means per gene (``"var"``) or per group (``"group"``)."""
    if how is None:
        return mean.copy()
    axes = (0, 1) if how == "var" else (1, 2)
    logger.info("Applying %s z-scoring (standard_scale=%r)", "gene-wise" if how == "var" else "group-wise", how)
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices stay NaN
        centre = np.nanmean(mean, axis=axes, keepdims=True)
        spread = np.nanstd(mean, axis=axes, keepdims=True)
    # a constant gene (or group) has every value at its mean: z = 0, not 0/0
    return (mean - centre) / np.where(spread > 0, spread, 1.0)


def _norm(lo: float | None, hi: float | None) -> Any:
    """Linear colour scale (centred data come with limits symmetric around their centre,
    so the centre is the colormap's middle and one distance from it one colour)."""
    from matplotlib.colors import Normalize

    return Normalize(vmin=lo, vmax=hi)


def _cmap(name: str) -> Any:
    import matplotlib

    return matplotlib.colormaps[name].with_extremes(bad="#EEEEEE")


def _draw_split(ax: Any, first: np.ndarray, second: np.ndarray, cmap: str, norm: Any) -> Any:
    """Two triangles per tile: lower-left ``first`` (condition1), upper-right ``second``.

    ``first``/``second`` are genes × groups; row i is drawn from y=i (top) to y=i+1.
    """
    from matplotlib.collections import PolyCollection

    n_genes, n_groups = first.shape
    i, j = np.meshgrid(np.arange(n_genes), np.arange(n_groups), indexing="ij")
    i, j = i.ravel(), j.ravel()
    # y grows downwards (inverted axis): the lower-left corner is (j, i + 1)
    lower = np.stack([np.c_[j, i], np.c_[j, i + 1], np.c_[j + 1, i + 1]], axis=1)
    upper = np.stack([np.c_[j, i], np.c_[j + 1, i], np.c_[j + 1, i + 1]], axis=1)
    out = None
    for verts, values, gid in ((lower, first, "condition1"), (upper, second, "condition2")):
        coll = PolyCollection(verts.astype(float), array=np.ma.masked_invalid(values.ravel()),
                              cmap=_cmap(cmap), norm=norm, edgecolors="white",
                              linewidths=0.3)
        coll.set_gid(gid)
        ax.add_collection(coll)
        out = coll
    return out


def _draw_squares(ax: Any, values: np.ndarray, cmap: str, norm: Any) -> Any:
    mesh = ax.pcolormesh(np.arange(values.shape[1] + 1), np.arange(values.shape[0] + 1),
                         np.ma.masked_invalid(values), cmap=_cmap(cmap), norm=norm,
                         edgecolors="white", linewidth=0.3)
    mesh.set_gid("fold_change")
    return mesh


def _split_legend(ax: Any, condition1: Any, condition2: Any, loc: str | None = "top") -> Any:
    """Which triangle is which condition: ``"top"`` puts the legend in one row above the
    tiles (between them and the title), inside the figure."""
    from matplotlib.lines import Line2D

    style = dict(linestyle="none", markersize=14, markerfacecolor="#9E9E9E", markeredgecolor="#616161")
    handles = [
        Line2D([], [], marker=[(-1, -1), (1, -1), (-1, 1)], label=f"{condition1} (lower left)", **style),
        Line2D([], [], marker=[(1, -1), (1, 1), (-1, 1)], label=f"{condition2} (upper right)", **style),
    ]
    if loc == "top":
        return ax.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False,
                         fontsize=9, ncols=2, handletextpad=0.3, borderaxespad=0.2, columnspacing=1.2)
    return place_legend(ax, loc, fontsize=9, handles=handles)

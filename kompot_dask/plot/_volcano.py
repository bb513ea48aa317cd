"""Volcano plot of a DE run: mean log fold change against Mahalanobis distance (or local FDR)."""

from __future__ import annotations

import logging
import os
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

_Y_AXIS = {"mahalanobis": "Mahalanobis distance", "local_fdr": "-log10(local FDR)"}
_THRESHOLD_KEYS = ("local_fdr", "mahalanobis")
_HIGHLIGHT_COLORS = ("#E76F51", "#2A9D8F", "#8338EC", "#F4A261", "#3A86FF", "#FF006E")


@output_options_doc
def volcano_de(
    data: Any,
    *,
    run_id: int = -1,
    y_axis_type: str = "mahalanobis",
    significance_threshold: float | dict[str, float] | None = None,
    gene_labels: int | list[str] | dict[str, str] | None = 10,
    highlight_genes: int | list[str] | list[dict[str, Any]] | None = None,
    title: str | None = None,
    lfc_key: str | None = None,
    score_key: str | None = None,
    color_up: str = "#D62828",
    color_down: str = "#1D6FB8",
    color_background: str = "#C8C8C8",
    point_size: float = 8.0,
    figsize: tuple[float, float] = (8.0, 6.5),
    ax: Any = None,
    save: str | os.PathLike | None = None,
    condition1: str | None = None,
    condition2: str | None = None,
    xlabel: str | None = None,
    ylabel: str | None = None,
    font_size: float = 8.0,
    legend_loc: str = "best",
    legend_fontsize: float = 8.0,
    show_legend: bool = True,
    return_fig: bool = False,
    show: bool | None = None,
    dpi: float | None = None,
    color: str | None = None,
    background_cmap: str = "Spectral_r",
    color_discrete_map: dict[Any, str] | None = None,
    vmin: float | str | None = None,
    vmax: float | str | None = None,
    vcenter: float | None = None,
    alpha_background: float = 0.6,
    n_x_ticks: int | None = None,
    n_y_ticks: int | None = None,
    text_offset: tuple[float, float] = (3.0, 3.0),
    text_kwargs: dict[str, Any] | None = None,
    grid: bool = False,
    grid_kwargs: dict[str, Any] | None = None,
    legend_title_fontsize: float | None = None,
    legend_ncol: int | None = None,
    sort_key: str | None = None,
    show_thresholds: bool = True,
    group: str | None = None,
    update_de_classification: bool = False,
    direction_column: str | None = None,
    n_top_genes: int | None = None,
    **kwargs: Any,
) -> Any:
    """Volcano plot of a DE run: each gene at (mean log fold change, score).

    Parameters
    ----------
    data
        Store path (or ``file://`` URL), :class:`~kompot_dask.store.Store` or AnnData
        holding a DE run.
    run_id
        Run to plot (``-1``: the latest). Its field names come from the run history.
    y_axis_type
        ``"mahalanobis"`` (distance) or ``"local_fdr"`` (shown as ``-log10``).
    significance_threshold
        Which genes are coloured as up/down. ``None``: the run's ``is_de`` column. A
        number: a threshold on the y-axis quantity (``local_fdr < t`` or
        ``mahalanobis > t``), drawn as a line. A dict ``{"local_fdr": a,
        "mahalanobis": b}``: genes meeting every given threshold (a line is drawn only
        when the one threshold given is the y-axis quantity).
    gene_labels
        Genes to name: an int (the top N by score), a list of genes, or a dict
        ``{gene: label}``; ``None`` or ``0`` names none.
    highlight_genes
        Gene sets drawn in their own colour with a legend entry: an int (the top N by
        score), a list of genes (one set), or a list of ``{"name", "genes", "color"}``
        dicts; drawn larger, with a black edge, over the up/down colouring.
    title
        Axes title; by default ``"<condition1> to <condition2>"``.
    lfc_key, score_key
        var columns to use instead of the run's (``score_key`` is the y-axis column).
    color_up, color_down, color_background
        Colours of genes higher in condition2, lower in condition2, and the rest.
    point_size
        Marker area.
    figsize
        Figure size when ``ax`` is not given.
    ax
        Axes to draw into (a new figure otherwise).
    save
        Path to save the figure to (format from the extension).
    condition1, condition2
        Names of the conditions in the legend, axis label and title (default: the run's).
    xlabel, ylabel
        Axis labels (default: the fold-change direction and the y-axis quantity).
    font_size
        Font size of the gene labels.
    legend_loc
        Where the legend goes: a matplotlib location (``"best"``, ``"upper left"``, …),
        ``"right margin"`` (outside the axes) or ``"none"``.
    legend_fontsize
        Font size of the legend.
    show_legend
        Draw the legend (``False`` is ``legend_loc="none"``).
    color
        A var column to colour the not-significant genes by (numeric: ``background_cmap``
        with a colour bar, limits ``vmin``/``vmax`` (numbers or ``"pNN"``) around
        ``vcenter``; categorical: ``color_discrete_map`` or a tab10/tab20 palette).
    alpha_background
        Opacity of the not-significant genes.
    n_x_ticks, n_y_ticks
        At most this many ticks on an axis (default: matplotlib's choice).
    text_offset, text_kwargs
        Offset of the gene labels from their points (in points) and further
        ``Axes.annotate`` arguments (``color``, ``fontweight``, …).
    grid, grid_kwargs
        Draw grid lines, with ``Axes.grid`` arguments.
    legend_title_fontsize, legend_ncol
        Legend title size and columns.
    sort_key
        var column that ranks genes for ``gene_labels=N`` and ``highlight_genes=N``
        (largest first; default: the y-axis values).
    show_thresholds
        Draw the threshold line of a numeric ``significance_threshold``.
    n_top_genes
        Colour the top N genes by score (``sort_key``) as up/down instead of the run's
        ``is_de`` (not together with ``significance_threshold``).
    group
        One subset of a run with ``FilterSettings(groups=...)``: its mean log fold change,
        distance, local FDR and ``is_de`` from the run's varm tables (genes it did not test
        are left out), as kompot's ``group=``.
    update_de_classification, direction_column
        kompot's in-plot re-classification (refused: a plot never writes to the data).
    **kwargs
        Further ``Axes.scatter`` arguments for the not-significant genes.
    {output_options}

    Returns
    -------
    ``None``; with ``return_fig=True`` the matplotlib Figure, with ``fig.kompot_data``: ``genes`` (var names), ``x``, ``y``
    (plotted values per gene), ``significant`` (bool per gene), ``highlighted`` (names of
    the genes coloured up/down, in var order), ``up``, ``down``, ``highlight_groups``
    (``{name: genes}``), ``labels`` (``{gene: label}``), ``threshold_line`` (y of the
    line or ``None``), ``lfc_key``, ``score_key``, ``run_id``.
    """
    if y_axis_type not in _Y_AXIS:
        raise ValueError(f"y_axis_type={y_axis_type!r} is not supported; pass one of {list(_Y_AXIS)}.")
    check_output_options(return_fig, show, dpi)
    check_legend_loc(legend_loc)
    _refuse_kompot_only(update_de_classification, direction_column)
    source = PlotData(data)
    fields = None
    if group is not None:  # the subset's columns of the run's varm tables stand in for var's
        source, fields = _group_view(source, run_id, group)
        describe_run(fields)
    explicit = lfc_key is not None and score_key is not None
    if fields is None and (not explicit or significance_threshold is None or isinstance(significance_threshold, dict)):
        roles = ["mean_lfc", "mahalanobis"]
        fields = run_fields(source, run_id, roles)
        describe_run(fields)
    if fields is not None and y_axis_type == "local_fdr" and score_key is None:
        score_key = fields["local_fdr"]
        logger.info("Using local_fdr values for y-axis: %s", score_key)
    lfc_key = lfc_key or fields["mean_lfc"]
    score_key = score_key or fields["mahalanobis"]
    logger.info("Using data columns from var - lfc: %r, score: %r", lfc_key, score_key)

    genes = source.var_names.astype(str).to_numpy()
    x = source.var_column(lfc_key, "lfc_key").astype(np.float64)
    score = source.var_column(score_key, "score_key").astype(np.float64)
    if y_axis_type == "local_fdr":
        y = -np.log10(np.clip(score, 1e-300, None))
        logger.info("Applied local_fdr transformation to y-axis data")
    else:
        y = score
    finite = np.isfinite(x) & np.isfinite(y)

    rank = y if sort_key is None else source.var_column(sort_key, "sort_key").astype(np.float64)
    rank_ok = finite & np.isfinite(rank)
    if n_top_genes is not None:
        if significance_threshold is not None:
            raise ValueError("n_top_genes= and significance_threshold= both choose the coloured genes; pass one.")
        if isinstance(n_top_genes, bool) or not isinstance(n_top_genes, int | np.integer) or n_top_genes < 0:
            raise ValueError(f"n_top_genes={n_top_genes!r} must be a non-negative integer")
        significant = np.zeros(len(y), dtype=bool)
        significant[_top_by_score(rank, rank_ok, int(n_top_genes))] = True
        threshold_line, sig_text = None, f"in the top {int(n_top_genes)} by score"
    else:
        significant, threshold_line, sig_text = _significance(
            source, fields, significance_threshold, y_axis_type, score_key
        )
    significant &= finite
    up = significant & (x > 0)
    down = significant & (x < 0)
    groups = _highlight_groups(source, highlight_genes, rank, rank_ok)

    own_figure = ax is None
    fig, ax = new_axes(ax, figsize)
    c1 = condition1 if condition1 is not None else fields.condition1 if fields is not None else "condition 1"
    c2 = condition2 if condition2 is not None else fields.condition2 if fields is not None else "condition 2"
    note, overwritten = run_note(fields, ("mean_lfc", "mahalanobis", "local_fdr", "is_de"))
    rest = finite & ~significant
    background = _background_colors(source, rest, color, color_background, background_cmap, color_discrete_map,
                                    vmin, vmax, vcenter)
    scatter_kw = {"linewidths": 0, "rasterized": True, **kwargs}
    coll = ax.scatter(x[rest], y[rest], s=point_size, c=background["c"], cmap=background.get("cmap"),
                      norm=background.get("norm"), alpha=alpha_background, label="_not significant", **scatter_kw)
    if background.get("norm") is not None:
        fig.colorbar(coll, ax=ax, shrink=0.8, label=color)
    for category, cat_color in background.get("legend", {}).items():
        ax.scatter([], [], s=point_size * 2, c=cat_color, label=str(category))
    ax.scatter(x[up], y[up], s=point_size * 1.5, c=color_up, linewidths=0,
               label=f"Up in {c2} ({int(up.sum())})", zorder=3)
    ax.scatter(x[down], y[down], s=point_size * 1.5, c=color_down, linewidths=0,
               label=f"Down in {c2} ({int(down.sum())})", zorder=3)
    logger.info("Highlighting %d genes %s (%d up, %d down)", int(significant.sum()), sig_text,
                int(up.sum()), int(down.sum()))
    for name, idx, color in groups:
        ax.scatter(x[idx], y[idx], s=point_size * 4, c=color, edgecolors="black", linewidths=0.6,
                   label=f"{name} ({len(idx)})", zorder=4)
        logger.info("Added highlight group %r with %d genes", name, len(idx))

    if threshold_line is not None and show_thresholds:
        ax.axhline(threshold_line, color="black", linestyle="--", linewidth=0.8, alpha=0.7)
    ax.axvline(0.0, color="black", linewidth=0.5, alpha=0.4)

    labels = _labels(source, gene_labels, rank, rank_ok)
    label_idx = source.gene_indices(list(labels), what="gene_labels") if labels else np.zeros(0, int)
    _place_labels(ax, x[label_idx], y[label_idx], list(labels.values()), fontsize=font_size,
                  offset=text_offset, text_kwargs=text_kwargs)
    if n_x_ticks is not None or n_y_ticks is not None:
        from matplotlib.ticker import MaxNLocator

        if n_x_ticks is not None:
            ax.xaxis.set_major_locator(MaxNLocator(nbins=max(1, int(n_x_ticks) - 1)))
        if n_y_ticks is not None:
            ax.yaxis.set_major_locator(MaxNLocator(nbins=max(1, int(n_y_ticks) - 1)))
    if grid:
        ax.grid(True, **{"alpha": 0.3, "linewidth": 0.5, **(grid_kwargs or {})})

    ax.set_xlabel(xlabel if xlabel is not None else f"Mean log fold change ({c2} vs {c1})")
    ax.set_ylabel(ylabel if ylabel is not None else _Y_AXIS[y_axis_type])
    ax.set_title(title if title is not None else f"{c1} to {c2}" + (f" in {group}" if group is not None else "")
                 + note)
    if show_legend and ax.get_legend_handles_labels()[0]:
        legend_kw: dict[str, Any] = {"title_fontsize": legend_title_fontsize}
        mode = fields.record.fdr_mode if fields is not None and sig_text == "marked as DE" else None
        if mode is not None:  # which null calibration the coloured is_de calls come from
            legend_kw["title"] = "is_de: " + ("kompot's raw FDR" if mode == "raw" else
                                              f"{mode.replace('_', '-')} FDR")
        if legend_ncol is not None:
            legend_kw["ncols"] = int(legend_ncol)
        place_legend(ax, legend_loc, fontsize=legend_fontsize, **legend_kw)

    return finish(fig, {
        "genes": genes, "x": x, "y": y, "significant": significant,
        "highlighted": genes[significant].tolist(), "up": genes[up].tolist(),
        "down": genes[down].tolist(),
        "highlight_groups": {name: genes[idx].tolist() for name, idx, _ in groups},
        "labels": labels, "threshold_line": threshold_line, "lfc_key": lfc_key,
        "score_key": score_key, "run_id": fields.run_id if fields is not None else None,
        "overwritten": overwritten, "fdr_mode": fields.record.fdr_mode if fields is not None else None,
        "group": group,
    }, save, return_fig=return_fig, show=show, dpi=dpi, own_figure=own_figure)


_GROUP_ROLES = {"mean_lfc": "group_mean_lfc", "mahalanobis": "group_mahalanobis",
                "local_fdr": "group_local_fdr", "is_de": "group_is_de"}


class _GroupView(PlotData):
    """A dataset whose var is one subset's columns of a run's per-group tables (varm),
    named ``<table>[<subset>]``."""

    def __init__(self, base: PlotData, frame: pd.DataFrame):
        self.store, self.adata = base.store, base.adata
        self._frame = frame

    @property
    def var(self) -> pd.DataFrame:
        return self._frame


def _group_view(source: PlotData, run_id: int, group: Any) -> tuple[PlotData, Any]:
    """kompot's ``group=``: the run's varm tables (``FilterSettings(groups=...)``), one
    subset's column of each, as the var columns the volcano reads."""
    import dataclasses

    from .._runs.history import get_run_fields

    fields = get_run_fields(source.source, run_id, roles=())
    if "group_mean_lfc" not in fields.names:
        raise ValueError(f"group={group!r}: run {fields.run_id} has no per-group results; run kompot_dask.de with "
                         "FilterSettings(groups=...) first, or pass group=None.")
    # again, for the tables' own checks (a later run that overwrote them, one that is gone)
    fields = get_run_fields(source.source, fields.run_id,
                            roles=[r for r in _GROUP_ROLES.values() if r in fields.names])
    names, writers, columns = {}, {}, {}
    for role, group_role in _GROUP_ROLES.items():
        key = fields.get(group_role)
        if key is None:
            continue
        table = source.varm_frame(key)
        if table is None:
            raise KeyError(f"group={group!r}: varm[{key!r}] of run {fields.run_id} is no longer in {source.label}; "
                           "re-run kompot_dask.de with FilterSettings(groups=...).")
        if str(group) not in table.columns.astype(str):
            raise KeyError(f"group={group!r} is not a subset of run {fields.run_id}; its subsets: "
                           f"{list(table.columns.astype(str))}. Pass one of these.")
        column = table.iloc[:, list(table.columns.astype(str)).index(str(group))]
        name = f"{key}[{group}]"
        columns[name] = column.to_numpy()
        names[role] = name
        writers[role] = fields.writers.get(group_role)
    logger.info("Using the per-group results of subset %r (varm: %s)", group,
                ", ".join(fields[_GROUP_ROLES[r]] for r in names))
    frame = pd.DataFrame(columns, index=source.var_names)
    view_fields = dataclasses.replace(fields, names=names, locations={r: "var" for r in names},
                                      writers={r: w for r, w in writers.items() if w is not None})
    return _GroupView(source, frame), view_fields


def _refuse_kompot_only(update_de_classification: Any, direction_column: Any) -> None:
    if update_de_classification or direction_column is not None:
        raise ValueError("update_de_classification=True: a kompot_dask plot never writes to the data. Colour "
                         "genes by a threshold with significance_threshold=, or re-run kompot_dask.de with "
                         "FDRSettings(threshold=...) to store a new is_de column.")


def _background_colors(source: PlotData, rest: np.ndarray, color: str | None, default: str, cmap: str,
                       discrete: dict[Any, str] | None, vmin: Any, vmax: Any, vcenter: float | None) -> dict:
    """Colours of the not-significant genes: one colour, or by a var column."""
    if color is None:
        return {"c": default}
    values = source.var[color] if color in source.var.columns else None
    if values is None:
        source.var_column(color, "color")  # raises, naming the columns
    shown = values.to_numpy()[rest]
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        import matplotlib

        finite = shown[np.isfinite(shown.astype(np.float64))].astype(np.float64)
        lo = resolve_limit(vmin, finite, "vmin")
        hi = resolve_limit(vmax, finite, "vmax")
        if finite.size:
            lo = float(finite.min()) if lo is None else lo
            hi = float(finite.max()) if hi is None else hi
        if vcenter is not None and lo is not None and hi is not None:
            half = max(abs(lo - vcenter), abs(hi - vcenter))
            lo, hi = vcenter - half, vcenter + half
        return {"c": shown.astype(np.float64), "cmap": matplotlib.colormaps[cmap],
                "norm": matplotlib.colors.Normalize(vmin=lo, vmax=hi)}
    categories = list(pd.unique(pd.Series(shown, dtype=object).dropna()))
    if discrete is None:
        import matplotlib

        base = matplotlib.colormaps["tab10" if len(categories) <= 10 else "tab20"].colors
        discrete = {c: matplotlib.colors.to_hex(base[i % len(base)]) for i, c in enumerate(categories)}
    missing = [c for c in categories if c not in discrete]
    if missing:
        raise KeyError(f"color_discrete_map has no colour for {missing[:10]} of var column {color!r}; add them.")
    return {"c": [discrete[v] if v in discrete else default for v in shown],
            "legend": {c: discrete[c] for c in categories}}


def _significance(source: PlotData, fields: Any, threshold: Any, y_axis_type: str,
                  score_key: str) -> tuple[np.ndarray, float | None, str]:
    """(significant mask, y of the threshold line or None, description for the log)."""
    n = len(source.var_names)
    if threshold is None:
        key = fields.get("is_de")
        if key is None or key not in source.var.columns:
            logger.info("The run has no is_de column (FDR was off); no genes are coloured as DE. "
                        "Pass significance_threshold= to colour genes by a threshold.")
            return np.zeros(n, dtype=bool), None, "marked as DE"
        is_de = source.var[key].fillna(False).astype(bool).to_numpy()
        return is_de, None, "marked as DE"

    if isinstance(threshold, dict):
        unknown = [k for k in threshold if k not in _THRESHOLD_KEYS]
        if unknown or not threshold:
            raise ValueError(
                f"significance_threshold keys {unknown or '{}'} are not supported; use "
                f"{list(_THRESHOLD_KEYS)}, e.g. {{'local_fdr': 0.05, 'mahalanobis': 10}}."
            )
        items = dict(threshold)
    elif isinstance(threshold, int | float) and not isinstance(threshold, bool):
        items = {y_axis_type: float(threshold)}
    else:
        raise TypeError(
            f"significance_threshold={threshold!r} must be None, a number or a dict "
            "{'local_fdr': ..., 'mahalanobis': ...}."
        )
    mask = np.ones(n, dtype=bool)
    texts = []
    for kind, t in items.items():
        # with explicit keys and no run (fields is None), the threshold is on score_key
        column = score_key if fields is None else fields[kind]
        values = source.var_column(column, f"{kind} column").astype(np.float64)
        op = "<" if kind == "local_fdr" else ">"
        hit = values < t if kind == "local_fdr" else values > t
        logger.info("Significance threshold selection: using column %r with threshold %s %s",
                    column, op, t)
        finite = values[np.isfinite(values)]
        if finite.size:
            logger.info("Values range: %.6f - %.6f", finite.min(), finite.max())
        logger.info("Found %d genes with %s %s %s", int(hit.sum()), kind, op, t)
        mask &= hit
        texts.append(f"{kind} {op} {t}")
    line = None
    if len(items) == 1 and y_axis_type in items:
        t = items[y_axis_type]
        line = float(-np.log10(t)) if y_axis_type == "local_fdr" else float(t)
        logger.info("Added %s threshold line at y=%.2f (%s=%s)", y_axis_type, line, y_axis_type, t)
    else:
        logger.info("Skipping threshold line drawing: the threshold is not on the y-axis "
                    "quantity alone")
    return mask, line, "at " + " and ".join(texts)


def _top_by_score(y: np.ndarray, finite: np.ndarray, n: int) -> np.ndarray:
    idx = np.flatnonzero(finite)
    return idx[np.argsort(-y[idx], kind="stable")[:n]]


def _highlight_groups(source: PlotData, highlight: Any, y: np.ndarray,
                      finite: np.ndarray) -> list[tuple[str, np.ndarray, str]]:
    if highlight is None:
        return []
    if isinstance(highlight, int) and not isinstance(highlight, bool):
        if highlight < 0:
            raise ValueError(f"highlight_genes={highlight} must be >= 0")
        if highlight == 0:
            return []
        return [(f"Top {highlight}", _top_by_score(y, finite, highlight), _HIGHLIGHT_COLORS[0])]
    if isinstance(highlight, str):
        highlight = [highlight]
    if not isinstance(highlight, list | tuple):
        raise TypeError(
            f"highlight_genes must be an int, a list of genes or a list of "
            f"{{'name', 'genes', 'color'}} dicts; got {type(highlight).__name__}."
        )
    if all(isinstance(h, dict) for h in highlight) and highlight:
        out = []
        for i, group in enumerate(highlight):
            if "genes" not in group:
                raise KeyError(f"highlight_genes[{i}] has no 'genes' key; each dict needs "
                               "'genes' (and optionally 'name' and 'color').")
            name = str(group.get("name", f"Group {i + 1}"))
            color = group.get("color", _HIGHLIGHT_COLORS[i % len(_HIGHLIGHT_COLORS)])
            out.append((name, _present_genes(source, group["genes"], f"highlight_genes[{name!r}]"),
                        color))
        return out
    if any(isinstance(h, dict) for h in highlight):
        raise TypeError("highlight_genes mixes gene names and dicts; pass one or the other.")
    return [("Highlighted genes", _present_genes(source, highlight, "highlight_genes"),
             _HIGHLIGHT_COLORS[0])]


def _present_genes(source: PlotData, genes: Any, what: str) -> np.ndarray:
    """Indices of the genes of a set that are in the data; a set with none raises."""
    genes = [genes] if isinstance(genes, str) else list(genes)
    pos = source.var_names.get_indexer(genes)
    missing = [g for g, p in zip(genes, pos, strict=True) if p < 0]
    if missing and len(missing) == len(genes):
        source.gene_indices(genes, what=what)  # raises, naming them
    if missing:
        logger.warning("%s: %d gene(s) not in var_names are skipped: %s", what, len(missing),
                       missing[:10])
    return pos[pos >= 0].astype(np.int64)


def _labels(source: PlotData, gene_labels: Any, y: np.ndarray, finite: np.ndarray) -> dict[str, str]:
    names = source.var_names.astype(str)
    if gene_labels is None or (isinstance(gene_labels, int) and not isinstance(gene_labels, bool)
                               and gene_labels == 0):
        return {}
    if isinstance(gene_labels, int) and not isinstance(gene_labels, bool):
        if gene_labels < 0:
            raise ValueError(f"gene_labels={gene_labels} must be >= 0")
        logger.info("Labeling top %d genes by score", gene_labels)
        return {names[j]: names[j] for j in _top_by_score(y, finite, gene_labels)}
    if isinstance(gene_labels, str):
        gene_labels = [gene_labels]
    if isinstance(gene_labels, list | tuple):
        gene_labels = {g: g for g in gene_labels}
    if isinstance(gene_labels, dict):
        # as kompot: genes missing from the data are named in a warning and not labelled
        pos = source.var_names.get_indexer(list(gene_labels))
        missing = [str(g) for g, p in zip(gene_labels, pos, strict=True) if p < 0]
        if missing:
            logger.warning("gene_labels: %d gene(s) not in var_names are not labelled: %s", len(missing),
                           missing[:10])
        labels = {str(k): str(v) for (k, v), p in zip(gene_labels.items(), pos, strict=True) if p >= 0}
        logger.info("Labeling %d specific genes", len(labels))
        return labels
    raise TypeError(f"gene_labels must be an int, a list of genes or a dict; got "
                    f"{type(gene_labels).__name__}.")


def _place_labels(ax: Any, xs: np.ndarray, ys: np.ndarray, texts: list[str], fontsize: float = 8.0,
                  offset: tuple[float, float] = (3.0, 3.0), text_kwargs: dict[str, Any] | None = None) -> None:
    """Annotate points, moving a label up (with a leader line) until its box, estimated
    from the text length, overlaps no label placed before it."""
    ax.autoscale_view()
    to_points = 72.0 / ax.figure.dpi
    placed: list[tuple[float, float, float, float]] = []  # boxes in points
    height = 1.25 * fontsize
    for k in np.argsort(-ys, kind="stable"):  # top first: labels stack upwards less often
        if not (np.isfinite(xs[k]) and np.isfinite(ys[k])):
            continue
        px, py = ax.transData.transform((xs[k], ys[k])) * to_points
        width = 0.62 * fontsize * len(texts[k])
        dx, dy0 = float(offset[0]), float(offset[1])
        dy = dy0
        while any(px + dx < bx1 and bx0 < px + dx + width and py + dy < by1 and by0 < py + dy + height
                  for bx0, by0, bx1, by1 in placed):
            dy += height * 0.6
        placed.append((px + dx, py + dy, px + dx + width, py + dy + height))
        arrow = {"arrowstyle": "-", "color": "0.4", "linewidth": 0.5} if dy > dy0 else None
        ax.annotate(texts[k], (xs[k], ys[k]), xytext=(dx, dy), textcoords="offset points",
                    **{"fontsize": fontsize, "arrowprops": arrow, "zorder": 5, **(text_kwargs or {})})

"""Cells on a 2-D embedding coloured by an obs column or a gene, one panel per selection."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from ._common import (
    PlotData,
    Selection,
    check_legend_loc,
    check_output_options,
    default_point_size,
    finish,
    output_options_doc,
    place_legend,
    resolve_limit,
    select_cells,
)

logger = logging.getLogger("kompot_dask")

_SINGLE_COLOR = "#3B6FB6"


@output_options_doc
def embedding(
    data: Any,
    basis: str,
    *,
    color: str | None = None,
    layer: str | None = None,
    mgroups: Sequence[dict[str, Any]] | None = None,
    vmin: float | str | None = None,
    vmax: float | str | None = None,
    cmap: str = "viridis",
    palette: Sequence[str] | dict[Any, str] | None = None,
    point_size: float | None = None,
    background_color: str = "#D9D9D9",
    frameon: bool = True,
    ncols: int = 4,
    title: str | None = None,
    figsize: tuple[float, float] | None = None,
    save: str | os.PathLike | None = None,
    ax: Any = None,
    legend_loc: str | None = "right margin",
    legend_fontsize: float = 8.0,
    colorbar_title: str | None = None,
    return_fig: bool = False,
    show: bool | None = None,
    dpi: float | None = None,
    groups: Sequence[Any] | None = None,
    matplotlib_scatter_kwargs: dict[str, Any] | None = None,
) -> Any:
    """Cells on an embedding, coloured by an obs column or a gene's expression.

    Parameters
    ----------
    data
        Store path (or ``file://`` URL), :class:`~kompot_dask.store.Store` or AnnData.
    basis
        obsm key of the embedding (``"umap"`` finds ``"X_umap"``); its first two columns
        are drawn.
    color
        An obs column (categorical or numeric) or a gene of var_names; ``None`` draws
        the cells in one colour.
    layer
        Layer a gene's expression is read from (``None``: X). Only that gene's column is
        read.
    mgroups
        One panel per entry, each a dict ``{obs column: value or list of values}``
        (several columns: cells matching all). The selected cells are coloured on top of
        the others in ``background_color``. ``None``: one panel with every cell.
    vmin, vmax
        Colour limits for numeric colours: numbers or ``"pNN"`` percentiles over the
        coloured cells of all panels (shared by the panels).
    cmap
        Colormap for numeric colours.
    palette
        Colours of the categories: a list (in category order) or ``{category: colour}``.
        ``None``: scanpy's ``uns['<color>_colors']`` when the data has one for every
        category, else a tab10/tab20 palette.
    point_size
        Marker area (default from the number of cells).
    background_color
        Colour of the cells outside a panel's selection.
    frameon
        Draw the axes frame and axis labels.
    ncols
        Panels per row.
    title
        Title of each panel (default: the colour and the selection).
    figsize
        Figure size (default 4 × 4 per panel).
    save
        Path to save the figure to.
    ax
        Axes to draw into (one panel only; a new figure otherwise).
    legend_loc
        Legend of categories: ``"right margin"`` (scanpy's default), ``"on data"`` (each
        category's name at the median of its cells), a matplotlib location, or
        ``"none"``/``None``.
    legend_fontsize
        Font size of the legend (or of the names on the data).
    colorbar_title
        Label of the colour bar of a numeric colour (default: the obs column, or the
        gene and the layer its values come from).
    groups
        scanpy's ``groups``: only these categories of a categorical colour are coloured
        (and in the legend); the other cells are drawn in ``background_color``.
    matplotlib_scatter_kwargs
        Further ``Axes.scatter`` arguments for the background cells, as kompot (e.g.
        ``alpha``, ``zorder``).
    {output_options}

    Returns
    -------
    ``None``; with ``return_fig=True`` the matplotlib Figure, with ``fig.kompot_data``:
    ``basis`` (obsm key), ``color``,
    ``color_kind`` (``"categorical"``, ``"numeric"`` or ``None``), ``values`` (per cell,
    in obs order), ``n_total``, ``panels`` (list of ``{"title", "n_cells", "mask"}``),
    ``vmin``, ``vmax``, ``palette`` (category → colour, or ``None``).
    """
    check_output_options(return_fig, show, dpi)
    check_legend_loc(legend_loc, extra=("on data",))
    source = PlotData(data)
    key, xy = source.embedding(basis)
    kind, values, categories = _color_values(source, color, layer)
    if mgroups is None:
        selections = [Selection("", np.ones(source.n_obs, dtype=bool))]
    else:
        if isinstance(mgroups, dict):
            mgroups = [mgroups]
        if not mgroups:
            raise ValueError("mgroups=[] selects nothing; pass None or a list of dicts.")
        selections = []
        for entry in mgroups:
            sel = select_cells(source, entry)
            logger.info("Selected %s cells out of %s total cells.", f"{sel.n_cells:,}", f"{source.n_obs:,}")
            selections.append(sel)

    lo = hi = None
    if kind == "numeric":
        union = np.zeros(source.n_obs, dtype=bool)
        for sel in selections:
            union |= sel.mask
        shown = values[union]
        shown = shown[np.isfinite(shown)]
        # one scale for every panel: the data range of all coloured cells unless given
        lo = resolve_limit(vmin, shown, "vmin")
        hi = resolve_limit(vmax, shown, "vmax")
        if shown.size:
            lo = float(shown.min()) if lo is None else lo
            hi = float(shown.max()) if hi is None else hi
    if kind == "categorical" and palette is None and color in source.obs.columns:
        palette = _uns_palette(source, color, categories)
    colors = _category_colors(categories, palette) if kind == "categorical" else None
    if groups is not None:
        if kind != "categorical":
            raise ValueError(f"groups= restricts the categories of a categorical colour; color={color!r} is "
                             f"{'numeric' if kind else 'not given'}. Drop groups= or colour by a categorical column.")
        wanted = [groups] if isinstance(groups, str) else list(groups)
        unknown = [g for g in wanted if g not in colors]
        if unknown:
            raise ValueError(f"groups: {unknown[:10]} are not categories of {color!r}; its categories are "
                             f"{list(colors)[:20]}.")
        colors = {c: v for c, v in colors.items() if c in wanted}

    n = len(selections)
    own_figure = ax is None
    if ax is not None:
        if n != 1:
            raise ValueError(f"ax= takes one panel, but mgroups= asks for {n}; drop ax= (the panels get "
                             "a figure of their own) or pass one selection.")
        fig, axes = ax.figure, np.array([[ax]])
    else:
        ncols = max(1, min(int(ncols), n))
        nrows = math.ceil(n / ncols)
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(nrows, ncols,
                                 figsize=figsize or (4.2 * ncols + (1.2 if kind else 0), 4.0 * nrows), squeeze=False)
    if colorbar_title is None and kind == "numeric":
        colorbar_title = color if color in source.obs.columns else f"{color} ({'X' if layer is None else layer})"
    size = point_size if point_size is not None else default_point_size(source.n_obs)
    panels = []
    for sel, ax in zip(selections, axes.ravel(), strict=False):
        draw_cells(ax, xy, sel.mask, kind, values, colors=colors, cmap=cmap, lo=lo, hi=hi, size=size,
                   background=background_color, background_kwargs=matplotlib_scatter_kwargs)
        panel_title = title if title is not None else " | ".join(p for p in (color or "", sel.label) if p)
        ax.set_title(panel_title, fontsize=10)
        style_axes(ax, key, frameon)
        if kind == "numeric":
            fig.colorbar(ax.collections[-1], ax=ax, shrink=0.8, label=colorbar_title)
        if kind == "categorical" and legend_loc == "on data":
            _names_on_data(ax, xy, sel.mask, values, legend_fontsize)
        panels.append({"title": panel_title, "n_cells": sel.n_cells, "mask": sel.mask})
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    if kind == "categorical" and legend_loc != "on data":
        shown = pd.unique(np.concatenate([values[s.mask] for s in selections]).astype(object))
        _category_legend(axes.ravel()[n - 1], [c for c in colors if c in set(shown)], colors, legend_loc,
                         legend_fontsize)

    return finish(fig, {
        "basis": key, "color": color, "color_kind": kind, "values": values,
        "n_total": source.n_obs, "panels": panels, "vmin": lo, "vmax": hi, "palette": colors,
    }, save, return_fig=return_fig, show=show, dpi=dpi, own_figure=own_figure)


def _color_values(source: PlotData, color: str | None,
                  layer: str | None) -> tuple[str | None, Any, list[Any] | None]:
    """(kind, values per cell, categories in legend order or None)."""
    if color is None:
        return None, None, None
    if color in source.obs.columns:
        column = source.obs[color]
        if isinstance(column.dtype, pd.CategoricalDtype):
            return "categorical", column.astype(object).to_numpy(), list(column.cat.categories)
        if column.dtype == object or column.dtype == bool:
            values = column.astype(object).to_numpy()
            present = list(pd.unique(pd.Series(values).dropna()))
            try:
                present = sorted(present)
            except TypeError:  # mixed types: first-seen order
                pass
            return "categorical", values, present
        return "numeric", column.to_numpy(dtype=np.float64), None
    if color in source.var_names:
        j = source.gene_indices([color], what="color")
        return "numeric", source.read_columns(layer, j)[:, 0], None
    raise KeyError(
        f"color={color!r} is neither an obs column nor a gene in var_names of {source.label}; "
        f"pass an obs column (e.g. {list(source.obs.columns[:5])}) or a gene name."
    )


def _category_colors(categories: list[Any], palette: Any) -> dict[Any, str]:
    import matplotlib

    if isinstance(palette, dict):
        missing = [c for c in categories if c not in palette]
        if missing:
            raise KeyError(f"palette has no colour for categories {missing[:10]}; add them.")
        return {c: palette[c] for c in categories}
    if palette is None:
        name = "tab10" if len(categories) <= 10 else "tab20"
        base = matplotlib.colormaps[name].colors
        palette = [matplotlib.colors.to_hex(base[i % len(base)]) for i in range(len(categories))]
    palette = list(palette)
    return {c: palette[i % len(palette)] for i, c in enumerate(categories)}


def _uns_palette(source: PlotData, column: str, categories: list[Any]) -> list[str] | None:
    """scanpy's colours of ``column`` (``uns['<column>_colors']``, in category order) when
    they cover every category; ``None`` (the default palette) otherwise."""
    colors = source.uns_colors(column)
    if colors is None:
        return None
    if len(colors) < len(categories):
        logger.warning("uns[%r] has %d colours for %d categories of %r; using the default palette.",
                       f"{column}_colors", len(colors), len(categories), column)
        return None
    logger.info("Using the colours of uns[%r]", f"{column}_colors")
    return colors[: len(categories)]


def _category_legend(ax: Any, categories: list[Any], colors: dict[Any, str], loc: str | None = "right margin",
                     fontsize: float = 8.0) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker="o", linestyle="none", markerfacecolor=colors[c],
                      markeredgewidth=0, markersize=6, label=str(c)) for c in categories]
    place_legend(ax, loc, fontsize=fontsize, handles=handles)


def _names_on_data(ax: Any, xy: np.ndarray, mask: np.ndarray, values: np.ndarray, fontsize: float) -> None:
    """scanpy's ``legend_loc="on data"``: each category's name at the median of its cells."""
    shown = values[mask]
    for category in pd.unique(shown.astype(object)):
        if category is None or (isinstance(category, float) and np.isnan(category)):
            continue
        here = mask & (values == category)
        x, y = np.median(xy[here], axis=0)
        ax.text(x, y, str(category), fontsize=fontsize, fontweight="bold", ha="center", va="center")


def draw_cells(ax: Any, xy: np.ndarray, mask: np.ndarray, kind: str | None, values: Any, *,
               colors: dict[Any, str] | None = None, cmap: str = "viridis", lo: Any = None,
               hi: Any = None, size: float = 2.0, background: str = "#D9D9D9",
               order: str = "value", background_kwargs: dict[str, Any] | None = None,
               cell_kwargs: dict[str, Any] | None = None) -> Any:
    """Draw the cells outside ``mask`` in ``background``, then those inside coloured.

    Numeric values are drawn in increasing order (``order="abs"``: increasing magnitude)
    so the largest sit on top; NaN values in the background colour. Returns the
    collection of the selected cells (gid ``"selected"``).
    """
    extra = {"linewidths": 0, "rasterized": True, **(cell_kwargs or {})}
    if kind == "categorical" and colors is not None:  # cells of categories not shown: background
        mask = mask & np.array([v in colors for v in values], dtype=bool)
    if (~mask).any():
        ax.scatter(xy[~mask, 0], xy[~mask, 1], **{"s": size, "c": background, "linewidths": 0, "rasterized": True,
                                                   **(background_kwargs or {})})
    idx = np.flatnonzero(mask)
    if kind == "numeric":
        v = values[idx]
        key = np.abs(v) if order == "abs" else v
        idx = idx[np.argsort(np.where(np.isfinite(key), key, -np.inf), kind="stable")]
        import matplotlib

        colormap = matplotlib.colormaps[cmap].with_extremes(bad=background)
        coll = ax.scatter(xy[idx, 0], xy[idx, 1], s=size, c=values[idx], cmap=colormap, vmin=lo,
                          vmax=hi, plotnonfinite=True, **extra)
    elif kind == "categorical":
        rng = np.random.default_rng(0)  # no category hides another by drawing order
        idx = idx[rng.permutation(len(idx))]
        cell_colors = [colors.get(v, background) if v is not None else background for v in values[idx]]
        coll = ax.scatter(xy[idx, 0], xy[idx, 1], s=size, c=cell_colors, **extra)
    else:
        coll = ax.scatter(xy[idx, 0], xy[idx, 1], s=size, c=_SINGLE_COLOR, **extra)
    coll.set_gid("selected")
    coll.kompot_cells = idx  # obs positions, in drawing order
    return coll


def style_axes(ax: Any, key: str, frameon: bool) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_aspect("equal", adjustable="datalim")
    if not frameon:
        ax.set_axis_off()
        return
    name = key[2:] if key.startswith("X_") else key
    ax.set_xlabel(f"{name.upper()}1", fontsize=9)
    ax.set_ylabel(f"{name.upper()}2", fontsize=9)

"""What every plot shares: opening the data, reading columns and group means without
loading a layer, resolving run fields, colour limits, and finishing a figure.

A plot never holds a cells × genes element: it reads the columns of the genes it shows,
a block of cells at a time, through the store's :class:`~kompot_dask.store.TileReader`
(or the same interface over an in-memory AnnData's matrix).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._engine import reductions
from .._io.source import open_data
from .._io.store import LayerInfo, Store
from .._runs.history import RunFields, get_run_fields

logger = logging.getLogger("kompot_dask")

DATA_ATTRIBUTE = "kompot_data"
"""Name of the dict that every plot attaches to the Figure it returns (see each plot's
Returns section for its keys)."""

_DENSE_BLOCK_ROWS = 65_536
"""Cells per read of a dense layer (rounded to whole on-disk chunks)."""
_SPARSE_BLOCK_NNZ = 8_000_000
"""Stored values per read of a CSR layer (a row block reads every gene of its rows)."""


# ---- the data a plot reads ------------------------------------------------------------


class _MatrixReader:
    """The TileReader interface over an in-memory matrix (dense, sparse or dask)."""

    def __init__(self, matrix: Any):
        self.matrix = matrix

    def read(self, r0: int, r1: int, cols: np.ndarray) -> np.ndarray:
        block = self.matrix[r0:r1]
        if sp.issparse(block):
            return np.asarray(block.tocsc()[:, cols].toarray())
        if hasattr(block, "compute"):
            block = block[:, cols].compute()
            return np.asarray(block.toarray() if sp.issparse(block) else block)
        return np.asarray(block[:, cols])


class PlotData:
    """obs, var and readers of one dataset: a zarr store (obs/var in memory, layers on
    disk) or an in-memory AnnData."""

    def __init__(self, data: Any):
        opened = open_data(data, Store)
        self.store: Store | None = opened if isinstance(opened, Store) else None
        self.adata: Any = None if self.store is not None else opened

    @property
    def source(self) -> Any:
        """What :func:`~kompot_dask.get_run_fields` reads the run history from."""
        return self.store if self.store is not None else self.adata

    @property
    def label(self) -> str:
        return f"the store {self.store.path}" if self.store is not None else "the AnnData"

    @property
    def obs(self) -> pd.DataFrame:
        return self.store.obs if self.store is not None else self.adata.obs

    @property
    def var(self) -> pd.DataFrame:
        return self.store.var if self.store is not None else self.adata.var

    @property
    def var_names(self) -> pd.Index:
        return self.var.index

    @property
    def n_obs(self) -> int:
        return len(self.obs)

    def uns_colors(self, column: str) -> list[str] | None:
        """``uns['<column>_colors']`` (scanpy's colours of a categorical obs column, in
        category order), or ``None`` when absent or unreadable."""
        key = f"{column}_colors"
        try:
            if self.store is not None:
                value = self.store.read_uns_value(key)
            else:
                value = self.adata.uns.get(key)
        except Exception as exc:  # a malformed entry: fall back to the default palette
            logger.debug("Not using uns[%r]: %s", key, exc)
            return None
        if value is None:
            return None
        colors = [str(c) for c in np.asarray(value, dtype=object).ravel()]
        return colors or None

    # -- names ----------------------------------------------------------------------

    def obs_column(self, column: str, what: str = "groupby") -> pd.Series:
        if column not in self.obs.columns:
            raise KeyError(
                f"{what}={column!r} is not an obs column of {self.label}; available columns: "
                f"{_short_list(self.obs.columns)}. Pass {what}= one of these."
            )
        return self.obs[column]

    def varm_frame(self, key: str) -> pd.DataFrame | None:
        """``varm[key]`` (kompot's per-group tables: genes × subsets), or ``None``."""
        if self.store is not None:
            value = self.store.read_varm(key)
        else:
            value = self.adata.varm[key] if key in self.adata.varm else None
        if value is None:
            return None
        return value if isinstance(value, pd.DataFrame) else pd.DataFrame(np.asarray(value), index=self.var_names)

    def var_column(self, column: str, what: str) -> np.ndarray:
        if column not in self.var.columns:
            raise KeyError(
                f"{what}={column!r} is not a var column of {self.label}; available columns: "
                f"{_short_list(self.var.columns)}. Run kompot_dask.de first or pass {what}= "
                "an existing column."
            )
        return self.var[column].to_numpy()

    def gene_indices(self, genes: Sequence[str], what: str = "genes") -> np.ndarray:
        """Positions of ``genes`` in var_names; a KeyError names the missing ones."""
        index = self.var_names
        pos = index.get_indexer(list(genes))
        missing = [g for g, p in zip(genes, pos, strict=True) if p < 0]
        if missing:
            raise KeyError(
                f"{what}: {_short_list(missing)} not found in var_names of {self.label} "
                f"({len(index):,} genes, e.g. {_short_list(index[:5])}). Check the spelling "
                "or pass names from var_names."
            )
        return pos.astype(np.int64)

    def layer_keys(self) -> list[str]:
        if self.store is not None:
            return self.store.layer_keys()
        return sorted(str(k) for k in self.adata.layers.keys())

    def check_layer(self, layer: str | None, what: str = "layer") -> None:
        if layer is None:
            has_x = self.store.has_element("X") if self.store is not None else self.adata.X is not None
            if not has_x:
                raise KeyError(
                    f"{what}=None means X, but {self.label} has no X; pass {what}= one of "
                    f"{self.layer_keys()}."
                )
            return
        if layer not in self.layer_keys():
            raise KeyError(
                f"{what}={layer!r} is not a layer of {self.label}; available layers: "
                f"{self.layer_keys()}. Pass {what}= one of these (None for X)."
            )

    def embedding(self, basis: str) -> tuple[str, np.ndarray]:
        """(obsm key, first two columns as float64) of ``basis``; ``"umap"`` finds ``X_umap``."""
        keys = self.store.obsm_keys() if self.store is not None else sorted(self.adata.obsm.keys())
        key = basis if basis in keys else f"X_{basis}" if f"X_{basis}" in keys else None
        if key is None:
            raise KeyError(
                f"basis={basis!r} is not in obsm of {self.label}; available: {keys}. Pass "
                "basis= one of these (e.g. 'X_umap', or 'umap' for 'X_umap')."
            )
        value = self.store.read_obsm(key) if self.store is not None else self.adata.obsm[key]
        if isinstance(value, pd.DataFrame):
            value = value.to_numpy()
        value = np.asarray(value.toarray() if sp.issparse(value) else value)
        if value.ndim != 2 or value.shape[1] < 2:
            raise ValueError(
                f"obsm[{key!r}] has shape {value.shape}; an embedding needs at least two "
                "columns. Pass another basis="
            )
        return key, value[:, :2].astype(np.float64)

    # -- reading expression -----------------------------------------------------------

    def reader(self, layer: str | None) -> tuple[Any, list[tuple[int, int]]]:
        """A reader of ``layer`` and the cell blocks to read it in."""
        self.check_layer(layer)
        if self.store is not None:
            info = self.store.layer_info(layer)
            return self.store.tile_reader(info), _row_blocks(self.store, info)
        matrix = self.adata.X if layer is None else self.adata.layers[layer]
        n = matrix.shape[0]
        step = _DENSE_BLOCK_ROWS
        return _MatrixReader(matrix), [(r0, min(r0 + step, n)) for r0 in range(0, n, step)]

    def read_columns(self, layer: str | None, cols: Sequence[int]) -> np.ndarray:
        """Dense (cells × len(cols)) float64 of the given gene columns, read block by block."""
        cols = np.asarray(cols, dtype=np.int64)
        order = np.argsort(cols, kind="stable")
        reader, blocks = self.reader(layer)
        out = np.empty((self.n_obs, len(cols)), dtype=np.float64)
        for r0, r1 in blocks:
            out[r0:r1, order] = reader.read(r0, r1, cols[order])
        return out

    def group_sums(self, layer: str | None, cols: Sequence[int], codes: np.ndarray, n_codes: int,
                   client: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """Per-code sums and counts of finite values, (n_codes × len(cols)) each.

        ``codes`` gives each cell's group (``-1``: left out). On a store this is a Dask
        reduction, one task per cell block reading only ``cols``, on ``client`` or the
        current client if any, else on the threaded scheduler.
        """
        cols = np.asarray(cols, dtype=np.int64)
        order = np.argsort(cols, kind="stable")
        sorted_cols = cols[order]
        reader, blocks = self.reader(layer)
        blocks = [(r0, r1) for r0, r1 in blocks if np.any(codes[r0:r1] >= 0)]
        if self.store is None:  # in memory: nothing to ship anywhere
            parts = [reductions.block_sums(reader, r0, r1, sorted_cols, codes[r0:r1], n_codes)
                     for r0, r1 in blocks]
        else:
            parts = reductions.group_block_sums(reader, blocks, sorted_cols, codes, n_codes, client)
        sums = np.zeros((n_codes, len(cols)))
        counts = np.zeros((n_codes, len(cols)))
        for s, c in parts:
            sums += s
            counts += c
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        return sums[:, inverse], counts[:, inverse]


def _row_blocks(store: Store, info: LayerInfo) -> list[tuple[int, int]]:
    n = info.shape[0]
    if info.kind == "csc":  # a CSC read takes its columns over every cell at once
        return [(0, n)]
    if info.kind == "csr":
        nnz = int(info.nnz or 0)
        step = max(256, int(_SPARSE_BLOCK_NNZ / max(nnz / max(n, 1), 1.0)))
    else:
        chunk = info.chunks[0] if info.chunks else n
        step = max(chunk, (_DENSE_BLOCK_ROWS // chunk) * chunk)
    return [(r0, min(r0 + step, n)) for r0 in range(0, n, step)]


# ---- run fields ---------------------------------------------------------------------


def run_fields(data: PlotData, run_id: int, roles: Sequence[str]) -> RunFields:
    """The run's field names for ``roles``, logged the way kompot's plots log them."""
    fields = get_run_fields(data.source, run_id, roles=roles)
    for role in roles:
        logger.info("Found %s_key=%r from run info", role, fields[role])
    if roles:
        logger.info("Successfully inferred fields: %s", {f"{r}_key": fields[r] for r in roles})
    return fields


def describe_run(fields: RunFields, purpose: str | None = None) -> None:
    if purpose:
        logger.info("Using DE run %d for %s.", fields.run_id, purpose)
    else:
        logger.info("Using DE run %d: comparing %s to %s", fields.run_id, fields.condition1,
                    fields.condition2)


# ---- colour limits and figures ------------------------------------------------------

_PERCENTILE = re.compile(r"^p(\d+(?:\.\d+)?)$")


def resolve_limit(value: float | str | None, values: Iterable[float] | np.ndarray,
                  name: str) -> float | None:
    """``vmin``/``vmax``: a number, ``None``, or ``"pNN"`` — the NNth percentile
    (``np.percentile``) of the finite plotted values."""
    if value is None:
        return None
    if isinstance(value, str):
        match = _PERCENTILE.match(value)
        if match is None or not 0 <= float(match.group(1)) <= 100:
            raise ValueError(
                f"{name}={value!r} is not understood; pass a number, None, or a percentile "
                "string 'pNN' with 0 <= NN <= 100 (e.g. 'p99')."
            )
        arr = np.asarray(values, dtype=np.float64).ravel()
        arr = arr[np.isfinite(arr)]
        if arr.size == 0:
            return None
        return float(np.percentile(arr, float(match.group(1))))
    if isinstance(value, bool) or not isinstance(value, int | float | np.number):
        raise TypeError(f"{name}={value!r} must be a number, None or a 'pNN' string")
    return float(value)


SAVE_DPI = 300
"""Resolution of saved figures (kompot's): print quality, not the screen's 100 dpi."""


_NON_INTERACTIVE_BACKENDS = frozenset({"agg", "cairo", "pdf", "pgf", "ps", "svg", "template"})


def interactive_backend() -> bool:
    """Whether matplotlib draws on a screen or in a notebook (Qt, Tk, macOS, Jupyter's
    inline backend, ipympl) rather than only into files (Agg in a batch job)."""
    import matplotlib

    return str(matplotlib.get_backend()).lower() not in _NON_INTERACTIVE_BACKENDS


OUTPUT_OPTIONS_DOC = """\
    return_fig
        Return the Figure (kompot's and scanpy's convention); by default nothing is
        returned, so that a notebook shows the figure once.
    show
        Show the figure (``plt.show()``); ``None``: when not returning it, on a screen or
        notebook backend, unless drawn into a given ``ax``.
    dpi
        Resolution of the saved file (default 300, kompot's).
"""


def output_options_doc(fn: Any) -> Any:
    """Put the parameters every plot shares (:data:`OUTPUT_OPTIONS_DOC`) where its
    docstring says ``{output_options}``."""
    if fn.__doc__:
        fn.__doc__ = fn.__doc__.replace("    {output_options}\n", OUTPUT_OPTIONS_DOC)
    return fn


def check_output_options(return_fig: Any, show: Any, dpi: Any) -> None:
    """The arguments every plot takes for its output, checked before anything is read."""
    if not isinstance(return_fig, bool | np.bool_):
        raise TypeError(f"return_fig={return_fig!r} must be True or False")
    if show is not None and not isinstance(show, bool | np.bool_):
        raise TypeError(f"show={show!r} must be True, False or None")
    if dpi is not None and (isinstance(dpi, bool) or not isinstance(dpi, int | float | np.number) or dpi <= 0):
        raise ValueError(f"dpi={dpi!r} must be a positive number (dots per inch of the saved file) or None")


def finish(fig: Any, data: dict[str, Any], save: str | os.PathLike | None, *, return_fig: bool = False,
           show: bool | None = None, dpi: float | None = None, own_figure: bool = True) -> Any:
    """Attach ``data`` as ``fig.kompot_data``, save the figure when asked, then hand it
    over the way kompot's and scanpy's plots do.

    - ``return_fig=True``: the Figure is returned and nothing is shown.
    - Otherwise ``None`` is returned, so that a notebook does not display the figure a
      second time as the cell's value. ``show=None`` shows it (``plt.show()``) when the
      backend draws on a screen or in a notebook and the plot made its own figure (not
      when it drew into a given ``ax``); under Agg the figure stays open, for
      ``plt.savefig`` and ``plt.gcf()``.
    """
    setattr(fig, DATA_ATTRIBUTE, data)
    if save is not None:
        fig.savefig(os.fspath(save), bbox_inches="tight", dpi=SAVE_DPI if dpi is None else float(dpi))
        logger.info("Saved figure to %s", os.fspath(save))
    if return_fig:
        return fig
    if show is None:
        show = own_figure and interactive_backend()
    if show:
        import matplotlib.pyplot as plt

        plt.show()
    return None


_MATPLOTLIB_LOCS = ("best", "upper right", "upper left", "lower left", "lower right", "right", "center left",
                    "center right", "lower center", "upper center", "center")


def check_legend_loc(loc: Any, extra: Sequence[str] = ()) -> None:
    """``legend_loc``: a matplotlib location, ``"right margin"`` (outside the axes, on the
    right), ``"none"`` (or ``None``: no legend), or one of ``extra``."""
    allowed = (*_MATPLOTLIB_LOCS, "right margin", "none", *extra)
    if loc is not None and (not isinstance(loc, str) or loc not in allowed):
        raise ValueError(f"legend_loc={loc!r} is not supported; pass one of {list(allowed)} or None.")


def place_legend(ax: Any, loc: str | None, fontsize: float = 8.0, **kwargs: Any) -> Any:
    """The axes' legend at ``loc`` (see :func:`check_legend_loc`); ``None`` for no legend."""
    if loc is None or loc == "none":
        return None
    if loc == "right margin":
        return ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize=fontsize, **kwargs)
    return ax.legend(loc=loc, frameon=False, fontsize=fontsize, **kwargs)


def run_note(fields: RunFields | None, roles: Sequence[str]) -> tuple[str, dict[str, int]]:
    """A title note when fields of the run a plot was asked for now hold a later run's
    values (``("", {})`` otherwise), and role → the run whose values the field holds."""
    if fields is None:
        return "", {}
    later = {r: w for r, w in fields.writers.items() if r in roles and w is not None and w != fields.run_id}
    if not later:
        return "", {}
    runs = sorted(set(later.values()))
    return (f" (values of run {runs[0]}: it overwrote run {fields.run_id}'s fields)" if len(runs) == 1 else
            f" (values of runs {', '.join(map(str, runs))}: they overwrote run {fields.run_id}'s fields)"), later


def new_axes(ax: Any, figsize: tuple[float, float]) -> tuple[Any, Any]:
    import matplotlib.pyplot as plt

    if ax is not None:
        return ax.figure, ax
    fig, ax = plt.subplots(figsize=figsize)
    return fig, ax


def default_point_size(n: int) -> float:
    """Marker area that keeps large embeddings readable (scanpy's 120,000 / n, capped)."""
    return float(min(20.0, max(0.2, 120_000 / max(n, 1))))


def _short_list(items: Iterable[Any], limit: int = 10) -> str:
    items = [str(i) for i in items]
    if len(items) <= limit:
        return str(items)
    return str(items[:limit])[:-1] + f", ... ({len(items)} in all)]"


@dataclass(frozen=True)
class Selection:
    """One ``mgroups`` entry resolved to cells."""

    label: str
    mask: np.ndarray

    @property
    def n_cells(self) -> int:
        return int(self.mask.sum())


def select_cells(data: PlotData, selection: dict[str, Any]) -> Selection:
    """Cells matching every ``{obs column: value or list of values}`` of ``selection``."""
    if not isinstance(selection, dict) or not selection:
        raise TypeError(
            f"each mgroups entry must be a non-empty dict {{obs column: value(s)}}, got "
            f"{selection!r}; e.g. mgroups=[{{'Age': 'Young'}}, {{'Age': 'Old'}}]."
        )
    mask = np.ones(data.n_obs, dtype=bool)
    parts = []
    for column, wanted in selection.items():
        series = data.obs_column(column, what="mgroups column")
        values = list(wanted) if isinstance(wanted, list | tuple | set) else [wanted]
        present = set(pd.unique(series.astype(object)))
        unknown = [v for v in values if v not in present]
        if unknown:
            raise ValueError(
                f"mgroups: value(s) {unknown} not found in obs column {column!r}; its values "
                f"are {_short_list(sorted(map(str, present)))}."
            )
        mask &= series.isin(values).to_numpy()
        parts.append(f"{column}: {', '.join(map(str, values))}")
    return Selection("; ".join(parts), mask)

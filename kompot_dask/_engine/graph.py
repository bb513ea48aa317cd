"""The Dask side of a DE run: what runs where, and in which order.

Shape of a run (DESIGN.md §3):

1. client: validate, masks, length scale, landmarks Z (small, n × d and m × d);
2. workers: ``S_c = Σ K(Z,X) K(X,Z)`` per condition and the kernel column mean k̄;
3. one worker: the m × m factors (Lp, C₁, C₂, R); they stay on the workers as futures and
   each worker fetches them once. They are also kept in the staging directory, so that a
   resumed run loads them instead of fitting again;
4. one task per gene block (columns ``[j·B, (j+1)·B)`` of the store): read its tiles once,
   reduce ``B_c = Σ K(Z,X_k) Y_k`` over cell chunks, score (W, Mahalanobis, mean lfc), then
   write its imputed / fold-change tiles into staged layers — no two tasks share a chunk;
   null-gene blocks read their source columns, permute them and are scored the same way;
5. tasks over cell ranges: posterior standard deviation per cell;
6. client: local FDR, then one commit of every field and the run record.

This module builds the DE run's task graph; the rest of :mod:`kompot_dask._engine` runs the
planner's calibration and the plots' reductions. Numerics live in :mod:`kompot_dask._numerics`,
I/O in :mod:`kompot_dask._io`.
"""

from __future__ import annotations

import logging
import operator
import os
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
from distributed import Client, as_completed

from .. import _layout
from .._io import commit as io_commit
from .._io.store import EmbeddingReader, LayerInfo, RowSubset, Store, TileReader, write_tile
from .._io.tiles import TransposedReader, read_staged_tile, transpose_group
from .._layout import (
    EMPIRICAL_OUTPUTS,
    FIT_OUTPUTS,
    Landmarks,
    LandmarkSource,
    Layout,
    fit_parts,
    permuted_outputs,
)
from .._numerics import fdr as fdr_mod
from .._numerics import gp as gp_mod
from .._progress import progress as progress_bar
from .cluster import client_cores, cluster_workers, glibc, is_embedded, unguarded_script

logger = logging.getLogger("kompot_dask")

FACTOR_DTYPE = "float64"
"""The m × m factorisations, solves and scores are always float64: with kompot's jitter
(1e-6) the landmark kernel's Cholesky fails in float32. ``ComputeSettings.dtype`` sets the
precision of the bulk tile arithmetic (the cells × genes projections and predictions)."""

class NonFiniteExpressionError(ValueError):
    """The expression layer holds NaN or inf for some genes."""

    def __init__(self, columns: list[int], names: list[str] | None = None, as_null_source: bool = False):
        self.columns = list(columns)
        self.names = names
        self.as_null_source = as_null_source
        shown = names if names is not None else columns
        advice = (
            "These genes were drawn as null-gene sources, which come from all genes whatever "
            "genes= says: replace the values in the layer (e.g. with 0 for unexpressed genes) "
            "or disable FDR with FDRSettings(null_genes=0)."
            if as_null_source else
            "Replace them (e.g. with 0 for unexpressed genes) or exclude these genes with genes=."
        )
        super().__init__(
            f"the expression layer holds NaN or inf values in {len(self.columns)} gene(s): "
            f"{list(shown)[:20]}{' ...' if len(self.columns) > 20 else ''}. {advice}"
        )

    def __reduce__(self):
        return (NonFiniteExpressionError, (self.columns, self.names, self.as_null_source))


class InjectedFailure(RuntimeError):
    """Raised by a block task when a test asks for a failure."""


@dataclass(frozen=True)
class BlockContext:
    """Everything a block task needs besides the big arrays passed as futures."""

    reader: TileReader
    layout: Layout
    ls: float
    sigma: float
    dtype: str
    layer_dtype: str
    staged: dict[str, str] = field(default_factory=dict)  # role -> staged array directory
    markers: str | None = None  # directory of finished-task markers (resume)
    shard_rows: int = 0  # rows of the output layers' shards (0: one cell chunk)

    def __post_init__(self) -> None:
        if not self.shard_rows:
            object.__setattr__(self, "shard_rows", self.layout.cell_chunk)


# --------------------------------------------------------------------------------------
# Worker tasks (module level so they pickle by reference)


ROW_PIECE = 65_536
"""Cells whose coordinates a fit task gathers at a time (rounded to whole kernel chunks, so
that the sums run in the same order as over all rows at once)."""


def _row_pieces(rows: np.ndarray, kernel_chunk: int) -> list[np.ndarray]:
    step = kernel_chunk * max(1, ROW_PIECE // kernel_chunk)
    return [rows[s : s + step] for s in range(0, len(rows), step)] or [rows]


def _cross_gram_task(Z, X, rows, ls, kernel_chunk, dtype):
    s = None
    for piece in _row_pieces(rows, kernel_chunk):
        s = gp_mod.cross_gram(Z, X[piece], ls, chunk=kernel_chunk, dtype=dtype, out=s)
    return s


def _kernel_sum_task(Z, X, rows, ls, kernel_chunk, dtype):
    total = None
    for piece in _row_pieces(rows, kernel_chunk):
        total = gp_mod.kernel_column_sum(Z, X[piece], ls, chunk=kernel_chunk, dtype=dtype, out=total)
    return total


def _named_factor(name, fn, *args):
    return gp_mod.check_factor(name, fn(*args))


def _condition_factor_task(name, Z, ls, s_parts, sigma, dtype):
    first = s_parts[0]
    # Factorise in place when the partial is ours to overwrite (only this task reads it).
    if len(s_parts) == 1 and first.data.flags.writeable:
        s = first
    else:
        s = gp_mod.PackedLower(first.data.copy(), first.n)
        for part in s_parts[1:]:
            s.data += part.data
    return gp_mod.check_factor(name, gp_mod.condition_factor(Z, ls, s, sigma, dtype))


def _mean_task(parts, n):
    return np.sum(parts, axis=0) / n


def _save_fit_task(path, value) -> bool:
    """Keep one output of the fit in the staging, so that a resumed run reuses it.

    Best effort: a run does not fail because its resume state could not be written (a
    missing file only means that a resume fits again).
    """
    try:
        io_commit.write_array_atomic(path, gp_mod.stored_form(value))
    except OSError as exc:
        logger.warning("Could not keep %s for a resume: %s", path, exc)
        return False
    return True


def _load_factor_task(path):
    """A saved factor: packed (one-dimensional) as it was kept, ``R`` (dense) for JAX."""
    a = io_commit.read_array(path)
    return gp_mod.as_factor(a) if a.ndim == 1 else gp_mod.DeviceMatrix(a, FACTOR_DTYPE)


def _load_metric_task(path, Z, ls: float):
    """A saved metric: :class:`~kompot_dask._numerics.gp.KernelMetric` when it was kept
    one-dimensional, else the dense ``Rᵀ`` (the empirical or sample variance's, or an older
    version's staging)."""
    a = io_commit.read_array(path)
    if a.ndim == 1:
        return gp_mod.KernelMetric.from_stored(a, np.asarray(Z), ls, FACTOR_DTYPE)
    return gp_mod.DeviceMatrix(a, FACTOR_DTYPE)


def _load_array_task(path):
    return io_commit.read_array(path)


def trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc only) at the end of a task: a worker's
    threads allocate from separate malloc arenas that otherwise keep what a finished task
    freed, so resident memory would creep up to threads × the largest task."""
    libc = glibc()
    if libc is not None:
        libc.malloc_trim(0)


class _Clock:
    """Thread-seconds per phase inside one task (returned with its result, summed by the
    client into :attr:`EngineResult.thread_seconds`)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._t
        self._t = now


class _Moments:
    """Running count, sum and sum of squares of each column (float64), for the per-gene mean
    and variance over the analysed cells that ``FDRSettings(mode="variance_stratified")``
    regresses the null distances on."""

    def __init__(self, n_cols: int):
        self.n = 0
        self.s = np.zeros(n_cols)
        self.ss = np.zeros(n_cols)

    def add(self, values) -> None:
        """Add rows (dense, or scipy sparse: only the stored values count, the rest are 0)."""
        self.n += values.shape[0]
        if isinstance(values, np.ndarray):
            for r in range(0, values.shape[0], 8192):  # float64 temporaries of 8192 rows
                v = values[r : r + 8192].astype(np.float64)
                self.s += v.sum(axis=0)
                v *= v
                self.ss += v.sum(axis=0)
            return
        csr = values if values.format == "csr" else values.tocsr()
        m = len(self.s)
        for a in range(0, csr.nnz, 1 << 22):  # stored values by column index, 4 Mi at a time
            v = csr.data[a : a + (1 << 22)].astype(np.float64)
            cols = csr.indices[a : a + (1 << 22)]
            self.s += np.bincount(cols, weights=v, minlength=m)
            v *= v
            self.ss += np.bincount(cols, weights=v, minlength=m)

    def result(self) -> np.ndarray:
        """2 × columns: the mean and the (population) variance, NaN without rows."""
        if self.n == 0:
            return np.full((2, len(self.s)), np.nan)
        mean = self.s / self.n
        return np.stack([mean, np.maximum(self.ss / self.n - mean * mean, 0.0)])


def _project(ctx: BlockContext, block: dict, clock: _Clock, Z, X, group: np.ndarray, n_groups: int,
             moments: _Moments | None = None) -> list[np.ndarray]:
    """``B_i = Σ K(Z, X_k) Y_k`` over the cells of each group ``i`` (``group``: one entry per
    store row, −1 for cells outside every group) for one block of store columns, reading
    each tile once. Groups are the two conditions, or with sample variance the samples
    and each condition's cells outside every fitted sample. ``moments`` accumulates the
    selected columns' values over the cells of every group."""
    lay = ctx.layout
    c0, c1 = block["c0"], block["c1"]
    local = block["local"]  # selected columns, relative to c0
    accs: list = [None] * n_groups

    def acc(i: int):
        if accs[i] is None:
            accs[i] = gp_mod.ProjectionAccumulator(Z, ctx.ls, lay.gene_block, lay.kernel_chunk, ctx.dtype)
        return accs[i]

    bad = np.zeros(len(local), dtype=bool)
    for r0, r1 in lay.row_ranges:
        gr = group[r0:r1]
        used = gr >= 0
        if not used.any():
            continue
        present = np.unique(gr[used])
        if getattr(ctx.reader, "sparse", False):
            piece = ctx.reader.piece(r0, r1, slice(c0, c1))
            if len(local) < c1 - c0:
                piece = piece[:, local]
            picked = piece[used]
            bad[np.unique(picked.indices[~np.isfinite(picked.data)])] = True
            if moments is not None:
                moments.add(picked)
            if piece.nnz < _layout.SPARSE_MAX_DENSITY * piece.shape[0] * piece.shape[1]:
                clock.lap("tile read")
                xs = X[r0:r1]
                for i in present:
                    sel = gr == i
                    acc(int(i)).add_sparse(xs[sel], piece[sel])
                clock.lap("sparse projection")
                continue
            tile = piece.toarray()
        else:
            tile = ctx.reader.read(r0, r1, slice(c0, c1))[:, local]
            bad |= ~np.all(np.isfinite(tile[used]), axis=0)
            if moments is not None:
                moments.add(tile[used])
        clock.lap("tile read")
        xs = X[r0:r1]
        for i in present:
            sel = gr == i
            acc(int(i)).add(xs[sel], tile[sel].astype(ctx.dtype, copy=False))
        clock.lap("projection")
    if bad.any():
        raise NonFiniteExpressionError((c0 + local[bad]).tolist())
    out = [a.result() if a is not None else np.zeros((Z.shape[0], lay.gene_block), dtype=ctx.dtype) for a in accs]
    clock.lap("projection")
    return out


def _project_labellings(ctx: BlockContext, block: dict, clock: _Clock, Z, X, codes: np.ndarray,
                        permuted_codes: np.ndarray, moments: _Moments) -> list:
    """Both conditions' ``B_c = Σ K(Z, X_k) Y_k`` for one block of store columns under each
    labelling: the real condition codes first, then each row of ``permuted_codes``
    (FDRSettings(mode="calibrated")). Each tile is read once and each cell's kernel row
    evaluated once; every labelling takes its conditions' rows of it."""
    lay = ctx.layout
    c0, c1, local = block["c0"], block["c1"], block["local"]
    labels = np.vstack([np.asarray(codes)[None, :], np.atleast_2d(permuted_codes)])
    kc, m = lay.kernel_chunk, Z.shape[0]
    out = [[np.zeros((m, lay.gene_block), dtype=ctx.dtype) for _ in (1, 2)] for _ in range(labels.shape[0])]
    Zd = gp_mod.as_device(Z, ctx.dtype)
    bad = np.zeros(len(local), dtype=bool)
    for r0, r1 in lay.row_ranges:
        used = np.flatnonzero(labels[0, r0:r1] > 0)
        if not len(used):
            continue
        if getattr(ctx.reader, "sparse", False):
            piece = ctx.reader.piece(r0, r1, slice(c0, c1))
            tile = (piece[:, local] if len(local) < c1 - c0 else piece)[used].toarray()
        else:
            tile = ctx.reader.read(r0, r1, slice(c0, c1))[:, local][used]
        bad |= ~np.all(np.isfinite(tile), axis=0)
        moments.add(tile)
        clock.lap("tile read")
        xs = X[r0:r1]
        for s in range(0, len(used), kc):
            rows = used[s : s + kc]
            k = gp_mod.kernel_rows(gp_mod._pad_rows(np.asarray(xs[rows]), kc), Zd, ctx.ls, ctx.dtype)[: len(rows)]
            y = tile[s : s + kc].astype(ctx.dtype, copy=False)
            lab = labels[:, r0 + rows]
            for i, (o1, o2) in enumerate(out):
                for c, acc in ((1, o1), (2, o2)):
                    sel = lab[i] == c
                    if sel.any():
                        acc[:, : y.shape[1]] += k[sel].T @ y[sel]
            del k
        clock.lap("projection")
    if bad.any():
        raise NonFiniteExpressionError((c0 + local[bad]).tolist())
    return out


def _write_layers(ctx: BlockContext, block: dict, clock: _Clock, Z, X, pred, values) -> None:
    """Predict and write a gene block's staged layers, whole shards at a time (one cell chunk
    in a zarr v2 store): ``values(rows, k)`` gives each layer role's values (cells × block
    genes) at the store rows ``rows`` from their kernel block ``k`` (cells × landmarks)."""
    lay = ctx.layout
    c0, c1, local = block["c0"], block["c1"], block["local"]
    kc = lay.kernel_chunk
    Zd = gp_mod.as_device(Z, ctx.dtype)  # once per block, not once per kernel chunk
    for r0, r1 in _shard_ranges(lay, ctx.shard_rows):
        sel = np.flatnonzero(pred[r0:r1])
        tiles = {role: np.full((r1 - r0, c1 - c0), np.nan, dtype=ctx.layer_dtype) for role in ctx.staged}
        for s in range(0, len(sel), kc):
            rows = sel[s : s + kc]
            k = gp_mod.kernel_rows(gp_mod._pad_rows(X[r0 + rows], kc), Zd, ctx.ls, ctx.dtype)[: len(rows)]
            got = values(r0 + rows, k)
            del k  # one kernel block alive at a time
            for role, t in tiles.items():
                t[np.ix_(rows, local)] = got[role][:, : len(local)]
            del got
        clock.lap("layer prediction")
        for role, path in ctx.staged.items():
            write_tile(path, "", r0, r1, c0, c1, tiles[role])
        clock.lap("layer write")


def _posterior_var(n: int, std_done, std_new, eps: float) -> np.ndarray:
    """Both conditions' posterior variance per store row (2 × n, NaN where not predicted)
    from the std tasks' results (std = sqrt(var + eps))."""
    var = np.full((2, n), np.nan)
    for rows, s1, s2 in [*std_done, *(t[:3] for t in std_new)]:
        var[0, rows] = np.asarray(s1) ** 2 - eps
        var[1, rows] = np.asarray(s2) ** 2 - eps
    return var


def _real_block_task(ctx: BlockContext, block: dict, Z, X, codes, pred, C1, C2, R, kbar, after=(), groups=(),
                     permuted=None):
    """Fit, score and (optionally) predict one block of store columns (``after``: the
    transposition of a CSR element, which its reads need; ``groups``: each subset's factor,
    :func:`_group_metric_task`; ``permuted``: the permuted condition labels and their fit's
    factors, whose distances FDRSettings(mode="calibrated") tests against)."""
    clock = _Clock()
    c0, local = block["c0"], block["local"]
    moments = _Moments(len(local))
    n_sel = len(local)
    perm_d = None
    if permuted is None:
        b1, b2 = _project(ctx, block, clock, Z, X, codes.astype(np.int8) - 1, 2, moments)
    else:
        proj = _project_labellings(ctx, block, clock, Z, X, codes, permuted["codes"], moments)
        b1, b2 = proj[0]
        perm_d = np.empty((len(permuted["factors"]), n_sel))
        for p, f in enumerate(permuted["factors"]):
            p1, p2 = proj[1 + p]
            proj[1 + p] = None
            perm_d[p] = gp_mod.block_scores(f, kbar, p1, p2, ctx.sigma, FACTOR_DTYPE)[2][:n_sel]
            del p1, p2
        del proj
        clock.lap("permuted-label scoring")
    factors = {"C1": C1, "C2": C2, "R": R}
    w1, w2, d, lfc = gp_mod.block_scores(factors, kbar, b1, b2, ctx.sigma, FACTOR_DTYPE, overwrite=True)
    del b1, b2
    clock.lap("scoring")
    out = {"index": block["index"], "columns": c0 + local, "mahalanobis": d[:n_sel], "mean_lfc": lfc[:n_sel],
           "moments": moments.result()}
    if perm_d is not None:
        out["permuted_mahalanobis"] = perm_d
    if groups:
        gd, glfc = _group_scores(groups, w1, w2)
        out["group_mahalanobis"], out["group_mean_lfc"] = gd[:, :n_sel], glfc[:, :n_sel]
        clock.lap("group scoring")
    if ctx.staged:
        def values(rows, k):
            mu1, mu2 = k @ w1, k @ w2
            return {"imputed1": mu1, "imputed2": mu2, "fold_change": mu2 - mu1}

        _write_layers(ctx, block, clock, Z, X, pred, values)
    out["seconds"] = clock.seconds
    trim_heap()
    if ctx.markers:  # after the tiles: a marker vouches for them
        io_commit.write_marker(ctx.markers, f"real-{block['index']}",
                               {k: np.asarray(v) for k, v in out.items() if k != "seconds"})
    return out


@dataclass(frozen=True)
class SampleSpec:
    """Replicate-aware variance (``sample_col``): the samples whose models are fitted and
    which of them make each condition's sample variance.

    A cell's group (``cell_group``, one entry per store row) is 0 / 1 for the cells of
    condition 1 / 2 outside every fitted sample, ``2 + k`` for the cells of sample ``k``,
    −1 for cells in neither condition: the condition's own model is then the sum over its
    samples' projections and its other cells, so every tile is projected once.
    """

    cell_group: np.ndarray
    labels: tuple[str, ...]  # one per fitted sample, "condition: sample"
    condition: tuple[int, ...]  # 1 or 2, per fitted sample
    use1: tuple[int, ...]  # the samples that make condition 1's variance
    use2: tuple[int, ...]  # condition 2's (condition 1's own under allow_single_condition_variance)

    @property
    def n_samples(self) -> int:
        return len(self.labels)

    def rows(self, k: int) -> np.ndarray:
        return np.flatnonzero(self.cell_group == 2 + k)


@dataclass(frozen=True)
class GroupSpec:
    """Per-group results (``FilterSettings(groups=...)``): each subset's cells (store rows,
    within the cell filter) and the points its Mahalanobis covariance is taken at — new
    landmarks of the subset when it has more cells than the run has landmarks, else its
    cells (kompot's choice). Each subset gets its own ``Rᵀ`` (m × points) and mean kernel
    row; every gene and null-gene block scores its genes with each of them."""

    names: tuple[str, ...]
    rows: tuple[np.ndarray, ...]
    points: tuple[np.ndarray, ...]

    @property
    def n_groups(self) -> int:
        return len(self.names)


_GROUP_FILES = ("R", "kbar", "diagonal")
_GROUP_EMPIRICAL_FILES = ("Wsq", "points")
_GROUP_COVARIANCE_FILES = ("Sigma", "points")


def _group_paths(fit_dir: str, i: int, empirical: bool = False, covariance: bool = False) -> dict[str, str]:
    """Where subset ``i``'s factor, mean kernel row and diagonal flag are kept (with the
    empirical variance also (L⁻¹)² at its points and the points; with ``covariance``, the
    sample and the empirical variance together, Σ + eps·I at its points and the points)."""
    names = (_GROUP_FILES + (_GROUP_EMPIRICAL_FILES if empirical else ())
             + (_GROUP_COVARIANCE_FILES if covariance else ()))
    return {name: os.path.join(fit_dir, f"group-{i}-{name}.npy") for name in names}


def _group_ref(paths: dict[str, str], diagonal: bool) -> dict:
    return {**{k: v for k, v in paths.items() if k != "diagonal"}, "diagonal": bool(diagonal)}


def _group_metric_task(i, Z, ls, Lp, C1, C2, eps, allow_diagonal, points, kernel_sums, n_cells, fit_dir,
                       empirical=False, covariance=False):
    """One subset's Mahalanobis factor ``Rᵀ`` at its points and its mean kernel row (with the
    empirical variance also (L⁻¹)² and the points, for kompot's factor trick there; with
    ``covariance``, Σ + eps·I at its points and the points, for the per-gene Cholesky of
    the sample and empirical variances together), kept in ``fit_dir`` (a block loads one
    subset's at a time; a resumed run reuses them)."""
    got = gp_mod.landmark_metric(Z, ls, Lp, C1, C2, eps, FACTOR_DTYPE, allow_diagonal, empirical, points=points)
    Rt, diagonal = got[0], got[1]
    kbar = _mean_task(kernel_sums, n_cells)
    paths = _group_paths(fit_dir, i, empirical, covariance)
    if covariance:
        io_commit.write_array_atomic(paths["Sigma"], gp_mod.landmark_covariance(Z, ls, Lp, C1, C2, eps, FACTOR_DTYPE,
                                                                               points=points))
    # R last: its file vouches for the others
    io_commit.write_array_atomic(paths["kbar"], kbar)
    io_commit.write_array_atomic(paths["diagonal"], np.asarray(bool(diagonal)))
    if empirical:
        io_commit.write_array_atomic(paths["Wsq"], np.asarray(got[2]))
    if empirical or covariance:
        io_commit.write_array_atomic(paths["points"], np.asarray(points, dtype=np.float64))
    io_commit.write_array_atomic(paths["R"], np.asarray(Rt))
    del Rt, got
    trim_heap()
    return _group_ref(paths, diagonal)


def _group_scores(groups, w1, w2, devs=None, emp=None) -> tuple[np.ndarray, np.ndarray]:
    """Each subset's Mahalanobis distances and mean log fold changes of one block's genes
    (``groups``: :func:`_group_metric_task`'s results; ``devs``: with sample variance, both
    conditions' Helmert contrasts, for the gene-specific low-rank term at the subset's points;
    ``emp``: with the empirical variance, ``(V, Z, ls, eps)``: both conditions' variance
    weights, whose variance at the subset's points enters kompot's factor trick — or, with
    the sample variance as well, kompot's per-gene Cholesky at the subset's points)."""
    g = w1.shape[1]
    d = np.empty((len(groups), g))
    lfc = np.empty((len(groups), g))
    dw = w2 - w1
    for i, grp in enumerate(groups):
        lfc[i] = io_commit.read_array(grp["kbar"]) @ dw
        if emp is not None and devs is not None:  # both variances: a Cholesky per gene at the points
            V, Z, ls, eps = emp
            k = gp_mod.matern52(io_commit.read_array(grp["points"]), Z, ls, FACTOR_DTYPE)  # points × m
            v = np.maximum(k @ V[0], eps) + np.maximum(k @ V[1], eps)
            d[i] = _direct_distances(io_commit.read_array(grp["Sigma"]), k, dw, devs, v)
            del k, v
            continue
        R = io_commit.read_array(grp["R"]).T  # points × m
        if emp is not None and not grp["diagonal"]:  # kompot's factor trick at the subset's points
            V, Z, ls, eps = emp
            k = gp_mod.matern52(io_commit.read_array(grp["points"]), Z, ls, FACTOR_DTYPE)  # points × m
            v = np.maximum(k @ V[0], eps) + np.maximum(k @ V[1], eps)
            del k
            d[i] = gp_mod.empirical_mahalanobis(R, io_commit.read_array(grp["Wsq"]), dw, v)
            continue
        if devs is None:  # (the diagonal shortcut ignores the empirical variance, as kompot's)
            z = R @ dw
            d[i] = np.sqrt(np.einsum("pg,pg->g", z, z))
            continue
        for g0 in range(0, g, _layout.SAMPLE_SCORE_GENES):
            sl = slice(g0, g0 + _layout.SAMPLE_SCORE_GENES)
            U = np.stack([u[:, sl] for u in (*devs[0], *devs[1])], axis=2)
            d[i, sl] = gp_mod.lowrank_mahalanobis(R, dw[:, sl], U)
        del R
    return d, lfc


def _sample_factor_task(name, Z, ls, s_parts, sigma, dtype, path):
    """One sample's model factor, kept on disk (``path``): a gene block loads the factors
    one at a time, so no worker holds every sample's m × m factor at once."""
    factor = _condition_factor_task(name, Z, ls, s_parts, sigma, dtype)
    io_commit.write_array_atomic(path, gp_mod.stored_form(factor))
    return path


def labelling_uses(labels, n_samples: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The samples whose spread makes each condition's sample variance under the sample
    conditions ``labels`` (1 / 2 per fitted sample): a condition's own when it has two or
    more, else the other condition's (allow_single_condition_variance), as
    :class:`SampleSpec` chooses them for the real labels."""
    used = [tuple(k for k in range(n_samples) if int(labels[k]) == c) for c in (1, 2)]
    return (used[0] if len(used[0]) >= 2 else used[1]), (used[1] if len(used[1]) >= 2 else used[0])


def _sample_distances(Rt: np.ndarray, dw: np.ndarray, devs: list) -> np.ndarray:
    """Each gene's distance with the gene-specific low-rank sample covariance (``devs``: both
    conditions' Helmert contrasts), a batch of genes at a time."""
    d = np.empty(dw.shape[1])
    for g0 in range(0, len(d), _layout.SAMPLE_SCORE_GENES):
        g = slice(g0, g0 + _layout.SAMPLE_SCORE_GENES)
        U = np.stack([u[:, g] for u in (*devs[0], *devs[1])], axis=2)
        d[g] = gp_mod.lowrank_mahalanobis(Rt, dw[:, g], U)
    return d


def _permuted_sample_distances(permuted: dict, weights: list, dws: list) -> np.ndarray:
    """Each relabelling's distances (sample_col with FDRSettings(mode="calibrated")): its
    fit's metric, its conditions' weight difference (``dws``), and the Helmert contrasts of
    its groups of samples, formed from the samples' weights (``weights``) a batch of genes
    at a time."""
    labels = np.atleast_2d(permuted["samples"])
    n_genes = dws[0].shape[1]
    out = np.empty((labels.shape[0], n_genes))
    for p, f in enumerate(permuted["factors"]):
        uses = labelling_uses(labels[p], len(weights))
        Rt = np.asarray(f["R"]).T
        for g0 in range(0, n_genes, _layout.SAMPLE_SCORE_GENES):
            g = slice(g0, g0 + _layout.SAMPLE_SCORE_GENES)
            devs = []
            for c in (0, 1):
                if c == 1 and uses[1] == uses[0]:
                    devs.append(devs[0])
                    continue
                con = gp_mod.SampleContrasts(len(uses[c]))
                for k in uses[c]:
                    con.add(weights[k][:, g].copy())
                devs.append(con.contrasts)
            U = np.stack([*devs[0], *devs[1]], axis=2)
            out[p, g] = gp_mod.lowrank_mahalanobis(Rt, dws[p][:, g], U)
        del Rt
    return out


def _sample_models(ctx: BlockContext, clock: _Clock, proj: list, spec: SampleSpec, factor_paths, C1, C2, R, kbar,
                   permuted=None, keep: bool = False) -> tuple:
    """Both conditions' weights, the distances with the sample variance, the mean log fold
    changes, both conditions' Helmert contrasts, (``permuted``) each relabelling's
    distances and (``keep``) every sample's weights, from a block's projections per cell
    group (``proj``: the conditions' cells outside every fitted sample, then each sample's;
    emptied as the weights are solved). Gene blocks and null-gene blocks alike. With
    ``keep`` (the empirical variance, whose residuals need each sample's model) the
    distances are left to the caller (None)."""
    perm_dw: list = []
    if permuted is not None:
        for p, f in enumerate(permuted["factors"]):
            b = [proj[0].copy(), proj[1].copy()]
            for k, c in enumerate(np.atleast_2d(permuted["samples"])[p]):
                b[int(c) - 1] += proj[2 + k]
            dw = gp_mod.condition_weights(f["C2"], b[1], ctx.sigma, FACTOR_DTYPE)
            b[1] = None
            dw -= gp_mod.condition_weights(f["C1"], b[0], ctx.sigma, FACTOR_DTYPE)
            perm_dw.append(dw)
            del b, dw
        clock.lap("permuted-label weights")
    for k, cond in enumerate(spec.condition):  # each condition's model: all its cells
        proj[cond - 1] += proj[2 + k]
    factors = {"C1": C1, "C2": C2, "R": R}
    w1, w2, _, lfc = gp_mod.block_scores(factors, kbar, proj[0], proj[1], ctx.sigma, FACTOR_DTYPE)
    proj[0] = proj[1] = None
    # each condition's samples as Helmert contrasts, one sample's factor and weights at a
    # time, each sample's projection dropped once its weights are solved
    uses = [tuple(spec.use1), tuple(spec.use2)]
    contrasts = [gp_mod.SampleContrasts(len(u)) for u in uses]
    if uses[1] == uses[0]:  # allow_single_condition_variance: condition 1's samples for both
        contrasts[1] = contrasts[0]
    kept: list = []  # every sample's weights, for the relabellings' contrasts
    for k, path in enumerate(factor_paths):
        w = gp_mod.condition_weights(io_commit.read_array(path), proj[2 + k], ctx.sigma, FACTOR_DTYPE)
        proj[2 + k] = None
        if permuted is not None or keep:
            kept.append(w.copy())
        c = 0 if k in uses[0] else 1
        if k in uses[c]:
            contrasts[c].add(w)
        del w
    proj.clear()
    devs = [contrasts[0].contrasts, contrasts[1].contrasts]
    clock.lap("sample models")
    if keep:
        return w1, w2, None, lfc, devs, None, kept
    d = _sample_distances(np.asarray(R).T, w2 - w1, devs)
    clock.lap("scoring")
    perm_d = None
    if permuted is not None:
        perm_d = _permuted_sample_distances(permuted, kept, perm_dw)
        kept = perm_dw = None
        clock.lap("permuted-label scoring")
    return w1, w2, d, lfc, devs, perm_d, []


def _sample_block_task(ctx: BlockContext, block: dict, Z, X, cell_group, pred, C1, C2, R, kbar,
                       spec: SampleSpec, factor_paths, eps: float, std_done, std_new, after=(), groups=(),
                       permuted=None, emp=None):
    """:func:`_real_block_task` with kompot's sample variance: each fitted sample's model for
    this block of genes, its Mahalanobis distances with the gene-specific low-rank covariance
    (:func:`kompot_dask._numerics.gp.lowrank_mahalanobis`), and per cell the std with the
    sample variance (and the z-scores) as layers. ``permuted``: the samples' conditions
    under each relabelling and their fits' factors (FDRSettings(mode="calibrated")); a
    relabelled condition's projection is the sum of its samples' (and of the cells outside
    every fitted sample, which keep their condition), so no tile is read again. ``emp``: the
    empirical variance as well (:func:`_sample_empirical`: a second read of the block's
    tiles for each sample's leave-one-out residuals, and kompot's per-gene Cholesky)."""
    clock = _Clock()
    lay = ctx.layout
    c0, c1, local = block["c0"], block["c1"], block["local"]
    n_sel = len(local)
    moments = _Moments(n_sel)
    proj = _project(ctx, block, clock, Z, X, cell_group, 2 + spec.n_samples, moments)
    w1, w2, d, lfc, devs, perm_d, kept = _sample_models(ctx, clock, proj, spec, factor_paths, C1, C2, R, kbar,
                                                        permuted, keep=emp is not None)
    del proj
    V = None
    if emp is not None:
        def pieces():  # every tile read once more, each sample's cells with its own model
            for r0, r1 in lay.row_ranges:
                grp = cell_group[r0:r1]
                present = np.unique(grp[grp >= 2])
                if not len(present):
                    continue
                tile = _dense_tile(ctx, r0, r1, c0, c1, local)
                for j in present:
                    sel = np.flatnonzero(grp == j)
                    yield spec.condition[j - 2] - 1, r0 + sel, tile[sel], kept[j - 2]

        d, V = _sample_empirical(ctx, clock, Z, X, pieces(), kept, w1, w2, devs, C1, C2, **emp)
    extra = {} if perm_d is None else {"permuted_mahalanobis": perm_d[:, :n_sel]}
    if groups:
        gd, glfc = _group_scores(groups, w1, w2, devs, None if V is None else (V, Z, ctx.ls, emp["eps"]))
        extra.update(group_mahalanobis=gd[:, :n_sel], group_mean_lfc=glfc[:, :n_sel])
        clock.lap("group scoring")
    if ctx.staged:
        var = _posterior_var(lay.row_ranges[-1][1] if lay.row_ranges else 0, std_done, std_new, eps)

        def values(rows, k):
            mu1, mu2 = k @ w1, k @ w2
            sv = []  # each condition's sample variance: the squared contrasts' predictions
            for c in (0, 1):
                if c == 1 and devs[1] is devs[0]:
                    sv.append(sv[0])
                    continue
                t = np.zeros_like(mu1)
                for dj in devs[c]:
                    p = k @ dj
                    p *= p
                    t += p
                sv.append(t)
            tv = [sv[c] + var[c, rows][:, None] for c in (0, 1)]
            if V is not None:  # the empirical variance's observation variance, as kompot floors it
                for c in (0, 1):
                    tv[c] += np.maximum(k @ V[c], eps)
            return {"imputed1": mu1, "imputed2": mu2, "fold_change": mu2 - mu1,
                    "sample_std1": np.sqrt(tv[0] + eps), "sample_std2": np.sqrt(tv[1] + eps),
                    "fold_change_zscores": (mu2 - mu1) / np.sqrt(tv[0] + tv[1] + eps)}

        _write_layers(ctx, block, clock, Z, X, pred, values)
    out = {"index": block["index"], "columns": c0 + local, "mahalanobis": d[:n_sel], "mean_lfc": lfc[:n_sel],
           "moments": moments.result(), **extra, "seconds": clock.seconds}
    w1 = w2 = devs = V = None  # freed before the heap is trimmed
    trim_heap()
    if ctx.markers:
        io_commit.write_marker(ctx.markers, f"real-{block['index']}",
                               {k: np.asarray(v) for k, v in out.items() if k != "seconds"})
    return out


def _sample_empirical(ctx: BlockContext, clock: _Clock, Z, X, pieces, kept: list, w1, w2, devs, C1, C2, *, Sigma,
                      eps: float, lev_done, lev_new) -> tuple[np.ndarray, list]:
    """The empirical variance with ``sample_col``, as kompot 0.8.0 computes it: each cell's
    squared residual from its own sample's model (``kept``: every sample's weights),
    leave-one-out corrected with that model's leverage, pooled per condition into one
    variance GP (weights V_c); then each gene's distance with the full covariance
    Σ + eps·I + diag(v_g) + V₁,g + V₂,g by one Cholesky per gene
    (:func:`kompot_dask._numerics.gp.direct_mahalanobis`). ``pieces`` yields (condition
    0/1, store rows, values, the weights of their sample). Returns the distances and V."""
    lay = ctx.layout
    n = lay.row_ranges[-1][1] if lay.row_ranges else 0
    h = _per_cell(n, lev_done, lev_new, "h")
    kzz = gp_mod.matern52(Z, Z, ctx.ls, FACTOR_DTYPE)
    V, v = _variance_weights(ctx, Z, X, pieces, h, (w1, w2), (C1, C2), eps, kzz)
    kept.clear()
    clock.lap("empirical variance")
    d = _direct_distances(np.asarray(Sigma), kzz, w2 - w1, devs, v)
    clock.lap("per-gene Cholesky")
    return d, V


def _direct_distances(cov: np.ndarray, k: np.ndarray, dw: np.ndarray, devs: list, v: np.ndarray) -> np.ndarray:
    """Each gene's distance by kompot's per-gene Cholesky (both variances) at the points of
    ``cov`` (Σ + eps·I there; ``k``: their kernel against the landmarks), the Helmert
    contrasts stacked a batch of genes at a time, one m × m work matrix for all."""
    work = np.empty(cov.shape, dtype=cov.dtype, order="F")
    d = np.empty(dw.shape[1])
    for g0 in range(0, len(d), _layout.SAMPLE_SCORE_GENES):
        g = slice(g0, g0 + _layout.SAMPLE_SCORE_GENES)
        U = np.stack([u[:, g] for u in (*devs[0], *devs[1])], axis=2)
        d[g] = gp_mod.direct_mahalanobis(cov, k, dw[:, g], U, v[:, g], work)
    return d


def _sample_leverage_task(path, rows, Z, X, ls, sigma, kernel_chunk, dtype, marker=None):
    """The leverages of one sample's cells under its own model (``path``: its factor), for
    the leave-one-out correction of their residuals (the empirical variance with
    ``sample_col``)."""
    M = gp_mod.leverage_factor(io_commit.read_array(path), sigma, dtype)
    return _leverage_task(rows, Z, X, M, ls, kernel_chunk, dtype, marker)


def _leverage_task(rows, Z, X, M, ls, kernel_chunk, dtype, marker=None):
    """mellon's leverage h(x) = k_xᵀ M⁻¹ k_x of the training cells ``rows`` of one condition
    (empirical variance), for the leave-one-out correction of their squared residuals."""
    h = np.empty(len(rows))
    for s in range(0, len(rows), kernel_chunk):
        r = rows[s : s + kernel_chunk]
        h[s : s + len(r)] = gp_mod.leverages(gp_mod._pad_rows(X[r], kernel_chunk), Z, M, ls, dtype)[: len(r)]
    trim_heap()
    out = {"leverage_rows": rows, "h": h}
    if marker is not None:
        io_commit.write_marker(marker[0], marker[1], out)
    return out


def _per_cell(n: int, done, new, value: str) -> np.ndarray:
    """One value per store row (NaN where none) from finished tasks' ``(rows, …)`` results."""
    out = np.full(n, np.nan)
    for r in [*done, *new]:
        out[r["leverage_rows"]] = r[value]
    return out


def _dense_tile(ctx: BlockContext, r0: int, r1: int, c0: int, c1: int, local: np.ndarray) -> np.ndarray:
    if getattr(ctx.reader, "sparse", False):
        piece = ctx.reader.piece(r0, r1, slice(c0, c1))
        return (piece[:, local] if len(local) < c1 - c0 else piece).toarray()
    return ctx.reader.read(r0, r1, slice(c0, c1))[:, local]


def _variance_weights(ctx, Z, X, pieces, h, w, C, eps, kzz=None):
    """Each condition's empirical variance weights V_c — the variance GP fitted to the
    leave-one-out corrected squared residuals of its cells (``pieces`` yields (condition
    0/1, rows, values), or (…, weights) when the residuals come from other weights than the
    condition's ``w``) — and their summed variance at the landmarks, Σ_c max(Kzz V_c, eps)
    (m × g; ``kzz``: Kzz when the caller has it already)."""
    accs = [gp_mod.ResidualAccumulator(Z, ctx.ls, w[c], ctx.layout.kernel_chunk, ctx.dtype) for c in (0, 1)]
    for c, rows, values, *own in pieces:  # (… , W): residuals from those weights, not the condition's
        accs[c].add(X, values, h[rows], rows=rows, W=own[0] if own else None)
    V = [gp_mod.condition_weights(C[c], accs[c].result(), ctx.sigma, FACTOR_DTYPE) for c in (0, 1)]
    del accs
    kzz = gp_mod.matern52(Z, Z, ctx.ls, FACTOR_DTYPE) if kzz is None else kzz
    return V, np.maximum(kzz @ V[0], eps) + np.maximum(kzz @ V[1], eps)


def _empirical_block_task(ctx: BlockContext, block: dict, Z, X, codes, pred, C1, C2, R, kbar, Wsq, diagonal,
                          eps: float, lev_done, lev_new, std_done, std_new, gene0: bool, after=(), groups=()):
    """:func:`_real_block_task` with kompot's empirical variance
    (``GPSettings(use_empirical_variance=True)``): a second read of the block's tiles gives
    each condition's leave-one-out corrected squared residuals, the variance GP fitted to them
    adds a per-gene diagonal term to the Mahalanobis covariance (kompot's factor trick), and
    its prediction enters the z-scores and (for the first tested gene) the obs std."""
    clock = _Clock()
    lay = ctx.layout
    c0, c1 = block["c0"], block["c1"]
    local = block["local"]
    n_sel = len(local)
    moments = _Moments(n_sel)
    b1, b2 = _project(ctx, block, clock, Z, X, codes.astype(np.int8) - 1, 2, moments)
    factors = {"C1": C1, "C2": C2, "R": R}
    w1, w2, d, lfc = gp_mod.block_scores(factors, kbar, b1, b2, ctx.sigma, FACTOR_DTYPE, overwrite=True)
    del b1, b2
    clock.lap("scoring")
    n = lay.row_ranges[-1][1] if lay.row_ranges else 0
    h = _per_cell(n, lev_done, lev_new, "h")

    def pieces():  # every tile read once more, both conditions' cells from it
        for r0, r1 in lay.row_ranges:
            code = codes[r0:r1]
            if not ((code == 1) | (code == 2)).any():
                continue
            tile = _dense_tile(ctx, r0, r1, c0, c1, local)
            for c in (0, 1):
                sel = np.flatnonzero(code == c + 1)
                if len(sel):
                    yield c, r0 + sel, tile[sel]

    V, v = _variance_weights(ctx, Z, X, pieces(), h, (w1, w2), (C1, C2), eps)
    if not bool(diagonal):  # kompot's diagonal shortcut ignores the empirical variance
        d = gp_mod.empirical_mahalanobis(np.asarray(R).T, np.asarray(Wsq), w2 - w1, v)
    clock.lap("empirical variance")
    out = {"index": block["index"], "columns": c0 + local, "mahalanobis": d[:n_sel], "mean_lfc": lfc[:n_sel],
           "moments": moments.result()}
    if groups:
        gd, glfc = _group_scores(groups, w1, w2, emp=(V, Z, ctx.ls, eps))
        out["group_mahalanobis"], out["group_mean_lfc"] = gd[:, :n_sel], glfc[:, :n_sel]
        clock.lap("group scoring")
    if ctx.staged:
        var = _posterior_var(n, std_done, std_new, eps)

        def values(rows, k):
            mu1, mu2 = k @ w1, k @ w2
            got = {"imputed1": mu1, "imputed2": mu2, "fold_change": mu2 - mu1}
            if "fold_change_zscores" in ctx.staged:
                total = ((var[0, rows] + var[1, rows])[:, None] + np.maximum(k @ V[0], eps)
                         + np.maximum(k @ V[1], eps))
                got["fold_change_zscores"] = (mu2 - mu1) / np.sqrt(total + eps)
            return got

        _write_layers(ctx, block, clock, Z, X, pred, values)
    kc = lay.kernel_chunk
    Zd = gp_mod.as_device(Z, ctx.dtype)
    if gene0:  # kompot's obs std holds the first tested gene's (gene-independent without this variance)
        rows = np.flatnonzero(pred)
        ov = np.empty((2, len(rows)))
        for s in range(0, len(rows), kc):
            r = rows[s : s + kc]
            k = gp_mod.kernel_rows(gp_mod._pad_rows(X[r], kc), Zd, ctx.ls, ctx.dtype)[: len(r)]
            ov[0, s : s + len(r)] = np.maximum(k @ V[0][:, 0], eps)
            ov[1, s : s + len(r)] = np.maximum(k @ V[1][:, 0], eps)
        out["gene0_rows"], out["gene0_obs_var"] = rows, ov
        clock.lap("empirical variance")
    out["seconds"] = clock.seconds
    trim_heap()
    if ctx.markers:
        io_commit.write_marker(ctx.markers, f"real-{block['index']}",
                               {k: np.asarray(v) for k, v in out.items() if k != "seconds"})
    return out


def _zscore_task(ctx: BlockContext, block: dict, fc_path: str, z_path: str, eps: float, std_done, std_new,
                 after=None) -> dict:
    """The fold-change z-score tiles of one gene block: the staged fold change over its
    posterior std, sqrt(var₁ + var₂ + eps) per cell (kompot's ``fold_change_zscores``),
    written shard by shard like the block's other layers."""
    t0 = time.perf_counter()
    n = ctx.layout.row_ranges[-1][1] if ctx.layout.row_ranges else 0
    total = np.full(n, np.nan)
    for rows, s1, s2 in [*std_done, *(t[:3] for t in std_new)]:
        # std = sqrt(var + eps), so var₁ + var₂ + eps = std₁² + std₂² − eps
        total[rows] = np.asarray(s1) ** 2 + np.asarray(s2) ** 2 - eps
    scale = 1.0 / np.sqrt(total)
    c0, c1 = block["c0"], block["c1"]
    for r0, r1 in _shard_ranges(ctx.layout, ctx.shard_rows):
        tile = read_staged_tile(fc_path, r0, r1, c0, c1).astype(np.float64) * scale[r0:r1, None]
        write_tile(z_path, "", r0, r1, c0, c1, tile.astype(ctx.layer_dtype, copy=False))
    out = {"zscore": block["index"], "seconds": {"fold-change z-scores": time.perf_counter() - t0}}
    if ctx.markers:
        io_commit.write_marker(ctx.markers, f"z-{block['index']}", {"index": np.asarray(block["index"])})
    return out


def _shard_ranges(lay, rows: int) -> list[tuple[int, int]]:
    n = lay.row_ranges[-1][1] if lay.row_ranges else 0
    rows = max(int(rows), 1)
    return [(r0, min(r0 + rows, n)) for r0 in range(0, n, rows)]


class ExternalNullValues:
    """One null-gene block's columns of FDRSettings.null_expression: condition 1's cells ×
    columns and condition 2's (numpy arrays, sent with the task; or lazy dask arrays, which
    the task computes itself, so the whole null expression never has to be in memory)."""

    def __init__(self, part1, part2, first: int):
        self.parts = (part1, part2)
        self.first = int(first)  # the block's first column of null_expression

    def values(self) -> np.ndarray:
        """Both conditions' values stacked, condition 1's cells first (float64)."""
        out = []
        for part in self.parts:
            if hasattr(part, "dask"):
                import dask

                part = dask.compute(part, scheduler="sync")[0]
            if hasattr(part, "toarray"):
                part = part.toarray()
            out.append(np.asarray(part, dtype=np.float64))
        y = np.vstack(out)
        bad = ~np.all(np.isfinite(y), axis=0)
        if bad.any():
            cols = (self.first + np.flatnonzero(bad)).tolist()
            raise ValueError(f"FDRSettings.null_expression has non-finite values in column(s) {cols[:10]}; pass finite "
                             "null expression (e.g. fill or drop those columns)")
        return y


def _null_block_task(ctx: BlockContext, block: dict, Z, X, rows1, rows2, C1, C2, R, kbar, after=(), emp=None,
                     groups=(), samples=None):
    """Score one block of null genes: permuted source columns over both conditions (``emp``:
    the empirical variance's inputs, :func:`_null_empirical`; ``groups``: each subset's
    factor, for its own null distances; ``samples``: the sample variance's spec and sample
    factors, as kompot fits its per-sample models to the null genes it appends)."""
    clock = _Clock()
    lay = ctx.layout
    if "external" in block:  # FDRSettings.null_expression: given values, fitted as they are
        y = block["external"].values()
        clock.lap("null-gene read")
        return _null_project(ctx, block, clock, y, Z, X, rows1, rows2, C1, C2, R, kbar, y.shape[1], emp, groups,
                             samples)
    sources = block["sources"]  # sorted store column of each null
    seeds = block["seeds"]
    uniq, inverse = np.unique(sources, return_inverse=True)
    n1, n2 = len(rows1), len(rows2)
    stacked_rows = np.concatenate([rows1, rows2])
    # The source columns over all cells of both conditions are this task's big arrays: kept
    # in the layer's own precision where float32 holds its values exactly (the projection
    # converts each chunk to the compute dtype, so nothing changes numerically).
    vdt = _layout.null_value_dtype(ctx.reader.info.dtype)
    if getattr(ctx.reader, "sparse", False):
        y = _sparse_null_values(ctx.reader, uniq, inverse, seeds, rows1, rows2)
        clock.lap("null-gene read")
        if y.nnz >= _layout.SPARSE_MAX_DENSITY * y.shape[0] * y.shape[1]:
            y = y.toarray().astype(vdt, copy=False)
        return _null_project(ctx, block, clock, y, Z, X, rows1, rows2, C1, C2, R, kbar, len(sources), emp, groups,
                             samples)
    values = np.empty((n1 + n2, len(uniq)), dtype=vdt)
    # rows1 and rows2 are sorted; fill stacked positions chunk by chunk.
    pos_of_row = np.full(int(stacked_rows.max()) + 1 if len(stacked_rows) else 0, -1, dtype=np.int64)
    pos_of_row[stacked_rows] = np.arange(n1 + n2)
    for r0, r1 in lay.row_ranges:
        hi = min(r1, len(pos_of_row))
        if r0 >= hi:
            continue
        pos = pos_of_row[r0:hi]
        keep = pos >= 0
        if not keep.any():
            continue
        tile = ctx.reader.read(r0, r1, uniq)[: hi - r0]
        values[pos[keep]] = tile[keep]
    del pos_of_row
    if not np.all(np.isfinite(values)):
        bad = ~np.all(np.isfinite(values), axis=0)
        raise NonFiniteExpressionError(uniq[bad].tolist(), as_null_source=True)
    clock.lap("null-gene read")
    # Both conditions' permuted values in one array, condition 1's cells first. Each source
    # column serves one null (sources are drawn without replacement whenever there are at
    # most as many nulls as genes): it is permuted in place, and the task holds one array.
    if len(uniq) == len(sources):  # sources are sorted: null i is column i
        y = values
        for i, seed in enumerate(seeds):
            column = y[:, i].copy()  # gather from a contiguous copy, not across the rows
            y[:, i] = column[fdr_mod.null_permutation(n1 + n2, int(seed))]
    else:
        y = np.empty((n1 + n2, len(sources)), dtype=vdt)
        for i, (col, seed) in enumerate(zip(inverse, seeds, strict=True)):
            y[:, i] = values[:, col][fdr_mod.null_permutation(n1 + n2, int(seed))]
    del values
    clock.lap("null-gene read")
    return _null_project(ctx, block, clock, y, Z, X, rows1, rows2, C1, C2, R, kbar, len(sources), emp, groups,
                         samples)


def _null_project(ctx, block, clock, y, Z, X, rows1, rows2, C1, C2, R, kbar, n_sources, emp=None, groups=(),
                  samples=None):
    """Project the permuted null values ``y`` (condition 1's cells first; dense, or CSR
    multiplied sparse) and score them."""
    lay, n1 = ctx.layout, len(rows1)
    sparse = not isinstance(y, np.ndarray)
    moments = _Moments(y.shape[1])  # a permutation keeps each source column's mean and variance
    moments.add(y)
    block = {**block, "moments": moments.result()[:, :n_sources]}
    if samples is not None:
        return _null_sample_scores(ctx, block, clock, y, Z, X, rows1, rows2, C1, C2, R, kbar, n_sources, groups,
                                   *samples, emp=emp)
    accs = []
    for part, rows in ((y[:n1], rows1), (y[n1:], rows2)):
        acc = gp_mod.ProjectionAccumulator(Z, ctx.ls, lay.null_gene_block, lay.kernel_chunk, ctx.dtype)
        (acc.add_sparse if sparse else acc.add)(X, part, rows=rows)
        accs.append(acc)
    clock.lap("null-gene sparse projection" if sparse else "null-gene projection")
    if emp is None:
        del y
        return _null_scores(ctx, block, clock, accs[0], accs[1], C1, C2, R, kbar, n_sources, groups)
    return _null_empirical(ctx, block, clock, y, Z, X, rows1, rows2, accs, C1, C2, R, kbar, n_sources, groups, **emp)


def _null_empirical(ctx, block, clock, y, Z, X, rows1, rows2, accs, C1, C2, R, kbar, n_sources, groups=(), *, Wsq,
                    diagonal, eps, lev_done, lev_new):
    """:func:`_null_scores` with the empirical variance: the null genes' own variance GP, as
    kompot fits it for the null genes it appends to the expression."""
    b1, b2 = accs[0].result(), accs[1].result()
    del accs
    w1, w2, d, _ = gp_mod.block_scores({"C1": C1, "C2": C2, "R": R}, kbar, b1, b2, ctx.sigma, FACTOR_DTYPE)
    del b1, b2
    n1 = len(rows1)
    n = ctx.layout.row_ranges[-1][1] if ctx.layout.row_ranges else 0
    h = _per_cell(n, lev_done, lev_new, "h")
    V, v = _variance_weights(ctx, Z, X, [(0, rows1, y[:n1]), (1, rows2, y[n1:])], h, (w1, w2), (C1, C2), eps)
    del y
    if not bool(diagonal):
        d = gp_mod.empirical_mahalanobis(np.asarray(R).T, np.asarray(Wsq), w2 - w1, v)
    clock.lap("null-gene empirical variance")
    out = {"index": block["index"], "null_ids": block["null_ids"], "mahalanobis": d[:n_sources],
           "moments": block["moments"]}
    if groups:
        out["group_mahalanobis"] = _group_scores(groups, w1, w2, emp=(V, Z, ctx.ls, eps))[0][:, :n_sources]
        clock.lap("null-gene scoring")
    return _null_done(ctx, block, clock, out)


def _sparse_null_values(reader, uniq, inverse, seeds, rows1, rows2):
    """The permuted null values of a sparse element as CSR (stacked cells × nulls, condition
    1's cells first), without a dense array: each source column is gathered once over the
    conditions' cells (column-major), and a null's permutation moves its stored values'
    row indices only — the same values the dense path permutes."""
    import scipy.sparse as sp

    n12 = len(rows1) + len(rows2)
    stacked = np.concatenate([rows1, rows2])
    pos_of_row = np.full(int(stacked.max()) + 1 if n12 else 0, -1, dtype=np.int64)
    pos_of_row[stacked] = np.arange(n12)
    pos, col, val = [], [], []
    for g0, g1 in reader.groups:
        if g0 >= len(pos_of_row):
            break
        piece = reader.piece(g0, g1, uniq).tocoo()
        rows = g0 + piece.row.astype(np.int64)
        p = np.full(len(rows), -1, dtype=np.int64)
        inside = rows < len(pos_of_row)
        p[inside] = pos_of_row[rows[inside]]
        keep = p >= 0
        p = p[keep]
        pos.append(p)
        col.append(piece.col[keep])
        val.append(piece.data[keep])
    del pos_of_row
    pos, col, val = (np.concatenate(a) if a else np.empty(0) for a in (pos, col, val))
    if not np.all(np.isfinite(val)):
        raise NonFiniteExpressionError(np.unique(uniq[col[~np.isfinite(val)]]).tolist(), as_null_source=True)
    src = sp.csc_matrix((val, (pos.astype(np.int64), col.astype(np.int64))), shape=(n12, len(uniq)))
    src.sum_duplicates()
    indptr, indices, data = [0], [], []
    for c, seed in zip(inverse, seeds, strict=True):
        lo, hi = src.indptr[c], src.indptr[c + 1]
        perm = fdr_mod.null_permutation(n12, int(seed))
        new_row = np.empty(n12, dtype=np.int64)
        new_row[perm] = np.arange(n12)  # the value at row perm[j] moves to row j
        indices.append(new_row[src.indices[lo:hi]])
        data.append(src.data[lo:hi])
        indptr.append(indptr[-1] + hi - lo)
    y = sp.csc_matrix((np.concatenate(data) if data else np.empty(0, src.dtype),
                       np.concatenate(indices) if indices else np.empty(0, np.int64), np.asarray(indptr)),
                      shape=(n12, len(inverse)))
    return y.tocsr()


def _null_sample_scores(ctx, block, clock, y, Z, X, rows1, rows2, C1, C2, R, kbar, n_sources, groups,
                        spec: SampleSpec, factor_paths, emp=None):
    """:func:`_null_scores` with the sample variance: the permuted values projected per cell
    group (each condition's cells outside every fitted sample, each sample's cells; a null
    value sits at a cell of the stacked conditions, and belongs to that cell's sample), then
    scored like a gene block (:func:`_sample_models`; ``emp``: with the empirical variance,
    :func:`_sample_empirical` on the same values)."""
    lay, n1 = ctx.layout, len(rows1)
    sparse = not isinstance(y, np.ndarray)
    proj = []
    for j in range(2 + spec.n_samples):
        acc = gp_mod.ProjectionAccumulator(Z, ctx.ls, lay.null_gene_block, lay.kernel_chunk, ctx.dtype)
        for lo, rows in ((0, rows1), (n1, rows2)):
            sel = np.flatnonzero(spec.cell_group[rows] == j)
            if len(sel):
                (acc.add_sparse if sparse else acc.add)(X, y[lo + sel], rows=rows[sel])
        proj.append(acc.result())
        del acc
    clock.lap("null-gene sparse projection" if sparse else "null-gene projection")
    w1, w2, d, _, devs, _, kept = _sample_models(ctx, clock, proj, spec, factor_paths, C1, C2, R, kbar,
                                                 keep=emp is not None)
    V = None
    if emp is not None:
        def pieces(y):
            for lo, rows in ((0, rows1), (n1, rows2)):
                for k in range(spec.n_samples):
                    sel = np.flatnonzero(spec.cell_group[rows] == 2 + k)
                    if len(sel):
                        part = y[lo + sel]
                        yield spec.condition[k] - 1, rows[sel], part.toarray() if sparse else part, kept[k]

        d, V = _sample_empirical(ctx, clock, Z, X, pieces(y), kept, w1, w2, devs, C1, C2, **emp)
    del y
    out = {"index": block["index"], "null_ids": block["null_ids"], "mahalanobis": d[:n_sources],
           "moments": block["moments"]}
    if groups:
        out["group_mahalanobis"] = _group_scores(groups, w1, w2, devs,
                                                 None if emp is None else (V, Z, ctx.ls, emp["eps"]))[0][:, :n_sources]
    clock.lap("null-gene scoring")
    w1 = w2 = devs = V = None
    return _null_done(ctx, block, clock, out)


def _null_done(ctx: BlockContext, block: dict, clock: _Clock, out: dict) -> dict:
    """The end of every null-gene task: its timings, the heap trimmed, its marker written."""
    out["seconds"] = clock.seconds
    trim_heap()
    if ctx.markers:
        io_commit.write_marker(ctx.markers, f"null-{block['index']}",
                               {k: np.asarray(v) for k, v in out.items() if k != "seconds"})
    return out


def _null_scores(ctx, block, clock, acc1, acc2, C1, C2, R, kbar, n_sources, groups=()):
    b1, b2 = acc1.result(), acc2.result()
    factors = {"C1": C1, "C2": C2, "R": R}
    w1, w2, d, _ = gp_mod.block_scores(factors, kbar, b1, b2, ctx.sigma, FACTOR_DTYPE, overwrite=True)
    out = {"index": block["index"], "null_ids": block["null_ids"], "mahalanobis": d[:n_sources],
           "moments": block["moments"]}
    if groups:
        out["group_mahalanobis"] = _group_scores(groups, w1, w2)[0][:, :n_sources]
    clock.lap("null-gene scoring")
    del acc1, acc2, b1, b2, w1, w2
    return _null_done(ctx, block, clock, out)


def _prior_variance_task(rows, Z, X, Lp, ls, kernel_chunk, dtype):
    """‖Lp⁻¹ k_x‖² at the cells ``rows``: the posterior variance's part that needs only the
    landmark factor. It runs while the conditions' grams are summed, so that Lp is freed
    before the metric and the blocks (95 MiB at m = 5,000). Returns the values and the
    task's seconds (the std task counts them as its own)."""
    t0 = time.perf_counter()
    out = np.empty(len(rows))
    for s in range(0, len(rows), kernel_chunk):
        r = rows[s : s + kernel_chunk]
        out[s : s + len(r)] = gp_mod.solved_sq_norms(gp_mod._pad_rows(X[r], kernel_chunk), Z, Lp, ls, dtype,
                                                     piece=_layout.STD_ROWS)[: len(r)]
    trim_heap()
    return out, time.perf_counter() - t0


def _std_task(rows, Z, X, prior, C1, C2, ls, kernel_chunk, eps, dtype, marker=None):
    """Posterior standard deviation of both conditions at the cells ``rows`` (``prior``:
    :func:`_prior_variance_task`'s values at them and its seconds)."""
    t0 = time.perf_counter()
    prior, prior_seconds = prior
    factors = {"C1": C1, "C2": C2}
    out1 = np.empty(len(rows))
    out2 = np.empty(len(rows))
    for s in range(0, len(rows), kernel_chunk):
        r = rows[s : s + kernel_chunk]
        pr = gp_mod._pad_rows(prior[s : s + len(r)], kernel_chunk)
        v1, v2 = gp_mod.posterior_variances(gp_mod._pad_rows(X[r], kernel_chunk), Z, factors, ls, dtype,
                                            piece=_layout.STD_ROWS, prior=pr)
        out1[s : s + len(r)] = v1[: len(r)]
        out2[s : s + len(r)] = v2[: len(r)]
    trim_heap()
    result = rows, np.sqrt(out1 + eps), np.sqrt(out2 + eps), np.float64(time.perf_counter() - t0 + prior_seconds)
    if marker is not None:
        io_commit.write_marker(marker[0], marker[1], dict(zip(("rows", "std1", "std2", "seconds"), result,
                                                              strict=True)))
    return result


def _length_scale_task(X1, ls_factor, neighbors="pynndescent", sample=None, random_state=None):
    if neighbors == "exact":
        nn = gp_mod.sampled_nearest_distances(X1, sample, random_state)
        return gp_mod.length_scale_from_distances(nn, ls_factor)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numba: "cannot cache nn_descent" — known, harmless
        nn = gp_mod.nearest_neighbour_distances(X1)
    return gp_mod.length_scale_from_distances(nn, ls_factor)


# --------------------------------------------------------------------------------------
# Client-side orchestration


def _running_keys(keys, dask_worker=None):
    tasks = dask_worker.state.tasks
    return [k for k in keys if k in tasks and tasks[k].state in ("executing", "cancelled", "resumed", "long-running")]


def _drain_writers(client: Client, keys: list[str], timeout: float = 120.0) -> None:
    """After cancelling, wait until no worker still holds a block task of this run (the
    scheduler forgets cancelled tasks at once, workers finish the running ones), so that
    no late tile write lands in a staged layer after it has been removed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            still = client.run(_running_keys, keys)
        except Exception:  # workers gone: nothing is running any more
            return
        if not any(still.values()):
            return
        time.sleep(0.2)
    logger.warning("Block tasks still running after %.0f s; staged layers may need cleanup", timeout)


def _prepare_in_subprocesses(X1, pooled, *, ls, ls_factor, landmarks, given, random_state, nn):
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor

    # The helpers end themselves when this process dies (see _exit_with_parent): a killed
    # client must not leave a ~350 MiB k-means process behind.
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_exit_with_parent, initargs=(os.getpid(),)) as pool:
        ls_f = pool.submit(_length_scale_task, X1, ls_factor, *nn) if ls is None else None
        Z = _landmark_array(landmarks, given, pooled, random_state, lambda *args: pool.submit(*args).result())
        if ls_f is not None:
            ls = float(ls_f.result())
    return float(ls), np.asarray(Z, dtype=np.float64), landmarks.source.value


def _landmark_array(landmarks: Landmarks, given: np.ndarray | None, pooled: np.ndarray,
                    random_state: int | None, run_kmeans, sample: int | None = None) -> np.ndarray:
    """The landmarks :func:`kompot_dask._layout.landmarks_for` decided on: the given ones,
    every cell, or k-means centroids (of ``sample`` cells at most) computed by
    ``run_kmeans(fn, *args)``."""
    if landmarks.source is LandmarkSource.PROVIDED:
        return given
    if landmarks.source is LandmarkSource.ALL_CELLS:
        return gp_mod.compute_landmarks(pooled, landmarks.requested, random_state)
    return run_kmeans(gp_mod.compute_landmarks, pooled, landmarks.count, random_state, sample)


def prepare_model(
    client: Client, X1: np.ndarray | RowSubset, pooled: np.ndarray | RowSubset, *, ls: float | None, ls_factor: float,
    landmarks: Landmarks, given: np.ndarray | None, random_state: int | None,
    neighbors: str = "pynndescent", neighbor_sample: int | None = None, landmark_sample: int | None = None,
) -> tuple[float, np.ndarray, str]:
    """Length scale and landmarks.

    ``landmarks`` says how many and where they come from (``given``: the user's array).
    Where they run is :func:`kompot_dask._layout.prep_in_client`'s decision:

    - the fast path (exact neighbours of a sample, k-means of a sample) runs here, in the
      client: bounded memory, no compiled code, nothing to start;
    - pynndescent compiles numba code (~20 s, ~300 MB of compiled code and k-means buffers
      that stay in the process) the first time a process runs it. On a long-lived cluster
      it runs on a pinned worker, which then pays that once. For an embedded, single-run
      cluster it runs in short-lived helper processes instead, so the workers start the
      factor phase without that memory.
    """
    from .._layout import prep_in_client

    nn = (neighbors, neighbor_sample, random_state)
    if prep_in_client(neighbors, landmark_sample, pooled.shape[0], landmarks.source):
        # the workers wait meanwhile: every core of the client's process
        with client_cores(openmp_libraries=landmarks.source is LandmarkSource.KMEANS):
            if ls is None:
                ls = _length_scale_task(X1, ls_factor, *nn)
            Z = _landmark_array(landmarks, given, pooled, random_state, lambda fn, *args: fn(*args), landmark_sample)
        return float(ls), np.asarray(Z, dtype=np.float64), landmarks.source.value
    # kompot's exact path needs its cells whole (pynndescent's index, k-means of every cell)
    X1, pooled = np.asarray(X1), np.asarray(pooled, dtype=np.float64)
    if is_embedded(client) and unguarded_script() is None:  # helpers would re-run an unguarded script
        return _prepare_in_subprocesses(X1, pooled, ls=ls, ls_factor=ls_factor, landmarks=landmarks,
                                        given=given, random_state=random_state, nn=nn)
    ls_f = None
    if ls is None:
        # Always the same worker, so that a long-lived cluster compiles pynndescent once.
        first = sorted(cluster_workers(client))[:1]
        ls_f = client.submit(_length_scale_task, X1, ls_factor, *nn, pure=False, workers=first,
                             allow_other_workers=True)

    def kmeans_on_a_worker(fn, *args):
        # On another worker than the length-scale search, so the two overlap.
        others = sorted(cluster_workers(client))[1:2]
        placement = {"workers": others, "allow_other_workers": True} if others else {}
        return client.submit(fn, *args, pure=False, **placement).result()

    Z = _landmark_array(landmarks, given, pooled, random_state, kmeans_on_a_worker, landmark_sample)
    if ls_f is not None:
        ls = float(ls_f.result())
    return float(ls), np.asarray(Z, dtype=np.float64), landmarks.source.value


def _sum_parts(rows: np.ndarray) -> list[np.ndarray]:
    """Kernel-sum tasks of a mean kernel row (:data:`kompot_dask._layout.KERNEL_SUM_ROWS`)."""
    return np.array_split(rows, _layout.kernel_sum_parts(len(rows)))


_FIT_PRIORITY = 10
"""Dask priority of the fit's critical path (higher runs first; std tasks have 1, blocks 0)."""


def _submit_fit(client: Client, Z_f, X_f, rows1, rows2, pred_rows, *, ls: float, sigma: float, eps: float,
                kernel_chunk: int, n_workers: int, n_threads: int, allow_diagonal: bool = True,
                empirical: bool = False, covariance: bool = False) -> tuple[dict, list]:
    """The fit as tasks: futures of :data:`FIT_OUTPUTS` by name, and every fit future the
    run waits on (``empirical``: also :data:`EMPIRICAL_OUTPUTS`; ``covariance``: also Σ₁ + Σ₂
    + eps·I at the landmarks, for the per-gene Cholesky of the sample variance with the
    empirical variance). The metric is a :class:`~kompot_dask._numerics.gp.KernelMetric`
    unless the empirical or the sample variance (``allow_diagonal`` False) needs R dense."""
    kc = kernel_chunk
    # Priorities follow the critical path S → C → metric → blocks: the metric's chain of
    # m × m solves is the longest single step, so everything it needs goes first and the
    # per-cell std tasks (which need no metric) fill the other threads meanwhile. (A metric
    # with two BLAS threads and the std tasks after it measured slower: OpenBLAS does not
    # regain its speed after threadpoolctl lowered and raised its thread count.)
    hi = {"pure": False, "priority": _FIT_PRIORITY}
    logger.info("Fitting expression estimator for condition 1...")
    parts = fit_parts(n_workers)
    s1 = [client.submit(_cross_gram_task, Z_f, X_f, r, ls, kc, FACTOR_DTYPE, **hi)
          for r in np.array_split(rows1, parts)]
    logger.info("Fitting expression estimator for condition 2...")
    s2 = [client.submit(_cross_gram_task, Z_f, X_f, r, ls, kc, FACTOR_DTYPE, **hi)
          for r in np.array_split(rows2, parts)]
    # kbar: off the critical path, but ahead of the std tasks (the blocks need it)
    ks = [client.submit(_kernel_sum_task, Z_f, X_f, r, ls, kc, FACTOR_DTYPE, pure=False, priority=2)
          for r in _sum_parts(pred_rows)]
    kbar_f = client.submit(_mean_task, ks, len(pred_rows), pure=False, priority=2)
    # The m × m factors as a small graph of their own, so that the two conditions are
    # factorised on different workers; workers fetch each factor once.
    # Lp and the part of the metric that needs only Lp go first: the metric then starts
    # once the conditions' factors exist, with a shorter chain of its own.
    first = {"pure": False, "priority": _FIT_PRIORITY + 1}
    Lp_f = client.submit(_named_factor, "Lp", gp_mod.landmark_cholesky, Z_f, ls, FACTOR_DTYPE, **first)
    prior_f = client.submit(gp_mod.prior_covariance, Z_f, ls, Lp_f, FACTOR_DTYPE, **first)
    C1_f = client.submit(_condition_factor_task, "C1", Z_f, ls, s1, sigma, FACTOR_DTYPE, **hi)
    C2_f = client.submit(_condition_factor_task, "C2", Z_f, ls, s2, sigma, FACTOR_DTYPE, **hi)
    metric_f = client.submit(gp_mod.landmark_metric, Z_f, ls, None, C1_f, C2_f, eps, FACTOR_DTYPE, allow_diagonal,
                             empirical, prior=prior_f, implicit=allow_diagonal and not empirical, **hi)
    R_f = client.submit(operator.getitem, metric_f, 0, **hi)
    diag_f = client.submit(operator.getitem, metric_f, 1, **hi)
    fit = dict(zip(FIT_OUTPUTS, (Lp_f, C1_f, C2_f, R_f, kbar_f, diag_f), strict=True))
    extra = []
    if empirical:
        fit["Wsq"] = client.submit(operator.getitem, metric_f, 2, **hi)
        fit["M1"] = client.submit(gp_mod.leverage_factor, C1_f, sigma, FACTOR_DTYPE, **hi)
        fit["M2"] = client.submit(gp_mod.leverage_factor, C2_f, sigma, FACTOR_DTYPE, **hi)
        extra = [fit[k] for k in EMPIRICAL_OUTPUTS]
    if covariance:
        fit["Sigma"] = client.submit(gp_mod.landmark_covariance, Z_f, ls, Lp_f, C1_f, C2_f, eps, FACTOR_DTYPE, **hi)
        extra.append(fit["Sigma"])
    return fit, [*s1, *s2, *ks, kbar_f, Lp_f, prior_f, C1_f, C2_f, metric_f, R_f, diag_f, *extra]


def _submit_permuted_fit(client: Client, p: int, Z_f, X_f, rows1, rows2, Lp_f, fit_dir: str, *, ls: float,
                         sigma: float, eps: float, kernel_chunk: int, n_workers: int,
                         allow_diagonal: bool = True) -> tuple[dict, list]:
    """The fit to permutation ``p``'s condition labels (FDRSettings(mode="calibrated")): both
    conditions' factors and the metric as futures, by role (``C1``, ``C2``, ``R``; loaded
    from ``fit_dir`` when a resumed run finds them there), and the tasks that make them.
    The landmark factor and the mean kernel row are the run's own: they do not depend on
    the labels. (``allow_diagonal``: False with the sample variance, whose low-rank
    distances need the full metric.)"""
    names = permuted_outputs(p)
    saved = io_commit.saved_arrays(fit_dir, names)
    if saved is not None:
        fit = {role: client.submit(_load_factor_task, saved[n], pure=False) for role, n in zip(("C1", "C2"), names[:2],
                                                                                              strict=True)}
        fit["R"] = client.submit(_load_metric_task, saved[names[2]], Z_f, ls, pure=False)
        return fit, list(fit.values())
    hi = {"pure": False, "priority": _FIT_PRIORITY}
    logger.info("Fitting both conditions' estimators to permutation %d of the labels (calibrated FDR)...", p + 1)
    parts = fit_parts(n_workers)
    s1 = [client.submit(_cross_gram_task, Z_f, X_f, r, ls, kernel_chunk, FACTOR_DTYPE, **hi)
          for r in np.array_split(rows1, parts)]
    s2 = [client.submit(_cross_gram_task, Z_f, X_f, r, ls, kernel_chunk, FACTOR_DTYPE, **hi)
          for r in np.array_split(rows2, parts)]
    C1_f = client.submit(_condition_factor_task, "C1", Z_f, ls, s1, sigma, FACTOR_DTYPE, **hi)
    C2_f = client.submit(_condition_factor_task, "C2", Z_f, ls, s2, sigma, FACTOR_DTYPE, **hi)
    metric_f = client.submit(gp_mod.landmark_metric, Z_f, ls, Lp_f, C1_f, C2_f, eps, FACTOR_DTYPE, allow_diagonal,
                             False, implicit=allow_diagonal, **hi)
    R_f = client.submit(operator.getitem, metric_f, 0, **hi)
    fit = {"C1": C1_f, "C2": C2_f, "R": R_f}
    saves = _save_fit(client, dict(zip(names, (C1_f, C2_f, R_f), strict=True)), fit_dir)
    return fit, [*s1, *s2, C1_f, C2_f, metric_f, R_f, *saves]


def _submit_sample_fits(client: Client, spec: SampleSpec, Z_f, X_f, fit_dir: str, *, ls: float, sigma: float,
                        kernel_chunk: int) -> tuple[list, list]:
    """Each fitted sample's factor, saved in ``fit_dir`` (reused as it is by a resumed run):
    its paths (futures for the factors still to fit) and the tasks that fit them."""
    paths, tasks = [], []
    for k, label in enumerate(spec.labels):
        path = os.path.join(fit_dir, f"sample-{k}.npy")
        if os.path.isfile(path):
            paths.append(path)
            continue
        rows = spec.rows(k)
        parts = [client.submit(_cross_gram_task, Z_f, X_f, r, ls, kernel_chunk, FACTOR_DTYPE, pure=False,
                               priority=_FIT_PRIORITY - 1)
                 for r in np.array_split(rows, max(1, -(-len(rows) // _layout.SAMPLE_GRAM_ROWS)))]
        fut = client.submit(_sample_factor_task, f"sample {label}", Z_f, ls, parts, sigma, FACTOR_DTYPE, path,
                            pure=False, priority=_FIT_PRIORITY - 1)
        paths.append(fut)
        tasks += [*parts, fut]
    n_new = sum(not isinstance(p, str) for p in paths)
    if n_new:
        logger.info("Fitting %d sample model(s) for the sample variance...", n_new)
    return paths, tasks


def _submit_group_fits(client: Client, spec: GroupSpec, Z_f, X_f, fit: dict, fit_dir: str, *, ls: float,
                       eps: float, kernel_chunk: int, allow_diagonal: bool, empirical: bool = False,
                       covariance: bool = False) -> tuple[list, list]:
    """Each subset's factor and mean kernel row (:func:`_group_metric_task`), or what a
    resumed run finds of them in ``fit_dir``: their results (futures for those still to
    compute) and the tasks that compute them."""
    refs, tasks = [], []
    for i, rows in enumerate(spec.rows):
        paths = _group_paths(fit_dir, i, empirical, covariance)
        if all(os.path.isfile(p) for p in paths.values()):
            refs.append(_group_ref(paths, bool(io_commit.read_array(paths["diagonal"]))))
            continue
        ks = [client.submit(_kernel_sum_task, Z_f, X_f, r, ls, kernel_chunk, FACTOR_DTYPE, pure=False, priority=2)
              for r in _sum_parts(rows)]
        fut = client.submit(_group_metric_task, i, Z_f, ls, fit["Lp"], fit["C1"], fit["C2"], eps, allow_diagonal,
                            spec.points[i], ks, len(rows), fit_dir, empirical, covariance, pure=False,
                            priority=_FIT_PRIORITY - 1)
        refs.append(fut)
        tasks += [*ks, fut]
    n_new = sum(not isinstance(r, dict) for r in refs)
    if n_new:
        logger.info("Preparing the Mahalanobis covariance of %d group(s)...", n_new)
    return refs, tasks


POSTERIOR_COVARIANCE_CHUNK = 1024
"""Rows and columns per chunk of the stored posterior covariance (8 MB of float64)."""


def _posterior_covariance_task(Z, X, rows, n, ls, Lp, C1, C2, path, marker=None):
    """kompot's ``store_posterior_covariance`` matrix: Σ₁ + Σ₂ between the predicted cells
    ``rows``, written into the staged ``n`` × ``n`` array ``path`` (zero elsewhere) a band of
    rows at a time; the planner has checked that one worker holds it."""
    cov = gp_mod.posterior_covariance(X[rows], Z, ls, Lp, C1, C2, FACTOR_DTYPE)
    pos = np.full(n, -1, dtype=np.int64)
    pos[rows] = np.arange(len(rows))
    step = POSTERIOR_COVARIANCE_CHUNK
    for r0 in range(0, n, step):
        r1 = min(r0 + step, n)
        sel = pos[r0:r1]
        keep = np.flatnonzero(sel >= 0)
        if not len(keep):
            continue  # all zero: the fill value
        band = np.zeros((r1 - r0, n), dtype=np.float64)
        band[np.ix_(keep, rows)] = cov[sel[keep]]
        write_tile(path, "", r0, r1, 0, n, band)
    del cov
    trim_heap()
    if marker is not None:
        io_commit.write_marker(marker[0], marker[1], {"rows": np.asarray(rows)})
    return {"posterior_covariance": path}


def _save_fit(client: Client, fit: dict, fit_dir: str) -> list:
    """Side-effect tasks that keep each fit output in ``fit_dir``, each on the worker that
    holds it. Ahead of the blocks: a run interrupted after them resumes without fitting."""
    paths = io_commit.array_paths(fit_dir, tuple(fit))
    return [client.submit(_save_fit_task, paths[name], fit[name], pure=False, priority=2) for name in fit]


def _load_fit(client: Client, paths: dict[str, str], Z_f, ls: float) -> tuple[dict, list]:
    """The saved fit as tasks that read it on the workers: tasks, not scattered data, so
    that the scheduler can load a factor again when the worker holding it dies."""
    factors = [n for n in ("Lp", "C1", "C2", "M1", "M2") if n in paths]
    fit = {name: client.submit(_load_factor_task, paths[name], pure=False) for name in factors}
    fit["R"] = client.submit(_load_metric_task, paths["R"], Z_f, ls, pure=False)
    for name in ("kbar", "Wsq", "Sigma"):
        if name in paths:
            fit[name] = client.submit(_load_array_task, paths[name], pure=False)
    setup = list(fit.values())
    fit["diagonal"] = client.submit(_load_array_task, paths["diagonal"], pure=False)
    return fit, setup


@dataclass
class EngineResult:
    """What the workers computed, gathered on the client (all small: genes or cells long)."""

    columns: np.ndarray
    mahalanobis: np.ndarray
    mean_lfc: np.ndarray
    null_mahalanobis: np.ndarray
    std1: np.ndarray
    std2: np.ndarray
    staged: dict[str, str]
    layout: Layout
    n_tasks: int
    n_reused: int = 0
    thread_seconds: dict[str, float] = field(default_factory=dict)
    """Thread-seconds the tasks spent per phase (tile read, projection, scoring, ...)."""
    wall_seconds: dict[str, float] = field(default_factory=dict)
    """Wall time of the engine's stages seen from the client (the fit, all tasks)."""
    group_mahalanobis: np.ndarray | None = None
    """Per subset (``FilterSettings(groups=...)``): distances, subsets × tested genes."""
    group_mean_lfc: np.ndarray | None = None
    group_null_mahalanobis: np.ndarray | None = None
    """Per subset: the null genes' distances, subsets × null genes."""
    staged_obsp: dict[str, str] = field(default_factory=dict)
    """obsp name → staged matrix (``store_posterior_covariance``)."""
    moments: np.ndarray | None = None
    """Each tested gene's mean and variance over both conditions' cells (2 × tested genes)."""
    null_moments: np.ndarray | None = None
    """The same of each null gene's source column (2 × null genes)."""
    permuted_mahalanobis: np.ndarray | None = None
    """FDRSettings(mode="calibrated"): each tested gene's distance under each permutation of
    the labels (permutations × tested genes)."""


def run_engine(
    client: Client,
    store: Store,
    info: LayerInfo,
    *,
    X: np.ndarray | EmbeddingReader,
    codes: np.ndarray,
    pred: np.ndarray,
    selected: np.ndarray,
    Z: np.ndarray,
    ls: float,
    sigma: float,
    eps: float,
    null_sources: np.ndarray,
    null_seeds: np.ndarray,
    layer_names: dict[str, str] | None,
    layer_dtype: str,
    dtype: str,
    layout: Layout,
    progress: bool,
    staging: io_commit.Staging,
    samples: SampleSpec | None = None,
    need_std: bool = True,
    empirical: bool = False,
    groups: GroupSpec | None = None,
    posterior_covariance: str | None = None,
    permuted_codes: np.ndarray | None = None,
    permuted_samples: np.ndarray | None = None,
    null_expression: tuple | None = None,
) -> EngineResult:
    """Run the distributed part of a DE run.

    Layers are written into ``staging``; every finished task leaves a marker there, and the
    tasks whose markers exist (a resumed run) are not run again. On failure the staging is
    left to the caller, which keeps it for a resume or discards it.
    """
    n_obs, n_vars = info.shape
    rows1 = np.flatnonzero(codes == 1)
    rows2 = np.flatnonzero(codes == 2)
    workers = cluster_workers(client)
    n_workers = max(1, len(workers))
    n_threads = max(1, sum(int(w.get("nthreads", 1)) for w in workers.values()))
    real_blocks = _layout.real_blocks(layout, n_vars, selected)
    # Null blocks: nulls sorted by source column so each block reads a narrow column range.
    order = np.argsort(null_sources, kind="stable")
    null_blocks = []
    for b, s in enumerate(range(0, len(order), layout.null_gene_block)):
        ids = order[s : s + layout.null_gene_block]
        null_blocks.append({"index": b, "null_ids": ids, "sources": null_sources[ids], "seeds": null_seeds[ids]})
    n_null = len(null_sources)
    if null_expression is not None:  # given null columns, after the null genes
        e1, e2 = null_expression
        for c0 in range(0, e1.shape[1], layout.null_gene_block):
            c1 = min(c0 + layout.null_gene_block, e1.shape[1])
            null_blocks.append({"index": len(null_blocks), "null_ids": n_null + np.arange(c0, c1),
                                "external": ExternalNullValues(e1[:, c0:c1], e2[:, c0:c1], c0)})
        n_null += e1.shape[1]

    staged: dict[str, str] = {}
    if layer_names:
        for role, name in layer_names.items():
            chunks, shards = _layout.output_chunks(layout, n_obs, np.dtype(layer_dtype).itemsize, store.zarr_format)
            staged[role] = staging.create_layer(name, (n_obs, n_vars), chunks, layer_dtype, shards=shards)
    if posterior_covariance:  # obsp: cells × cells, zero outside the predicted cells
        step = POSTERIOR_COVARIANCE_CHUNK
        staged_obsp = {posterior_covariance: staging.create_layer(
            posterior_covariance, (n_obs, n_obs), (min(step, n_obs), min(step, n_obs)), "float64",
            location="obsp", fill_value=0.0)}
    else:
        staged_obsp = {}
    markers = staging.sub("markers")
    done = io_commit.read_markers(markers)
    # a block marker from before the per-gene moments were recorded: that block runs again
    done = {k: v for k, v in done.items() if not k.startswith(("real-", "null-")) or "moments" in v}
    if permuted_codes is not None:  # a block of a run without the permuted labels' distances
        done = {k: v for k, v in done.items() if not k.startswith("real-") or "permuted_mahalanobis" in v}
    pred_rows = np.flatnonzero(pred)
    std_parts = list(enumerate(_layout.std_parts(layout, pred_rows))) if need_std else []
    real_out = [done[f"real-{b['index']}"] for b in real_blocks if f"real-{b['index']}" in done]
    null_out = [done[f"null-{b['index']}"] for b in null_blocks if f"null-{b['index']}" in done]
    std_out = [tuple(done[f"stdk-{i}"][k] for k in ("rows", "std1", "std2")) + (0.0,)
               for i, _ in std_parts if f"stdk-{i}" in done]
    # with sample or empirical variance the block tasks write the z-scores themselves
    own_z = samples is not None or empirical
    z_blocks = list(real_blocks) if "fold_change_zscores" in staged and not own_z else []
    # the empirical variance's leverages: per condition, or (sample_col) per sample, each
    # cell's under its own sample's model
    sample_emp = empirical and samples is not None
    lev_parts = ([(c, i, r) for c, rows in ((1, rows1), (2, rows2))
                  for i, r in enumerate(_layout.std_parts(layout, rows))] if empirical and not sample_emp else [])
    lev_done = [done[f"lev{c}-{i}"] for c, i, _ in lev_parts if f"lev{c}-{i}" in done]
    lev_parts = [(c, i, r) for c, i, r in lev_parts if f"lev{c}-{i}" not in done]
    sample_lev = list(range(samples.n_samples)) if sample_emp else []
    lev_done += [done[f"levs-{k}"] for k in sample_lev if f"levs-{k}" in done]
    sample_lev = [k for k in sample_lev if f"levs-{k}" not in done]
    cov_todo = bool(staged_obsp) and "postcov" not in done
    n_all = len(real_blocks) + len(null_blocks) + len(std_parts) + len(z_blocks) + bool(staged_obsp)
    z_blocks = [b for b in z_blocks if f"z-{b['index']}" not in done]
    real_blocks = [b for b in real_blocks if f"real-{b['index']}" not in done]
    null_blocks = [b for b in null_blocks if f"null-{b['index']}" not in done]
    std_parts = [(i, r) for i, r in std_parts if f"stdk-{i}" not in done]
    std_done = list(std_out)  # before this run's std results join them
    n_reused = n_all - len(real_blocks) - len(null_blocks) - len(std_parts) - len(z_blocks) - cov_todo
    if n_reused:
        logger.info("Resuming: %d of %d tasks finished before the interruption are reused "
                    "(%d gene blocks, %d null-gene blocks, %d std tasks)", n_reused, n_all,
                    len(real_out), len(null_out), len(std_out))
    n_groups = 0 if groups is None else groups.n_groups
    if n_reused == n_all:
        out = _gather(real_out, null_out, std_out, n_null, n_obs, staged, layout, 0, n_reused, n_groups)
        out.staged_obsp = staged_obsp
        return out
    futures: list = []
    pending = None
    run_token = uuid.uuid4().hex[:12]
    block_keys = [f"kompot-real-block-{run_token}-{b['index']}" for b in real_blocks]
    try:
        rows = _layout.shard_rows(layout.cell_chunk, layout.gene_block, np.dtype(layer_dtype).itemsize, n_obs,
                                  store.zarr_format)
        reader = store.tile_reader(info)
        transposing: list = []
        if _layout.transposes(info.kind, len(real_blocks) + len(null_blocks)):
            # A CSR element is read once, into column-major row groups, instead of once
            # per gene block (TransposedReader); every block task waits for it.
            row_groups = _layout.transpose_groups(layout, n_obs, info.nnz)
            tdir = staging.sub("transposed")
            source, reader = reader, TransposedReader(tdir, info, row_groups)
            transposing = [client.submit(transpose_group, source.store_path, info, g, g0, g1, tdir, pure=False,
                                         key=f"kompot-transpose-{run_token}-{g}")
                           for g, (g0, g1) in enumerate(row_groups)]
        block_layers = {r: p for r, p in staged.items() if r != "fold_change_zscores" or own_z}
        ctx = BlockContext(reader, layout, ls, sigma, dtype, layer_dtype, block_layers, markers, rows)
        # Tasks that hold their data rather than scattered data: the scheduler can run them
        # again on a restarted worker, while scattered data dies with its workers.
        # A stored embedding travels as its reader (each task reads the rows it needs); an
        # in-memory one as one input task.
        inputs = {"Z": Z, "codes": codes, "pred": pred, "rows1": rows1, "rows2": rows2}
        if isinstance(X, np.ndarray):
            inputs["X"] = X
        futs = dict(zip(inputs, _input_futures(client, run_token, **inputs), strict=True))
        Z_f, codes_f, pred_f, rows1_f, rows2_f = (futs[k] for k in ("Z", "codes", "pred", "rows1", "rows2"))
        X_f = futs.get("X", X)
        kc = layout.kernel_chunk

        fit_dir = staging.sub("fit")
        fit_names = FIT_OUTPUTS + (("Sigma",) if sample_emp else EMPIRICAL_OUTPUTS if empirical else ())
        saved = io_commit.saved_arrays(fit_dir, fit_names)
        if saved is not None:
            logger.info("Resuming: the fit of the interrupted run is reused")
            fit, setup = _load_fit(client, saved, Z_f, ls)
        else:
            fit, setup = _submit_fit(client, Z_f, X_f, rows1, rows2, pred_rows, ls=ls, sigma=sigma, eps=eps,
                                     kernel_chunk=kc, n_workers=n_workers, n_threads=n_threads,
                                     allow_diagonal=samples is None, empirical=empirical and not sample_emp,
                                     covariance=sample_emp)
            setup += _save_fit(client, fit, fit_dir)
        Lp_f, C1_f, C2_f, R_f, kbar_f, diag_f = (fit[k] for k in FIT_OUTPUTS)
        if samples is not None:
            sample_paths, sample_setup = _submit_sample_fits(client, samples, Z_f, X_f, fit_dir, ls=ls, sigma=sigma,
                                                             kernel_chunk=kc)
            setup += sample_setup
            group_f = _input_futures(client, run_token, cell_group=samples.cell_group)[0]
        permuted = None
        if permuted_codes is not None:
            pfits = []
            for p, pc in enumerate(np.atleast_2d(permuted_codes)):
                pfit, perm_setup = _submit_permuted_fit(
                    client, p, Z_f, X_f, np.flatnonzero(pc == 1), np.flatnonzero(pc == 2), Lp_f, fit_dir, ls=ls,
                    sigma=sigma, eps=eps, kernel_chunk=kc, n_workers=n_workers, allow_diagonal=samples is None)
                pfits.append(pfit)
                setup += perm_setup
            if samples is None:
                permuted = {"codes": _input_futures(client, run_token,
                                                    permuted_codes=np.atleast_2d(permuted_codes))[0],
                            "factors": pfits}
            else:  # the relabelled conditions are sums of the samples' projections
                permuted = {"samples": np.atleast_2d(permuted_samples), "factors": pfits}
        group_refs: list = []
        if groups is not None:
            group_refs, group_setup = _submit_group_fits(
                client, groups, Z_f, X_f, fit, fit_dir, ls=ls, eps=eps, kernel_chunk=kc,
                allow_diagonal=samples is None, empirical=empirical and not sample_emp, covariance=sample_emp)
            setup += group_setup

        if cov_todo:
            setup.append(client.submit(_posterior_covariance_task, Z_f, X_f, pred_rows, n_obs, ls, Lp_f, C1_f, C2_f,
                                       staged_obsp[posterior_covariance], (markers, "postcov"), pure=False,
                                       priority=1))
        std_futures = []
        # The std tasks' Lp part goes first, beside the conditions' grams (after the fit's
        # own tasks), and the rest ahead of the blocks: Lp is freed before the metric runs.
        # Both kinds are loosely restricted to the cluster's workers, which only keeps the
        # scheduler from taking them for root tasks: it holds a large group with few
        # dependencies in its own queue and sends it on only to workers with a free slot,
        # and the gene blocks, sent as soon as the metric exists, took the slots (measured at
        # 10k × 2k: three std tasks ran after the last null block, and Lp stayed in memory
        # until then).
        loose = {"workers": sorted(cluster_workers(client)), "allow_other_workers": True}
        for i, r in std_parts:
            setup.append(client.submit(_prior_variance_task, r, Z_f, X_f, Lp_f, ls, kc, FACTOR_DTYPE, pure=False,
                                       priority=_FIT_PRIORITY - 1, **loose))
            std_futures.append(client.submit(_std_task, r, Z_f, X_f, setup[-1], C1_f, C2_f, ls, kc, eps,
                                             FACTOR_DTYPE, (markers, f"stdk-{i}"), pure=False, priority=1, **loose))
        lev_futures = [client.submit(_leverage_task, r, Z_f, X_f, fit[f"M{c}"], ls, kc, FACTOR_DTYPE,
                                     (markers, f"lev{c}-{i}"), pure=False, priority=1) for c, i, r in lev_parts]
        lev_futures += [client.submit(_sample_leverage_task, sample_paths[k], samples.rows(k), Z_f, X_f, ls, sigma, kc,
                                      FACTOR_DTYPE, (markers, f"levs-{k}"), pure=False, priority=1)
                        for k in sample_lev]
        first_block = min((b["index"] for b in _layout.real_blocks(layout, n_vars, selected)), default=-1)
        if sample_emp:
            emp = dict(Sigma=fit["Sigma"], eps=eps, lev_done=lev_done, lev_new=lev_futures)
        elif empirical:
            emp = dict(Wsq=fit["Wsq"], diagonal=diag_f, eps=eps, lev_done=lev_done, lev_new=lev_futures)
        else:
            emp = None
        real_futures = {}
        for blk in real_blocks:
            key = f"kompot-real-block-{run_token}-{blk['index']}"
            if empirical and not sample_emp:
                with_std = bool(block_layers) and "fold_change_zscores" in block_layers
                real_futures[blk["index"]] = client.submit(
                    _empirical_block_task, ctx, blk, Z_f, X_f, codes_f, pred_f, C1_f, C2_f, R_f, kbar_f, fit["Wsq"],
                    diag_f, eps, lev_done, lev_futures, [t[:3] for t in std_done] if with_std else [],
                    std_futures if with_std else [], blk["index"] == first_block, transposing, groups=group_refs,
                    pure=False, key=key,
                )
            elif samples is None:
                real_futures[blk["index"]] = client.submit(
                    _real_block_task, ctx, blk, Z_f, X_f, codes_f, pred_f, C1_f, C2_f, R_f, kbar_f, transposing,
                    groups=group_refs, permuted=permuted, pure=False, key=key,
                )
            else:
                with_std = bool(block_layers)  # the std layers need every cell's posterior variance
                real_futures[blk["index"]] = client.submit(
                    _sample_block_task, ctx, blk, Z_f, X_f, group_f, pred_f, C1_f, C2_f, R_f, kbar_f, samples,
                    sample_paths, eps, [t[:3] for t in std_done] if with_std else [],
                    std_futures if with_std else [], transposing, groups=group_refs, permuted=permuted, emp=emp,
                    pure=False, key=key,
                )
            futures.append(real_futures[blk["index"]])
        for blk in null_blocks:
            # After the gene blocks, which take longer: the shorter tasks last keep both
            # threads busy to the end (measured at 10k × 2k: a gene block left to run alone
            # while the other thread had nothing left idled it for 5.5 s)
            futures.append(client.submit(
                _null_block_task, ctx, blk, Z_f, X_f, rows1_f, rows2_f, C1_f, C2_f, R_f, kbar_f, transposing, emp,
                groups=group_refs, samples=None if samples is None else (samples, sample_paths), pure=False,
                key=f"kompot-null-block-{run_token}-{blk['index']}", priority=-1,
            ))
        futures += lev_futures
        del lev_futures, emp
        futures += std_futures
        for blk in z_blocks:
            # fold change / its posterior std, once the block's tiles and every cell's std exist
            futures.append(client.submit(
                _zscore_task, ctx, blk, staged["fold_change"], staged["fold_change_zscores"], eps,
                [t[:3] for t in std_done], std_futures, real_futures.get(blk["index"]),
                pure=False, key=f"kompot-zscore-{run_token}-{blk['index']}",
            ))
        del real_futures, std_futures
        setup += transposing
        del transposing
        n_tasks = len(futures) + len(setup)
        outputs = {f.key for f in futures}
        pending = as_completed(setup + futures, loop=client.loop)
        # Only the iterator holds the futures now: each intermediate (S partials, factors,
        # input arrays) is freed on the workers as soon as its last dependent finishes.
        del fit, Lp_f, C1_f, C2_f, R_f, kbar_f, setup
        del X_f, Z_f, codes_f, pred_f, rows1_f, rows2_f, futs
        if samples is not None:
            del group_f, sample_paths, sample_setup
        del group_refs
        futures = []
        diagonal = False
        t_tasks = time.perf_counter()
        walls: dict[str, float] = {}
        with progress_bar(n_tasks, "kompot_dask", "task", progress) as bar:
            for fut, res in _completed(client, pending, outputs | {diag_f.key}):
                if fut.key == diag_f.key:
                    # gathered inside the loop that watches for lost workers: fetched after
                    # it, a flag whose worker had gone would wait for a worker forever
                    diagonal = bool(res)
                    walls["fit"] = round(time.perf_counter() - t_tasks, 3)
                elif fut.key in outputs:
                    if isinstance(res, tuple):
                        std_out.append(res)
                    elif "leverage_rows" in res:
                        pass  # used by the block tasks only
                    elif "zscore" in res:
                        pass  # its tiles are in the staged layer
                    elif "null_ids" in res:
                        null_out.append(res)
                    else:
                        real_out.append(res)
                elif fut.status == "error":
                    fut.result()
                bar.update(1)
        walls["all tasks"] = round(time.perf_counter() - t_tasks, 3)
        if diagonal:
            logger.info("Mahalanobis distances used the diagonal covariance shortcut")
    except BaseException as exc:
        # every task of the run that may still write into the staging (tiles, markers, the
        # transposition, the saved fit), not only the gene blocks: a late marker would
        # recreate a staging directory the caller removes
        writers = set(block_keys) | {f.key for f in futures}
        if pending is not None:
            writers |= {f.key for f in pending.futures}
            client.cancel(list(pending.futures), force=True)
        for f in futures:
            f.cancel()
        _drain_writers(client, sorted(writers, key=str))
        lost = _as_worker_lost(exc)
        if lost is not None:
            raise lost from exc
        raise
    result = _gather(real_out, null_out, std_out, n_null, n_obs, staged, layout, n_tasks, n_reused,
                     n_groups)
    result.staged_obsp = staged_obsp
    result.wall_seconds = walls
    return result


def _gather(real_out, null_out, std_out, n_null, n_obs, staged, layout, n_tasks, n_reused,
            n_groups: int = 0) -> EngineResult:
    """The per-task results (computed now or reused from markers) as whole arrays."""
    real_out.sort(key=lambda r: r["index"])
    columns = np.concatenate([r["columns"] for r in real_out]) if real_out else np.array([], dtype=int)
    mahal = np.concatenate([r["mahalanobis"] for r in real_out]) if real_out else np.array([])
    lfc = np.concatenate([r["mean_lfc"] for r in real_out]) if real_out else np.array([])
    moments = np.concatenate([r["moments"] for r in real_out], axis=1) if real_out else np.empty((2, 0))
    permuted = (np.concatenate([np.atleast_2d(r["permuted_mahalanobis"]) for r in real_out], axis=1)
                if real_out and all("permuted_mahalanobis" in r for r in real_out) else None)
    null_d = np.full(n_null, np.nan)
    null_moments = np.full((2, n_null), np.nan)
    for r in null_out:
        null_d[r["null_ids"]] = r["mahalanobis"]
        null_moments[:, r["null_ids"]] = r["moments"]
    group_d = group_lfc = group_null = None
    if n_groups:
        group_d = (np.concatenate([r["group_mahalanobis"] for r in real_out], axis=1) if real_out
                   else np.empty((n_groups, 0)))
        group_lfc = (np.concatenate([r["group_mean_lfc"] for r in real_out], axis=1) if real_out
                     else np.empty((n_groups, 0)))
        group_null = np.full((n_groups, n_null), np.nan)
        for r in null_out:
            group_null[:, r["null_ids"]] = r["group_mahalanobis"]
    std1 = np.full(n_obs, np.nan)
    std2 = np.full(n_obs, np.nan)
    seconds: dict[str, float] = {}
    for rows, a, b, t in std_out:
        std1[rows] = a
        std2[rows] = b
        seconds["posterior std"] = seconds.get("posterior std", 0.0) + float(t)
    for r in real_out:  # empirical variance: kompot's obs std includes the first tested gene's
        if "gene0_obs_var" in r:
            rows, ov = r["gene0_rows"], r["gene0_obs_var"]
            std1[rows] = np.sqrt(std1[rows] ** 2 + ov[0])  # std² = var + eps
            std2[rows] = np.sqrt(std2[rows] ** 2 + ov[1])
    for r in (*real_out, *null_out):
        for phase, t in r.get("seconds", {}).items():
            seconds[phase] = seconds.get(phase, 0.0) + float(t)
    return EngineResult(columns, mahal, lfc, null_d, std1, std2, staged, layout, n_tasks, n_reused,
                        thread_seconds={k: round(v, 3) for k, v in seconds.items()},
                        group_mahalanobis=group_d, group_mean_lfc=group_lfc, group_null_mahalanobis=group_null,
                        moments=moments, null_moments=null_moments, permuted_mahalanobis=permuted)


# --------------------------------------------------------------------------------------
# Helper processes that die with the client


_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_PARENT_POLL_S = 0.5


def _exit_with_parent(parent_pid: int) -> None:
    """Initializer of the length-scale / k-means helper processes: end with the client.

    A ProcessPoolExecutor child holds both ends of its task queue, so when the client is
    SIGKILLed it never sees end-of-file: it finishes its task, then waits forever under
    PID 1, keeping its memory, the caller's stdout and the multiprocessing resource
    tracker (which lives while any process holds its pipe) alive.

    On Linux the kernel then kills the helper at once: PR_SET_PDEATHSIG fires when the
    thread that started it exits, and that thread is the one blocked on the pool in
    :func:`_prepare_in_subprocesses`, alive for as long as the helpers are needed. A
    daemon thread that polls the parent pid covers other systems (it needs the GIL, so it
    may only act between two calls into compiled code) and a parent that died before the
    prctl call.
    """
    import os
    import sys
    import threading

    if sys.platform.startswith("linux"):
        _set_parent_death_signal()
    if os.getppid() != parent_pid:
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="kompot-parent-watch", daemon=True).start()


def _set_parent_death_signal() -> None:
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, ctypes.c_ulong(signal.SIGKILL), 0, 0, 0) != 0:
            logger.debug("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    except (OSError, AttributeError):  # no libc prctl: the polling thread still applies
        logger.debug("prctl is not available; helper processes rely on polling the parent pid")


def _watch_parent(parent_pid: int) -> None:
    import os

    while True:
        time.sleep(_PARENT_POLL_S)
        if os.getppid() != parent_pid:  # reparented: the client is gone
            os._exit(1)


# --------------------------------------------------------------------------------------
# Worker loss


_NO_WORKER_GRACE_S = 120.0
"""How long a run waits for a cluster that has lost every worker to get one back (an
embedded cluster's nanny restarts its worker within seconds)."""
_WORKER_POLL_S = 2.0


class WorkerLostError(RuntimeError):
    """A Dask worker died and the run could not go on without it."""

    def __init__(self, detail: str):
        self.detail = detail
        super().__init__(
            f"A Dask worker died during the run and the run could not continue: {detail}. "
            "No results were written to the store; rerunning the same call is safe. A worker "
            "that dies again and again is often killed for exceeding its memory limit: see "
            "the worker logs, or give workers more memory (ComputeSettings(memory_limit=...))."
        )

    def __reduce__(self):
        return (WorkerLostError, (self.detail,))


def _identity(x):
    return x


def _input_futures(client: Client, token: str, **arrays: np.ndarray) -> list:
    """One task per input array whose spec holds the array.

    The scheduler keeps the spec (one copy of each array: the embedding X is n × d, the
    rest are cells or landmarks long, never cells × genes) until the last dependent task
    is done, so after a worker dies it re-runs these tasks on the workers that remain or
    on the one its nanny restarts, and then everything lost downstream. No task gets
    ``retries=``: those re-run a task that raised (a NaN in the layer would only fail
    again), while a task whose worker died is re-run anyway, up to
    ``distributed.scheduler.allowed-failures`` times, before it fails with KilledWorker.
    """
    import warnings

    with warnings.catch_warnings():
        # Putting the embedding into the graph is the point here, not an accident.
        warnings.filterwarnings("ignore", message="Sending large graph", category=UserWarning)
        return [client.submit(_identity, a, key=f"kompot-input-{name}-{token}", pure=False)
                for name, a in arrays.items()]


def _completed(client: Client, pending, wanted: set):
    """``(future, result)`` for the futures of ``pending`` (an ``as_completed``) as they
    finish; the result is fetched only for keys in ``wanted`` (the small outputs: the
    factors stay on the workers), and a failed future raises its error.

    A task that was running on a worker that died is re-run by the scheduler, but only on
    a worker: on a cluster left with none (an external cluster that loses all of its
    workers) the run would wait forever. Stop it with :class:`WorkerLostError` once no
    worker has been seen for ``_NO_WORKER_GRACE_S``.
    """
    watch = _WorkerWatch(client)
    while not pending.is_empty():
        if pending.has_ready():
            fut = next(pending)
            if fut.key not in wanted and fut.status != "error":
                yield fut, None
                continue
            # Fetched here, still watched: a finished task whose worker left before its
            # result was fetched is recomputed, which waits for a worker.
            while True:
                try:
                    res = fut.result(timeout=_WORKER_POLL_S)
                    break
                except TimeoutError:
                    watch.check()
            yield fut, res
            continue
        watch.check()
        time.sleep(0.05)


class _WorkerWatch:
    """Raises :class:`WorkerLostError` once the cluster has had no worker for
    ``_NO_WORKER_GRACE_S``, naming the workers that left."""

    def __init__(self, client: Client):
        self.client = client
        self.seen = set(client.nthreads())  # address -> threads; lighter than scheduler_info
        self.gone: list[str] = []
        self.empty_since: float | None = None
        self.next_poll = time.monotonic() + _WORKER_POLL_S

    def check(self) -> None:
        now = time.monotonic()
        if now < self.next_poll:
            return
        self.next_poll = now + _WORKER_POLL_S
        current = set(self.client.nthreads())
        self.gone.extend(sorted(self.seen - current))
        self.seen |= current
        if current:
            self.empty_since = None
        elif self.empty_since is None:
            self.empty_since = now
        elif now - self.empty_since > _NO_WORKER_GRACE_S:
            which = ", ".join(dict.fromkeys(self.gone)) or "unknown"
            raise WorkerLostError(
                f"the cluster has had no worker for {_NO_WORKER_GRACE_S:.0f} s (workers that left: {which})"
            )


def _as_worker_lost(exc: BaseException) -> WorkerLostError | None:
    """The :class:`WorkerLostError` that a Dask failure stands for, if it is a worker loss."""
    from distributed.scheduler import KilledWorker

    if isinstance(exc, WorkerLostError):
        return None  # already says it
    if isinstance(exc, KilledWorker):
        try:
            where = f"worker {exc.last_worker.address}"
        except AttributeError:
            where = "a worker"
        return WorkerLostError(
            f"{where} died while running task {exc.task!r}; workers died running that task "
            f"{exc.allowed_failures + 1} time(s), more than distributed.scheduler.allowed-failures="
            f"{exc.allowed_failures} allows"
        )
    # distributed's FutureCancelledError (older versions have no reason attribute): the
    # scheduler forgot a task whose only copy was on a worker that died.
    if getattr(exc, "reason", None) in ("lost dependencies", "already forgotten"):
        return WorkerLostError(f"the data of task {getattr(exc, 'key', '?')!r} was lost with the worker holding it")
    return None

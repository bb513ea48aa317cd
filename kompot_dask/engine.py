"""The Dask side of a DE run: what runs where, and in which order.

Shape of a run (DESIGN.md §3):

1. client: validate, masks, length scale, landmarks Z (small, n × d and m × d);
2. workers: ``S_c = Σ K(Z,X) K(X,Z)`` per condition and the kernel column mean k̄;
3. one worker: the m × m factors (Lp, C₁, C₂, R); they stay on the workers as futures and
   each worker fetches them once;
4. one task per gene block (columns ``[j·B, (j+1)·B)`` of the store): read its tiles once,
   reduce ``B_c = Σ K(Z,X_k) Y_k`` over cell chunks, score (W, Mahalanobis, mean lfc), then
   write its imputed / fold-change tiles into staged layers — no two tasks share a chunk;
   null-gene blocks read their source columns, permute them and are scored the same way;
5. tasks over cell ranges: posterior standard deviation per cell;
6. client: local FDR, then one commit of every field and the run record.

Only this module builds task graphs; numerics live in :mod:`gp`, :mod:`fdr`, I/O in :mod:`store`.
"""

from __future__ import annotations

import logging
import math
import operator
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
from distributed import Client, as_completed
from tqdm.auto import tqdm

from . import fdr as fdr_mod
from . import gp as gp_mod
from ._io.store import LayerInfo, Store, TileReader, write_tile

logger = logging.getLogger("kompot_dask")

FACTOR_DTYPE = "float64"
"""The m × m factorisations, solves and scores are always float64: with kompot's jitter
(1e-6) the landmark kernel's Cholesky fails in float32. ``ComputeSettings.dtype`` sets the
precision of the bulk tile arithmetic (the cells × genes projections and predictions)."""

_FAIL_BLOCK_FOR_TESTS: int | None = None
"""Tests set this to a real-gene block index to make that block task fail."""


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
class Layout:
    """How the work is cut: row chunks (aligned with the store), gene blocks, kernel chunk."""

    row_chunk: int
    kernel_chunk: int
    gene_block: int
    null_gene_block: int
    row_ranges: tuple[tuple[int, int], ...]
    n_real_blocks: int
    n_std_tasks: int


@dataclass(frozen=True)
class BlockContext:
    """Everything a block task needs besides the big arrays passed as futures."""

    reader: TileReader
    layout: Layout
    ls: float
    sigma: float
    dtype: str
    layer_dtype: str
    staged: dict[str, str] = field(default_factory=dict)  # role -> elem path


def make_layout(n_obs: int, n_vars: int, n_threads: int, *, cell_chunk: int, gene_block: int,
                null_gene_block: int, kernel_chunk: int) -> Layout:
    """The engine's cut of the work for the chunk sizes a plan chose."""
    cell_chunk = int(min(cell_chunk, n_obs))
    gene_block = int(min(gene_block, n_vars))
    row_ranges = tuple((r, min(r + cell_chunk, n_obs)) for r in range(0, n_obs, cell_chunk))
    return Layout(
        row_chunk=cell_chunk,
        kernel_chunk=int(kernel_chunk),
        gene_block=gene_block,
        null_gene_block=int(null_gene_block),
        row_ranges=row_ranges,
        n_real_blocks=math.ceil(n_vars / gene_block),
        n_std_tasks=max(1, min(len(row_ranges), 4 * n_threads)),
    )


def _fit_parts(n_workers: int) -> int:
    return max(1, n_workers // 2)


def _real_blocks(layout: Layout, n_vars: int, selected: np.ndarray) -> list[dict]:
    """Fixed column ranges of the store, only the selected genes inside; empty ones skipped."""
    sel_mask = np.zeros(n_vars, dtype=bool)
    sel_mask[selected] = True
    blocks = []
    for j in range(layout.n_real_blocks):
        c0, c1 = j * layout.gene_block, min((j + 1) * layout.gene_block, n_vars)
        local = np.flatnonzero(sel_mask[c0:c1])
        if len(local):
            blocks.append({"index": j, "c0": c0, "c1": c1, "local": local, "fail": _FAIL_BLOCK_FOR_TESTS == j})
    return blocks


def task_counts(layout: Layout, n_vars: int, selected: np.ndarray, n_null: int, n_pred: int,
                n_workers: int, n_threads: int) -> dict[str, int]:
    """How many tasks :func:`run_engine` submits for this layout (the planner reports these)."""
    return {
        "fit tasks": 2 * _fit_parts(n_workers) + n_threads + 6,
        "gene blocks": len(_real_blocks(layout, n_vars, selected)),
        "null-gene blocks": math.ceil(n_null / layout.null_gene_block) if n_null else 0,
        "std tasks": min(layout.n_std_tasks, n_pred),
    }


# --------------------------------------------------------------------------------------
# Worker tasks (module level so they pickle by reference)


def _cross_gram_task(Z, X, rows, ls, kernel_chunk, dtype):
    return gp_mod.cross_gram(Z, X[rows], ls, chunk=kernel_chunk, dtype=dtype)


def _kernel_sum_task(Z, X, rows, ls, kernel_chunk, dtype):
    return gp_mod.kernel_column_sum(Z, X[rows], ls, chunk=kernel_chunk, dtype=dtype)


def _named_factor(name, fn, *args):
    return gp_mod.check_factor(name, fn(*args))


def _condition_factor_task(name, Z, ls, s_parts, sigma, dtype):
    first = s_parts[0]
    # Factorise in place when the partial is ours to overwrite (only this task reads it).
    if len(s_parts) == 1 and first.flags.f_contiguous and first.flags.writeable:
        s = first
    else:
        s = np.array(first, order="F", copy=True)
        for part in s_parts[1:]:
            s += part
    return gp_mod.check_factor(name, gp_mod.condition_factor(Z, ls, s, sigma, dtype))


def _mean_task(parts, n):
    return np.sum(parts, axis=0) / n


def _real_block_task(ctx: BlockContext, block: dict, Z, X, codes, pred, C1, C2, R, kbar):
    """Fit, score and (optionally) predict one block of store columns."""
    lay = ctx.layout
    c0, c1 = block["c0"], block["c1"]
    local = block["local"]  # selected columns, relative to c0
    width = lay.gene_block
    acc1 = gp_mod.ProjectionAccumulator(Z, ctx.ls, width, lay.kernel_chunk, ctx.dtype)
    acc2 = gp_mod.ProjectionAccumulator(Z, ctx.ls, width, lay.kernel_chunk, ctx.dtype)
    bad = np.zeros(len(local), dtype=bool)
    for r0, r1 in lay.row_ranges:
        code = codes[r0:r1]
        in1 = code == 1
        in2 = code == 2
        if not (in1.any() or in2.any()):
            continue
        tile = ctx.reader.read(r0, r1, slice(c0, c1))[:, local]
        used = tile[in1 | in2]
        bad |= ~np.all(np.isfinite(used), axis=0)
        xs = X[r0:r1]
        if in1.any():
            acc1.add(xs[in1], tile[in1].astype(ctx.dtype, copy=False))
        if in2.any():
            acc2.add(xs[in2], tile[in2].astype(ctx.dtype, copy=False))
    if bad.any():
        raise NonFiniteExpressionError((c0 + local[bad]).tolist())
    if block.get("fail"):
        raise InjectedFailure(f"injected failure in gene block {block['index']}")
    factors = {"C1": C1, "C2": C2, "R": R}
    n_sel = len(local)
    w1, w2, d, lfc = gp_mod.block_scores(factors, kbar, acc1.result(), acc2.result(), ctx.sigma, FACTOR_DTYPE)
    if ctx.staged:
        kc = lay.kernel_chunk
        for r0, r1 in lay.row_ranges:
            sel = np.flatnonzero(pred[r0:r1])
            tiles = {role: np.full((r1 - r0, c1 - c0), np.nan, dtype=ctx.layer_dtype) for role in ctx.staged}
            for s in range(0, len(sel), kc):
                rows = sel[s : s + kc]
                xs = gp_mod._pad_rows(X[r0 + rows], kc)
                mu1, mu2, fc = gp_mod.predict_pair(xs, Z, w1, w2, ctx.ls, ctx.dtype)
                n = len(rows)
                values = {"imputed1": mu1, "imputed2": mu2, "fold_change": fc}
                for role, t in tiles.items():
                    t[np.ix_(rows, local)] = values[role][:n, :n_sel]
            for role, path in ctx.staged.items():
                write_tile(ctx.reader.store_path, path, r0, r1, c0, c1, tiles[role])
    return {"index": block["index"], "columns": c0 + local, "mahalanobis": d[:n_sel], "mean_lfc": lfc[:n_sel]}


def _null_block_task(ctx: BlockContext, block: dict, Z, X, rows1, rows2, C1, C2, R, kbar):
    """Score one block of null genes: permuted source columns over both conditions."""
    lay = ctx.layout
    sources = block["sources"]  # sorted store column of each null
    seeds = block["seeds"]
    uniq, inverse = np.unique(sources, return_inverse=True)
    n1, n2 = len(rows1), len(rows2)
    stacked_rows = np.concatenate([rows1, rows2])
    values = np.empty((n1 + n2, len(uniq)), dtype=ctx.dtype)
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
    if not np.all(np.isfinite(values)):
        bad = ~np.all(np.isfinite(values), axis=0)
        raise NonFiniteExpressionError(uniq[bad].tolist(), as_null_source=True)
    width = lay.null_gene_block
    y1 = np.zeros((n1, width), dtype=ctx.dtype)
    y2 = np.zeros((n2, width), dtype=ctx.dtype)
    for i, (col, seed) in enumerate(zip(inverse, seeds, strict=True)):
        permuted = values[:, col][fdr_mod.null_permutation(n1 + n2, int(seed))]
        y1[:, i] = permuted[:n1]
        y2[:, i] = permuted[n1:]
    del values
    acc1 = gp_mod.ProjectionAccumulator(Z, ctx.ls, width, lay.kernel_chunk, ctx.dtype)
    acc1.add(X[rows1], y1)
    del y1
    acc2 = gp_mod.ProjectionAccumulator(Z, ctx.ls, width, lay.kernel_chunk, ctx.dtype)
    acc2.add(X[rows2], y2)
    del y2
    factors = {"C1": C1, "C2": C2, "R": R}
    _, _, d, _ = gp_mod.block_scores(factors, kbar, acc1.result(), acc2.result(), ctx.sigma, FACTOR_DTYPE)
    return {"index": block["index"], "null_ids": block["null_ids"], "mahalanobis": d[: len(sources)]}


def _std_task(rows, Z, X, Lp, C1, C2, ls, kernel_chunk, eps, dtype):
    """Posterior standard deviation of both conditions at the cells ``rows``."""
    factors = {"Lp": Lp, "C1": C1, "C2": C2}
    out1 = np.empty(len(rows))
    out2 = np.empty(len(rows))
    for s in range(0, len(rows), kernel_chunk):
        r = rows[s : s + kernel_chunk]
        v1, v2 = gp_mod.posterior_variances(gp_mod._pad_rows(X[r], kernel_chunk), Z, factors, ls, dtype)
        out1[s : s + len(r)] = v1[: len(r)]
        out2[s : s + len(r)] = v2[: len(r)]
    return rows, np.sqrt(out1 + eps), np.sqrt(out2 + eps)


def _length_scale_task(X1, ls_factor):
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


def _prepare_in_subprocesses(X1, pooled, *, ls, ls_factor, landmarks, n_landmarks, random_state):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        ls_f = pool.submit(_length_scale_task, X1, ls_factor) if ls is None else None
        if landmarks is not None:
            Z, source = landmarks, "provided"
        elif n_landmarks >= pooled.shape[0]:
            Z, source = gp_mod.compute_landmarks(pooled, n_landmarks, random_state), "all_cells"
        else:
            Z, source = pool.submit(gp_mod.compute_landmarks, pooled, n_landmarks, random_state).result(), "kmeans"
        if ls_f is not None:
            ls = float(ls_f.result())
    return float(ls), np.asarray(Z, dtype=np.float64), source


def prepare_model(
    client: Client, X1: np.ndarray, pooled: np.ndarray, *, ls: float | None, ls_factor: float,
    landmarks: np.ndarray | None, n_landmarks: int, random_state: int | None,
) -> tuple[float, np.ndarray, str]:
    """Length scale and landmarks, computed concurrently.

    The nearest-neighbour search compiles numba code (~20 s, ~300 MB of compiled code and
    k-means buffers that stay in the process) the first time a process runs it. On a
    long-lived cluster it runs on a pinned worker, which then pays that once. For an
    embedded, single-run cluster it runs in short-lived helper processes instead, so the
    workers start the factor phase without that memory.
    """
    from .cluster import is_embedded

    if is_embedded(client):
        return _prepare_in_subprocesses(X1, pooled, ls=ls, ls_factor=ls_factor, landmarks=landmarks,
                                        n_landmarks=n_landmarks, random_state=random_state)
    ls_f = None
    if ls is None:
        # Always the same worker, so that a long-lived cluster compiles pynndescent once.
        first = sorted(client.scheduler_info(n_workers=-1)["workers"])[:1]
        ls_f = client.submit(_length_scale_task, X1, ls_factor, pure=False, workers=first, allow_other_workers=True)
    if landmarks is not None:
        Z, source = landmarks, "provided"
    elif n_landmarks >= pooled.shape[0]:
        Z, source = gp_mod.compute_landmarks(pooled, n_landmarks, random_state), "all_cells"
    else:
        # On another worker than the length-scale search, so the two overlap.
        others = sorted(client.scheduler_info(n_workers=-1)["workers"])[1:2]
        placement = {"workers": others, "allow_other_workers": True} if others else {}
        Z = client.submit(gp_mod.compute_landmarks, pooled, n_landmarks, random_state, pure=False,
                          **placement).result()
        source = "kmeans"
    if ls_f is not None:
        ls = float(ls_f.result())
    return float(ls), np.asarray(Z, dtype=np.float64), source


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


def run_engine(
    client: Client,
    store: Store,
    info: LayerInfo,
    *,
    X: np.ndarray,
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
) -> EngineResult:
    """Run the distributed part of a DE run. Staged layers are discarded on failure."""
    n_obs, n_vars = info.shape
    rows1 = np.flatnonzero(codes == 1)
    rows2 = np.flatnonzero(codes == 2)
    workers = client.scheduler_info(n_workers=-1)["workers"]
    n_workers = max(1, len(workers))
    n_threads = max(1, sum(int(w.get("nthreads", 1)) for w in workers.values()))
    real_blocks = _real_blocks(layout, n_vars, selected)
    # Null blocks: nulls sorted by source column so each block reads a narrow column range.
    order = np.argsort(null_sources, kind="stable")
    null_blocks = []
    for b, s in enumerate(range(0, len(order), layout.null_gene_block)):
        ids = order[s : s + layout.null_gene_block]
        null_blocks.append({"index": b, "null_ids": ids, "sources": null_sources[ids], "seeds": null_seeds[ids]})

    staged: dict[str, str] = {}
    if layer_names:
        for role, name in layer_names.items():
            staged[role] = store.stage_layer(name, (n_obs, n_vars), (layout.row_chunk, layout.gene_block), layer_dtype)
    futures: list = []
    pending = None
    run_token = uuid.uuid4().hex[:12]
    block_keys = [f"kompot-real-block-{run_token}-{b['index']}" for b in real_blocks]
    try:
        ctx = BlockContext(store.tile_reader(info), layout, ls, sigma, dtype, layer_dtype, staged)
        X_f = client.scatter(X, broadcast=True, hash=False)
        Z_f = client.scatter(Z, broadcast=True, hash=False)
        codes_f = client.scatter(codes, broadcast=True, hash=False)
        pred_f = client.scatter(pred, broadcast=True, hash=False)
        rows1_f = client.scatter(rows1, broadcast=True, hash=False)
        rows2_f = client.scatter(rows2, broadcast=True, hash=False)
        kc = layout.kernel_chunk

        logger.info("Fitting expression estimator for condition 1...")
        parts = _fit_parts(n_workers)
        s1 = [client.submit(_cross_gram_task, Z_f, X_f, r, ls, kc, FACTOR_DTYPE, pure=False)
              for r in np.array_split(rows1, parts)]
        logger.info("Fitting expression estimator for condition 2...")
        s2 = [client.submit(_cross_gram_task, Z_f, X_f, r, ls, kc, FACTOR_DTYPE, pure=False)
              for r in np.array_split(rows2, parts)]
        pred_rows = np.flatnonzero(pred)
        ks = [client.submit(_kernel_sum_task, Z_f, X_f, r, ls, kc, FACTOR_DTYPE, pure=False)
              for r in np.array_split(pred_rows, n_threads)]
        kbar_f = client.submit(_mean_task, ks, len(pred_rows), pure=False)
        # The m × m factors as a small graph of their own, so that the two conditions are
        # factorised on different workers; workers fetch each factor once.
        Lp_f = client.submit(_named_factor, "Lp", gp_mod.landmark_cholesky, Z_f, ls, FACTOR_DTYPE, pure=False)
        C1_f = client.submit(_condition_factor_task, "C1", Z_f, ls, s1, sigma, FACTOR_DTYPE, pure=False)
        C2_f = client.submit(_condition_factor_task, "C2", Z_f, ls, s2, sigma, FACTOR_DTYPE, pure=False)
        metric_f = client.submit(gp_mod.landmark_metric, Z_f, ls, Lp_f, C1_f, C2_f, eps, FACTOR_DTYPE, pure=False)
        R_f = client.submit(operator.getitem, metric_f, 0, pure=False)
        diag_f = client.submit(operator.getitem, metric_f, 1, pure=False)
        setup = [*s1, *s2, *ks, kbar_f, Lp_f, C1_f, C2_f, metric_f, R_f]

        for blk in real_blocks:
            futures.append(client.submit(
                _real_block_task, ctx, blk, Z_f, X_f, codes_f, pred_f, C1_f, C2_f, R_f, kbar_f,
                pure=False, key=f"kompot-real-block-{run_token}-{blk['index']}",
            ))
        for blk in null_blocks:
            futures.append(client.submit(
                _null_block_task, ctx, blk, Z_f, X_f, rows1_f, rows2_f, C1_f, C2_f, R_f, kbar_f,
                pure=False, key=f"kompot-null-block-{run_token}-{blk['index']}",
            ))
        for r in np.array_split(pred_rows, layout.n_std_tasks):
            if len(r):
                # Ahead of the blocks: they need Lp, which is then freed for the rest of the run.
                futures.append(client.submit(_std_task, r, Z_f, X_f, Lp_f, C1_f, C2_f, ls, kc, eps, FACTOR_DTYPE,
                                             pure=False, priority=1))
        n_tasks = len(futures) + len(setup)
        outputs = {f.key for f in futures}
        pending = as_completed(setup + futures, loop=client.loop)
        # Only the iterator holds the futures now: each intermediate (S partials, factors,
        # scattered inputs) is freed on the workers as soon as its last dependent finishes.
        del s1, s2, ks, kbar_f, Lp_f, C1_f, C2_f, metric_f, R_f, setup
        del X_f, Z_f, codes_f, pred_f, rows1_f, rows2_f
        futures = []
        real_out, null_out, std_out = [], [], []
        with tqdm(total=n_tasks, desc="kompot_dask", unit="task", disable=not progress) as bar:
            for fut in pending:
                if fut.key in outputs:
                    res = fut.result()
                    if isinstance(res, tuple):
                        std_out.append(res)
                    elif "null_ids" in res:
                        null_out.append(res)
                    else:
                        real_out.append(res)
                elif fut.status == "error":
                    fut.result()
                bar.update(1)
        if diag_f.result():
            logger.info("Mahalanobis distances used the diagonal covariance shortcut")
    except BaseException:
        if pending is not None:
            client.cancel(list(pending.futures), force=True)
        for f in futures:
            f.cancel()
        _drain_writers(client, block_keys)
        store.discard_staged(list(staged.values()))
        raise

    real_out.sort(key=lambda r: r["index"])
    columns = np.concatenate([r["columns"] for r in real_out]) if real_out else np.array([], dtype=int)
    mahal = np.concatenate([r["mahalanobis"] for r in real_out]) if real_out else np.array([])
    lfc = np.concatenate([r["mean_lfc"] for r in real_out]) if real_out else np.array([])
    null_d = np.full(len(null_sources), np.nan)
    for r in null_out:
        null_d[r["null_ids"]] = r["mahalanobis"]
    std1 = np.full(n_obs, np.nan)
    std2 = np.full(n_obs, np.nan)
    for rows, a, b in std_out:
        std1[rows] = a
        std2[rows] = b
    return EngineResult(columns, mahal, lfc, null_d, std1, std2, staged, layout, n_tasks)

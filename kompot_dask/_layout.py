"""The layout and cost model of a DE run: pure functions of sizes, shared by the planner
and the engine.

One model answers every "how is the work cut, and what does it cost" question, so that
the plan a user reads and the graph the engine submits cannot disagree:

* **landmarks**: how many there are and where they come from (:func:`landmarks_for`, the
  one place that caps ``n_landmarks`` at the number of cells);
* **layout**: cell chunks, gene blocks, null-gene blocks and the kernel chunk
  (:class:`Chunks`), the cut they make of a store (:class:`Layout`, :func:`make_layout`)
  and how many tasks the engine submits for it (:func:`task_counts`);
* **memory**: the working set of every task kind, what each worker holds for the whole
  run and what the model preparation leaves behind (:func:`estimate_worker_memory`), and
  the largest layout that fits a budget (:func:`choose`);
* **time**: FLOPs and seconds per phase from calibrated kernel speeds
  (:func:`flops_and_seconds`).

Nothing here talks to a cluster, a store or a logger: the inputs are sizes
(:class:`PlanInputs`, :class:`ClusterResources`, :class:`Calibration`), the outputs typed
values. Display labels are made by the planner's report, never used as keys here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from enum import Enum, StrEnum
from typing import Any

import numpy as np

MEMORY_FRACTION = 0.6
"""Share of a worker's memory limit the plan lets one run's peak reach."""


# --------------------------------------------------------------------------------------
# Landmarks


class LandmarkSource(StrEnum):
    """Where a run's landmarks come from (the value is what the run record stores)."""

    PROVIDED = "provided"
    ALL_CELLS = "all_cells"
    KMEANS = "kmeans"


@dataclass(frozen=True)
class Landmarks:
    """How many landmarks a run uses, and how they are obtained."""

    count: int
    source: LandmarkSource
    requested: int
    """``GPSettings.n_landmarks`` as asked (the all-cells warning names it)."""


def landmarks_for(n_landmarks: int, n_cells: int, provided: int | None = None) -> Landmarks:
    """The landmarks of a run over ``n_cells`` pooled cells.

    Parameters
    ----------
    n_landmarks
        ``GPSettings.n_landmarks``.
    n_cells
        Cells of both conditions after filtering (the pool k-means would cluster).
    provided
        Rows of ``GPSettings.landmarks`` when given (they are used as they are).

    Returns
    -------
    Landmarks
        With as many landmarks as cells or more requested, every cell is a landmark and no
        k-means runs: this is the only place that applies that cap.
    """
    if provided is not None:
        return Landmarks(int(provided), LandmarkSource.PROVIDED, int(n_landmarks))
    if n_landmarks >= n_cells:
        return Landmarks(int(n_cells), LandmarkSource.ALL_CELLS, int(n_landmarks))
    return Landmarks(int(n_landmarks), LandmarkSource.KMEANS, int(n_landmarks))


CLIENT_KMEANS_CELLS = 200_000
"""Most cells k-means clusters in the client process (beyond, it runs where pynndescent would)."""


def prep_in_client(neighbors: str, landmark_sample: int | None, n_pooled: int,
                   source: LandmarkSource) -> bool:
    """Whether the length scale and landmarks are computed in the client process: on the fast
    path (exact neighbours: no compiled code) when k-means, if any, clusters a bounded pool."""
    if neighbors != "exact":
        return False
    if source is not LandmarkSource.KMEANS:
        return True
    pool = n_pooled if landmark_sample is None else min(n_pooled, landmark_sample)
    return pool <= CLIENT_KMEANS_CELLS


# --------------------------------------------------------------------------------------
# The model's inputs


@dataclass(frozen=True)
class PlanInputs:
    """The sizes a run depends on (everything is read from metadata, nothing from layers),
    and what the report says about its outputs."""

    store_path: str
    n_obs: int
    n_vars: int
    n_selected: int
    n1: int
    n2: int
    n_pred: int
    d: int
    m: int
    n_null: int
    layer: str | None
    layer_kind: str
    layer_itemsize: int
    layer_chunks: tuple[int, int] | None
    layer_nnz: int | None
    store_layers: bool
    layer_dtype: str
    dtype: str
    ls_given: bool
    landmark_source: LandmarkSource
    fields: tuple[tuple[str, str, str], ...]  # (role, location, name)
    overwrites: tuple[tuple[str, str, int | None], ...]  # (location, name, previous run id)
    previous_run: dict[str, Any] | None = None
    in_memory: bool = False
    overwrite: bool | None = None  # StorageSettings.overwrite
    layer_dtype_is_float32_safe: bool = True  # float32 holds every value of the layer's dtype
    neighbors: str = "pynndescent"  # GPSettings.neighbors
    neighbor_sample: int | None = None
    landmark_sample: int | None = None
    embedding_cache_bytes: int = 0  # a stored embedding read in bands: the most a process caches; 0: held whole
    zarr_format: int = 2  # the store's: format 3 stores get sharded output layers
    n_samples: int = 0  # sample_col: the samples fitted (each its own m × m factor); 0 without
    sample_rank: int = 0  # columns of the per-gene low-rank sample covariance (both conditions' samples)
    empirical: bool = False  # GPSettings(use_empirical_variance=True)
    n_groups: int = 0  # FilterSettings(groups=...): the subsets reported
    group_points: int = 0  # their Mahalanobis points, all subsets together
    group_max_points: int = 0  # the most points of one subset (its factor is m × that)
    group_cells: int = 0  # their cells, all subsets together (mean kernel rows)
    group_tasks: int = 0  # the subsets' kernel-sum and factor tasks
    permutations: int = 0  # FDRSettings(mode="calibrated"): fits to permuted labels, each scored per block

    def writes(self, role: str) -> bool:
        """Whether the run writes the field of ``role``."""
        return any(r == role for r, _, _ in self.fields)

    @property
    def embedding_bytes(self) -> int:
        """What one process holds of the embedding: its cached bands, or all of it."""
        return self.embedding_cache_bytes or self.n_obs * self.d * 8

    @property
    def nn_queries(self) -> int:
        """Condition-1 cells whose nearest neighbour the exact search finds."""
        return self.n1 if self.neighbor_sample is None else min(self.n1, self.neighbor_sample)

    @property
    def kmeans_pool(self) -> int:
        """Cells k-means clusters."""
        return self.n12 if self.landmark_sample is None else min(self.n12, max(self.landmark_sample, self.m))

    @property
    def prep_in_client(self) -> bool:
        return prep_in_client(self.neighbors, self.landmark_sample, self.n12, self.landmark_source)

    @property
    def n12(self) -> int:
        """Cells of both conditions."""
        return self.n1 + self.n2

    @property
    def implicit_metric(self) -> bool:
        """Whether the metric R is kept as its packed factor and applied with a recomputed
        Kzz (:class:`~kompot_dask._numerics.gp.KernelMetric`): unless the empirical or the
        sample variance needs R dense."""
        return not self.empirical and not self.n_samples

    @property
    def score_mm(self) -> int:
        """m² multiples of flops per gene to score it: the weights' four triangular solves,
        then R applied (2m² with R dense; with an implicit R, the product with Kzz and a
        solve, 3m²)."""
        return 7 if self.implicit_metric else 6

    @property
    def metric_slab_bytes(self) -> int:
        """What applying an implicit R adds to a task: a slab of Kzz rows as JAX returns it
        and its contiguous copy."""
        return 2 * METRIC_SLAB_ROWS * self.m * 8 if self.implicit_metric else 0

    def fingerprint(self) -> dict[str, Any]:
        """What must not change between planning and running."""
        keys = ("store_path", "n_obs", "n_vars", "n_selected", "n1", "n2", "n_pred", "d", "m",
                "n_null", "layer", "layer_kind", "store_layers", "layer_dtype", "dtype", "n_samples", "empirical",
                "n_groups", "permutations")
        return {k: getattr(self, k) for k in keys}


@dataclass(frozen=True)
class ClusterResources:
    """What the plan may use: per worker (the smallest worker when they differ)."""

    source: str
    n_workers: int
    threads_per_worker: int
    memory_limit: int  # bytes per worker; host memory / workers where the cluster sets none
    memory_limit_set: bool
    host_memory_total: int
    host_memory_available: int
    disk_path: str
    disk_free: int

    @property
    def total_threads(self) -> int:
        return self.n_workers * self.threads_per_worker


@dataclass(frozen=True)
class Calibration:
    """Measured on the workers (medians over workers)."""

    worker_rss: int  # resident memory of a worker with the kernels loaded, before the run
    kernel_s: float | None = None  # seconds per (cell × landmark) kernel evaluation, at this d
    gemm_flops: float | None = None  # FLOP/s of the projection GEMM, one thread
    syrk_flops: float | None = None  # FLOP/s of the rank-k update, one thread
    chol_flops: float | None = None  # FLOP/s of the Cholesky, one thread
    read_bytes_s: float | None = None  # bytes/s reading expression tiles
    write_bytes_s: float | None = None  # bytes/s writing layer tiles
    nn_compiled: bool = False  # pynndescent already compiled on the first worker
    seconds: float = 0.0

    @property
    def timed(self) -> bool:
        return self.gemm_flops is not None


# --------------------------------------------------------------------------------------
# Layout and task counts


@dataclass(frozen=True)
class Chunks:
    """The four sizes that cut a run: cells per tile, genes per block, null genes per
    block, cells per kernel evaluation."""

    cell_chunk: int
    gene_block: int
    null_gene_block: int
    kernel_chunk: int


def kernel_chunk_for(m: int) -> int:
    """Cells per kernel block: bounds the m × rows kernel matrix to ~32 MB (float64). Smaller
    blocks measured faster (less memory traffic) as well as leaner than 64 MB ones."""
    return int(max(128, min(2048, 4_000_000 // max(m, 1))))


@dataclass(frozen=True)
class Layout:
    """How the work is cut: cell chunks (aligned with the store), gene blocks, kernel chunk."""

    cell_chunk: int
    kernel_chunk: int
    gene_block: int
    null_gene_block: int
    row_ranges: tuple[tuple[int, int], ...]
    n_real_blocks: int
    n_std_tasks: int

    @property
    def chunks(self) -> Chunks:
        return Chunks(self.cell_chunk, self.gene_block, self.null_gene_block, self.kernel_chunk)


def make_layout(n_obs: int, n_vars: int, n_threads: int, *, cell_chunk: int, gene_block: int,
                null_gene_block: int, kernel_chunk: int) -> Layout:
    """The cut of an ``n_obs`` × ``n_vars`` store for these chunk sizes.

    Chunks larger than the store are clipped to it. A std task takes one kernel chunk of
    cells (a few seconds): short tasks let the fit's critical path, which the std tasks
    run beside, take the next free thread.
    """
    cell_chunk = int(min(cell_chunk, n_obs))
    gene_block = int(min(gene_block, n_vars))
    row_ranges = tuple((r, min(r + cell_chunk, n_obs)) for r in range(0, n_obs, cell_chunk))
    return Layout(
        cell_chunk=cell_chunk,
        kernel_chunk=int(kernel_chunk),
        gene_block=gene_block,
        null_gene_block=int(null_gene_block),
        row_ranges=row_ranges,
        n_real_blocks=math.ceil(n_vars / gene_block),
        n_std_tasks=max(1, math.ceil(n_obs / kernel_chunk)),
    )


def std_parts(layout: Layout, pred_rows: np.ndarray) -> list[np.ndarray]:
    """The cells of each std task: consecutive runs of one kernel chunk."""
    kc = layout.kernel_chunk
    return [pred_rows[s : s + kc] for s in range(0, len(pred_rows), kc)]


def fit_parts(n_workers: int) -> int:
    """How many partial sums each condition's S is split into (half the workers)."""
    return max(1, n_workers // 2)


FIT_OUTPUTS = ("Lp", "C1", "C2", "R", "kbar", "diagonal")
"""What the fit hands to the block and std tasks (and keeps in the staging for a resume)."""
def permuted_outputs(p: int) -> tuple[str, str, str]:
    """With FDRSettings(mode="calibrated"), also, for permutation ``p``: both conditions'
    factors and the metric of the fit to its permuted condition labels."""
    return (f"p{p}C1", f"p{p}C2", f"p{p}R")
EMPIRICAL_OUTPUTS = ("Wsq", "M1", "M2")
"""With empirical variance, also: (L⁻¹)∘(L⁻¹) for the factor trick, and each condition's
leverage factor."""


SHARD_BYTES = 32 * 2**20
"""Target size of one shard of an output layer in a zarr v3 store (uncompressed)."""
INNER_CHUNK_GENES = 64
"""Genes per inner chunk of a sharded output layer, where the gene block allows it."""


def shard_rows(cell_chunk: int, gene_block: int, itemsize: int, n_obs: int, zarr_format: int) -> int:
    """Rows of one shard of an output layer: whole cell chunks, ~:data:`SHARD_BYTES` per
    (shard × gene block), never more than the cells. A gene-block task writes its shards
    whole (no read-modify-write), so a shard is also what it buffers per layer. zarr v2
    stores have no shards: one cell chunk."""
    if zarr_format != 3:
        return cell_chunk
    k = max(1, SHARD_BYTES // max(1, cell_chunk * gene_block * itemsize))
    return int(min(cell_chunk * k, -(-n_obs // cell_chunk) * cell_chunk))


def output_chunks(layout: Layout, n_obs: int, itemsize: int, zarr_format: int) -> tuple[tuple[int, int], tuple[int, int] | None]:
    """(chunks, shards) of an output layer: zarr v2 gets (cell chunk × gene block) chunks;
    v3 gets shards of :func:`shard_rows` × gene block, holding (cell chunk × 64-gene)
    inner chunks, so that a reader of a few genes decodes a narrow part of each shard."""
    C, G = layout.cell_chunk, layout.gene_block
    if zarr_format != 3:
        return (C, G), None
    inner = INNER_CHUNK_GENES if G % INNER_CHUNK_GENES == 0 else G
    return (C, inner), (shard_rows(C, G, itemsize, n_obs, zarr_format), G)


def real_blocks(layout: Layout, n_vars: int, selected: np.ndarray) -> list[dict]:
    """Fixed column ranges of the store, only the selected genes inside; empty ones skipped."""
    sel_mask = np.zeros(n_vars, dtype=bool)
    sel_mask[selected] = True
    blocks = []
    for j in range(layout.n_real_blocks):
        c0, c1 = j * layout.gene_block, min((j + 1) * layout.gene_block, n_vars)
        local = np.flatnonzero(sel_mask[c0:c1])
        if len(local):
            blocks.append({"index": j, "c0": c0, "c1": c1, "local": local})
    return blocks


@dataclass(frozen=True)
class TaskCounts:
    """How many tasks of each kind the engine submits."""

    fit: int
    gene_blocks: int
    null_blocks: int
    std: int
    transpose: int = 0  # row groups of a CSR element's transposition
    zscore: int = 0  # the fold-change z-score layer's pass (store_additional_stats)

    @property
    def total(self) -> int:
        return self.fit + self.gene_blocks + self.null_blocks + self.std + self.transpose + self.zscore

    def labelled(self) -> dict[str, int]:
        """The counts under the names the plan report and ``to_dict`` show."""
        out = {"fit tasks": self.fit, "gene blocks": self.gene_blocks,
               "null-gene blocks": self.null_blocks, "std tasks": self.std}
        if self.transpose:
            out["CSR transposition tasks"] = self.transpose
        if self.zscore:
            out["z-score tasks"] = self.zscore
        return out


def task_counts(layout: Layout, n_vars: int, selected: np.ndarray, n_null: int, n_pred: int,
                n_workers: int, n_threads: int, kind: str = "dense", nnz: int | None = None,
                zscores: bool = False, n_samples: int = 0, sample_cells: int = 0,
                std: bool = True, leverage_cells: int = 0, group_tasks: int = 0, permutations: int = 0) -> TaskCounts:
    """How many tasks the engine submits for this layout (the engine's own arithmetic;
    ``zscores``: the fold-change z-score layer's pass, one task per gene block; with
    ``n_samples`` fitted samples of ``sample_cells`` cells, their grams and factors, and
    the z-scores written by the gene blocks themselves; ``std=False``: no per-cell std;
    ``leverage_cells``: the empirical variance's leverage tasks over the training cells, its
    two leverage factors and (L⁻¹)², and the z-scores in the gene blocks)."""
    n_real = len(real_blocks(layout, n_vars, selected))
    n_nullb = math.ceil(n_null / layout.null_gene_block) if n_null else 0
    n_obs = layout.row_ranges[-1][1] if layout.row_ranges else 0
    return TaskCounts(
        transpose=len(transpose_groups(layout, n_obs, nnz)) if transposes(kind, n_real + n_nullb) else 0,
        # cross-grams, kernel sums; kbar, Lp, the metric's prior part, C1, C2, the metric, R,
        # the diagonal flag; one save per fit output
        fit=(2 * fit_parts(n_workers) + kernel_sum_parts(n_pred) + 8 + len(FIT_OUTPUTS) + group_tasks
             + (2 * n_samples + sample_cells // SAMPLE_GRAM_ROWS if n_samples else 0)
             # the leverages: per condition's cell chunk (and (L⁻¹)², M1, M2 with their saves),
             # or with samples one task per sample (and Σ + eps·I with its save)
             + ((2 + n_samples if n_samples else 6 + 2 + math.ceil(leverage_cells / layout.kernel_chunk))
                if leverage_cells else 0)
             # each permutation's cross-grams, C1, C2, the metric, R, and their saves
             + permutations * (2 * fit_parts(n_workers) + 4 + 3)),
        gene_blocks=n_real,
        null_blocks=n_nullb,
        # each std task and the task of its Lp part (gp.solved_sq_norms)
        std=2 * math.ceil(n_pred / layout.kernel_chunk) if std else 0,
        zscore=n_real if zscores and not n_samples and not leverage_cells else 0,
    )


# --------------------------------------------------------------------------------------
# Memory model


@dataclass(frozen=True)
class TaskBytes:
    """Working set of one task of each kind (bytes)."""

    real_block: int
    null_block: int
    std: int
    transpose: int = 0  # a CSR element's transposition task (0 for other layouts)

    @property
    def largest(self) -> int:
        return max(self.real_block, self.null_block, self.std, self.transpose)


def task_bytes(inp: PlanInputs, ch: Chunks) -> TaskBytes:
    """Working set of one task of each kind."""
    m, C, G, kc = inp.m, ch.cell_chunk, ch.gene_block, ch.kernel_chunk
    bt = 4 if inp.dtype == "float32" else 8
    s = inp.layer_itemsize
    lb = 4 if inp.layer_dtype == "float32" else 8
    if inp.layer_kind == "csr":
        nnz_row = (inp.layer_nnz or inp.n_obs * inp.n_vars) / max(1, inp.n_obs)
        read = int(C * nnz_row * (s + 4) + C * G * 8)
    else:
        read = int(C * G * s)
    # tile read + column selection + the per-condition float copies
    tile = read + C * G * (2 * s + bt)
    kernel = 2 * m * kc * bt + kc * G * bt  # JAX temporaries of one projection step
    acc = 2 * m * G * bt
    scores = 4 * m * G * 8 + inp.metric_slab_bytes  # W1, W2 and the Mahalanobis batch temporaries
    S = shard_rows(C, G, lb, inp.n_obs, inp.zarr_format)  # rows of the tiles a task writes at once
    predict = (3 * S * G * lb + 2 * m * kc * bt + 3 * kc * G * bt) if inp.store_layers else 0
    if inp.permutations:
        # both conditions' projections under each labelling (the kernel block shared), and
        # one kernel block's rows gathered for one product
        acc = 2 * (1 + inp.permutations) * m * G * bt + kc * m * bt
    real = acc + max(tile + kernel, scores, predict)
    if inp.n_samples:
        # a projection per sample and per condition's other cells; then, one sample at a
        # time, its factor, its weights and its Helmert contrast (which reuses them), beside
        # the remaining projections, both conditions' weights, the running sum and one
        # temporary; the distances in batches (whitened contrasts, their QR: × 3); the
        # layers: both weights and the contrasts, every cell's posterior variance, and per
        # kernel chunk the predictions and both conditions' sample variances (below). With the
        # calibrated FDR, each relabelling's weight difference (summed projections, solved
        # beside them) and every sample's weights, kept for the relabellings' contrasts
        rows_w, S, r = S, inp.n_samples, inp.sample_rank
        P = inp.permutations
        n_tiles = sum(1 for _, loc, _ in inp.fields if loc == "layers")
        acc = (2 + S + (P + 3 if P else 0)) * m * G * bt
        models = (2 + r) * m * G * 8
        weights = max(acc, (S + (S + P if P else 0)) * m * G * 8 + 6 * m * G * 8) + packed_bytes(m)
        scores = models + ((S + P) * m * G * 8 if P else 0) + 3 * r * m * min(G, SAMPLE_SCORE_GENES) * 8
        # per kernel chunk: both means, the fold change, each condition's sample variance
        # and a squared contrast, both total variances, the stds, the z-scores and their
        # temporaries (ten arrays; with the empirical variance two more, and V_c beside)
        predict = ((models + n_tiles * rows_w * G * lb + (12 if inp.empirical else 10) * kc * G * 8
                    + (2 * m * G * 8 if inp.empirical else 0)
                    + 2 * m * kc * bt + 2 * inp.n_obs * 8) if inp.store_layers else 0)
        real = max(acc + tile + kernel, weights, scores, predict)
    if inp.empirical and inp.n_samples:
        # every sample's weights kept through the second read (a tile, a kernel block, the
        # residuals, both variance projections) beside both weights and the contrasts; then
        # Σ + eps·I, Kzz and the Cholesky's work matrix beside the variances, and a batch of
        # genes' contrasts stacked
        models = (2 + inp.sample_rank) * m * G * 8
        real = max(real, models + inp.n_samples * m * G * 8 + tile + kernel + 3 * m * G * bt,
                   models + 3 * m * m * 8 + 4 * m * G * 8 + inp.sample_rank * m * min(G, SAMPLE_SCORE_GENES) * 8)
    elif inp.empirical:
        # the second read: a tile, a kernel block, the residuals; then Kzz and both variances
        real += max(tile + kernel + m * G * bt, m * m * 8 + 3 * m * G * 8)
    # groups: one subset's factor (m × its points) loaded at a time beside the weights, and
    # its whitened differences
    p = inp.group_max_points
    group_scores = (p * m * 8 + p * G * 8 + 2 * m * G * 8) if inp.n_groups else 0
    if inp.n_groups and inp.empirical:  # (L⁻¹)² (or Σ + eps·I and the Cholesky's work matrix with
        # samples) at the points, their kernel rows, their variances
        group_scores += (2 if inp.n_samples else 1) * p * p * 8 + p * m * 8 + 2 * p * G * 8
    real = max(real, group_scores + (2 * m * G * 8 if not inp.n_samples else (2 + inp.sample_rank) * m * G * 8))
    nb = ch.null_gene_block
    # source columns of both conditions, permuted in place (in the layer's precision where
    # float32 holds it), a permutation and one permuted column, one tile, projections
    vb = _null_value_bytes(inp)
    null = (inp.n12 * (nb * vb + 8 + vb) + C * nb * s + 2 * m * nb * bt + kernel + 4 * m * nb * 8
            + inp.metric_slab_bytes)
    if inp.empirical:  # the values stay for the residual pass, then Kzz and the variances
        null += m * m * 8 + 3 * m * nb * 8 + kernel
    if inp.n_samples:
        # a projection per cell group beside the values (a group's rows of them gathered),
        # then the samples' weights and contrasts, as a gene block holds them
        S, r = inp.n_samples, inp.sample_rank
        null = max(null + S * m * nb * bt + inp.n12 * nb * vb // 2,
                   (2 * S + 6) * m * nb * 8 + packed_bytes(m) + 3 * r * m * min(nb, SAMPLE_SCORE_GENES) * 8)
        if inp.empirical:  # every sample's weights kept, then the per-gene Cholesky's m × m arrays
            null += S * m * nb * 8 + 2 * m * m * 8
    if inp.n_groups:
        null = max(null, p * m * 8 + p * nb * 8 + 4 * m * nb * 8
                   + ((p * p * 8 + p * m * 8 + 2 * p * nb * 8) if inp.empirical else 0))
    # a kernel block, solved in place (evaluated again per factor), and JAX's temporaries
    # of one piece of it
    std = m * kc * 8 + 2 * m * min(kc, STD_ROWS) * 8 + 2 * kc * 8
    transpose = 0
    if inp.layer_kind == "csr":
        # one row group's CSR as read and its CSC copy (values, 4-byte indices), plus the
        # conversion's int64 index arrays
        nnz_row = (inp.layer_nnz if inp.layer_nnz is not None else inp.n_obs * inp.n_vars) / max(1, inp.n_obs)
        group = max(TRANSPOSE_GROUP_NNZ, C * nnz_row)
        transpose = int(group * (2 * (s + 4) + 8) + 2 * inp.n_vars * 8)
    return TaskBytes(int(real), int(null), int(std), transpose)


@dataclass(frozen=True)
class SharedBytes:
    """What every worker holds for the whole run, beside its tasks."""

    embedding: int  # the embedding and the condition masks
    landmarks: int
    factors: int  # C1, C2, Lp (packed), R
    csc_cache: int  # column cache of a CSC layer (0 for other layouts)

    @property
    def total(self) -> int:
        return self.embedding + self.landmarks + self.factors + self.csc_cache

    @property
    def besides_factors(self) -> int:
        """What stays beside the factor phase, whose own arrays are counted apart."""
        return self.total - self.factors


def shared_bytes(inp: PlanInputs, ch: Chunks) -> SharedBytes:
    m = inp.m
    r_bytes = packed_bytes(m) if inp.implicit_metric else m * m * 8
    return SharedBytes(
        embedding=inp.embedding_bytes + inp.n_obs * 2 + inp.n12 * 8,
        landmarks=m * inp.d * 8,
        # Lp, C1, C2 packed; R packed (its factor, KernelMetric) or dense (Rᵀ) with the
        # empirical or sample variance; (L⁻¹)² with empirical variance; each permutation's
        # C1, C2 and R (packed unless the sample variance needs it dense)
        factors=(3 * packed_bytes(m) + r_bytes + (m * m * 8 if inp.empirical else 0)
                 + inp.permutations * (2 * packed_bytes(m) + (m * m * 8 if inp.n_samples else packed_bytes(m)))),
        csc_cache=_csc_cache_bytes(inp, ch) if inp.layer_kind == "csc" else 0,
    )


def _csc_cache_bytes(inp: PlanInputs, ch: Chunks) -> int:
    """Two cached column spans of a CSC element (kept sparse, as CSR over all cells): one
    gene block's stored values twice (the span read and its CSR copy) and the row pointers."""
    nnz = inp.layer_nnz if inp.layer_nnz is not None else inp.n_obs * inp.n_vars
    span = nnz * ch.gene_block / max(1, inp.n_vars)
    return int(2 * (2 * span * (inp.layer_itemsize + 4) + 2 * inp.n_obs * 8))


STD_ROWS = 256
"""Cells per piece of a std task's kernel block that JAX evaluates at a time: the std tasks
run beside the fit's m × m arrays, where the worker's peak is, so JAX's temporaries are
kept small; the solves still take a kernel chunk of cells at once (with 256 cells they
took 20 % more thread time beside the metric, more passes over the factors)."""

METRIC_SLAB_ROWS = 256
"""Rows of Kzz an implicit metric evaluates at a time (``gp.KernelMetric.SLAB``)."""


def packed_bytes(m: int) -> int:
    """One packed m × m factor or symmetric matrix (:class:`~kompot_dask._numerics.packed.PackedLower`)."""
    return m * (m + 1) // 2 * 8


def factor_phase_bytes(inp: PlanInputs) -> int:
    """The worker that factorises: Lp, C1, C2 and the metric's covariance (packed) and its
    m × m work array (with samples, a sample's gram, factorised in place, on its other
    thread; with the empirical variance, (L⁻¹)² and a leverage factor's dense copy; each
    permutation's factors, covariance and work array)."""
    m = inp.m
    packed, dense = packed_bytes(m), m * m * 8
    return (4 * packed + dense + (packed if inp.n_samples else 0) + (2 * dense if inp.empirical else 0)
            + inp.permutations * (3 * packed + dense))


SAMPLE_GRAM_ROWS = 65_536
"""Cells per task of a sample's cross gram (a large sample's sum is split over workers)."""

KERNEL_SUM_ROWS = 32_768
"""Cells per kernel-sum task (a mean kernel row): a fixed size, so the sum's order — and its
last bits — do not depend on how many threads the cluster has."""


def kernel_sum_parts(n_cells: int) -> int:
    return max(1, -(-int(n_cells) // KERNEL_SUM_ROWS))


SAMPLE_SCORE_GENES = 32
"""Genes per batch of the low-rank sample-variance distances (their whitened deviations and
QR, 3 × m × rank numbers per gene, stay small beside the block's weights)."""

SAMPLE_TASK_BYTES = 640 << 20
"""Most bytes of one sample-variance block's per-sample projections ((2 + samples) × m ×
genes): the gene block narrows as samples are added, so the task's peak stays bounded
whatever the donor count."""


class PrepPlacement(Enum):
    """Where the model preparation (length scale, k-means landmarks) runs."""

    CLIENT = "the client process"  # the fast path: no compiled code, bounded pools
    HELPERS = "helper processes on the client host"  # an embedded cluster
    TWO_WORKERS = "first and second worker"
    ONE_WORKER = "the only worker"


@dataclass(frozen=True)
class PrepMemory:
    """Resident memory the model preparation adds, and where."""

    placement: PrepPlacement
    length_scale: int  # the nearest-neighbour search's compiled code and graph
    kmeans: int

    @property
    def helpers(self) -> int:
        """Bytes in the embedded cluster's helper processes (0 on a cluster's workers)."""
        return self.length_scale + self.kmeans if self.placement is PrepPlacement.HELPERS else 0

    @property
    def client(self) -> int:
        """Bytes the preparation adds to the client process while it runs (the fast path)."""
        return max(self.length_scale, self.kmeans) if self.placement is PrepPlacement.CLIENT else 0

    @property
    def first_worker(self) -> int:
        """What the length-scale search leaves in the first worker for the whole run."""
        return 0 if self.placement in (PrepPlacement.HELPERS, PrepPlacement.CLIENT) else self.length_scale

    def placements(self) -> list[tuple[str, int]]:
        """(where, bytes) of each part, named as the report shows them."""
        if self.placement is PrepPlacement.CLIENT:
            return [("client process (length scale, then k-means)", self.client)]
        if self.placement is PrepPlacement.HELPERS:
            return [("helper processes (client host)", self.helpers)]
        kmeans_where = ("second worker (k-means)" if self.placement is PrepPlacement.TWO_WORKERS
                        else "first worker (k-means, before the engine)")
        return [("first worker (length scale)", self.length_scale), (kmeans_where, self.kmeans)]


NO_PREP = PrepMemory(PrepPlacement.HELPERS, 0, 0)
"""No preparation memory on the workers (an estimate of the engine alone)."""

# Measured here (benchmarks/plan_accuracy.py and a probe of pynndescent alone): the
# nearest-neighbour search leaves ~360 MB of numba-compiled code in the process that ran
# it, plus ~220 B per cell of graph; k-means needs sklearn (~50 MB) and two copies of the
# pooled embedding.
_NN_FIXED = 360 * 1024**2
_NN_PER_CELL = 220
_KM_FIXED = 50 * 1024**2
_NN_REF_ROWS = 32768  # reference rows per block of gp.exact_nearest_distances
_NN_BLOCK_BYTES = 512 * _NN_REF_ROWS * 8 * 2  # one distance block and its temporaries


def prep_memory(inp: PlanInputs, n_workers: int, nn_compiled: bool, embedded: bool) -> PrepMemory:
    """Extra resident memory of the model-preparation step (length scale, landmarks)."""
    if inp.prep_in_client:
        # the exact search: a float64 copy of condition 1 and one block of distances; k-means
        # runs after it, on its pool (sklearn and two copies of the pool)
        if inp.ls_given:
            nn = 0
        elif inp.embedding_cache_bytes:  # the sample's rows and one block of reference rows
            nn = 2 * inp.nn_queries * inp.d * 8 + _NN_REF_ROWS * inp.d * 8 + _NN_BLOCK_BYTES
        else:
            nn = inp.n1 * inp.d * 8 + _NN_BLOCK_BYTES
        km = _KM_FIXED + 2 * inp.kmeans_pool * inp.d * 8 if inp.landmark_source is LandmarkSource.KMEANS else 0
        return PrepMemory(PrepPlacement.CLIENT, nn, km)
    nn = 0 if inp.ls_given else _NN_FIXED + _NN_PER_CELL * inp.n1
    km = _KM_FIXED + 2 * inp.kmeans_pool * inp.d * 8 if inp.landmark_source is LandmarkSource.KMEANS else 0
    if embedded:
        return PrepMemory(PrepPlacement.HELPERS, nn, km)
    if nn_compiled:
        nn = 0  # already in the first worker's resident memory
    # One worker runs both, concurrently; k-means' buffers are gone before the engine starts.
    return PrepMemory(PrepPlacement.TWO_WORKERS if n_workers > 1 else PrepPlacement.ONE_WORKER, nn, km)


@dataclass(frozen=True)
class MemoryEstimate:
    worker_peak: int  # the largest worker
    base: int
    shared: SharedBytes
    tasks: TaskBytes
    factor_phase: int


# XLA's compiled kernels for the run's shapes, and allocator slack on the working set.
_JIT_OVERHEAD = 40 * 1024**2
_SLACK = 1.0


def factor_worker_bytes(est: MemoryEstimate, prep: PrepMemory) -> int:
    """Peak of the worker that factorises the m × m matrices."""
    return (est.base + _JIT_OVERHEAD + int(_SLACK * (est.factor_phase + est.shared.besides_factors))
            + prep.first_worker)


def estimate_worker_memory(inp: PlanInputs, ch: Chunks, threads: int, base_rss: int,
                           prep: PrepMemory | None = None) -> MemoryEstimate:
    """Peak resident memory of the largest worker for the chunks ``ch``."""
    tasks = task_bytes(inp, ch)
    shared = shared_bytes(inp, ch)
    steady = shared.total + threads * tasks.largest
    factor = factor_phase_bytes(inp) + shared.besides_factors
    run_part = _JIT_OVERHEAD + int(_SLACK * max(steady, factor))
    prep = prep or NO_PREP
    first = prep.first_worker
    if prep.placement is PrepPlacement.TWO_WORKERS:
        peak = base_rss + max(first + run_part, max(prep.kmeans, run_part))
    elif prep.placement is PrepPlacement.ONE_WORKER:
        # k-means ends before the engine starts, the search's code stays
        peak = base_rss + first + max(run_part, prep.kmeans)
    else:  # helper processes or the client: nothing stays in the workers
        peak = base_rss + run_part
    return MemoryEstimate(peak, base_rss, shared, tasks, factor_phase_bytes(inp))


def _cell_options(inp: PlanInputs, given: int | None, rbase: int) -> list[int]:
    if given:
        return [given]
    multiples = (max(1, 8192 // rbase), max(1, 4096 // rbase), max(1, 2048 // rbase), 1)
    return sorted({min(inp.n_obs, rbase * k) for k in multiples}, reverse=True)


MAX_GENE_BLOCK = 512
"""Widest gene block tried: every block task evaluates the kernel over all cells once, which
costs about as much as projecting 200 genes (benchmarks/phases.py), so wide blocks amortise
it; 1024 measured no faster at 10k × 2k and held 300 MB more."""


def _gene_options(inp: PlanInputs, given: int | None, cbase: int, total_threads: int = 1) -> list[int]:
    """Gene-block widths to try, widest first: multiples of the store's column chunk up to
    :data:`MAX_GENE_BLOCK`, but no wider than leaves one block per worker thread (all
    threads busy) unless even the narrowest option would not."""
    if given:
        return [given]
    widths = (MAX_GENE_BLOCK, 512, 256, 128, 64)
    options = sorted({min(inp.n_vars, cbase * max(1, w // cbase)) for w in widths} | {min(inp.n_vars, cbase)},
                     reverse=True)
    if inp.n_samples:  # every sample's projection of the block is held at once
        # (with the calibrated FDR, every sample's weights and each relabelling's beside them)
        per_gene = ((2 + inp.n_samples) if not inp.permutations
                    else (2 * inp.n_samples + inp.permutations + 2)) * inp.m * 8
        fit = [g for g in options if g * per_gene <= SAMPLE_TASK_BYTES]
        options = fit or [min(options[-1], max(1, SAMPLE_TASK_BYTES // per_gene))]
    busy = [g for g in options if math.ceil(max(1, inp.n_selected) / g) >= total_threads]
    return busy or options[-1:]


NULL_TASK_BYTES = 512 << 20
"""Most bytes a null-gene block's source columns may take (they span every cell of both
conditions, and are permuted in place). Each null block evaluates the kernel over all those
cells once, so the widest block that fits is the fastest; this bound (per task: twice that
with two threads) keeps a 200k-cell run's null blocks at the gene block (512) and a 1M-cell
run's at ~134 genes."""


def null_value_dtype(layer_dtype) -> np.dtype:
    """Precision the null-gene source values are kept in: float32 where it holds every value
    of the layer's dtype exactly, float64 otherwise."""
    dt = np.dtype(layer_dtype)
    return np.dtype(np.float32) if np.can_cast(dt, np.float32, casting="safe") else np.dtype(np.float64)


def _null_value_bytes(inp: PlanInputs) -> int:
    """Bytes per null source value as the null task keeps it (:func:`null_value_dtype`)."""
    return 4 if inp.layer_dtype_is_float32_safe else 8


def _null_options(inp: PlanInputs, given: int | None, gene_block: int) -> list[int]:
    if given:
        return [given]
    top = int(max(8, min(gene_block, NULL_TASK_BYTES // max(1, inp.n12 * _null_value_bytes(inp)))))
    return sorted({top} | {x for x in (128, 64, 32, 16, 8) if x < top}, reverse=True)


def choose(inp: PlanInputs, res: ClusterResources, base_rss: int, *, cell_chunk: int | None,
           gene_block: int | None, null_gene_block: int | None, prep: PrepMemory | None = None,
           max_task_bytes: int | None = None) -> tuple[Chunks, MemoryEstimate, bool]:
    """The largest chunks under the memory budget (user-given sizes are kept as given).

    Candidates are whole multiples of the store's chunks, tried from the largest kernel
    chunk, gene block, cell chunk and null block down; the first that fits is taken.

    Returns
    -------
    tuple
        The chunks, their estimate, and whether they fit the budget (else the smallest tried).
    """
    budget = MEMORY_FRACTION * res.memory_limit
    kc = kernel_chunk_for(inp.m)
    if inp.layer_kind == "dense" and inp.layer_chunks is not None:
        rbase, cbase = inp.layer_chunks
    else:
        rbase, cbase = 1024, 32
    kc_opts = sorted({kc, max(128, kc // 2), max(128, kc // 4)}, reverse=True)
    best = None
    for k in kc_opts:
        for g in _gene_options(inp, gene_block, cbase, res.total_threads):
            for c in _cell_options(inp, cell_chunk, rbase):
                for nb in _null_options(inp, null_gene_block, g):
                    ch = Chunks(int(c), int(g), int(nb), int(k))
                    est = estimate_worker_memory(inp, ch, res.threads_per_worker, base_rss, prep)
                    if est.worker_peak <= budget and (max_task_bytes is None
                                                      or est.tasks.largest <= max_task_bytes):
                        return ch, est, True
                    best = (ch, est)
    ch, est = best
    return ch, est, False


def max_landmarks(inp: PlanInputs, res: ClusterResources, base_rss: int, prep: PrepMemory,
                  cell_chunk: int | None, gene_block: int | None, null_gene_block: int | None) -> int:
    """The largest landmark count whose plan fits the budget (0 if none does)."""
    lo, hi = 0, inp.m
    # The preparation memory stays as planned: only the m × m and m × block terms shrink.
    while hi - lo > max(1, inp.m // 200):
        mid = (lo + hi) // 2
        _, _, ok = choose(replace(inp, m=mid), res, base_rss, cell_chunk=cell_chunk, gene_block=gene_block,
                          null_gene_block=null_gene_block, prep=prep)
        lo, hi = (mid, hi) if ok else (lo, mid)
    return int(lo // 100 * 100 if lo >= 1000 else lo)


def client_peak_bytes(inp: PlanInputs, current_rss: int) -> tuple[int, dict[str, int]]:
    """Peak resident memory of the client, and its parts (named for the report)."""
    parts = {
        "embedding (as stored and float64)": (inp.embedding_cache_bytes if inp.embedding_cache_bytes
                                              else inp.n_obs * inp.d * 16 + inp.n12 * inp.d * 8),
        "masks and per-cell results": inp.n_obs * 40,
        "per-gene results and nulls": (inp.n_vars + inp.n_null) * 64,
    }
    if inp.in_memory:
        lb = 4 if inp.layer_dtype == "float32" else 8
        parts["layers copied back into the AnnData"] = (3 * inp.n_obs * inp.n_vars * lb) if inp.store_layers else 0
    return int(current_rss + sum(parts.values())), parts


COMMIT_RESERVE_BYTES = 4 << 20
"""Room the commit reserves before its journal for the metadata written after it (a
margin over the 1 MiB plus twice the consolidated metadata it takes on typical stores)."""


TRANSPOSE_GROUP_NNZ = 2**23
"""Stored values per row group of a CSR element's transposition (whole cell chunks; at
least one): a transposition task holds the group's CSR and CSC forms, ~2 × 8 Mi × 8 bytes
for float32 values."""


def transposes(kind: str, n_passes: int) -> bool:
    """Whether a CSR element is transposed before the gene blocks: when it would otherwise
    be read whole more than once (one pass per gene block and per null-gene block)."""
    return kind == "csr" and n_passes >= 2


def transpose_groups(layout: Layout, n_obs: int, nnz: int | None) -> tuple[tuple[int, int], ...]:
    """Row groups of the transposition: whole cell chunks of the layout, about
    :data:`TRANSPOSE_GROUP_NNZ` stored values each (by the element's mean density)."""
    chunks = max(1, len(layout.row_ranges))
    per_chunk = (nnz if nnz is not None else 0) / chunks
    step = layout.cell_chunk * max(1, int(TRANSPOSE_GROUP_NNZ // max(per_chunk, 1.0)))
    return tuple((r, min(r + step, n_obs)) for r in range(0, n_obs, step))


def staging_bytes(inp: PlanInputs) -> int:
    """Disk a run needs besides its outputs, while it runs: the model kept for a resume
    (three packed m × m factors and the dense R, the kernel mean, the landmarks), the task
    markers (a few numbers per gene, null gene and cell) and the commit's reserve. With
    sample variance, each sample's packed factor is kept there too (the gene blocks load them
    one at a time)."""
    model = (3 + inp.n_samples) * packed_bytes(inp.m) + inp.m * inp.m * 8 + inp.m * 8 + inp.m * inp.d * 8
    markers = 24 * inp.n_vars + 16 * inp.n_null + 24 * inp.n_pred
    return int(model + markers + transposed_bytes(inp) + COMMIT_RESERVE_BYTES)


def transposed_bytes(inp: PlanInputs) -> int:
    """Disk of a CSR element's transposition in the staging (an upper bound: it is made
    whenever the element is CSR and read more than once): every stored value with a 4-byte
    row index, and one column pointer per gene and row group."""
    if inp.layer_kind != "csr":
        return 0
    nnz = inp.layer_nnz if inp.layer_nnz is not None else inp.n_obs * inp.n_vars
    groups = max(1, math.ceil(nnz / TRANSPOSE_GROUP_NNZ))
    return int(nnz * (inp.layer_itemsize + 4) + groups * (inp.n_vars + 1) * 8)


def output_bytes(inp: PlanInputs, location: str) -> int:
    """Bytes of one output field at ``location`` (uncompressed)."""
    lb = 4 if inp.layer_dtype == "float32" else 8
    return int({"layers": inp.n_obs * inp.n_vars * lb, "obs": inp.n_obs * 8, "var": inp.n_vars * 8,
                "varm": inp.n_vars * max(1, inp.n_groups) * 8, "obsp": inp.n_obs * inp.n_obs * 8}[location])


# --------------------------------------------------------------------------------------
# Time model


# Measured on this project's machine (2 cores; benchmarks/plan_accuracy.py and probes of
# each step alone): pynndescent's numba compile in a fresh process (~21 s, whatever the
# cell count up to 100k) and its search per cell per 10 embedding dimensions; sklearn's
# k-means (k-means++ and Lloyd, two threads) per cell × landmark × dimension, scaled by
# the calibrated GEMM speed relative to this machine's; the start of spawned helpers.
_NN_COMPILE_S = 21.0
_NN_S_PER_CELL = 1e-5
_KMEANS_S = 4e-9
_REF_GEMM_FLOPS = 66e9
_KMEANS_ITERS = 10  # for the FLOP count only
_PROCESS_START_S = 4.0
_NN_GEMM_EFFICIENCY = 0.5  # the exact search's blocked products with their min-reductions
# Whole tasks against their calibrated kernels (Python between kernels, memory traffic,
# scheduling). It was 1.2–1.8× while the workers' heap settings made every kernel block a
# fresh mmap; with the run's heap thresholds (calibration included) the engine's phases
# took 0.96–1.05× the kernel-only estimate at 10k, 200k and 1M cells × 2k genes
# (benchmarks/plan_scale.py).
_ENGINE_EFFICIENCY = 1.0


def _flops(inp: PlanInputs) -> dict[str, float]:
    m, d, n12, G = inp.m, inp.d, inp.n12, inp.n_selected
    kmeans = inp.landmark_source is LandmarkSource.KMEANS
    # the metric R formed once (m³ more in the fit), or kept as its factor (PlanInputs.score_mm)
    fit_mm, score = (2 if inp.implicit_metric else 3), inp.score_mm
    return {
        "landmarks (k-means)": 2.0 * inp.kmeans_pool * m * d * _KMEANS_ITERS if kmeans else 0.0,
        "length scale (exact neighbours)": (2.0 * inp.nn_queries * inp.n1 * d
                                            if inp.neighbors == "exact" and not inp.ls_given else 0.0),
        "fit (S, factors)": float(n12 * m * m + fit_mm * m**3),
        "genes (fit, scores, predictions)": float(
            2 * n12 * m * G + score * m * m * G + (4 * inp.n_pred * m * G if inp.store_layers else 0)),
        "null genes": float(2 * n12 * m * inp.n_null + score * m * m * inp.n_null),
        **({"permuted labels (fits, projections, scores)": float(
            inp.permutations * (n12 * m * m + fit_mm * m**3 + 2 * n12 * m * G + score * m * m * G))}
           if inp.permutations and not inp.n_samples else {}),
        # with samples, a relabelled condition's projection is a sum of its samples'
        **({"permuted labels (fits, weights, low-rank scores)": float(
            inp.permutations * (n12 * m * m + 3 * m**3 + 4 * m * m * G + 2 * inp.sample_rank * m * m * G))}
           if inp.permutations and inp.n_samples else {}),
        "per-cell std": float(3 * inp.n_pred * m * m) if (inp.store_layers or not inp.n_samples) else 0.0,
        **_sample_flops(inp),
        **_empirical_flops(inp),
        **_group_flops(inp),
        **({"posterior covariance": float(3 * m * m * inp.n_pred + 3 * m * inp.n_pred**2)}
           if inp.writes("posterior_covariance") else {}),
    }


def _group_flops(inp: PlanInputs) -> dict[str, float]:
    """groups: each subset's mean kernel row over its cells and its factor at its points
    (kernels, three triangular solves and rank-k updates of m × points, a Cholesky and the
    final solve); per gene and null gene, every subset's whitened difference."""
    if not inp.n_groups:
        return {}
    m, P, pmax = inp.m, inp.group_points, inp.group_max_points
    out = {
        # Σ over subsets of p² terms is at most pmax · P
        "groups (factors)": float(2 * inp.group_cells * m + 3 * m * m * P + 4 * m * pmax * P + pmax * pmax * P / 3),
        "groups (per gene)": float(2 * P * m * (inp.n_selected + inp.n_null)),
    }
    if inp.empirical and inp.n_samples:  # both variances: a Cholesky per gene at each subset's points
        out["groups (per-gene Cholesky)"] = float((inp.n_selected + inp.n_null) * pmax * pmax * P / 3)
        out["groups (factors)"] += 6 * m * m * P
    return out


def _empirical_flops(inp: PlanInputs) -> dict[str, float]:
    """Empirical variance: two leverage factors and (L⁻¹)² (with samples, one leverage
    factor per sample and Σ + eps·I); each training cell's leverage; per gene (and null
    gene) the residual pass (predictions and the variance projection) and the variance at
    the landmarks; with samples also kompot's per-gene Cholesky of the full covariance."""
    if not inp.empirical:
        return {}
    m, G = inp.m, inp.n_selected + inp.n_null
    factors = (inp.n_samples * 4 * m**3 / 3 + 3 * m**3) if inp.n_samples else 3 * m**3
    out = {
        "empirical variance (factors, leverages)": float(factors + inp.n12 * m * m),
        "empirical variance (residuals, variance GP)": float(4 * inp.n12 * m * G + 6 * m * m * G),
    }
    if inp.n_samples:
        out["per-gene Cholesky (sample and empirical variance)"] = float(
            G * (m**3 / 3 + (3 * inp.sample_rank + 3) * m * m))
    return out


def _sample_flops(inp: PlanInputs) -> dict[str, float]:
    """sample_col: each sample's gram and factor; per gene, its weights (two triangular
    solves per sample) and the low-rank distance (R times the contrasts); per cell and
    gene, the prediction of each condition's Helmert contrasts (one fewer than its samples)
    for the std layers."""
    if not inp.n_samples:
        return {}
    m, G, S, r = inp.m, inp.n_selected, inp.n_samples, inp.sample_rank
    scored = G + inp.n_null  # null genes get the samples' models too
    return {
        "sample models (S, factors)": float(inp.n12 * m * m + S * m**3 / 3),
        "sample variance (weights, distances, layers)": float(
            2 * S * m * m * scored + 2 * r * m * m * scored
            + (2 * inp.n_pred * m * G * r if inp.store_layers else 0)),
    }


def _prep_seconds(inp: PlanInputs, cal: Calibration, embedded: bool) -> float:
    """Length scale and landmarks, which run concurrently before the engine."""
    km_t = 0.0
    if inp.landmark_source is LandmarkSource.KMEANS:
        km_t = _KMEANS_S * inp.kmeans_pool * inp.m * inp.d * (_REF_GEMM_FLOPS / cal.gemm_flops)
    if inp.prep_in_client:
        # one after the other in the client, which uses every core of its host
        ls_t = 0.0 if inp.ls_given else 2.0 * inp.nn_queries * inp.n1 * inp.d / (_NN_GEMM_EFFICIENCY * cal.gemm_flops)
        return ls_t + km_t
    ls_t = 0.0
    if not inp.ls_given:
        ls_t = (0.0 if (cal.nn_compiled and not embedded) else _NN_COMPILE_S) + _NN_S_PER_CELL * inp.n1 * inp.d / 10
    return max(ls_t, km_t) + (_PROCESS_START_S if embedded else 0.0)


def _fit_seconds(inp: PlanInputs, res: ClusterResources, cal: Calibration) -> float:
    """S per condition on half the workers, then the factor chain (three potrf in
    parallel, then the metric on one thread)."""
    m, n12, kern = inp.m, inp.n12, cal.kernel_s
    s_t = (n12 * m * kern + n12 * m * m / cal.syrk_flops) / max(1, min(res.total_threads,
                                                                       2 * max(1, res.n_workers // 2)))
    chol = (m**3 / 3) / cal.chol_flops
    # the metric's solves and Cholesky (with a dense R, one more m × m solve to form it)
    fac_t = chol + 2 * m * m * kern + ((1 if inp.implicit_metric else 2) * m**3 + m**3 / 3) / cal.chol_flops
    if inp.empirical and inp.n_samples:  # Σ + eps·I beside the metric; the samples' leverages
        fac_t += 3 * m**3 / cal.chol_flops / 2
        s_t += (inp.n_samples * 4 * m**3 / 3 / cal.chol_flops + n12 * m * kern + n12 * m * m / cal.gemm_flops
                ) / max(1, res.total_threads)
    elif inp.empirical:  # the leverage factors after C1, C2 (syrk and potrf each), then (L⁻¹)²
        fac_t += (2 * (m**3 + m**3 / 3) / 2 + m**3 / 3) / cal.chol_flops
    if inp.permutations:  # an S pass per permutation; their factor chains beside the first
        P = inp.permutations
        s_t *= 1 + P
        fac_t *= 1 + P / max(1, min(P + 1, res.total_threads))
    if inp.n_samples:  # the samples' grams and factors, over every thread beside the chain
        s_t += ((n12 * m * kern + n12 * m * m / cal.syrk_flops + inp.n_samples * (m**3 / 3) / cal.chol_flops)
                / max(1, res.total_threads))
    if inp.n_groups:  # each subset's factor after the conditions' (kernels, solves, Cholesky)
        P = inp.group_points
        s_t += ((inp.group_cells * m + 4 * m * P) * kern
                + (3 * m * m * P + 4 * m * inp.group_max_points * P) / cal.chol_flops) / max(1, res.total_threads)
    return _ENGINE_EFFICIENCY * (s_t + fac_t)


SPARSE_MAX_DENSITY = 0.12
"""Above this fraction of stored values a sparse tile is multiplied dense: the sparse
product's cost per stored value (a kernel row streamed per value) equals the dense GEMM's
at ~14 % (one core, m = 5,000), and the margin keeps the choice on the side of the gain."""
_SPARSE_EVEN_DENSITY = 0.14
"""Fraction of stored values at which the sparse projection takes the dense GEMM's time
(one core, m = 5,000; :meth:`kompot_dask._numerics.gp.ProjectionAccumulator.add_sparse`)."""


def _block_seconds(inp: PlanInputs, ch: Chunks, res: ClusterResources, cal: Calibration,
                   counts: TaskCounts) -> float:
    """Gene blocks, null blocks and std tasks: parallel over all threads."""
    m, n12, G = inp.m, inp.n12, inp.n_selected
    kern, gemm = cal.kernel_s, cal.gemm_flops
    read_rate = cal.read_bytes_s or 2e8
    write_rate = cal.write_bytes_s or 1e8
    lb = 4 if inp.layer_dtype == "float32" else 8
    nr, nn = counts.gene_blocks, counts.null_blocks
    project = 2 * n12 * m * G / gemm
    reads = inp.n_obs * nr * ch.gene_block * inp.layer_itemsize / read_rate
    if inp.layer_kind == "csr":
        nnz = inp.layer_nnz if inp.layer_nnz is not None else inp.n_obs * inp.n_vars
        stored = nnz * (inp.layer_itemsize + 4)
        density = nnz / max(1, inp.n_obs * inp.n_vars)
        if density < SPARSE_MAX_DENSITY:  # m · nnz: as dense at ~14 % (gp.add_sparse)
            project *= density / _SPARSE_EVEN_DENSITY
        # read whole once per pass, or transposed once (read, written) and read once more
        reads = ((2 * stored / read_rate + stored / write_rate) if counts.transpose
                 else (nr + nn) * stored / read_rate)
    P = inp.permutations
    if inp.n_samples:  # the relabelled projections are sums of the samples': solves, low-rank scores
        blocks = (nr * n12 * m * kern + project + 6 * m * m * G / gemm + reads
                  + P * (4 + 2 * inp.sample_rank) * m * m * G / gemm)
    else:
        blocks = (nr * n12 * m * kern + (1 + P) * project + inp.score_mm * (1 + P) * m * m * G / gemm + reads
                  + (nr * (1 + P) * m * m * kern if inp.implicit_metric else 0.0))
    if inp.store_layers:
        blocks += (nr * inp.n_pred * m * kern + 4 * inp.n_pred * m * G / gemm
                   + 3 * inp.n_obs * nr * ch.gene_block * lb / write_rate)
    null_reads = (0.0 if inp.layer_kind == "csr" else  # counted with the real blocks' reads
                  inp.n_obs * min(inp.n_vars, inp.n_null + nn * 256) * inp.layer_itemsize / read_rate)
    nulls = (nn * n12 * m * kern + 2 * n12 * m * inp.n_null / gemm + null_reads
             + inp.score_mm * m * m * inp.n_null / gemm + (nn * m * m * kern if inp.implicit_metric else 0.0))
    std = inp.n_pred * m * kern + 3 * inp.n_pred * m * m / gemm
    if inp.n_samples:
        sample = _sample_flops(inp)["sample variance (weights, distances, layers)"] / gemm
        if inp.store_layers:  # two more layers (the stds) and the z-scores written by the blocks
            sample += 2 * inp.n_obs * nr * ch.gene_block * lb / write_rate
        else:
            std = 0.0
        blocks += sample
    if inp.empirical:  # the second read and kernel pass of every block, and the leverages
        emp = _empirical_flops(inp)
        blocks += (reads + nr * n12 * m * kern + nn * n12 * m * kern
                   + emp["empirical variance (residuals, variance GP)"] / gemm
                   + (0.0 if inp.n_samples else n12 * m * kern + n12 * m * m / gemm))
        if inp.n_samples:  # one Cholesky per gene and null gene, at the Cholesky's rate
            blocks += emp["per-gene Cholesky (sample and empirical variance)"] / cal.chol_flops
    if inp.n_groups:
        gf = _group_flops(inp)
        blocks += gf["groups (per gene)"] / gemm + gf.get("groups (per-gene Cholesky)", 0.0) / cal.chol_flops
    return _ENGINE_EFFICIENCY * (blocks + nulls + std) / res.total_threads


def flops_and_seconds(inp: PlanInputs, ch: Chunks, res: ClusterResources, cal: Calibration,
                      counts: TaskCounts, embedded: bool) -> tuple[dict[str, float], dict[str, float], float | None]:
    """FLOPs and predicted seconds per phase, and the total wall time.

    Without a timed calibration only the FLOPs are known: the seconds are ``{}`` and the
    total ``None``.
    """
    flops = _flops(inp)
    if not cal.timed:
        return flops, {}, None
    seconds = {
        "landmarks and length scale": _prep_seconds(inp, cal, embedded),
        "fit (S and factors)": _fit_seconds(inp, res, cal),
        "gene and null blocks, std": _block_seconds(inp, ch, res, cal, counts),
        "FDR and commit": 2.0 + inp.n_obs * 2e-7,
    }
    return flops, seconds, sum(seconds.values())

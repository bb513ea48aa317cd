"""Resource planning against the live cluster: chunk sizes, memory, disk and time.

A plan is made from three things:

* the **inputs** (shapes, layout and dtype of the expression element, cells per condition,
  landmarks, genes and null genes, which outputs are written), read from metadata;
* the **cluster** (workers, threads and memory limit per worker from the scheduler, or the
  LocalCluster kompot_dask would start; free disk where the store lives);
* a **calibration** measured on the workers themselves: the resident memory of a worker
  once the JAX kernels are loaded, and the time of a few kernel blocks of the run's own
  shapes (kernel evaluation, projection GEMM, rank-k update, Cholesky, one tile read).

From these it chooses the cell chunk and gene block so that every task's working set ×
threads per worker stays under :data:`MEMORY_FRACTION` of the worker's memory limit (JAX
buffers are unmanaged memory to Dask: spilling cannot rescue an oversized task), predicts
the peak resident memory per worker and on the client, the bytes written per output field,
FLOPs and wall time per phase, and says whether the run is feasible — and if not, what
would make it so. :func:`kompot_dask.de` executes exactly the layout a plan chose.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import psutil
from dask.utils import format_bytes, format_time

from ._engine.calibration import measure_workers
from ._report import Report, Section

logger = logging.getLogger("kompot_dask")


MEMORY_FRACTION = 0.6
"""Share of a worker's memory limit the plan lets one run's peak reach."""

# --------------------------------------------------------------------------------------
# Inputs, cluster, calibration


@dataclass(frozen=True)
class PlanInputs:
    """The sizes a run depends on (everything is read from metadata, nothing from layers)."""

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
    landmarks_given: bool
    fields: tuple[tuple[str, str, str], ...]  # (role, location, name)
    overwrites: tuple[tuple[str, str, int | None], ...]  # (location, name, previous run id)
    previous_run: dict[str, Any] | None = None
    in_memory: bool = False
    overwrite: bool | None = None  # StorageSettings.overwrite

    def fingerprint(self) -> dict[str, Any]:
        """What must not change between planning and running."""
        keys = ("store_path", "n_obs", "n_vars", "n_selected", "n1", "n2", "n_pred", "d", "m",
                "n_null", "layer", "layer_kind", "store_layers", "layer_dtype", "dtype")
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


def resources_from_client(client, store_path: str, *, embedded: bool) -> ClusterResources:
    workers = client.scheduler_info(n_workers=-1)["workers"]
    if not workers:
        raise RuntimeError(
            "the Dask cluster has no workers; start some (e.g. cluster.scale(n)) before planning or running"
        )
    vm = psutil.virtual_memory()
    limits = [int(w.get("memory_limit") or 0) for w in workers.values()]
    threads = [int(w.get("nthreads", 1)) for w in workers.values()]
    limit_set = all(lim > 0 for lim in limits)
    limit = min(limits) if limit_set else int(vm.total / max(1, len(workers)))
    where = "embedded LocalCluster" if embedded else f"scheduler {client.scheduler.address}"
    return ClusterResources(
        source=where, n_workers=len(workers), threads_per_worker=min(threads), memory_limit=limit,
        memory_limit_set=limit_set, host_memory_total=int(vm.total), host_memory_available=int(vm.available),
        disk_path=store_path, disk_free=_disk_free(store_path),
    )


def _disk_free(path: str) -> int:
    """Free disk where the store lives, counting the staging that interrupted runs kept:
    the run reuses it (a resume) or deletes it before it writes."""
    from ._io.commit import staged_bytes

    p = os.path.abspath(path)
    while not os.path.exists(p):
        p = os.path.dirname(p)
    kept = staged_bytes(path) if os.path.isdir(path) else 0
    return int(shutil.disk_usage(p).free) + kept


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


def calibrate(client, inputs: PlanInputs, layout_hint: tuple[int, int, int], reader=None, *,
              timed: bool = True) -> Calibration:
    """Run the probe (and, with ``timed``, the timed kernel blocks) on every worker."""
    t0 = time.perf_counter()
    cell_chunk, gene_block, kc = layout_hint
    res = measure_workers(client, d=inputs.d, m=inputs.m, width=min(gene_block, 256), kernel_chunk=kc,
                          reader=reader, tile_rows=cell_chunk, tile_cols=gene_block, timed=timed)
    first = res[0]

    def med(key):
        vals = [r[key] for r in res if r.get(key) is not None]
        return float(np.median(vals)) if vals else None

    return Calibration(
        worker_rss=int(max(r["rss"] for r in res)),
        kernel_s=med("kernel_s"), gemm_flops=med("gemm_flops"), syrk_flops=med("syrk_flops"),
        chol_flops=med("chol_flops"), read_bytes_s=med("read_bytes_s"), write_bytes_s=med("write_bytes_s"),
        nn_compiled=bool(first.get("nn_compiled")), seconds=time.perf_counter() - t0,
    )


# --------------------------------------------------------------------------------------
# Memory model


@dataclass(frozen=True)
class Choice:
    cell_chunk: int
    gene_block: int
    null_gene_block: int
    kernel_chunk: int


def kernel_chunk_for(m: int) -> int:
    """Cells per kernel block: bounds the m × rows kernel matrix to ~64 MB."""
    return int(max(128, min(2048, 8_000_000 // max(m, 1))))


def _task_bytes(inp: PlanInputs, ch: Choice) -> dict[str, int]:
    """Working set of one task of each kind (bytes)."""
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
    scores = 4 * m * G * 8  # W1, W2 and the Mahalanobis batch temporaries
    predict = (3 * C * G * lb + 2 * m * kc * bt + 3 * kc * G * bt) if inp.store_layers else 0
    real = acc + max(tile + kernel, scores, predict)
    nb = ch.null_gene_block
    n12 = inp.n1 + inp.n2
    # source columns of both conditions, their permuted copies, one tile, projections
    null = 2 * n12 * nb * bt + C * nb * s + 2 * m * nb * bt + kernel + 4 * m * nb * 8
    std = 3 * m * kc * 8 + 2 * kc * 8  # kernel block, its Fortran copy, the solve's work array
    return {"real_block": int(real), "null_block": int(null), "std": int(std)}


def _shared_bytes(inp: PlanInputs, ch: Choice) -> dict[str, int]:
    """What every worker holds for the whole run, beside its tasks."""
    m = inp.m
    out = {
        "embedding and masks": inp.n_obs * (inp.d * 8 + 2) + (inp.n1 + inp.n2) * 8,
        "landmarks": m * inp.d * 8,
        "factors C1, C2, R, Lp": 4 * m * m * 8,
    }
    if inp.layer_kind == "csc":
        out["CSC column cache"] = 2 * inp.n_obs * ch.gene_block * 8
    return out


def _factor_phase_bytes(inp: PlanInputs) -> int:
    """The worker that factorises: Lp, C1, C2 and the metric's two m × m work arrays."""
    return 5 * inp.m * inp.m * 8


@dataclass(frozen=True)
class MemoryEstimate:
    worker_peak: int  # the largest worker
    base: int
    shared: dict[str, int]
    tasks: dict[str, int]
    factor_phase: int


# Measured here (benchmarks/plan_accuracy.py and a probe of pynndescent alone): the
# nearest-neighbour search leaves ~360 MB of numba-compiled code in the process that ran
# it, plus ~220 B per cell of graph; k-means needs sklearn (~50 MB) and two copies of the
# pooled embedding.
_NN_FIXED = 360 * 1024**2
_NN_PER_CELL = 220
_KM_FIXED = 50 * 1024**2


def prep_memory(inp: PlanInputs, n_workers: int, nn_compiled: bool, embedded: bool) -> dict[str, int]:
    """Extra resident memory of the model-preparation step (length scale, landmarks)."""
    nn = 0 if inp.ls_given else _NN_FIXED + _NN_PER_CELL * inp.n1
    km = 0 if inp.landmarks_given or inp.m >= inp.n1 + inp.n2 else _KM_FIXED + 2 * (inp.n1 + inp.n2) * inp.d * 8
    if embedded:
        return {"helper processes (client host)": nn + km}
    if nn_compiled:
        nn = 0  # already in the first worker's resident memory
    if n_workers > 1:
        return {"first worker (length scale)": nn, "second worker (k-means)": km}
    # One worker runs both, concurrently; k-means' buffers are gone before the engine starts.
    return {"first worker (length scale)": nn, "first worker (k-means, before the engine)": km}


def estimate_worker_memory(inp: PlanInputs, ch: Choice, threads: int, base_rss: int,
                           prep: dict[str, int] | None = None) -> MemoryEstimate:
    tasks = _task_bytes(inp, ch)
    shared = _shared_bytes(inp, ch)
    per_thread = max(tasks.values())
    steady = sum(shared.values()) + threads * per_thread
    factor = _factor_phase_bytes(inp) + sum(v for k, v in shared.items() if not k.startswith("factors"))
    # XLA's compiled kernels for the run's shapes, and allocator slack on the working set.
    run_part = _JIT_OVERHEAD + int(_SLACK * max(steady, factor))
    prep = prep or {}
    first = prep.get("first worker (length scale)", 0)
    if "second worker (k-means)" in prep:
        peak = base_rss + max(first + run_part, max(prep["second worker (k-means)"], run_part))
    else:  # one worker: k-means ends before the engine starts, the search's code stays
        peak = base_rss + first + max(run_part, prep.get("first worker (k-means, before the engine)", 0))
    return MemoryEstimate(peak, base_rss, shared, tasks, _factor_phase_bytes(inp))


_JIT_OVERHEAD = 40 * 1024**2
_SLACK = 1.0


def choose(inp: PlanInputs, res: ClusterResources, base_rss: int, *, cell_chunk: int | None,
           gene_block: int | None, null_gene_block: int | None,
           prep: dict[str, int] | None = None,
           max_task_bytes: int | None = None) -> tuple[Choice, MemoryEstimate, bool]:
    """The largest layout under the memory budget (user-given sizes are kept as given).

    Returns the choice, its estimate and whether it fits the budget.
    """
    budget = MEMORY_FRACTION * res.memory_limit
    kc = kernel_chunk_for(inp.m)
    if inp.layer_kind == "dense" and inp.layer_chunks is not None:
        rbase, cbase = inp.layer_chunks
    else:
        rbase, cbase = 1024, 32
    cell_opts = ([cell_chunk] if cell_chunk else
                 sorted({min(inp.n_obs, rbase * k) for k in (max(1, 8192 // rbase), max(1, 4096 // rbase),
                                                             max(1, 2048 // rbase), 1)}, reverse=True))
    cbase_opts = [cbase * k for k in (max(1, 256 // cbase), max(1, 128 // cbase), max(1, 64 // cbase), 1)]
    gene_opts = [gene_block] if gene_block else sorted({min(inp.n_vars, g) for g in cbase_opts}, reverse=True)
    n12 = inp.n1 + inp.n2
    kc_opts = sorted({kc, max(128, kc // 2), max(128, kc // 4)}, reverse=True)
    best = None
    for k in kc_opts:
        for g in gene_opts:
            for c in cell_opts:
                if null_gene_block:
                    nb_opts = [null_gene_block]
                else:
                    top = int(max(8, min(g, 160_000_000 // max(1, 20 * n12))))
                    nb_opts = sorted({top} | {x for x in (128, 64, 32, 16, 8) if x < top}, reverse=True)
                for nb in nb_opts:
                    ch = Choice(int(c), int(g), int(nb), int(k))
                    est = estimate_worker_memory(inp, ch, res.threads_per_worker, base_rss, prep)
                    if est.worker_peak <= budget and (max_task_bytes is None
                                                      or max(est.tasks.values()) <= max_task_bytes):
                        return ch, est, True
                    best = (ch, est)
    ch, est = best
    return ch, est, False


def _max_landmarks(inp: PlanInputs, res: ClusterResources, base_rss: int, prep: dict[str, int],
                   cell_chunk: int | None, gene_block: int | None, null_gene_block: int | None) -> int:
    """The largest landmark count whose plan fits the budget (0 if none does)."""
    lo, hi = 0, inp.m
    while hi - lo > max(1, inp.m // 200):
        mid = (lo + hi) // 2
        _, _, ok = choose(replace(inp, m=mid), res, base_rss, cell_chunk=cell_chunk, gene_block=gene_block,
                          null_gene_block=null_gene_block, prep=prep)
        lo, hi = (mid, hi) if ok else (lo, mid)
    return int(lo // 100 * 100 if lo >= 1000 else lo)


def client_peak_bytes(inp: PlanInputs, current_rss: int) -> tuple[int, dict[str, int]]:
    n12 = inp.n1 + inp.n2
    parts = {
        "embedding (as stored and float64)": inp.n_obs * inp.d * 16 + n12 * inp.d * 8,
        "masks and per-cell results": inp.n_obs * 40,
        "per-gene results and nulls": (inp.n_vars + inp.n_null) * 64,
    }
    if inp.in_memory:
        lb = 4 if inp.layer_dtype == "float32" else 8
        parts["layers copied back into the AnnData"] = (3 * inp.n_obs * inp.n_vars * lb) if inp.store_layers else 0
    return int(current_rss + sum(parts.values())), parts


# --------------------------------------------------------------------------------------
# The plan


@dataclass
class Problem:
    message: str
    fixes: list[str] = field(default_factory=list)


@dataclass
class ResourcePlan:
    """A resource plan: what a run will need on this cluster, and the layout it will use.

    Print it (or show it in Jupyter) for the report; :meth:`to_dict` for scripts; pass it
    to :func:`kompot_dask.de` with ``plan=`` to run exactly this layout.
    """

    status: str
    inputs: PlanInputs
    resources: ClusterResources
    calibration: Calibration
    cell_chunk: int
    gene_block: int
    null_gene_block: int
    kernel_chunk: int
    n_std_tasks: int
    n_tasks: int
    task_counts: dict[str, int]
    peak_worker_bytes: int
    peak_client_bytes: int
    factor_worker_bytes: int
    helper_bytes: int
    memory_allocations: list[dict[str, Any]]
    output_fields: list[dict[str, Any]]
    output_bytes: int
    flops: dict[str, float]
    phase_seconds: dict[str, float]
    wall_seconds: float | None
    info: list[str]
    warnings: list[str]
    errors: list[Problem]
    created: float = field(default_factory=time.time)

    @property
    def feasible(self) -> bool:
        return self.status != "INFEASIBLE"

    # ---- serialisation ---------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary (top level: status, peaks, bytes, seconds, layout)."""
        return {
            "status": self.status,
            "peak_worker_bytes": int(self.peak_worker_bytes),
            "peak_client_bytes": int(self.peak_client_bytes),
            "factor_worker_bytes": int(self.factor_worker_bytes),
            "helper_bytes": int(self.helper_bytes),
            "output_bytes": int(self.output_bytes),
            "wall_seconds": None if self.wall_seconds is None else float(self.wall_seconds),
            "cell_chunk": int(self.cell_chunk),
            "gene_block": int(self.gene_block),
            "null_gene_block": int(self.null_gene_block),
            "kernel_chunk": int(self.kernel_chunk),
            "n_tasks": int(self.n_tasks),
            "task_counts": {k: int(v) for k, v in self.task_counts.items()},
            "phase_seconds": {k: float(v) for k, v in self.phase_seconds.items()},
            "flops": {k: float(v) for k, v in self.flops.items()},
            "memory_allocations": [dict(a) for a in self.memory_allocations],
            "output_fields": [dict(f) for f in self.output_fields],
            "inputs": _jsonable(asdict(self.inputs)),
            "resources": _jsonable(asdict(self.resources)) | {"total_threads": self.resources.total_threads},
            "calibration": _jsonable(asdict(self.calibration)),
            "info": list(self.info),
            "warnings": list(self.warnings),
            "errors": [{"message": e.message, "fixes": list(e.fixes)} for e in self.errors],
        }

    # ---- report ----------------------------------------------------------------------

    def report(self) -> Report:
        """The plan as a :class:`~kompot_dask._report.Report` (text and HTML)."""
        errors = [(e.message, [f"fix: {f}" for f in e.fixes]) for e in self.errors]
        return Report("RESOURCE USAGE PLAN", [
            Section("Cluster Resources", _cluster_lines(self)),
            Section("Data", _data_lines(self.inputs)),
            Section("Layout", [
                f"cell_chunk={self.cell_chunk:,}  gene_block={self.gene_block}  "
                f"null_gene_block={self.null_gene_block}  kernel_chunk={self.kernel_chunk}",
                "Tasks: " + ", ".join(f"{v} {k}" for k, v in self.task_counts.items()) + f" ({self.n_tasks} in all)",
            ]),
            Section("Total Requirements", _total_lines(self)),
            Section("Memory Allocations", _allocation_lines(self.memory_allocations), mark="•"),
            Section("Output Fields", _output_lines(self.output_fields, self.inputs.in_memory)),
            Section("Info", self.info, mark="ℹ", optional=True),
            Section("Warnings", self.warnings, mark="⚠", optional=True),
            Section("Errors", errors, mark="✗", optional=True),
        ], status=f"STATUS: {_STATUS_TEXT[self.status]}", tone=_STATUS_TONE[self.status])

    def __str__(self) -> str:
        return self.report().text()

    def __repr__(self) -> str:
        return str(self)

    def _repr_html_(self) -> str:
        return self.report().html()


def _cluster_lines(plan: ResourcePlan) -> list[str]:
    r, cal = plan.resources, plan.calibration
    lines = [
        f"Cluster: {r.source}: {r.n_workers} worker(s) × {r.threads_per_worker} thread(s)",
        f"Memory per worker: {format_bytes(r.memory_limit)}"
        + ("" if r.memory_limit_set else " (no limit set: host memory / workers)")
        + f"; budget for this run {format_bytes(MEMORY_FRACTION * r.memory_limit)} ({MEMORY_FRACTION:.0%})",
        f"Client host: {format_bytes(r.host_memory_available)} available of {format_bytes(r.host_memory_total)}",
        f"Disk: {format_bytes(r.disk_free)} free at {r.disk_path}",
    ]
    if cal.timed:
        lines.append(
            f"Calibration ({cal.seconds:.1f} s on the workers): kernel {cal.kernel_s * 1e9:.1f} ns/(cell·landmark), "
            f"GEMM {cal.gemm_flops / 1e9:.1f} GFLOP/s, rank-k {cal.syrk_flops / 1e9:.1f} GFLOP/s, "
            f"Cholesky {cal.chol_flops / 1e9:.1f} GFLOP/s per thread"
            + (f", read {format_bytes(cal.read_bytes_s)}/s" if cal.read_bytes_s else "")
        )
    lines.append(f"Worker memory before the run (kernels loaded): {format_bytes(cal.worker_rss)}")
    return lines


def _data_lines(inp: PlanInputs) -> list[str]:
    return [
        f"Cells: {inp.n_obs:,} (condition 1: {inp.n1:,}, condition 2: {inp.n2:,}; predicted at {inp.n_pred:,})",
        f"Genes: {inp.n_selected:,} tested of {inp.n_vars:,}, + {inp.n_null:,} null genes",
        f"Expression: {'X' if inp.layer is None else 'layers/' + inp.layer} ({inp.layer_kind}"
        + (f", chunks {inp.layer_chunks}" if inp.layer_chunks else "")
        + (f", nnz {inp.layer_nnz:,}" if inp.layer_nnz is not None else "") + ")",
        f"Landmarks: {inp.m:,}; embedding dimension {inp.d}",
    ]


def _total_lines(plan: ResourcePlan) -> list[str]:
    r = plan.resources
    lines = [
        f"Peak memory per worker: {format_bytes(plan.peak_worker_bytes)} "
        f"({plan.peak_worker_bytes / max(1, r.memory_limit):.0%} of its limit)",
        f"Peak memory on the factorising worker (m × m phase): {format_bytes(plan.factor_worker_bytes)}",
        f"Peak memory on the client: {format_bytes(plan.peak_client_bytes)}"
        + (f" (+ {format_bytes(plan.helper_bytes)} in two short-lived helper processes for the "
           "length scale and landmarks)" if plan.helper_bytes else ""),
        f"Written to the store: {format_bytes(plan.output_bytes)} (uncompressed)",
    ]
    if plan.wall_seconds is not None:
        lines.append(
            f"Wall time: ~{format_time(plan.wall_seconds)} on {r.total_threads} thread(s) "
            "(" + ", ".join(f"{k} {format_time(v)}" for k, v in plan.phase_seconds.items()) + ")"
        )
    else:
        lines.append("Wall time: not predicted (plan made without calibration; use kd.plan)")
    lines.append("FLOPs: " + ", ".join(f"{k} {v / 1e9:,.1f} G" for k, v in plan.flops.items()))
    return lines


def _allocation_lines(allocations: list[dict[str, Any]]) -> list[str]:
    return [f"{a['what']} {tuple(a['shape']) if a.get('shape') else ''}: {format_bytes(a['bytes'])}"
            + (f" ({a['where']})" if a.get("where") else "") for a in allocations]


def _output_lines(output_fields: list[dict[str, Any]], in_memory: bool) -> list[tuple[str, list[str]]]:
    out = []
    for loc in ("layers", "obs", "var"):
        fields = [f for f in output_fields if f["location"] == loc]
        if fields:
            out.append((f"{'adata.' if in_memory else ''}{loc}:", [
                f"- {f['name']} ({format_bytes(f['bytes'])})"
                + (f" [OVERWRITES run_id={f['overwrites_run_id']}]" if f["overwrites"] else "")
                for f in fields]))
    return out


_STATUS_TEXT = {
    "FEASIBLE": "✓ FEASIBLE",
    "FEASIBLE WITH WARNINGS": "⚠ FEASIBLE WITH WARNINGS - Proceed with caution",
    "INFEASIBLE": "✗ INFEASIBLE - see Errors for what would fix it",
}
_STATUS_TONE = {"FEASIBLE": "ok", "FEASIBLE WITH WARNINGS": "warn", "INFEASIBLE": "error"}


class InfeasiblePlanError(RuntimeError):
    """``de()`` refused a plan that does not fit the cluster."""

    def __init__(self, plan: ResourcePlan):
        self.plan = plan
        reasons = "\n".join(
            f"  - {e.message}" + "".join(f"\n      fix: {f}" for f in e.fixes) for e in plan.errors
        )
        super().__init__(f"the run does not fit this cluster; nothing was computed or written:\n{reasons}")


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# --------------------------------------------------------------------------------------
# Time model


def _flops_and_seconds(inp: PlanInputs, ch: Choice, res: ClusterResources, cal: Calibration,
                       n_real_blocks: int, n_null_blocks: int, embedded: bool) -> tuple[dict, dict, float | None]:
    m, d = inp.m, inp.d
    n12 = inp.n1 + inp.n2
    G_tested = inp.n_selected
    flops = {
        "landmarks (k-means)": 0.0 if inp.landmarks_given or m >= n12 else 2.0 * n12 * m * d * _KMEANS_ITERS,
        "fit (S, factors)": float(n12 * m * m + 3 * m**3),
        "genes (fit, scores, predictions)": float(
            2 * n12 * m * G_tested + 6 * m * m * G_tested
            + (4 * inp.n_pred * m * G_tested if inp.store_layers else 0)),
        "null genes": float(2 * n12 * m * inp.n_null + 6 * m * m * inp.n_null),
        "per-cell std": float(3 * inp.n_pred * m * m),
    }
    if not cal.timed:
        return flops, {}, None
    T = res.total_threads
    kern = cal.kernel_s
    gemm = cal.gemm_flops
    s: dict[str, float] = {}
    # Length scale and landmarks run concurrently before the engine.
    ls_t = 0.0
    if not inp.ls_given:
        ls_t = (0.0 if (cal.nn_compiled and not embedded) else _NN_COMPILE_S) + _NN_S_PER_CELL * inp.n1 * d / 10
    km_t = 0.0
    if flops["landmarks (k-means)"]:
        km_t = _KMEANS_S * n12 * m * d * (_REF_GEMM_FLOPS / gemm)
    s["landmarks and length scale"] = max(ls_t, km_t) + (_PROCESS_START_S if embedded else 0.0)
    # S per condition on half the workers, then the factor chain (three potrf in parallel,
    # then the metric on one thread).
    s_t = (n12 * m * kern + n12 * m * m / cal.syrk_flops) / max(1, min(T, 2 * max(1, res.n_workers // 2)))
    chol = (m**3 / 3) / cal.chol_flops
    fac_t = chol + 2 * m * m * kern + (2 * m**3 + m**3 / 3) / cal.chol_flops
    s["fit (S and factors)"] = _ENGINE_EFFICIENCY * (s_t + fac_t)
    # Gene blocks, null blocks, std tasks: parallel over all threads.
    read_rate = cal.read_bytes_s or 2e8
    write_rate = cal.write_bytes_s or 1e8
    lb = 4 if inp.layer_dtype == "float32" else 8
    blocks = (n_real_blocks * n12 * m * kern
              + 2 * n12 * m * G_tested / gemm + 6 * m * m * G_tested / gemm
              + inp.n_obs * n_real_blocks * ch.gene_block * inp.layer_itemsize / read_rate)
    if inp.store_layers:
        blocks += (n_real_blocks * inp.n_pred * m * kern + 4 * inp.n_pred * m * G_tested / gemm
                   + 3 * inp.n_obs * n_real_blocks * ch.gene_block * lb / write_rate)
    nulls = (n_null_blocks * n12 * m * kern + 2 * n12 * m * inp.n_null / gemm
             + 6 * m * m * inp.n_null / gemm
             + inp.n_obs * min(inp.n_vars, inp.n_null + n_null_blocks * 256) * inp.layer_itemsize / read_rate)
    std = inp.n_pred * m * kern + 3 * inp.n_pred * m * m / gemm
    s["gene and null blocks, std"] = _ENGINE_EFFICIENCY * (blocks + nulls + std) / T
    s["FDR and commit"] = 2.0 + inp.n_obs * 2e-7
    total = sum(s.values())
    return flops, s, total


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
# Whole tasks run slower than their calibrated kernels (Python between kernels, memory
# traffic, scheduling): measured engine phases took 1.2–1.8× the kernel-only estimate.
_ENGINE_EFFICIENCY = 1.5


# --------------------------------------------------------------------------------------
# Assembling a plan


def make_plan(inp: PlanInputs, res: ClusterResources, cal: Calibration, *, cell_chunk: int | None,
              gene_block: int | None, null_gene_block: int | None, current_client_rss: int,
              embedded: bool, task_counter, max_task_bytes: int | None = None) -> ResourcePlan:
    """Decide the layout and predict memory, disk and time. ``task_counter(choice)`` returns
    the engine's task counts for a layout (the engine's own arithmetic)."""
    prep = prep_memory(inp, res.n_workers, cal.nn_compiled, embedded)
    ch, est, fits = choose(inp, res, cal.worker_rss, cell_chunk=cell_chunk, gene_block=gene_block,
                           null_gene_block=null_gene_block, prep=prep, max_task_bytes=max_task_bytes)
    counts = task_counter(ch)
    n_tasks = int(sum(counts.values()))
    client_peak, client_parts = client_peak_bytes(inp, current_client_rss)
    helper_bytes = 0
    if embedded and prep.get("helper processes (client host)"):
        helper_bytes = 2 * cal.worker_rss + prep["helper processes (client host)"]
    budget = MEMORY_FRACTION * res.memory_limit
    lb = 4 if inp.layer_dtype == "float32" else 8
    field_bytes = {"layers": inp.n_obs * inp.n_vars * lb, "obs": inp.n_obs * 8, "var": inp.n_vars * 8}
    prev = {(loc, name): rid for loc, name, rid in inp.overwrites}
    outputs = [
        {"role": role, "location": loc, "name": name, "bytes": int(field_bytes[loc]),
         "overwrites": (loc, name) in prev, "overwrites_run_id": prev.get((loc, name))}
        for role, loc, name in inp.fields
    ]
    output_bytes = int(sum(f["bytes"] for f in outputs))
    flops, phases, wall = _flops_and_seconds(inp, ch, res, cal, counts.get("gene blocks", 0),
                                             counts.get("null-gene blocks", 0), embedded)
    m, n12, kc = inp.m, inp.n1 + inp.n2, ch.kernel_chunk
    alloc = [
        {"what": "worker at rest (Python, Dask, JAX; measured)", "shape": None, "bytes": cal.worker_rss, "where": "each worker"},
    ]
    for k, v in est.shared.items():
        shape = [m, m] if k.startswith("factors") else ([inp.n_obs, inp.d] if k.startswith("embedding") else None)
        alloc.append({"what": k, "shape": shape, "bytes": int(v), "where": "each worker"})
    alloc += [
        {"what": "factor phase working set (Lp, C1, C2, metric work arrays)", "shape": [m, m],
         "bytes": est.factor_phase, "where": "the factorising worker"},
        {"what": f"gene-block task (tile {ch.cell_chunk}×{ch.gene_block}, projections {m}×{ch.gene_block})",
         "shape": [ch.cell_chunk, ch.gene_block], "bytes": est.tasks["real_block"], "where": "per thread"},
        {"what": f"null-gene task ({n12} cells × {ch.null_gene_block} nulls)", "shape": [n12, ch.null_gene_block],
         "bytes": est.tasks["null_block"], "where": "per thread"},
        {"what": f"per-cell std task (kernel block {m}×{kc})", "shape": [m, kc], "bytes": est.tasks["std"], "where": "per thread"},
    ]
    for k, v in prep.items():
        if v:
            alloc.append({"what": "length scale (pynndescent) and k-means landmarks", "shape": None,
                          "bytes": int(v), "where": k})
    alloc += [{"what": k, "shape": None, "bytes": int(v), "where": "client"} for k, v in client_parts.items() if v]
    info = [
        f"Null distribution uses {inp.n_null:,} permuted genes (total: {inp.n_selected + inp.n_null:,} genes scored)",
        f"No task holds more than {ch.cell_chunk:,} cells × {ch.gene_block} genes of expression; "
        f"a full cells × genes array would be {format_bytes(inp.n_obs * inp.n_vars * 8)}",
        "Spilling cannot help: JAX buffers are unmanaged memory to Dask, so the plan keeps the peak "
        f"under {MEMORY_FRACTION:.0%} of the worker limit",
    ]
    warnings: list[str] = []
    errors: list[Problem] = []
    if inp.overwrites and inp.overwrite is True:
        info.append(f"{len(inp.overwrites)} field(s) of earlier runs will be overwritten (overwrite=True)")
    elif inp.overwrites:
        p = inp.previous_run or {}
        shown = ", ".join(f"{loc}.{n}" for loc, n, _ in inp.overwrites[:5])
        more = f" and {len(inp.overwrites) - 5} more" if len(inp.overwrites) > 5 else ""
        warnings.append(
            f"Results already exist in these fields (run_id={p.get('run_id')}, {p.get('timestamp')}, "
            f"{p.get('condition1')} → {p.get('condition2')}); they will be overwritten: {shown}{more}"
        )
    if not res.memory_limit_set:
        warnings.append("The workers have no memory limit; the plan assumed host memory / workers "
                        f"= {format_bytes(res.memory_limit)}")
    if cell_chunk or gene_block or null_gene_block:
        info.append("Sizes given in ComputeSettings were kept as given")
    if not fits and est.worker_peak <= budget:
        errors.append(Problem(
            f"No layout keeps one task under ComputeSettings(max_task_bytes={max_task_bytes:,}); the smallest "
            f"tried needs {format_bytes(max(est.tasks.values()))}",
            [f"max_task_bytes ≥ {max(est.tasks.values()):,}", "max_task_bytes=None (the memory budget still applies)"]))
    elif not fits:
        fixed = est.worker_peak - res.threads_per_worker * max(est.tasks.values())
        need = est.worker_peak / MEMORY_FRACTION
        fixes = [
            f"workers with memory_limit ≥ {format_bytes(need)} (now {format_bytes(res.memory_limit)})",
        ]
        if res.threads_per_worker > 1:
            one = (est.worker_peak - (res.threads_per_worker - 1) * max(est.tasks.values())) / MEMORY_FRACTION
            fixes.append(f"1 thread per worker (then ≥ {format_bytes(one)} per worker), and more workers")
        factor_share = est.shared["factors C1, C2, R, Lp"]
        if factor_share > 0.2 * budget:
            m_max = _max_landmarks(inp, res, cal.worker_rss, prep, cell_chunk, gene_block, null_gene_block)
            fixes.append(
                f"fewer landmarks: GPSettings(n_landmarks={m_max:,}) or less (now {m:,}; "
                f"the m × m factors alone take {format_bytes(factor_share)} per worker)"
                if m_max else f"fewer landmarks do not suffice here (now {m:,})"
            )
        if inp.store_layers and not fits:
            lazy = estimate_worker_memory(replace(inp, store_layers=False), ch, res.threads_per_worker,
                                          cal.worker_rss, prep)
            if lazy.worker_peak < est.worker_peak:
                fixes.append(
                    f"StorageSettings(store_layers=False): no imputed/fold-change layers are materialised "
                    f"(peak {format_bytes(lazy.worker_peak)} per worker); per-gene and per-cell results are still written"
                )
        nn_extra = prep.get("first worker (length scale)", 0)
        if nn_extra and est.worker_peak - nn_extra <= budget:
            fixes.append(
                f"GPSettings(ls=...) with a known length scale: the nearest-neighbour search adds "
                f"{format_bytes(nn_extra)} to the first worker (or run once on this cluster so it is compiled)"
            )
        if not gene_block and ch.gene_block > 8:
            fixes.append("a smaller gene block does not help enough here: already at the smallest tried "
                         f"({ch.gene_block}); the fixed part is {format_bytes(fixed)}")
        else:
            fixes.append(f"a smaller ComputeSettings(gene_block=...) / cell_chunk (now {ch.gene_block} / {ch.cell_chunk})")
        errors.append(Problem(
            f"Peak memory per worker {format_bytes(est.worker_peak)} exceeds the budget "
            f"{format_bytes(budget)} ({MEMORY_FRACTION:.0%} of the {format_bytes(res.memory_limit)} limit)", fixes))
    elif est.worker_peak > 0.8 * budget:
        warnings.append(f"Peak memory per worker is {est.worker_peak / budget:.0%} of the budget")
    if est.factor_phase + cal.worker_rss > res.memory_limit * MEMORY_FRACTION and fits:
        warnings.append("The factorising worker briefly needs "
                        f"{format_bytes(est.factor_phase + cal.worker_rss)} during the m × m phase")
    if client_peak > 0.8 * res.host_memory_available:
        errors.append(Problem(
            f"The client needs ~{format_bytes(client_peak)} but its host has {format_bytes(res.host_memory_available)} available",
            ["run on a host with more memory", "use a zarr store instead of an in-memory AnnData"
             if inp.in_memory else "free memory on the client host"]))
    new_bytes = output_bytes
    if new_bytes > res.disk_free:
        layer_bytes = sum(f["bytes"] for f in outputs if f["location"] == "layers")
        errors.append(Problem(
            f"The outputs need {format_bytes(new_bytes)} of disk; {format_bytes(res.disk_free)} is free at {res.disk_path}",
            [f"free {format_bytes(new_bytes - res.disk_free)} more disk",
             f"StorageSettings(store_layers=False) writes no layers (saves {format_bytes(layer_bytes)}); "
             "the per-gene and per-cell results are still written",
             "StorageSettings(layer_dtype='float32') halves the layers" if inp.layer_dtype == "float64" else
             "kompot_dask.cleanup() of earlier runs' layers"]))
    elif new_bytes > 0.8 * res.disk_free:
        warnings.append(f"The outputs take {new_bytes / res.disk_free:.0%} of the free disk")
    status = "INFEASIBLE" if errors else ("FEASIBLE WITH WARNINGS" if warnings else "FEASIBLE")
    factor_worker = cal.worker_rss + _JIT_OVERHEAD + int(_SLACK * (est.factor_phase + sum(
        v for k, v in est.shared.items() if not k.startswith("factors")))) + prep.get("first worker (length scale)", 0)
    return ResourcePlan(
        status=status, inputs=inp, resources=res, calibration=cal,
        cell_chunk=ch.cell_chunk, gene_block=ch.gene_block, null_gene_block=ch.null_gene_block,
        kernel_chunk=ch.kernel_chunk, n_std_tasks=int(counts.get("std tasks", 0)), n_tasks=n_tasks,
        task_counts=counts, peak_worker_bytes=int(max(est.worker_peak, factor_worker)),
        peak_client_bytes=client_peak, factor_worker_bytes=int(factor_worker), helper_bytes=int(helper_bytes),
        memory_allocations=alloc, output_fields=outputs, output_bytes=output_bytes, flops=flops,
        phase_seconds=phases, wall_seconds=wall, info=info, warnings=warnings, errors=errors,
    )

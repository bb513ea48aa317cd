"""Resource planning against the live cluster: chunk sizes, memory, disk and time.

A plan is made from three things:

* the **inputs** (shapes, layout and dtype of the expression element, cells per condition,
  landmarks, genes and null genes, which outputs are written), read from metadata;
* the **cluster** (workers, threads and memory limit per worker from the scheduler, or the
  LocalCluster kompot_dask would start; free disk where the store lives);
* a **calibration** measured on the workers themselves (the tasks are the engine's,
  :mod:`kompot_dask._engine.calibration`): the resident memory of a worker once the JAX
  kernels are loaded, and the time of a few kernel blocks of the run's own shapes (kernel
  evaluation, projection GEMM, rank-k update, Cholesky, one tile read).

The layout and cost model that turns these into chunk sizes, task counts, memory and
time is :mod:`kompot_dask._layout`, shared with the engine. This module adds the cluster
and calibration figures, judges feasibility (and what would make an infeasible run fit),
and renders the report. :func:`kompot_dask.de` executes exactly the :class:`Layout` a plan
chose (``plan.layout``).
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
from ._engine.cluster import cluster_workers
from ._layout import (
    MEMORY_FRACTION,
    Calibration,
    Chunks,
    ClusterResources,
    Layout,
    MemoryEstimate,
    PlanInputs,
    PrepMemory,
    TaskCounts,
    choose,
    client_peak_bytes,
    estimate_worker_memory,
    factor_worker_bytes,
    flops_and_seconds,
    kernel_chunk_for,
    make_layout,
    max_landmarks,
    output_bytes,
    prep_memory,
    staging_bytes,
    task_counts,
)
from ._report import Report, Section

logger = logging.getLogger("kompot_dask")

__all__ = [
    "MEMORY_FRACTION", "Calibration", "ClusterResources", "InfeasiblePlanError", "PlanInputs", "Problem",
    "ResourcePlan", "calibrate", "make_plan", "resources_from_client",
]


# --------------------------------------------------------------------------------------
# The cluster and the calibration


def resources_from_client(client, store_path: str, *, embedded: bool) -> ClusterResources:
    workers = cluster_workers(client)
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


def calibrate(client, inputs: PlanInputs, reader=None, *, timed: bool = True) -> Calibration:
    """Run the probe (and, with ``timed``, the timed kernel blocks) on every worker.

    The timed blocks have the run's shapes: one on-disk chunk of the expression element
    (1024 × 256 where it has none) and the kernel chunk of the run's landmark count.
    """
    t0 = time.perf_counter()
    rows, cols = inputs.layer_chunks if inputs.layer_chunks else (1024, 256)
    res = measure_workers(client, d=inputs.d, m=inputs.m, width=min(cols, 256),
                          kernel_chunk=kernel_chunk_for(inputs.m), reader=reader, tile_rows=rows,
                          tile_cols=cols, timed=timed)
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
# The plan



@dataclass
class Problem:
    """What makes a plan infeasible, with the changes that would fix it."""

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
    layout: Layout
    """The cut of the work that ``de(plan=...)`` runs."""
    tasks: TaskCounts
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

    # The chunk sizes and counts under their user-facing names (the report, to_dict, tests).

    @property
    def cell_chunk(self) -> int:
        return self.layout.cell_chunk

    @property
    def gene_block(self) -> int:
        return self.layout.gene_block

    @property
    def null_gene_block(self) -> int:
        return self.layout.null_gene_block

    @property
    def kernel_chunk(self) -> int:
        return self.layout.kernel_chunk

    @property
    def n_std_tasks(self) -> int:
        return self.tasks.std

    @property
    def n_tasks(self) -> int:
        return self.tasks.total

    @property
    def task_counts(self) -> dict[str, int]:
        return self.tasks.labelled()

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
    for loc in ("layers", "obs", "var", "varm", "obsp"):
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
# Assembling a plan


@dataclass
class _Findings:
    """What the report lists under Info, Warnings and Errors, in the order found."""

    info: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    errors: list[Problem] = field(default_factory=list)


def plan_on(client, inputs: PlanInputs, selected: np.ndarray, *, cell_chunk: int | None,
            gene_block: int | None, null_gene_block: int | None, max_task_bytes: int | None,
            embedded: bool, reader=None, timed: bool) -> ResourcePlan:
    """The plan of ``inputs`` on the cluster of ``client``: its resources, a calibration
    on its workers (timed when ``timed``; a memory probe only otherwise) and the model."""
    res = resources_from_client(client, inputs.store_path, embedded=embedded)
    cal = calibrate(client, inputs, reader if timed else None, timed=timed)
    return make_plan(inputs, res, cal, selected=selected, cell_chunk=cell_chunk, gene_block=gene_block,
                     null_gene_block=null_gene_block, current_client_rss=int(psutil.Process().memory_info().rss),
                     embedded=embedded, max_task_bytes=max_task_bytes)


def make_plan(inp: PlanInputs, res: ClusterResources, cal: Calibration, *, selected: np.ndarray,
              cell_chunk: int | None, gene_block: int | None, null_gene_block: int | None,
              current_client_rss: int, embedded: bool, max_task_bytes: int | None = None) -> ResourcePlan:
    """Decide the layout and predict memory, disk and time.

    Parameters
    ----------
    inp, res, cal
        The run's sizes, the cluster's resources and the calibration on its workers.
    selected
        Store columns of the genes tested (the gene blocks that hold none are not run).
    cell_chunk, gene_block, null_gene_block
        Sizes the user gave (``ComputeSettings``), kept as given; ``None`` lets the model choose.
    current_client_rss
        The client's resident memory now.
    embedded
        The cluster is the LocalCluster kompot_dask started (its helpers run on the client host).
    max_task_bytes
        ``ComputeSettings.max_task_bytes``.
    """
    prep = prep_memory(inp, res.n_workers, cal.nn_compiled, embedded)
    ch, est, fits = choose(inp, res, cal.worker_rss, cell_chunk=cell_chunk, gene_block=gene_block,
                           null_gene_block=null_gene_block, prep=prep, max_task_bytes=max_task_bytes)
    layout = make_layout(inp.n_obs, inp.n_vars, res.total_threads, cell_chunk=ch.cell_chunk,
                         gene_block=ch.gene_block, null_gene_block=ch.null_gene_block, kernel_chunk=ch.kernel_chunk)
    counts = task_counts(layout, inp.n_vars, selected, inp.n_null, inp.n_pred, res.n_workers, res.total_threads,
                         inp.layer_kind, inp.layer_nnz,
                         zscores=inp.writes("fold_change_zscores"),
                         n_samples=inp.n_samples, sample_cells=inp.n12 if inp.n_samples else 0,
                         std=inp.store_layers or not inp.n_samples, leverage_cells=inp.n12 if inp.empirical else 0,
                         group_tasks=inp.group_tasks, permutations=inp.permutations)
    client_peak, client_parts = client_peak_bytes(inp, current_client_rss)
    if prep.client:
        client_parts["model preparation (length scale, then k-means)"] = prep.client
        client_peak += prep.client
    outputs = _output_fields(inp)
    total_output = int(sum(f["bytes"] for f in outputs))
    flops, phases, wall = flops_and_seconds(inp, ch, res, cal, counts, embedded)
    found = _Findings(info=_layout_info(inp, ch))
    _note_overwrites(inp, found)
    if not res.memory_limit_set:
        found.warnings.append("The workers have no memory limit; the plan assumed host memory / workers "
                              f"= {format_bytes(res.memory_limit)}")
    if cell_chunk or gene_block or null_gene_block:
        found.info.append("Sizes given in ComputeSettings were kept as given")
    _note_worker_memory(inp, res, cal, ch, est, prep, fits, found, asked=(cell_chunk, gene_block, null_gene_block),
                        max_task_bytes=max_task_bytes)
    _note_client_and_disk(inp, res, client_peak, outputs, total_output, found)
    _note_posterior_covariance(inp, res, cal, est, found)
    status = "INFEASIBLE" if found.errors else ("FEASIBLE WITH WARNINGS" if found.warnings else "FEASIBLE")
    factor_worker = factor_worker_bytes(est, prep)
    return ResourcePlan(
        status=status, inputs=inp, resources=res, calibration=cal, layout=layout, tasks=counts,
        peak_worker_bytes=int(max(est.worker_peak, factor_worker)), peak_client_bytes=client_peak,
        factor_worker_bytes=int(factor_worker),
        helper_bytes=int(2 * cal.worker_rss + prep.helpers if embedded and prep.helpers else 0),
        memory_allocations=_allocations(inp, ch, est, prep, cal, client_parts), output_fields=outputs,
        output_bytes=total_output, flops=flops, phase_seconds=phases, wall_seconds=wall, info=found.info,
        warnings=found.warnings, errors=found.errors,
    )


def _output_fields(inp: PlanInputs) -> list[dict[str, Any]]:
    prev = {(loc, name): rid for loc, name, rid in inp.overwrites}
    return [
        {"role": role, "location": loc, "name": name, "bytes": output_bytes(inp, loc),
         "overwrites": (loc, name) in prev, "overwrites_run_id": prev.get((loc, name))}
        for role, loc, name in inp.fields
    ]


def _allocations(inp: PlanInputs, ch: Chunks, est: MemoryEstimate, prep: PrepMemory, cal: Calibration,
                 client_parts: dict[str, int]) -> list[dict[str, Any]]:
    """Each term of the memory model, with its shape and where it lives (the report's rows)."""
    m, n12, kc, sh = inp.m, inp.n12, ch.kernel_chunk, est.shared
    worker = "each worker"
    alloc = [
        {"what": "worker at rest (Python, Dask, JAX; measured)", "shape": None, "bytes": cal.worker_rss, "where": worker},
        {"what": "embedding and masks", "shape": [inp.n_obs, inp.d], "bytes": int(sh.embedding), "where": worker},
        {"what": "landmarks", "shape": None, "bytes": int(sh.landmarks), "where": worker},
        {"what": "factors C1, C2, Lp, R (packed)" if inp.implicit_metric else "factors C1, C2, Lp (packed), R",
         "shape": [m, m], "bytes": int(sh.factors), "where": worker},
    ]
    if inp.layer_kind == "csc":
        alloc.append({"what": "CSC column cache", "shape": None, "bytes": int(sh.csc_cache), "where": worker})
    alloc += [
        {"what": "factor phase working set (Lp, C1, C2, metric covariance and work array)", "shape": [m, m],
         "bytes": est.factor_phase, "where": "the factorising worker"},
        {"what": f"gene-block task (tile {ch.cell_chunk}×{ch.gene_block}, projections {m}×{ch.gene_block})",
         "shape": [ch.cell_chunk, ch.gene_block], "bytes": est.tasks.real_block, "where": "per thread"},
        {"what": f"null-gene task ({n12} cells × {ch.null_gene_block} nulls)", "shape": [n12, ch.null_gene_block],
         "bytes": est.tasks.null_block, "where": "per thread"},
        {"what": f"per-cell std task (kernel block {m}×{kc})", "shape": [m, kc], "bytes": est.tasks.std,
         "where": "per thread"},
    ]
    if est.tasks.transpose:
        alloc.append({"what": "CSR transposition task (one row group, CSR and CSC)", "shape": None,
                      "bytes": est.tasks.transpose, "where": "per thread"})
    method = "exact neighbours" if inp.neighbors == "exact" else "pynndescent"
    alloc += [{"what": f"length scale ({method}) and k-means landmarks", "shape": None, "bytes": int(v),
               "where": where} for where, v in prep.placements() if v]
    alloc += [{"what": k, "shape": None, "bytes": int(v), "where": "client"} for k, v in client_parts.items() if v]
    return alloc


def _layout_info(inp: PlanInputs, ch: Chunks) -> list[str]:
    return [
        f"Null distribution uses {inp.n_null:,} permuted genes (total: {inp.n_selected + inp.n_null:,} genes scored)",
        f"No task holds more than {ch.cell_chunk:,} cells × {ch.gene_block} genes of expression; "
        f"a full cells × genes array would be {format_bytes(inp.n_obs * inp.n_vars * 8)}",
        "Spilling cannot help: JAX buffers are unmanaged memory to Dask, so the plan keeps the peak "
        f"under {MEMORY_FRACTION:.0%} of the worker limit",
    ]


def _note_overwrites(inp: PlanInputs, found: _Findings) -> None:
    if inp.overwrites and inp.overwrite is True:
        found.info.append(f"{len(inp.overwrites)} field(s) of earlier runs will be overwritten (overwrite=True)")
    elif inp.overwrites:
        p = inp.previous_run or {}
        shown = ", ".join(f"{loc}.{n}" for loc, n, _ in inp.overwrites[:5])
        more = f" and {len(inp.overwrites) - 5} more" if len(inp.overwrites) > 5 else ""
        found.warnings.append(
            f"Results already exist in these fields (run_id={p.get('run_id')}, {p.get('timestamp')}, "
            f"{p.get('condition1')} → {p.get('condition2')}); they will be overwritten: {shown}{more}"
        )


def posterior_covariance_bytes(n_pred: int, m: int, n_obs: int) -> int:
    """What the posterior-covariance task holds: Σ₁ + Σ₂ between the predicted cells, its
    m × cells work matrix, and one band of stored rows."""
    return 8 * (n_pred * n_pred + m * n_pred + 1024 * n_obs)


def max_posterior_covariance_cells(room: float, m: int) -> int:
    """The most predicted cells whose posterior covariance fits ``room`` bytes (the band of
    stored rows counted at that size)."""
    # 8 (n² + m·n + 1024·n) ≤ room
    b = m + 1024
    return max(0, int((-b + math.sqrt(b * b + 4 * room / 8)) / 2))


def _note_posterior_covariance(inp: PlanInputs, res: ClusterResources, cal: Calibration, est: MemoryEstimate,
                               found: _Findings) -> None:
    """``store_posterior_covariance``: refused when one worker cannot hold the cells × cells
    matrix beside what it keeps for the run, naming the largest cell count that fits."""
    if not inp.writes("posterior_covariance"):
        return
    need = posterior_covariance_bytes(inp.n_pred, inp.m, inp.n_obs)
    room = MEMORY_FRACTION * res.memory_limit - cal.worker_rss - est.shared.total
    if need <= room:
        found.info.append(f"The posterior covariance ({inp.n_pred:,} × {inp.n_pred:,} cells) is computed by one "
                          f"task holding {format_bytes(need)}")
        return
    most = max_posterior_covariance_cells(room, inp.m)
    found.errors.append(Problem(
        f"StorageSettings(store_posterior_covariance=True) needs the {inp.n_pred:,} × {inp.n_pred:,} cells "
        f"covariance in one worker ({format_bytes(need)}); a worker here has room for {most:,} cells at most",
        [f"restrict the predicted cells to ≤ {most:,} with FilterSettings(cell_filter=...)",
         "store_posterior_covariance=False (kompot_dask's results do not need it)",
         "workers with more memory (ComputeSettings(memory_limit=...))"]))


def _note_worker_memory(inp: PlanInputs, res: ClusterResources, cal: Calibration, ch: Chunks,
                        est: MemoryEstimate, prep: PrepMemory, fits: bool, found: _Findings, *,
                        asked: tuple[int | None, int | None, int | None], max_task_bytes: int | None) -> None:
    """Errors and warnings about the workers' memory: the budget, max_task_bytes, the factor phase."""
    budget = MEMORY_FRACTION * res.memory_limit
    if not fits and est.worker_peak <= budget:
        found.errors.append(Problem(
            f"No layout keeps one task under ComputeSettings(max_task_bytes={max_task_bytes:,}); the smallest "
            f"tried needs {format_bytes(est.tasks.largest)}",
            [f"max_task_bytes ≥ {est.tasks.largest:,}", "max_task_bytes=None (the memory budget still applies)"]))
    elif not fits:
        found.errors.append(_over_budget(inp, res, cal, ch, est, prep, asked))
    elif est.worker_peak > 0.8 * budget:
        found.warnings.append(f"Peak memory per worker is {est.worker_peak / budget:.0%} of the budget")
    if est.factor_phase + cal.worker_rss > res.memory_limit * MEMORY_FRACTION and fits:
        found.warnings.append("The factorising worker briefly needs "
                              f"{format_bytes(est.factor_phase + cal.worker_rss)} during the m × m phase")


def _over_budget(inp: PlanInputs, res: ClusterResources, cal: Calibration, ch: Chunks, est: MemoryEstimate,
                 prep: PrepMemory, asked: tuple[int | None, int | None, int | None]) -> Problem:
    """The peak exceeds the budget even at the smallest layout tried: what would fix it."""
    budget = MEMORY_FRACTION * res.memory_limit
    largest = est.tasks.largest
    fixes = [f"workers with memory_limit ≥ {format_bytes(est.worker_peak / MEMORY_FRACTION)} "
             f"(now {format_bytes(res.memory_limit)})"]
    if res.threads_per_worker > 1:
        one = (est.worker_peak - (res.threads_per_worker - 1) * largest) / MEMORY_FRACTION
        fixes.append(f"1 thread per worker (then ≥ {format_bytes(one)} per worker), and more workers")
    if est.shared.factors > 0.2 * budget:
        m_max = max_landmarks(inp, res, cal.worker_rss, prep, *asked)
        fixes.append(
            f"fewer landmarks: GPSettings(n_landmarks={m_max:,}) or less (now {inp.m:,}; "
            f"the m × m factors alone take {format_bytes(est.shared.factors)} per worker)"
            if m_max else f"fewer landmarks do not suffice here (now {inp.m:,})"
        )
    if inp.store_layers:
        lazy = estimate_worker_memory(replace(inp, store_layers=False), ch, res.threads_per_worker,
                                      cal.worker_rss, prep)
        if lazy.worker_peak < est.worker_peak:
            fixes.append(
                f"StorageSettings(store_layers=False): no imputed/fold-change layers are materialised "
                f"(peak {format_bytes(lazy.worker_peak)} per worker); per-gene and per-cell results are still written"
            )
    nn_extra = prep.first_worker
    if nn_extra and est.worker_peak - nn_extra <= budget:
        fixes.append(
            f"GPSettings(ls=...) with a known length scale: the nearest-neighbour search adds "
            f"{format_bytes(nn_extra)} to the first worker (or run once on this cluster so it is compiled)"
        )
    if not asked[1] and ch.gene_block > 8:
        fixed = est.worker_peak - res.threads_per_worker * largest
        fixes.append("a smaller gene block does not help enough here: already at the smallest tried "
                     f"({ch.gene_block}); the fixed part is {format_bytes(fixed)}")
    else:
        fixes.append(f"a smaller ComputeSettings(gene_block=...) / cell_chunk (now {ch.gene_block} / {ch.cell_chunk})")
    return Problem(
        f"Peak memory per worker {format_bytes(est.worker_peak)} exceeds the budget "
        f"{format_bytes(budget)} ({MEMORY_FRACTION:.0%} of the {format_bytes(res.memory_limit)} limit)", fixes)


def _note_client_and_disk(inp: PlanInputs, res: ClusterResources, client_peak: int,
                          outputs: list[dict[str, Any]], total_output: int, found: _Findings) -> None:
    if client_peak > 0.8 * res.host_memory_available:
        found.errors.append(Problem(
            f"The client needs ~{format_bytes(client_peak)} but its host has "
            f"{format_bytes(res.host_memory_available)} available",
            ["run on a host with more memory", "use a zarr store instead of an in-memory AnnData"
             if inp.in_memory else "free memory on the client host"]))
    need = total_output + staging_bytes(inp)
    if need > res.disk_free:
        layer_bytes = sum(f["bytes"] for f in outputs if f["location"] == "layers")
        found.errors.append(Problem(
            f"The run needs {format_bytes(need)} of disk (outputs {format_bytes(total_output)}, working files "
            f"{format_bytes(need - total_output)}); {format_bytes(res.disk_free)} is free at {res.disk_path}",
            [f"free {format_bytes(need - res.disk_free)} more disk",
             f"StorageSettings(store_layers=False) writes no layers (saves {format_bytes(layer_bytes)}); "
             "the per-gene and per-cell results are still written",
             "StorageSettings(layer_dtype='float32') halves the layers" if inp.layer_dtype == "float64" else
             "kompot_dask.cleanup() of earlier runs' layers"]))
    elif need > 0.8 * res.disk_free:
        found.warnings.append(f"The run takes {need / res.disk_free:.0%} of the free disk")

"""The resource planner: its layout is what the engine runs; it reads the live cluster;
infeasible plans are refused before anything is computed; overwrites are flagged; and
a store has one writer at a time."""

from __future__ import annotations

import json
import os

import anndata as ad
import dask
import pytest
from conftest import tree_digest
from distributed import Client, LocalCluster

import kompot_dask as kd
from kompot_dask._engine.cluster import worker_environment
from kompot_dask._io.lease import LOCK_NAME, store_lock
from kompot_dask._io.store import Store
from kompot_dask._runs import history as runs
from kompot_dask.testing import SyntheticSpec, make_synthetic_adata, write_synthetic_store

ARGS = dict(groupby="Age", condition1="Young", condition2="Old", layer="logged_counts", obsm_key="X_pca")
FAST = dict(gp=kd.GPSettings(n_landmarks=100), fdr=kd.FDRSettings(null_genes=200),
            output=kd.OutputSettings(progress=False))


def _cluster(n_workers: int, threads: int, memory_limit: str, *, enforce: bool = True) -> LocalCluster:
    off = {} if enforce else {f"distributed.worker.memory.{k}": False for k in ("target", "spill", "pause", "terminate")}
    with dask.config.set(off):
        return LocalCluster(n_workers=n_workers, threads_per_worker=threads, processes=True,
                            memory_limit=memory_limit, host="127.0.0.1", dashboard_address=None,
                            env=worker_environment(threads))


def _history(path) -> list[dict]:
    return runs.load_history(Store(path).read_uns_json(runs.HISTORY_KEY))


def test_plan__layout_and_task_counts_are_what_the_engine_runs(small_store, client):
    plan = kd.plan(small_store, **ARGS, **FAST, client=client)
    # feasible; a warning is possible late in the suite: the session's shared workers grow
    # at rest (XLA executables of every earlier test's shapes), and the plan measures them
    assert plan.feasible, str(plan)
    assert plan.wall_seconds is not None and plan.wall_seconds > 0
    assert plan.calibration.timed and plan.calibration.gemm_flops > 0
    kd.de(small_store, **ARGS, **FAST, client=client, plan=plan)
    layout = _history(small_store)[-1]["layout"]
    assert layout["cell_chunk"] == plan.cell_chunk
    assert layout["gene_block"] == plan.gene_block
    assert layout["null_gene_block"] == plan.null_gene_block
    assert layout["kernel_chunk"] == plan.kernel_chunk
    assert layout["n_tasks"] == plan.n_tasks
    # The store's column chunk is 32: gene blocks are whole multiples of it (or all genes).
    assert plan.gene_block % 32 == 0 or plan.gene_block == 90


def test_plan__csr_store_counts_and_prices_its_transposition(tmp_path, client):
    """A CSR layer as anndata writes it: the plan counts the transposition tasks the engine
    runs, and reports their memory."""
    adata = make_synthetic_adata(SyntheticSpec(n_obs=1500, n_vars=90, n_dims=8, seed=4), sparse=True)
    path = str(tmp_path / "csr.zarr")
    adata.write_zarr(path)
    compute = kd.ComputeSettings(cell_chunk=256)
    plan = kd.plan(path, **ARGS, **FAST, compute=compute, client=client)
    # feasible; a warning is possible: the session's shared workers grow at rest (XLA
    # executables of every earlier test's shapes), and the plan measures them as they are
    assert plan.feasible, str(plan)
    assert plan.task_counts["CSR transposition tasks"] >= 1
    assert any(a["what"].startswith("CSR transposition task") for a in plan.memory_allocations)
    kd.de(path, **ARGS, **FAST, compute=compute, client=client, plan=plan)
    assert _history(path)[-1]["layout"]["n_tasks"] == plan.n_tasks


def test_plan__additional_stats_count_the_zscore_pass(small_store, client):
    storage = kd.StorageSettings(store_additional_stats=True, overwrite=True)
    plan = kd.plan(small_store, **ARGS, **FAST, storage=storage, client=client)
    assert plan.task_counts["z-score tasks"] == plan.task_counts["gene blocks"]
    kd.de(small_store, **ARGS, **FAST, storage=storage, client=client, plan=plan)
    assert _history(small_store)[-1]["layout"]["n_tasks"] == plan.n_tasks
    assert "kompot_de_Young_to_Old_fold_change_zscores" in ad.read_zarr(small_store).layers


def test_planner__csr_transposition_disk_and_sparse_projection_time():
    from kompot_dask._layout import Calibration, _block_seconds, staging_bytes, transposed_bytes

    dense = _inputs()
    nnz = int(0.05 * dense.n_obs * dense.n_vars)
    csr = _inputs(layer_kind="csr", layer_chunks=None, layer_nnz=nnz)
    # the transposed values (8 bytes each: float32 and a row index) are working disk
    assert transposed_bytes(dense) == 0 and transposed_bytes(csr) >= nnz * 8
    assert staging_bytes(csr) - staging_bytes(dense) == transposed_bytes(csr)
    res = _resources(8)
    p_dense, p_csr = _plan(dense, res), _plan(csr, res)
    assert p_csr.feasible and p_dense.tasks.transpose == 0 and p_csr.tasks.transpose >= 1
    assert p_csr.peak_worker_bytes <= 0.6 * res.memory_limit
    # at 5 % stored values the projection costs m·nnz: the blocks are predicted faster
    cal = Calibration(worker_rss=400 * 2**20, kernel_s=2e-9, gemm_flops=5e10, syrk_flops=5e10, chol_flops=3e10,
                      read_bytes_s=2e8, write_bytes_s=1e8)
    ch = p_dense.layout.chunks
    t_dense = _block_seconds(dense, ch, res, cal, p_dense.tasks)
    t_csr = _block_seconds(csr, ch, res, cal, p_csr.tasks)
    assert t_csr < t_dense


def test_plan__user_sizes_are_kept(small_store, client):
    compute = kd.ComputeSettings(cell_chunk=300, gene_block=16, null_gene_block=24)
    plan = kd.plan(small_store, **ARGS, **FAST, compute=compute, client=client)
    assert (plan.cell_chunk, plan.gene_block, plan.null_gene_block) == (300, 16, 24)
    assert plan.task_counts["gene blocks"] == 6  # 90 genes / 16
    assert plan.task_counts["null-gene blocks"] == 9  # 200 nulls / 24


def test_plan__report_html_and_dict(small_store, client):
    plan = kd.de(small_store, **ARGS, **FAST, client=client, dry_run=True)
    assert isinstance(plan, kd.ResourcePlan)
    text = str(plan)
    for part in ("RESOURCE USAGE PLAN", "Cluster Resources", "Total Requirements", "Memory Allocations",
                 "Output Fields", "kompot_de_Young_to_Old_mahalanobis", "STATUS: ✓ FEASIBLE"):
        assert part in text
    assert "<table>" in plan._repr_html_() and "STATUS" in plan._repr_html_()
    d = json.loads(json.dumps(plan.to_dict()))
    for key in ("status", "peak_worker_bytes", "peak_client_bytes", "output_bytes", "wall_seconds",
                "cell_chunk", "gene_block", "n_tasks"):
        assert key in d
    assert d["status"] == "FEASIBLE"
    # 3 float32 layers of 1200 × 90, 2 obs and 4 var float64 columns
    assert d["output_bytes"] == 3 * 1200 * 90 * 4 + 2 * 1200 * 8 + 4 * 90 * 8
    assert d["resources"]["n_workers"] == 2


def test_dry_run__computes_and_writes_nothing(small_store, client):
    before = tree_digest(small_store)
    plan = kd.de(small_store, **ARGS, **FAST, client=client, dry_run=True)
    assert plan.feasible
    assert tree_digest(small_store) == before


def test_plan__flags_fields_of_an_earlier_run(small_store, client):
    kd.de(small_store, **ARGS, **FAST, client=client)
    plan = kd.plan(small_store, **ARGS, **FAST, client=client)
    assert plan.status == "FEASIBLE WITH WARNINGS"
    flagged = {f["name"]: f["overwrites_run_id"] for f in plan.output_fields if f["overwrites"]}
    assert flagged["kompot_de_Young_imputed"] == 0
    assert flagged["kompot_de_Young_to_Old_mahalanobis"] == 0
    assert "kompot_de_Young_to_Old_fold_change (" in str(plan)
    assert "[OVERWRITES run_id=0]" in str(plan)
    # A different comparison only overwrites the condition-1 fields it shares.
    other = kd.plan(small_store, **{**ARGS, "condition1": "Old", "condition2": "Young"}, **FAST, client=client)
    names = {f["name"] for f in other.output_fields if f["overwrites"]}
    assert names == {"kompot_de_Old_imputed", "kompot_de_Young_imputed", "kompot_de_Old_std", "kompot_de_Young_std"}
    # overwrite=False turns the warning into an error in the plan.
    strict = kd.plan(small_store, **ARGS, **FAST, storage=kd.StorageSettings(overwrite=False), client=client)
    assert strict.status == "INFEASIBLE"


def test_plan__made_for_other_arguments_is_refused(small_store, client):
    plan = kd.plan(small_store, **ARGS, **FAST, client=client)
    before = tree_digest(small_store)
    with pytest.raises(ValueError, match="n_selected: planned 90, now 2"):
        kd.de(small_store, **ARGS, **FAST, genes=["gene_0", "gene_1"], client=client, plan=plan)
    assert tree_digest(small_store) == before


def test_plan__small_worker_vs_roomy_workers_give_different_feasible_plans(tmp_path):
    """1 worker × 2 threads at 1 GiB versus 2 workers × 1 thread at 3 GiB, same data."""
    spec = SyntheticSpec(n_obs=20_000, n_vars=300, n_dims=10, seed=5)
    path = write_synthetic_store(tmp_path / "mid.zarr", spec, cell_chunk=2048, gene_chunk=32)
    args = dict(**ARGS, gp=kd.GPSettings(n_landmarks=1000, ls=5.0), fdr=kd.FDRSettings(null_genes=500),
                output=kd.OutputSettings(progress=False))
    with _cluster(1, 2, "1GiB") as cl, Client(cl, set_as_default=False) as c:
        small = kd.plan(path, **args, client=c)
        assert small.feasible, str(small)
        kd.de(path, **args, client=c, plan=small)
    with _cluster(2, 1, "3GiB") as cl, Client(cl, set_as_default=False) as c:
        roomy = kd.plan(path, **args, client=c, storage=kd.StorageSettings(overwrite=True))
    assert roomy.status == "FEASIBLE", str(roomy)
    assert small.resources.memory_limit < roomy.resources.memory_limit
    assert (small.cell_chunk * small.gene_block, small.null_gene_block) < (roomy.cell_chunk * roomy.gene_block,
                                                                             roomy.null_gene_block)
    assert small.n_tasks != roomy.n_tasks
    assert small.peak_worker_bytes <= 0.6 * small.resources.memory_limit
    assert _history(path)[-1]["layout"]["n_tasks"] == small.n_tasks


def test_plan__infeasible_is_refused_with_reasons_and_store_unchanged(tmp_path):
    """A 200 MB worker cannot hold m = 5000 factors (4 × 200 MB)."""
    spec = SyntheticSpec(n_obs=6000, n_vars=40, n_dims=8, seed=2)
    path = write_synthetic_store(tmp_path / "s.zarr", spec, cell_chunk=1024, gene_chunk=32)
    args = dict(**ARGS, gp=kd.GPSettings(n_landmarks=5000, ls=5.0), output=kd.OutputSettings(progress=False))
    before = tree_digest(path)
    # The nanny must not kill the worker for exceeding 200 MB at rest: only the plan judges.
    with _cluster(1, 1, "200MB", enforce=False) as cl, Client(cl, set_as_default=False) as c:
        plan = kd.plan(path, **args, client=c)
        assert plan.status == "INFEASIBLE"
        text = str(plan)
        assert "INFEASIBLE" in text and "Errors:" in text
        fixes = " ".join(f for e in plan.errors for f in e.fixes)
        # The worker at rest (~400 MB) already exceeds the 120 MB budget: more memory is
        # the fix, and the plan says fewer landmarks would not be enough.
        assert "memory_limit ≥" in fixes and "fewer landmarks do not suffice" in fixes
        assert "factors C1, C2, Lp, R (packed) (5000, 5000): 381.55 MiB" in text  # four packed
        with pytest.raises(kd.InfeasiblePlanError, match="does not fit this cluster") as err:
            kd.de(path, **args, client=c, plan=plan)
        assert "memory_limit ≥" in str(err.value)
        # Without a plan, de() plans by itself and refuses as well.
        with pytest.raises(kd.InfeasiblePlanError):
            kd.de(path, **args, client=c)
    assert tree_digest(path) == before


def test_lock__second_writer_is_refused(small_store, client):
    before = tree_digest(small_store)
    with store_lock(os.fspath(small_store), "another kompot_dask.de"):
        with pytest.raises(kd.StoreLockedError, match="another kompot_dask.de"):
            kd.de(small_store, **ARGS, **FAST, client=client)
    after = tree_digest(small_store)
    assert after == before
    assert not os.path.exists(os.path.join(small_store, LOCK_NAME))


def test_lock__stale_lease_of_a_dead_process_is_taken_over(small_store, client):
    import socket

    with open(os.path.join(small_store, LOCK_NAME), "w") as fh:
        json.dump({"host": socket.gethostname(), "pid": 2**22 + 12345, "purpose": "crashed run"}, fh)
    kd.de(small_store, **ARGS, **FAST, client=client)
    assert len(_history(small_store)) == 1
    assert not os.path.exists(os.path.join(small_store, LOCK_NAME))
    assert ad.read_zarr(small_store).var.shape[0] == 90


def test_in_memory__second_run_continues_history_and_sees_layers(client, caplog):
    adata = make_synthetic_adata(SyntheticSpec(n_obs=600, n_vars=30, n_dims=6, seed=4))
    kd.de(adata, **ARGS, **FAST, client=client)
    assert "kompot_de_Young_imputed" in adata.layers
    with caplog.at_level("WARNING", logger="kompot_dask"):
        kd.de(adata, **ARGS, **FAST, client=client)
    # 6 var/obs fields + the 3 layers, which only the AnnData (not the temporary store) holds
    assert "Fields that will be overwritten: var.kompot_de_Young_to_Old_mahalanobis" in caplog.text
    assert "and 4 more" in caplog.text
    history = runs.load_history(adata.uns[runs.HISTORY_KEY])
    assert [h["run_id"] for h in history] == [0, 1]
    plan = kd.plan(adata, **ARGS, **FAST, client=client)
    flagged = {f["name"] for f in plan.output_fields if f["overwrites"]}
    assert "kompot_de_Young_imputed" in flagged and plan.inputs.in_memory


# ---- the planner's decisions as pure functions (no cluster) ------------------------------

def _inputs(**kw):
    from kompot_dask._layout import LandmarkSource
    from kompot_dask._planner import PlanInputs

    base = dict(store_path="/tmp/x.zarr", n_obs=100_000, n_vars=2000, n_selected=2000, n1=50_000, n2=50_000,
                n_pred=100_000, d=20, m=2000, n_null=2000, layer="logged_counts", layer_kind="dense",
                layer_itemsize=4, layer_chunks=(4096, 256), layer_nnz=None, store_layers=True,
                layer_dtype="float32", dtype="float64", ls_given=True, landmark_source=LandmarkSource.KMEANS,
                fields=(("imputed1", "layers", "a"), ("imputed2", "layers", "b"),
                        ("fold_change", "layers", "c"), ("mahalanobis", "var", "d")),
                overwrites=())
    base.update(kw)
    return PlanInputs(**base)


def _resources(memory_gib: float, workers: int = 2, threads: int = 1, disk_gib: float = 100.0):
    from kompot_dask._planner import ClusterResources

    return ClusterResources(source="test", n_workers=workers, threads_per_worker=threads,
                            memory_limit=int(memory_gib * 2**30), memory_limit_set=True,
                            host_memory_total=64 * 2**30, host_memory_available=32 * 2**30,
                            disk_path="/tmp", disk_free=int(disk_gib * 2**30))


def _plan(inp, res, max_task_bytes=None):
    import numpy as np

    from kompot_dask._planner import Calibration, make_plan

    cal = Calibration(worker_rss=400 * 2**20)
    return make_plan(inp, res, cal, selected=np.arange(inp.n_selected), cell_chunk=None, gene_block=None,
                     null_gene_block=None, current_client_rss=300 * 2**20, embedded=False,
                     max_task_bytes=max_task_bytes)


def test_planner__peak_stays_under_the_budget_and_shrinks_with_memory():
    roomy = _plan(_inputs(), _resources(8))
    tight = _plan(_inputs(), _resources(1.2))
    assert roomy.status == "FEASIBLE" and tight.feasible
    for p in (roomy, tight):
        assert p.peak_worker_bytes <= 0.6 * p.resources.memory_limit
    assert tight.null_gene_block < roomy.null_gene_block or tight.cell_chunk < roomy.cell_chunk
    assert tight.n_tasks > roomy.n_tasks
    # Memory is set by chunk sizes, not data size: 10× the cells adds only the n × d embedding
    # and the null columns (which the planner then cuts smaller).
    big = _plan(_inputs(n_obs=1_000_000, n1=500_000, n2=500_000, n_pred=1_000_000), _resources(8))
    assert big.feasible and big.peak_worker_bytes <= 0.6 * 8 * 2**30


def test_planner__disk_shortage_is_infeasible_with_figures():
    plan = _plan(_inputs(), _resources(8, disk_gib=0.5))
    assert plan.status == "INFEASIBLE"
    (err,) = plan.errors
    assert "of disk" in err.message
    assert any("store_layers=False" in f and "saves" in f for f in err.fixes)
    assert "free" in err.fixes[0] and "GiB more disk" in err.fixes[0]


def test_planner__factors_too_large_suggests_fewer_landmarks():
    plan = _plan(_inputs(m=20_000), _resources(4))
    assert plan.status == "INFEASIBLE"
    fixes = " ".join(plan.errors[0].fixes)
    m_fix = int(fixes.split("n_landmarks=")[1].split(")")[0].replace(",", ""))
    assert 1000 < m_fix < 20_000
    again = _plan(_inputs(m=m_fix), _resources(4))
    assert again.feasible, str(again)


def test_planner__max_task_bytes_bounds_every_task():
    free = _plan(_inputs(), _resources(8))
    capped = _plan(_inputs(), _resources(8), max_task_bytes=64 * 2**20)
    assert capped.feasible and capped.n_tasks > free.n_tasks
    per_thread = [a["bytes"] for a in capped.memory_allocations if a["where"] == "per thread"]
    assert max(per_thread) <= 64 * 2**20 < max(a["bytes"] for a in free.memory_allocations if a["where"] == "per thread")
    impossible = _plan(_inputs(), _resources(8), max_task_bytes=1000)
    assert impossible.status == "INFEASIBLE" and "max_task_bytes" in impossible.errors[0].message

"""The layout and cost model as pure functions: the cut covers every cell and gene once,
task counts follow the cut, the landmark cap lives in one place, and the model needs
nothing but sizes."""

from __future__ import annotations

import ast
import math
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kompot_dask import _layout as L


@settings(max_examples=300, deadline=None)
@given(n_obs=st.integers(1, 5000), n_vars=st.integers(1, 3000), n_threads=st.integers(1, 64),
       cell_chunk=st.integers(1, 6000), gene_block=st.integers(1, 4000), data=st.data())
def test_layout__covers_every_cell_and_gene_exactly_once(n_obs, n_vars, n_threads, cell_chunk, gene_block, data):
    lay = L.make_layout(n_obs, n_vars, n_threads, cell_chunk=cell_chunk, gene_block=gene_block,
                        null_gene_block=8, kernel_chunk=128)
    rows = np.zeros(n_obs, dtype=int)
    for r0, r1 in lay.row_ranges:
        assert 0 <= r0 < r1 <= n_obs and r1 - r0 <= lay.cell_chunk
        rows[r0:r1] += 1
    assert np.all(rows == 1)
    # Every selected gene lies in exactly one gene block, and no block holds another gene.
    selected = np.sort(data.draw(st.sets(st.integers(0, n_vars - 1), min_size=1, max_size=min(n_vars, 200)).map(list)))
    genes = np.zeros(n_vars, dtype=int)
    for block in L.real_blocks(lay, n_vars, selected):
        assert block["c1"] - block["c0"] <= lay.gene_block and len(block["local"])
        genes[block["c0"] + block["local"]] += 1
    expected = np.zeros(n_vars, dtype=int)
    expected[selected] = 1
    assert np.array_equal(genes, expected)
    assert lay.cell_chunk == min(cell_chunk, n_obs) and lay.gene_block == min(gene_block, n_vars)
    assert lay.n_real_blocks == math.ceil(n_vars / lay.gene_block)


def test_layout__cell_chunk_keeps_its_name_and_chunks_round_trip():
    lay = L.make_layout(1000, 90, 2, cell_chunk=256, gene_block=32, null_gene_block=20, kernel_chunk=512)
    assert lay.row_ranges == ((0, 256), (256, 512), (512, 768), (768, 1000))
    assert lay.chunks == L.Chunks(cell_chunk=256, gene_block=32, null_gene_block=20, kernel_chunk=512)
    assert L.make_layout(1000, 90, 2, **vars(lay.chunks)) == lay


@pytest.mark.parametrize(("n_obs", "n_threads", "n_pred", "std"), [
    (1000, 2, 1000, 2),  # one kernel chunk (512 cells) of predicted cells per std part
    (100_000, 2, 100_000, 196),
    (100_000, 2, 3, 1),  # a partial chunk is one task
    (100_000, 2, 0, 0),  # no predicted cells, no std task
])
def test_task_counts__follow_the_layout(n_obs, n_threads, n_pred, std):
    lay = L.make_layout(n_obs, 90, n_threads, cell_chunk=256, gene_block=16, null_gene_block=24, kernel_chunk=512)
    counts = L.task_counts(lay, 90, np.arange(90), n_null=200, n_pred=n_pred, n_workers=2, n_threads=n_threads)
    assert counts.gene_blocks == 6  # 90 genes / 16
    assert counts.null_blocks == 9  # 200 nulls / 24
    # each std part is two tasks: its Lp part (run beside the fit) and the std task
    assert counts.std == 2 * std
    assert counts.std == 2 * len(L.std_parts(lay, np.arange(n_pred)))
    # kernel sums: fixed-size parts; kbar, Lp, the metric's prior part, C1, C2, the metric, R, the diagonal flag
    assert counts.fit == 2 * 1 + L.kernel_sum_parts(n_pred) + 8 + len(L.FIT_OUTPUTS)
    assert counts.total == sum(counts.labelled().values())
    assert list(counts.labelled()) == ["fit tasks", "gene blocks", "null-gene blocks", "std tasks"]


def test_task_counts__skip_gene_blocks_without_tested_genes_and_nulls_when_none():
    lay = L.make_layout(500, 100, 1, cell_chunk=500, gene_block=10, null_gene_block=8, kernel_chunk=128)
    counts = L.task_counts(lay, 100, np.array([3, 4, 55]), n_null=0, n_pred=500, n_workers=1, n_threads=1)
    assert counts.gene_blocks == 2 and counts.null_blocks == 0


@pytest.mark.parametrize(("requested", "cells", "provided", "expected"), [
    (5000, 1200, None, L.Landmarks(1200, L.LandmarkSource.ALL_CELLS, 5000)),
    (1200, 1200, None, L.Landmarks(1200, L.LandmarkSource.ALL_CELLS, 1200)),
    (100, 1200, None, L.Landmarks(100, L.LandmarkSource.KMEANS, 100)),
    (5000, 1200, 37, L.Landmarks(37, L.LandmarkSource.PROVIDED, 5000)),
])
def test_landmarks__all_cells_cap_in_one_place(requested, cells, provided, expected):
    assert L.landmarks_for(requested, cells, provided) == expected


def test_landmark_source__values_are_what_the_record_stores():
    assert [s.value for s in L.LandmarkSource] == ["provided", "all_cells", "kmeans"]


def _inputs(**kw) -> L.PlanInputs:
    base = dict(store_path="/x.zarr", n_obs=100_000, n_vars=2000, n_selected=2000, n1=50_000, n2=50_000,
                n_pred=100_000, d=20, m=2000, n_null=2000, layer=None, layer_kind="dense", layer_itemsize=4,
                layer_chunks=(4096, 256), layer_nnz=None, store_layers=True, layer_dtype="float32",
                dtype="float64", ls_given=False, landmark_source=L.LandmarkSource.KMEANS, fields=(), overwrites=())
    return L.PlanInputs(**{**base, **kw})


def test_prep_memory__placement_decides_who_holds_the_search_and_kmeans():
    inp = _inputs()
    helpers = L.prep_memory(inp, 2, nn_compiled=False, embedded=True)
    assert helpers.first_worker == 0 and helpers.helpers == helpers.length_scale + helpers.kmeans > 0
    two = L.prep_memory(inp, 2, nn_compiled=False, embedded=False)
    assert two.placement is L.PrepPlacement.TWO_WORKERS and two.helpers == 0
    assert [w for w, _ in two.placements()] == ["first worker (length scale)", "second worker (k-means)"]
    compiled = L.prep_memory(inp, 1, nn_compiled=True, embedded=False)
    assert compiled.placement is L.PrepPlacement.ONE_WORKER and compiled.first_worker == 0
    # No k-means when every cell is a landmark, no search when the length scale is given.
    none = L.prep_memory(_inputs(ls_given=True, landmark_source=L.LandmarkSource.ALL_CELLS), 2, False, False)
    assert none.length_scale == none.kmeans == 0


def test_choose__largest_layout_under_the_budget_and_estimate_is_monotone():
    res = L.ClusterResources("t", 2, 2, 4 * 2**30, True, 64 * 2**30, 32 * 2**30, "/", 2**40)
    ch, est, fits = L.choose(_inputs(), res, 400 * 2**20, cell_chunk=None, gene_block=None, null_gene_block=None)
    assert fits and est.worker_peak <= L.MEMORY_FRACTION * res.memory_limit
    assert ch.cell_chunk % 4096 == 0 and ch.gene_block % 256 == 0  # whole store chunks
    bigger = L.estimate_worker_memory(_inputs(), L.Chunks(ch.cell_chunk * 2, ch.gene_block, ch.null_gene_block,
                                                          ch.kernel_chunk), 2, 400 * 2**20)
    assert bigger.worker_peak > est.worker_peak
    assert est.shared.besides_factors == est.shared.total - est.shared.factors


def test_flops_and_seconds__untimed_plans_predict_no_time():
    inp = _inputs()
    res = L.ClusterResources("t", 2, 1, 8 * 2**30, True, 64 * 2**30, 32 * 2**30, "/", 2**40)
    ch = L.Chunks(4096, 256, 64, 2048)
    counts = L.TaskCounts(fit=12, gene_blocks=8, null_blocks=32, std=8)
    flops, seconds, wall = L.flops_and_seconds(inp, ch, res, L.Calibration(worker_rss=0), counts, False)
    assert seconds == {} and wall is None and flops["landmarks (k-means)"] > 0
    cal = L.Calibration(worker_rss=0, kernel_s=2e-9, gemm_flops=3e10, syrk_flops=2e10, chol_flops=1e10)
    _, seconds, wall = L.flops_and_seconds(inp, ch, res, cal, counts, False)
    assert wall == pytest.approx(sum(seconds.values())) and wall > 0
    all_cells = _inputs(landmark_source=L.LandmarkSource.ALL_CELLS)
    assert L.flops_and_seconds(all_cells, ch, res, cal, counts, False)[0]["landmarks (k-means)"] == 0


def test_layout_module__imports_nothing_but_numpy():
    tree = ast.parse(open(os.path.join(os.path.dirname(L.__file__), "_layout.py"), encoding="utf-8").read())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "the layout model imports nothing of the package"
            imported.add(node.module.split(".")[0])
    assert imported <= {"__future__", "math", "dataclasses", "enum", "typing", "numpy"}


def test_prep_memory__fast_path_runs_in_the_client_with_bounded_pools():
    inp = _inputs(n1=5_000_000, n2=5_000_000, neighbors="exact", neighbor_sample=20_000, landmark_sample=100_000)
    prep = L.prep_memory(inp, 2, nn_compiled=False, embedded=True)
    assert prep.placement is L.PrepPlacement.CLIENT and prep.helpers == 0 and prep.first_worker == 0
    assert inp.kmeans_pool == 100_000 and inp.nn_queries == 20_000
    assert prep.kmeans < 100 * 1024**2  # the k-means pool is the sample, not the 10M cells
    assert prep.client == max(prep.length_scale, prep.kmeans)
    assert [w for w, _ in prep.placements()] == ["client process (length scale, then k-means)"]
    est = L.estimate_worker_memory(inp, L.Chunks(4096, 256, 64, 512), 2, 300 << 20, prep)
    assert est.worker_peak == L.estimate_worker_memory(inp, L.Chunks(4096, 256, 64, 512), 2, 300 << 20).worker_peak
    # the exact search's cost is linear in the cells: sample × condition-1 cells × d
    flops = L._flops(inp)
    assert flops["length scale (exact neighbours)"] == 2.0 * 20_000 * 5_000_000 * 20
    assert flops["landmarks (k-means)"] == 2.0 * 100_000 * 2000 * 20 * L._KMEANS_ITERS

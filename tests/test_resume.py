"""A resumed run reuses what the interrupted one finished: its task markers and its fit."""

from __future__ import annotations

import os

import numpy as np
import pytest
import zarr

from kompot_dask._engine import graph as engine
from kompot_dask._io import commit
from kompot_dask._io.store import Store
from kompot_dask._layout import FIT_OUTPUTS, make_layout
from kompot_dask._numerics import fdr as fdr_mod

FIT_TASKS = {"_cross_gram_task", "_kernel_sum_task", "_mean_task", "_named_factor", "_condition_factor_task",
             "prior_covariance", "landmark_metric"}


def _inputs(path: str) -> tuple[Store, dict]:
    store = Store(path)
    age = store.obs["Age"].to_numpy()
    codes = np.where(age == "Young", 1, np.where(age == "Old", 2, 0)).astype(np.int8)
    X = np.ascontiguousarray(store.read_obsm("X_pca"), dtype=np.float64)
    null_sources, null_seeds = fdr_mod.choose_null_genes(store.n_vars, 40, 0)
    layout = make_layout(store.n_obs, store.n_vars, 2, cell_chunk=256, gene_block=32,
                                null_gene_block=20, kernel_chunk=256)
    return store, dict(
        X=X, codes=codes, pred=np.ones(store.n_obs, dtype=bool), selected=np.arange(store.n_vars),
        Z=X[codes > 0][::9].copy(), ls=60.0, sigma=1.0, eps=1e-8, null_sources=null_sources,
        null_seeds=null_seeds, layer_names={"fold_change": "kompot_fc"}, layer_dtype="float64",
        dtype="float64", layout=layout, progress=False,
    )


def _run(client, store: Store, staging: commit.Staging, kw: dict, monkeypatch) -> tuple[engine.EngineResult, list]:
    """run_engine, recording the name of every function it submits."""
    submitted: list[str] = []
    submit = client.submit

    def recording(fn, *args, **kwargs):
        submitted.append(getattr(fn, "__name__", repr(fn)))
        return submit(fn, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(client, "submit", recording)
        res = engine.run_engine(client, store, store.layer_info("logged_counts"), staging=staging, **kw)
    return res, submitted


def _results(res: engine.EngineResult) -> dict[str, np.ndarray]:
    """The gathered results and the staged fold-change layer."""
    return {"columns": res.columns, "mahalanobis": res.mahalanobis, "mean_lfc": res.mean_lfc,
            "null": res.null_mahalanobis, "std1": res.std1, "std2": res.std2,
            "fold_change": zarr.open_array(res.staged["fold_change"], mode="r")[:]}


@pytest.mark.parametrize("lost", [("real-0", "null-1", "stdk-0"), ("real-1", "real-2")])
def test_resume__remaining_blocks_reuse_the_saved_fit_bit_for_bit(small_store, client, monkeypatch, lost):
    store, kw = _inputs(small_store)
    staging = commit.Staging.create(small_store)
    first, submitted = _run(client, store, staging, kw, monkeypatch)
    assert FIT_TASKS <= set(submitted)
    assert submitted.count("_save_fit_task") == len(FIT_OUTPUTS)
    fit = commit.saved_arrays(staging.sub("fit"), FIT_OUTPUTS)
    assert fit is not None
    expected = _results(first)
    markers = staging.sub("markers")
    n_all = len(commit.read_markers(markers))
    for name in lost:  # as if the run had died before these tasks finished
        os.remove(os.path.join(markers, f"{name}.npz"))
    mtimes = {k: os.stat(p).st_mtime_ns for k, p in fit.items()}

    again, submitted = _run(client, store, staging, kw, monkeypatch)
    assert not FIT_TASKS & set(submitted), submitted
    assert "_save_fit_task" not in submitted
    assert submitted.count("_load_factor_task") == 3  # Lp, C1, C2
    assert submitted.count("_load_metric_task") == 1  # R, kept as its packed factor
    assert again.n_reused == n_all - len(lost)
    # the lost tasks (a std part with the task of its Lp part) and the five loads (Lp, C1, C2, R, kbar)
    assert again.n_tasks == len(lost) + sum(name.startswith("stdk-") for name in lost) + 5
    assert {k: os.stat(p).st_mtime_ns for k, p in fit.items()} == mtimes  # the fit was read, not rewritten
    got = _results(again)
    for key, value in expected.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)
    staging.remove()


def test_resume__incomplete_saved_fit_is_fitted_again(small_store, client, monkeypatch):
    store, kw = _inputs(small_store)
    staging = commit.Staging.create(small_store)
    first, _ = _run(client, store, staging, kw, monkeypatch)
    os.remove(os.path.join(staging.sub("fit"), "R.npy"))  # died while the fit was being saved
    os.remove(os.path.join(staging.sub("markers"), "real-0.npz"))
    again, submitted = _run(client, store, staging, kw, monkeypatch)
    assert FIT_TASKS <= set(submitted) and not {"_load_factor_task", "_load_metric_task"} & set(submitted)
    assert commit.saved_arrays(staging.sub("fit"), FIT_OUTPUTS) is not None
    np.testing.assert_array_equal(again.mahalanobis, first.mahalanobis)
    staging.remove()

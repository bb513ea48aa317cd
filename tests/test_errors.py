"""Bad inputs: each one gets a clear error, raised before any compute, and the store is
left byte-identical.

Every error names the problem, the value seen and what to do. Errors that can be found
from metadata, obs/var or the embedding are raised before a Dask client is even
resolved (the ``no_compute`` fixture makes reaching compute an AssertionError). NaN/inf
in the expression layer is only seen inside the block tasks; there the staged layers
are removed, so the store is still byte-identical afterwards.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import time

import anndata as ad
import numpy as np
import pytest
import zarr
from conftest import tree_digest

import kompot_dask as kd
import kompot_dask._api as analysis_mod
from kompot_dask._engine import graph as engine
from kompot_dask._io.commit import STAGING_DIR
from kompot_dask._io.store import Store, StoreError
from kompot_dask._runs import history as runs
from kompot_dask._settings import SettingsError
from kompot_dask.testing import make_synthetic_adata

GROUPBY, COND1, COND2 = "Age", "Young", "Old"
LAYER, OBSM = "logged_counts", "X_pca"


def _fast(**overrides):
    """Settings that keep a run short: fixed length scale (no numba compile), few
    landmarks and null genes, no progress bar."""
    kwargs = dict(
        gp=kd.GPSettings(n_landmarks=100, ls=50.0),
        fdr=kd.FDRSettings(null_genes=20),
        output=kd.OutputSettings(progress=False),
    )
    kwargs.update(overrides)
    return kwargs


def _de(path, **kwargs):
    """``kd.de`` on the small store's labels, layer and embedding unless overridden."""
    args = dict(groupby=GROUPBY, condition1=COND1, condition2=COND2, layer=LAYER, obsm_key=OBSM)
    args.update({k: kwargs.pop(k) for k in list(kwargs) if k in args or k == "genes"})
    return kd.de(path, **args, **_fast(**kwargs))


def _snapshot(path) -> tuple[dict[str, str], list[str]]:
    """Content hash of every file plus the list of directories (an empty leftover
    staging directory holds no file but must not stay either)."""
    dirs = sorted(os.path.relpath(root, path) for root, _, _ in os.walk(path))
    return tree_digest(path), dirs


def _open_rw(path) -> zarr.Group:
    return zarr.open_group(store=os.fspath(path), mode="r+", use_consolidated=False)


def _forbidden(*args, **kwargs):
    raise AssertionError("de() reached compute; the bad input should have been rejected before")


def _forbid_compute(monkeypatch) -> None:
    monkeypatch.setattr(analysis_mod, "resolve_client", _forbidden)
    monkeypatch.setattr(engine, "prepare_model", _forbidden)
    monkeypatch.setattr(engine, "run_engine", _forbidden)


@pytest.fixture
def no_compute(monkeypatch):
    """Reaching the client or the engine is a test failure: the error must come first."""
    _forbid_compute(monkeypatch)


def _wait_until_workers_idle(client, timeout: float = 60.0) -> None:
    """Block until no worker executes a task. A cancelled task that had already started
    still runs to its end on its worker; it must not write into the store afterwards."""

    def n_executing(dask_worker):
        return len(dask_worker.state.executing)

    deadline = time.monotonic() + timeout
    while sum(client.run(n_executing).values()):
        assert time.monotonic() < deadline, "workers still busy after the failed run"
        time.sleep(0.05)


@pytest.fixture
def staggered_blocks(client):
    """On the workers, gene block 1 starts late and every staged-tile write is slow
    (the array is opened, then the write waits), so that when block 1 fails the other
    blocks are surely in the middle of writing their tiles."""

    def patch(on):
        import time

        import kompot_dask._engine.graph as eng
        import kompot_dask._io.tiles as st

        if not (hasattr(eng, "write_tile") and hasattr(eng, "_real_block_task")):
            return False
        originals = getattr(eng, "_test_errors_originals", None)
        if originals is None:
            originals = eng._test_errors_originals = (eng.write_tile, eng._real_block_task)
        write_tile, real_block_task = originals
        if not on:
            eng.write_tile, eng._real_block_task = originals
            del eng._test_errors_originals
            return True

        def slow_write_tile(store_path, elem_path, *args, **kwargs):
            st._open_array_cached(store_path, elem_path, "r+")
            time.sleep(0.5)
            return write_tile(store_path, elem_path, *args, **kwargs)

        def late_block_task(ctx, block, *args, **kwargs):
            if block["index"] == 1:
                time.sleep(1.0)
            return real_block_task(ctx, block, *args, **kwargs)

        eng.write_tile, eng._real_block_task = slow_write_tile, late_block_task
        return True

    assert all(client.run(patch, True).values()), "engine.write_tile/_real_block_task not found on the workers"
    yield
    client.run(patch, False)


@contextlib.contextmanager
def _failing_block(client, index: int, delay: float = 0.0):
    """On the workers, real-gene block ``index`` raises ``engine.InjectedFailure`` after
    ``delay`` seconds. The block task runs in the worker processes, where a monkeypatch of
    this process does not reach, so the task function is replaced there (a task resolves
    ``engine._real_block_task`` by name when a worker unpickles it)."""

    def patch(on, index, delay):
        import time

        import kompot_dask._engine.graph as eng

        if not on:
            eng._real_block_task = getattr(eng._real_block_task, "unpatched", eng._real_block_task)
            return True
        inner = eng._real_block_task

        def failing_block_task(ctx, block, *args, **kwargs):
            if block["index"] == index:
                time.sleep(delay)
                raise eng.InjectedFailure(f"injected failure in gene block {index}")
            return inner(ctx, block, *args, **kwargs)

        failing_block_task.unpatched = inner
        eng._real_block_task = failing_block_task
        return True

    assert all(client.run(patch, True, index, delay).values())
    try:
        yield
    finally:
        client.run(patch, False, index, delay)


@pytest.fixture
def store_and_snapshot(small_store, no_compute):
    """The small store and its snapshot; the test's end asserts it is unchanged."""
    before = _snapshot(small_store)
    yield small_store
    assert _snapshot(small_store) == before, "the store was modified by a failed run"


# ---------------------------------------------------------------------------
# The store itself
# ---------------------------------------------------------------------------


def test_de__missing_path(tmp_path, no_compute):
    missing = tmp_path / "nowhere.zarr"
    with pytest.raises(StoreError, match=r"does not exist.*kompot_dask\.ingest") as excinfo:
        _de(missing)
    assert str(missing) in str(excinfo.value)
    assert not missing.exists()


def test_de__missing_path_file_url(tmp_path, no_compute):
    missing = tmp_path / "nowhere.zarr"
    with pytest.raises(StoreError, match="does not exist") as excinfo:
        _de(f"file://{missing}")
    assert str(missing) in str(excinfo.value)
    assert not missing.exists()


def test_de__plain_directory_is_not_a_store(tmp_path, no_compute):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("not a zarr store")
    before = _snapshot(plain)
    with pytest.raises(StoreError, match=r"is not a zarr store.*kompot_dask\.ingest") as excinfo:
        _de(plain)
    assert str(plain) in str(excinfo.value)
    assert _snapshot(plain) == before


def test_de__h5ad_file_is_not_a_store(tmp_path, no_compute):
    h5ad = tmp_path / "data.h5ad"
    make_synthetic_adata(n_obs=50, n_vars=5, n_dims=3).write_h5ad(h5ad)
    digest = tree_digest(tmp_path)
    with pytest.raises(StoreError, match=r"is not a zarr store.*Convert an \.h5ad with kompot_dask\.ingest"):
        _de(h5ad)
    assert tree_digest(tmp_path) == digest


def test_de__plain_zarr_group_is_not_anndata(tmp_path, no_compute):
    path = tmp_path / "group.zarr"
    group = zarr.open_group(store=str(path), mode="w")
    group.create_array("values", shape=(4,), dtype="f8")
    before = _snapshot(path)
    with pytest.raises(StoreError, match=r"not an AnnData store.*encoding-type=None.*'anndata'.*kompot_dask\.ingest"):
        _de(path)
    assert _snapshot(path) == before


def test_de__read_only_store(store_and_snapshot):
    """chmod -R a-w. Tests run as root, for whom os.access() says every directory is
    writable, so check_writable also treats a directory without any write bit as
    read-only; the test is meaningful for root and for ordinary users."""
    path = store_and_snapshot

    def chmod_tree(writable: bool) -> None:
        for root, dirs, files in os.walk(path):
            for d in dirs + [""]:
                os.chmod(os.path.join(root, d), 0o755 if writable else 0o555)
            for f in files:
                os.chmod(os.path.join(root, f), 0o644 if writable else 0o444)

    chmod_tree(writable=False)
    try:
        assert not os.stat(path).st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
        with pytest.raises(PermissionError, match=r"is read-only.*Make it writable or copy it first") as excinfo:
            _de(path)
        assert str(path) in str(excinfo.value)
    finally:
        chmod_tree(writable=True)


# ---------------------------------------------------------------------------
# Labels, conditions and cell filters
# ---------------------------------------------------------------------------


def test_de__groupby_column_missing(store_and_snapshot):
    with pytest.raises(KeyError, match=r"obs column 'Condition' \(groupby\) not found.*available columns: \['Age'\]"):
        _de(store_and_snapshot, groupby="Condition")


@pytest.mark.parametrize("which", ["condition1", "condition2"])
def test_de__condition_not_present(store_and_snapshot, which):
    with pytest.raises(ValueError, match=rf"{which}='Middle' is not a value of obs\['Age'\]") as excinfo:
        _de(store_and_snapshot, **{which: "Middle"})
    message = str(excinfo.value)
    assert re.search(r"available values: \[.*\]", message)
    assert "'Young'" in message and "'Old'" in message


def test_de__conditions_identical(store_and_snapshot):
    with pytest.raises(ValueError, match=r"condition1 and condition2 are both 'Old'.*two different values of obs\['Age'\]"):
        _de(store_and_snapshot, condition1="Old", condition2="Old")


def test_de__too_few_cells_after_boolean_filter(store_and_snapshot):
    obs = Store(store_and_snapshot).obs
    keep = (obs[GROUPBY] == COND2).to_numpy().copy()
    keep[np.flatnonzero((obs[GROUPBY] == COND1).to_numpy())[0]] = True  # a single Young cell
    with pytest.raises(
        ValueError,
        match=r"condition1='Young' has 1 cell\(s\) after filtering; at least 2 are needed.*Relax the cell filter",
    ):
        _de(store_and_snapshot, filter=kd.FilterSettings(cell_filter=keep))


def test_de__too_few_cells_after_dict_filter(store_and_snapshot):
    with pytest.raises(ValueError, match=r"condition1='Young' has 0 cell\(s\) after filtering"):
        _de(store_and_snapshot, filter=kd.FilterSettings(cell_filter={GROUPBY: [COND2]}))


def test_de__too_few_cells_for_min_cells(store_and_snapshot):
    with pytest.raises(ValueError, match=r"has \d+ cell\(s\) after filtering; at least 100000 are needed \(FilterSettings\.min_cells\)"):
        _de(store_and_snapshot, filter=kd.FilterSettings(min_cells=100_000))


def test_de__cell_filter_column_missing(store_and_snapshot):
    with pytest.raises(KeyError, match=r"cell_filter: obs column 'keep' not found; available: \['Age'\]"):
        _de(store_and_snapshot, filter=kd.FilterSettings(cell_filter="keep"))


def test_de__cell_filter_wrong_length(store_and_snapshot):
    with pytest.raises(ValueError, match=r"cell_filter array must be boolean with 1200 entries, got dtype bool shape \(10,\)"):
        _de(store_and_snapshot, filter=kd.FilterSettings(cell_filter=np.ones(10, dtype=bool)))


# ---------------------------------------------------------------------------
# Embedding, layer and genes
# ---------------------------------------------------------------------------


def test_de__obsm_key_missing(store_and_snapshot):
    with pytest.raises(KeyError, match=r"obsm key 'DM_EigenVectors' not found.*available: \['X_pca'\].*Pass obsm_key="):
        _de(store_and_snapshot, obsm_key="DM_EigenVectors")


def test_de__layer_missing(store_and_snapshot):
    with pytest.raises(KeyError, match=r"layer 'counts' not found.*available layers: \['logged_counts'\]"):
        _de(store_and_snapshot, layer="counts")


def test_de__no_x_and_no_layer(store_and_snapshot):
    with pytest.raises(KeyError, match=r"the store has no X; pass layer= one of \['logged_counts'\]"):
        _de(store_and_snapshot, layer=None)


@pytest.mark.parametrize(
    ("value", "bad"),
    [(np.nan, "NaN"), (np.inf, "inf"), (-np.inf, "-inf")],
    ids=["nan", "inf", "-inf"],
)
def test_de__nonfinite_embedding(small_store, no_compute, value, bad):
    obsm = _open_rw(small_store)["obsm"][OBSM]
    obsm[3, 0] = value
    obsm[7, 1] = value
    before = _snapshot(small_store)
    with pytest.raises(ValueError, match=r"obsm\['X_pca'\] holds NaN or inf in 2 cell\(s\)") as excinfo:
        _de(small_store)
    message = str(excinfo.value)
    assert "['cell_3', 'cell_7']" in message
    assert "FilterSettings(cell_filter=" in message
    assert _snapshot(small_store) == before


def test_de__nonfinite_embedding_outside_the_compared_cells(small_store, client):
    """The NaN-embedding message says to filter the cells out; doing so must work."""
    obsm = _open_rw(small_store)["obsm"][OBSM]
    obsm[3, 0] = np.nan
    keep = np.ones(obsm.shape[0], dtype=bool)
    keep[3] = False
    result = _de(
        small_store, client=client, filter=kd.FilterSettings(cell_filter=keep),
        fdr=kd.FDRSettings(null_genes=0),
        storage=kd.StorageSettings(store_layers=False),
        output=kd.OutputSettings(progress=False, return_full_results=True),
    )
    assert np.all(np.isfinite(result["table"]["mahalanobis"]))


def test_de__landmarks_dimension_mismatch(store_and_snapshot):
    gp = kd.GPSettings(ls=50.0, landmarks=np.zeros((5, 3)))
    with pytest.raises(ValueError, match=r"GPSettings\.landmarks has 3 columns but obsm\['X_pca'\] has 8"):
        _de(store_and_snapshot, gp=gp)


def test_de__unknown_genes(store_and_snapshot):
    with pytest.raises(KeyError, match=r"genes= names 2 gene\(s\) not in var_names: \['GENE_7', 'foo'\]; check spelling"):
        _de(store_and_snapshot, genes=["gene_1", "GENE_7", "foo"])


def test_de__empty_genes(store_and_snapshot):
    with pytest.raises(ValueError, match=r"genes= is an empty list; pass at least one var name, or genes=None"):
        _de(store_and_snapshot, genes=[])


@pytest.mark.parametrize(
    ("layer", "values", "dtype_text"),
    [
        ("names", np.full((1200, 90), "high", dtype=object).astype(str), "String"),
        ("flags", np.zeros((1200, 90), dtype=bool), "bool"),
    ],
    ids=["string", "bool"],
)
def test_de__non_numeric_layer(small_store, no_compute, layer, values, dtype_text):
    ad.io.write_elem(_open_rw(small_store)["layers"], layer, values)
    zarr.consolidate_metadata(small_store)
    before = _snapshot(small_store)
    with pytest.raises(TypeError, match=rf"layers/{layer} has dtype \w*{dtype_text}\w*(\(\))?, which is not numeric.*Pass layer= a numeric"):
        _de(small_store, layer=layer)
    assert _snapshot(small_store) == before


def test_de__nonfinite_expression(small_store, client):
    """Found inside the block tasks: the message names the genes, and the staged layers
    (some tiles may already be written) are removed."""
    arr = _open_rw(small_store)["layers"][LAYER]
    arr[10, 5] = np.nan
    arr[700, 20] = np.inf  # same 32-gene block as gene_5: one task reports both
    before = _snapshot(small_store)
    with pytest.raises(engine.NonFiniteExpressionError, match=r"NaN or inf values in 2 gene\(s\): \['gene_5', 'gene_20'\]") as excinfo:
        _de(small_store, client=client, fdr=kd.FDRSettings(null_genes=0), compute=kd.ComputeSettings(gene_block=32))
    assert "genes=" in str(excinfo.value)
    assert _snapshot(small_store) == before
    assert not os.path.exists(os.path.join(small_store, STAGING_DIR))


# ---------------------------------------------------------------------------
# Settings (validated on construction, no store needed)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("result_key", ["a/b", "a\\b", "..", "up/../x", "x..y", ""])
def test_de__result_key_unsafe(result_key):
    with pytest.raises(SettingsError, match=r"StorageSettings\.result_key=.* is invalid: expected a non-empty name without '/'"):
        kd.StorageSettings(result_key=result_key)


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("n_landmarks", 0, "a positive integer"), ("n_landmarks", -5, "a positive integer"),
        ("n_landmarks", 10.5, "an integer"),
        ("sigma", 0.0, "a positive, finite number"), ("sigma", -1.0, "a positive, finite number"),
        ("sigma", float("nan"), "a positive, finite number"), ("sigma", "1", "a positive number"),
        ("ls_factor", 0, "a positive, finite number"), ("ls_factor", -2.0, "a positive, finite number"),
        ("ls_factor", float("inf"), "a positive, finite number"),
        ("ls", 0.0, "a positive, finite number"), ("ls", -1.0, "a positive, finite number"),
    ],
)
def test_de__gp_setting_not_positive(name, value, expected):
    with pytest.raises(SettingsError, match=rf"GPSettings\.{name}={re.escape(repr(value))} is invalid: expected {expected}\."):
        kd.GPSettings(**{name: value})


@pytest.mark.parametrize(
    ("value", "expected"),
    [(-1, "a non-negative integer"), (-2000, "a non-negative integer"), (1.5, "an integer"),
     ("all", '"auto", None or a non-negative integer')],
)
def test_de__null_genes_invalid(value, expected):
    with pytest.raises(SettingsError, match=rf"FDRSettings\.null_genes={re.escape(repr(value))} is invalid: expected {re.escape(expected)}\."):
        kd.FDRSettings(null_genes=value)


def test_de__settings_of_wrong_type(store_and_snapshot):
    with pytest.raises(TypeError, match=r"gp= expects a kompot_dask\.GPSettings, got dict"):
        kd.de(store_and_snapshot, GROUPBY, COND1, COND2, layer=LAYER, obsm_key=OBSM, gp={"ls": 1.0})


# ---------------------------------------------------------------------------
# Failure midway, rerun and the overwrite guard
# ---------------------------------------------------------------------------


def test_de__failure_midway_leaves_no_trace_and_rerun_succeeds(small_store, client, monkeypatch):
    before = _snapshot(small_store)
    # gene_block=32 gives three real-gene blocks, so block 1 fails while others write tiles.
    compute = kd.ComputeSettings(gene_block=32)
    with _failing_block(client, 1), pytest.raises(engine.InjectedFailure, match="gene block 1"):
        _de(small_store, client=client, compute=compute)
    assert _snapshot(small_store) == before
    store = Store(small_store)
    assert store.read_uns_json(runs.HISTORY_KEY) == {}
    assert not any(c.startswith("kompot_de") for c in store.var.columns)

    result = _de(
        small_store, client=client, compute=compute,
        output=kd.OutputSettings(progress=False, return_full_results=True),
    )
    assert result["run_id"] == 0
    store = Store(small_store)
    history = runs.load_history(store.read_uns_json(runs.HISTORY_KEY))
    assert [h["run_id"] for h in history] == [0]
    names = result["field_names"]
    assert names["mahalanobis"] in store.var.columns
    assert {names[r] for r in ("imputed1", "imputed2", "fold_change")} <= set(store.layer_keys())
    assert history[0]["fields_written"] and all(
        f.split("/", 1)[1].startswith("kompot_de_") for f in history[0]["fields_written"]
    )

    # With results present, overwrite=False refuses before any compute.
    after_run = _snapshot(small_store)
    _forbid_compute(monkeypatch)
    with pytest.raises(ValueError, match=r"result_key='kompot_de' already exist.*Use a different StorageSettings\(result_key=\.\.\.\) or overwrite=True"):
        _de(small_store, client=client, storage=kd.StorageSettings(overwrite=False))
    assert _snapshot(small_store) == after_run


@pytest.mark.parametrize("failure", ["injected", "nonfinite"])
def test_de__failure_midway_leaves_no_late_writes(small_store, client, monkeypatch, staggered_blocks, failure):
    """Like the test above, but the store is compared once every worker is idle, and
    block 1 fails while the other blocks are still writing their tiles."""
    if failure == "injected":
        # Wrapped around staggered_blocks' late start, so it waits the same 1 s itself.
        injected = _failing_block(client, 1, delay=1.0)
        expected = engine.InjectedFailure
    else:
        _open_rw(small_store)["layers"][LAYER][10, 40] = np.nan  # gene block 1 of 3
        injected = contextlib.nullcontext()
        expected = engine.NonFiniteExpressionError
    before = _snapshot(small_store)
    with injected, pytest.raises(expected):
        _de(small_store, client=client, fdr=kd.FDRSettings(null_genes=0), compute=kd.ComputeSettings(gene_block=32))
    _wait_until_workers_idle(client)
    after = _snapshot(small_store)
    assert not os.path.exists(os.path.join(small_store, STAGING_DIR))
    assert after == before


def test_de__copy_of_store_is_independent(small_store, tmp_path, no_compute):
    """Sanity check of the helpers: a copied store compares equal, a changed one not."""
    copy = tmp_path / "copy.zarr"
    shutil.copytree(small_store, copy)
    assert _snapshot(copy) == _snapshot(small_store)
    _open_rw(copy)["obsm"][OBSM][0, 0] = 123.0
    assert _snapshot(copy) != _snapshot(small_store)

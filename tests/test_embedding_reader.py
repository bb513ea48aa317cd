"""The embedding read band by band from the store: the same rows as the array, in any
order; runs that never hand a worker the whole embedding; results equal to an embedding
held in memory."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import zarr

import kompot_dask as kd
from kompot_dask._engine import graph
from kompot_dask._io import tiles
from kompot_dask._io.store import Store
from kompot_dask._io.tiles import EmbeddingReader, RowSubset
from kompot_dask._numerics import gp
from kompot_dask.testing import SyntheticSpec, write_synthetic_store


@pytest.fixture
def stored_embedding(tmp_path, monkeypatch):
    """A 5,000 × 7 float32 embedding in 300-row zarr chunks; bands of 900 rows."""
    monkeypatch.setattr(tiles, "EMBEDDING_BAND_ROWS", 800)
    rng = np.random.default_rng(1)
    values = rng.standard_normal((5000, 7)).astype(np.float32)
    path = str(tmp_path / "emb.zarr")
    arr = zarr.create_array(store=path, name="obsm/E", shape=values.shape, chunks=(300, 7), dtype=values.dtype,
                            zarr_format=2)
    arr[:] = values
    tiles.clear_caches()
    reader = EmbeddingReader.open(path, "obsm/E", token="t0")
    return reader, values.astype(np.float64), path


def test_reader__rows_equal_the_array_for_slices_and_indices(stored_embedding):
    reader, values, _ = stored_embedding
    assert reader.band == 900 and reader.shape == values.shape and len(reader) == 5000
    for sl in (slice(0, 5000), slice(0, 1), slice(899, 901), slice(1234, 4321), slice(4999, 5000), slice(10, 10),
               slice(-50, None)):
        np.testing.assert_array_equal(reader[sl], values[sl])
    rng = np.random.default_rng(0)
    for idx in (np.sort(rng.choice(5000, 700, replace=False)), rng.choice(5000, 700), np.array([4999, 0, 899, 900]),
                np.array([], dtype=np.int64), np.array([-1, -5000])):
        np.testing.assert_array_equal(reader[idx], values[idx])
    mask = rng.random(5000) < 0.3
    np.testing.assert_array_equal(reader[mask], values[mask])
    with pytest.raises(IndexError, match="out of range"):
        reader[np.array([5000])]
    # bands cover every row once, in order
    got = np.concatenate([rows for _, _, rows in reader.bands()])
    np.testing.assert_array_equal(got, values)


def test_reader__a_rewritten_element_is_never_served_from_old_bands(stored_embedding):
    reader, values, path = stored_embedding
    np.testing.assert_array_equal(reader[:10], values[:10])
    zarr.open_array(store=path, path="obsm/E", mode="r+")[:10] = 0.0
    tiles._open_array_cached.cache_clear()
    np.testing.assert_array_equal(reader[:10], values[:10])  # same token: the cached band
    fresh = EmbeddingReader.open(path, "obsm/E", token="t1")
    np.testing.assert_array_equal(fresh[:10], np.zeros((10, 7)))


def test_row_subset_and_nearest_distances__equal_the_gathered_array_bit_for_bit(stored_embedding):
    reader, values, _ = stored_embedding
    rows = np.flatnonzero(np.random.default_rng(2).random(5000) < 0.5)
    sub = RowSubset(reader, rows)
    np.testing.assert_array_equal(np.asarray(sub), values[rows])
    np.testing.assert_array_equal(sub[5:17], values[rows[5:17]])
    queries = np.sort(np.random.default_rng(3).choice(len(rows), 300, replace=False))
    # small blocks, so that the reference blocks cross bands and the query blocks are several
    want = gp.exact_nearest_distances(values[rows], queries, query_block=64, ref_block=500)
    got = gp.exact_nearest_distances(sub, queries, query_block=64, ref_block=500)
    np.testing.assert_array_equal(got, want)


def test_store__dense_obsm_gets_a_reader_other_encodings_are_read_whole(tmp_path):
    rng = np.random.default_rng(0)
    a = ad.AnnData(X=np.zeros((50, 3), np.float32),
                   obsm={"dense": rng.standard_normal((50, 4)),
                         "frame": pd.DataFrame(rng.standard_normal((50, 2)), index=[str(i) for i in range(50)],
                                         columns=["a", "b"])})
    a.obs_names = [str(i) for i in range(50)]
    path = str(tmp_path / "s.zarr")
    a.write_zarr(path)
    store = Store(path)
    reader = store.embedding_reader("dense")
    assert isinstance(reader, EmbeddingReader)
    np.testing.assert_array_equal(reader[:], a.obsm["dense"])
    assert json.loads(reader.token)[0] == "obsm/dense"
    assert store.embedding_reader("frame") is None
    with pytest.raises(KeyError, match="obsm key 'nope' not found"):
        store.embedding_reader("nope")


def test_de__workers_get_a_reader_not_the_embedding_and_the_results_match_memory(tmp_path, monkeypatch):
    spec = SyntheticSpec(n_obs=900, n_vars=40, n_dims=6, seed=5)
    stored = write_synthetic_store(tmp_path / "a.zarr", spec, cell_chunk=128, gene_chunk=16)
    sent: list[str] = []
    real_inputs = graph._input_futures

    def spy(client, token, **arrays):
        sent.extend(arrays)
        return real_inputs(client, token, **arrays)

    monkeypatch.setattr(graph, "_input_futures", spy)
    kw = dict(groupby="Age", condition1="Young", condition2="Old", layer="logged_counts", obsm_key="X_pca",
              gp=kd.GPSettings(n_landmarks=60), output=kd.OutputSettings(progress=False, return_full_results=True),
              compute=kd.ComputeSettings(processes=False, gene_block=16, null_gene_block=16))
    banded = kd.de(stored, **kw)
    assert "X" not in sent and "Z" in sent
    # The same data with the embedding stored as a DataFrame: read whole, sent as an input.
    a = ad.read_zarr(stored)
    a.obsm["X_pca"] = pd.DataFrame(a.obsm["X_pca"], index=a.obs_names,
                                   columns=[f"c{i}" for i in range(a.obsm["X_pca"].shape[1])])
    other = str(tmp_path / "b.zarr")
    a.write_zarr(other)
    sent.clear()
    whole = kd.de(other, **kw)
    assert "X" in sent
    assert banded["ls"] == whole["ls"]
    np.testing.assert_array_equal(banded["landmarks"], whole["landmarks"])
    pd.testing.assert_frame_equal(banded["table"], whole["table"])
    np.testing.assert_array_equal(banded["null_mahalanobis"], whole["null_mahalanobis"])

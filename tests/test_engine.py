"""The engine on real LocalClusters and real stores: invariance, layouts, laziness."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import zarr
from conftest import SMALL

import kompot_dask as kd
from kompot_dask.testing import (
    SyntheticSpec,
    assert_de_results_close,
    make_synthetic_adata,
    write_synthetic_store,
)

PAIR = "kompot_de_Young_to_Old"
KW = dict(groupby="Age", condition1="Young", condition2="Old", layer="logged_counts", obsm_key="X_pca",
          gp=kd.GPSettings(n_landmarks=150, ls=60.0), fdr=kd.FDRSettings(null_genes=120),
          output=kd.OutputSettings(progress=False),
          # float64 layers, so that invariance is checked to 1e-10 and not to float32 rounding
          storage=kd.StorageSettings(layer_dtype="float64", overwrite=True))


def _results(path) -> dict[str, np.ndarray]:
    a = ad.read_zarr(path)
    out = {c: a.var[c].to_numpy(dtype=float) for c in a.var.columns if c.startswith("kompot")}
    out.update({c: a.obs[c].to_numpy(dtype=float) for c in a.obs.columns if c.startswith("kompot")})
    out.update({k: np.asarray(a.layers[k], dtype=float) for k in a.layers if k.startswith("kompot")})
    return out


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, client):
    path = write_synthetic_store(tmp_path_factory.mktemp("base") / "s.zarr", SMALL, cell_chunk=256, gene_chunk=32)
    kd.de(path, client=client, **KW)
    return _results(path)


@pytest.mark.parametrize(("cell_chunk", "gene_block", "null_block"), [(100, 7, 13), (512, 64, 120), (1200, 90, 40)])
def test_de__chunking_does_not_change_results(tmp_path, client, baseline, cell_chunk, gene_block, null_block):
    path = write_synthetic_store(tmp_path / "s.zarr", SMALL, cell_chunk=256, gene_chunk=32)
    kd.de(path, client=client, compute=kd.ComputeSettings(cell_chunk=cell_chunk, gene_block=gene_block,
                                                          null_gene_block=null_block), **KW)
    got = _results(path)
    assert got.keys() == baseline.keys() and len(got) == 9
    assert_de_results_close(got, baseline, columns=list(baseline), atol=1e-10)


def test_de__one_worker_equals_two_workers(tmp_path, client_one_worker, baseline):
    path = write_synthetic_store(tmp_path / "s.zarr", SMALL, cell_chunk=256, gene_chunk=32)
    kd.de(path, client=client_one_worker, **KW)
    got = _results(path)
    assert_de_results_close(got, baseline, columns=list(baseline), atol=1e-10)


@pytest.mark.parametrize("fmt", ["csr", "csc"])
def test_de__sparse_layer_in_existing_store(tmp_path, client, baseline, fmt):
    """A store written by anndata with a CSR (read by row chunks) or CSC (read by columns)
    layer gives the same answer as the dense tiles."""
    adata = make_synthetic_adata(SMALL, sparse=True)
    if fmt == "csc":
        adata.layers["logged_counts"] = adata.layers["logged_counts"].tocsc()
    path = tmp_path / f"{fmt}.zarr"
    adata.write_zarr(path)
    assert zarr.open_group(str(path), mode="r")["layers/logged_counts"].attrs["encoding-type"] == f"{fmt}_matrix"
    kd.de(str(path), client=client, **KW)
    got = _results(path)
    assert_de_results_close(got, baseline, columns=list(baseline), atol=1e-10)


def _thinned(adata: ad.AnnData, keep: float, seed: int = 0) -> ad.AnnData:
    """``adata`` with all but a fraction ``keep`` of the layer's stored values set to 0."""
    y = adata.layers["logged_counts"].tocsr().copy()
    y.data[np.random.default_rng(seed).random(y.nnz) > keep] = 0
    y.eliminate_zeros()
    adata.layers["logged_counts"] = y
    return adata


@pytest.mark.parametrize(("fmt", "zarr_format", "shard"),
                         [("csr", 2, False), ("csr", 3, False), ("csr", 3, True), ("csc", 2, False)],
                         ids=["csr-v2", "csr-v3", "csr-v3-sharded", "csc-v2"])
def test_de__sparse_store_equals_dense_store(tmp_path, client, fmt, zarr_format, shard):
    """A 5 %-dense CSR layer, as anndata writes it (v2, v3, and v3 sharded as anndata 0.13
    does by default), transposed once, or a CSC layer read by column spans: multiplied
    sparse (m·nnz), and the answer is the dense store's. Several gene blocks and null blocks, cell chunks that do not divide the
    cells: every tile path is taken."""
    adata = _thinned(make_synthetic_adata(SMALL, sparse=True), keep=0.05)
    density = adata.layers["logged_counts"].nnz / np.prod(adata.shape)
    assert 0.02 < density < 0.08
    if fmt == "csc":  # read by column spans, kept sparse; no transposition
        adata.layers["logged_counts"] = adata.layers["logged_counts"].tocsc()
    dense = adata.copy()
    dense.layers["logged_counts"] = dense.layers["logged_counts"].toarray()
    paths = {}
    for name, a in (("sparse", adata), ("dense", dense)):
        paths[name] = str(tmp_path / f"{name}.zarr")
        with ad.settings.override(zarr_write_format=zarr_format, auto_shard_zarr_v3=shard):
            a.write_zarr(paths[name])
    layer = zarr.open_group(paths["sparse"], mode="r")["layers/logged_counts"]
    assert layer.attrs["encoding-type"] == f"{fmt}_matrix" and layer.metadata.zarr_format == zarr_format
    assert (layer["data"].shards is not None) == shard
    compute = kd.ComputeSettings(cell_chunk=300, gene_block=24, null_gene_block=50)
    got = {}
    for name, path in paths.items():
        kd.de(path, client=client, compute=compute, **KW)
        got[name] = _results(path)
    assert len(got["sparse"]) == 9
    assert_de_results_close(got["sparse"], got["dense"], columns=list(got["dense"]), atol=1e-10)
    tasks = kd.RunInfo(paths["sparse"]).run_record.task_seconds
    assert tasks.get("sparse projection", 0) > 0 and tasks.get("null-gene sparse projection", 0) > 0, tasks
    assert "sparse projection" not in kd.RunInfo(paths["dense"]).run_record.task_seconds


@pytest.mark.parametrize("fmt", ["csr", "csc"])
def test_tile_reader__sparse_pieces_equal_the_dense_values(tmp_path, fmt, monkeypatch):
    """Pieces of a sparse element in place: slices, scattered columns (a CSC element reads
    runs of nearby columns, not the span from the first to the last), row bands."""
    from kompot_dask._io import tiles
    from kompot_dask._io.store import Store

    monkeypatch.setattr(tiles, "CSC_COLUMN_GAP", 4)
    adata = _thinned(make_synthetic_adata(SMALL, sparse=True), keep=0.2)
    dense = adata.layers["logged_counts"].toarray()
    adata.layers["logged_counts"] = adata.layers["logged_counts"].asformat(fmt)
    path = str(tmp_path / "s.zarr")
    adata.write_zarr(path)
    tiles.clear_caches()
    store = Store(path)
    reader = store.tile_reader(store.layer_info("logged_counts"))
    assert reader.sparse
    cols = np.array([0, 1, 2, 30, 33, 70, 89])
    for r0, r1 in ((0, 300), (250, 1200), (1199, 1200)):
        np.testing.assert_array_equal(reader.piece(r0, r1, cols).toarray(), dense[r0:r1][:, cols])
        np.testing.assert_array_equal(reader.read(r0, r1, slice(10, 40)), dense[r0:r1, 10:40])
    bands = reader.groups
    assert bands[0][0] == 0 and bands[-1][1] == 1200 and all(a[1] == b[0] for a, b in zip(bands[:-1], bands[1:], strict=True))


def test_de__sparse_csr_nonfinite_values_are_named(tmp_path, client):
    """NaN / inf stored in a CSR layer are found by the sparse paths: in a gene block (the
    genes named), and in a null gene's source column (named as such)."""
    adata = _thinned(make_synthetic_adata(SMALL, sparse=True), keep=0.05)
    y = adata.layers["logged_counts"].tolil()
    y[10, 5], y[700, 20] = np.nan, np.inf
    adata.layers["logged_counts"] = y.tocsr()
    path = str(tmp_path / "csr.zarr")
    adata.write_zarr(path)
    kw = dict(KW, compute=kd.ComputeSettings(gene_block=32, cell_chunk=300))
    with pytest.raises(kd.NonFiniteExpressionError, match=r"2 gene\(s\): \['gene_5', 'gene_20'\]"):
        kd.de(path, client=client, **dict(kw, fdr=kd.FDRSettings(null_genes=0)))
    genes = [g for g in adata.var_names if g not in ("gene_5", "gene_20")]
    with pytest.raises(kd.NonFiniteExpressionError, match=r"drawn as null-gene sources") as excinfo:
        kd.de(path, genes=genes, client=client, **dict(kw, fdr=kd.FDRSettings(null_genes=90)))
    assert sorted(excinfo.value.columns) == [5, 20]


def test_ingest__h5ad_sparse_source_stays_sparse_or_becomes_dense_tiles(tmp_path, monkeypatch):
    """Sparse layers of an .h5ad stay sparse (CSR and CSC, streamed in blocks and appended
    with anndata's own writer); keep_sparse=False writes dense gene-block tiles."""
    import kompot_dask._io.ingest as ingest_mod

    monkeypatch.setattr(ingest_mod, "_SPARSE_BLOCK_VALUES", 2000)  # several appended blocks
    adata = make_synthetic_adata(SyntheticSpec(n_obs=500, n_vars=70, n_dims=5, seed=2), sparse=True)
    adata.layers["by_gene"] = adata.layers["logged_counts"].tocsc()
    counts = adata.layers["logged_counts"].copy()
    counts.data = np.round(counts.data * 10)
    adata.layers["counts"] = counts.astype(np.int64)
    adata.write_h5ad(tmp_path / "a.h5ad")
    path = kd.ingest(tmp_path / "a.h5ad", tmp_path / "a.zarr", progress=False)
    root = zarr.open_group(path, mode="r")
    back = ad.read_zarr(path)
    for name, fmt, dtype in (("logged_counts", "csr", np.float32), ("by_gene", "csc", np.float32),
                             ("counts", "csr", np.float32)):
        assert root[f"layers/{name}"].attrs["encoding-type"] == f"{fmt}_matrix"
        assert back.layers[name].format == fmt and back.layers[name].dtype == dtype
        np.testing.assert_array_equal(back.layers[name].toarray(), adata.layers[name].toarray())
    assert kd.verify(path).ok  # each element has its manifest
    assert back.obs.equals(adata.obs) and back.var.equals(adata.var)
    np.testing.assert_array_equal(back.obsm["X_pca"], adata.obsm["X_pca"])

    path = kd.ingest(tmp_path / "a.h5ad", tmp_path / "d.zarr", cell_chunk=128, gene_chunk=16, keep_sparse=False,
                     progress=False)
    arr = zarr.open_group(path, mode="r")["layers/logged_counts"]
    assert arr.chunks == (128, 16) and arr.dtype == np.float32
    np.testing.assert_array_equal(ad.read_zarr(path).layers["logged_counts"], adata.layers["logged_counts"].toarray())


def test_de__genes_subset_and_no_layers(tmp_path, client, baseline):
    path = write_synthetic_store(tmp_path / "s.zarr", SMALL, cell_chunk=256, gene_chunk=32)
    genes = ["gene_3", "gene_40", "gene_41", "gene_77"]
    kw = dict(KW, storage=kd.StorageSettings(store_layers=False), fdr=kd.FDRSettings(null_genes=0))
    kd.de(path, genes=genes, client=client, **kw)
    a = ad.read_zarr(path)
    assert not [k for k in a.layers if k.startswith("kompot")]
    assert f"{PAIR}_is_de" not in a.var  # FDR disabled
    d = a.var[f"{PAIR}_mahalanobis"]
    assert d.notna().sum() == 4 and d[genes].notna().all()
    # Per-gene statistics do not depend on which other genes are analysed.
    idx = [int(g.split("_")[1]) for g in genes]
    np.testing.assert_allclose(d[genes].to_numpy(), baseline[f"{PAIR}_mahalanobis"][idx], rtol=0, atol=1e-10)


def test_de__results_are_in_store_and_readable(tmp_path, client):
    path = write_synthetic_store(tmp_path / "s.zarr", SMALL, cell_chunk=256, gene_chunk=32)
    kd.de(path, client=client, **KW)
    a = ad.read_zarr(path)
    layer = zarr.open_group(path, mode="r")[f"layers/{PAIR}_fold_change"]
    assert layer.attrs["encoding-type"] == "array"
    np.testing.assert_allclose(
        a.layers[f"{PAIR}_fold_change"],
        a.layers["kompot_de_Old_imputed"] - a.layers["kompot_de_Young_imputed"], atol=1e-6,
    )
    lazy = ad.experimental.read_lazy(zarr.open_group(path, mode="r"))
    assert lazy.layers[f"{PAIR}_fold_change"].shape == (SMALL.n_obs, SMALL.n_vars)
    import json

    history = json.loads(a.uns["kompot_de"]["run_history"])
    assert history[0]["run_id"] == 0 and history[0]["params"]["fdr"]["null_genes"] == 120
    assert set(history[0]["environment"]["package_versions"]) >= {"dask", "distributed", "zarr", "jax"}
    assert not [k for k in zarr.open_group(path, mode="r")["layers"].keys() if k.startswith("_kompot_staging")]


def test_de__embedded_local_cluster_when_no_client(tmp_path, baseline):
    """No client given and none current: an embedded LocalCluster is started and closed,
    k-means landmarks are computed in a helper process, and the results match a run on
    the shared cluster."""
    from distributed import get_client

    path = write_synthetic_store(tmp_path / "s.zarr", SMALL, cell_chunk=256, gene_chunk=32)
    kd.de(path, compute=kd.ComputeSettings(memory_limit="2GiB"), **KW)
    with pytest.raises(ValueError):
        get_client()  # the embedded cluster is gone
    got = _results(path)
    assert_de_results_close(got, baseline, columns=list(baseline), atol=1e-10)
    import json

    record = json.loads(ad.read_zarr(path).uns["kompot_de"]["last_run_info"])
    assert record["layout"]["n_workers"] == 1  # one process, one thread per core


def test_de__float32_tiles_run_and_stay_close(tmp_path, client, baseline):
    """float32 bulk arithmetic (factors stay float64) runs and moves distances by a few %."""
    path = write_synthetic_store(tmp_path / "s.zarr", SMALL, cell_chunk=256, gene_chunk=32)
    kd.de(path, client=client, compute=kd.ComputeSettings(dtype="float32"), **KW)
    d = ad.read_zarr(path).var[f"{PAIR}_mahalanobis"].to_numpy()
    ref = baseline[f"{PAIR}_mahalanobis"]
    rel = np.abs(d - ref) / ref
    assert np.all(np.isfinite(d))
    assert np.median(rel) < 0.05 and rel.max() < 0.2, (np.median(rel), rel.max())

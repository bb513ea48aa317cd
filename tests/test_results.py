"""kd.results: a run's fields as a labelled, lazy xarray.Dataset, checked against what
anndata itself reads from the same store."""

from __future__ import annotations

import logging

import anndata as ad
import dask.array as da
import numpy as np
import pytest
import xarray as xr

import kompot_dask as kd
from kompot_dask.testing import SyntheticSpec, make_synthetic_adata, write_synthetic_store

SPEC = SyntheticSpec(n_obs=900, n_vars=40, n_dims=6, seed=11)
KW = dict(groupby="Age", condition1="Young", condition2="Old", layer="logged_counts", obsm_key="X_pca",
          gp=kd.GPSettings(n_landmarks=80), fdr=kd.FDRSettings(null_genes=60),
          output=kd.OutputSettings(progress=False))
ROLE_FIELDS = {"mahalanobis": "var", "mean_lfc": "var", "local_fdr": "var", "is_de": "var",
               "std1": "obs", "std2": "obs", "imputed1": "layers", "imputed2": "layers", "fold_change": "layers"}


@pytest.fixture(scope="module")
def store(tmp_path_factory, client) -> str:
    path = write_synthetic_store(tmp_path_factory.mktemp("results") / "r.zarr", SPEC, cell_chunk=256,
                                 gene_chunk=16)
    kd.de(path, **KW, client=client)
    return path


def test_results__every_field_labelled_and_equal_to_what_anndata_reads(store):
    ds = kd.results(store)
    assert isinstance(ds, xr.Dataset)
    reference = ad.read_zarr(store)
    assert list(ds["gene"].values) == list(reference.var_names)
    assert list(ds["cell"].values) == list(reference.obs_names)
    assert set(ds.data_vars) == set(ROLE_FIELDS)
    for role, location in ROLE_FIELDS.items():
        var = ds[role]
        name = var.attrs["field"]
        assert var.attrs["location"] == location and var.attrs["written_by_run"] == 0
        if location == "layers":
            assert var.dims == ("cell", "gene")
            assert isinstance(var.data, da.Array)  # lazy: read from the store when computed
            np.testing.assert_array_equal(var.values, np.asarray(reference.layers[name]))
        else:
            frame = reference.var if location == "var" else reference.obs
            np.testing.assert_array_equal(var.values, frame[name].to_numpy())
    assert ds.attrs["run_id"] == 0 and ds.attrs["condition1"] == "Young" and ds.attrs["source"] == store
    # labelled selection reads one gene's column, chunk by chunk
    one = ds["fold_change"].sel(gene="gene_3")
    np.testing.assert_array_equal(one.values, np.asarray(reference[:, "gene_3"].layers[
        ds["fold_change"].attrs["field"]]).ravel())
    assert set(kd.results(store, layers=False).data_vars) == {r for r, loc in ROLE_FIELDS.items()
                                                              if loc != "layers"}


def test_results__cleaned_layers_are_left_out_with_a_warning(store, tmp_path, caplog):
    import shutil

    copy = str(tmp_path / "copy.zarr")
    shutil.copytree(store, copy)
    kd.cleanup(copy, run_ids=0)
    with caplog.at_level(logging.WARNING, logger="kompot_dask"):
        ds = kd.results(copy, run_id=0)
    assert not {"imputed1", "imputed2", "fold_change"} & set(ds.data_vars)
    assert {"mahalanobis", "std1"} <= set(ds.data_vars)
    assert any("left out" in r.getMessage() for r in caplog.records)


def test_results__an_in_memory_anndata(client):
    adata = make_synthetic_adata(SPEC)
    kd.de(adata, **KW, client=client)
    ds = kd.results(adata)
    name = ds["imputed2"].attrs["field"]
    np.testing.assert_array_equal(ds["imputed2"].values, np.asarray(adata.layers[name]))
    np.testing.assert_array_equal(ds["mahalanobis"].values, adata.var[ds["mahalanobis"].attrs["field"]].to_numpy())
    assert ds.attrs["source"] == "in-memory AnnData"


def test_de__a_lazily_read_anndata_runs_on_its_store(store, tmp_path, client, caplog):
    """anndata.experimental.read_lazy: traced back to the store and computed out of core
    there, never loaded; what needs an in-memory copy is refused, before anything runs."""
    import shutil

    from anndata.experimental import read_lazy

    copy = str(tmp_path / "lazy.zarr")
    shutil.copytree(store, copy)
    lazy = read_lazy(copy)
    with caplog.at_level(logging.INFO, logger="kompot_dask"):
        kd.de(lazy, **{**KW, "condition1": "Old", "condition2": "Young"}, client=client)
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"read lazily from {copy}" in m for m in messages)
    assert any(m.startswith(f"Results written to {copy} (run_id=1)") for m in messages)
    assert kd.results(copy).attrs["condition1"] == "Old"
    with pytest.raises(kd.SettingsError, match="read lazily"):
        kd.de(read_lazy(copy), **{**KW, "output": kd.OutputSettings(copy=True)}, client=client)
    assert kd.plan(read_lazy(copy), **{k: v for k, v in KW.items() if k != "output"}, client=client).feasible
    # lazy matrices that come from no store cannot be traced: refused, naming the fix
    adata = make_synthetic_adata(SPEC)
    adata.layers["logged_counts"] = da.from_array(np.asarray(adata.layers["logged_counts"]))
    with pytest.raises(TypeError, match="Pass the store path"):
        kd.de(adata, **KW, client=client)


def test_de__an_in_memory_anndata_says_where_its_results_go(client, caplog):
    adata = make_synthetic_adata(SPEC)
    with caplog.at_level(logging.INFO, logger="kompot_dask"):
        kd.de(adata, **KW, client=client)
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("Computing an in-memory AnnData (900 cells × 40 genes)") for m in messages)
    assert "Results written to the AnnData in memory (run_id=0)" in messages
    assert not any("kompot_dask_" in m for m in messages if m.startswith("Results written"))

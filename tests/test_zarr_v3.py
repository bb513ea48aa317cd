"""Stores as anndata writes them in zarr format 3: computed in place, outputs written in the
store's own format with shards that the gene-block tasks write whole."""

from __future__ import annotations

import os

import anndata as ad
import numpy as np
import pytest
import zarr

import kompot_dask as kd
from kompot_dask import _layout
from kompot_dask.testing import SyntheticSpec, make_synthetic_adata

SPEC = SyntheticSpec(n_obs=1500, n_vars=150, n_dims=5, seed=21)
KW = dict(groupby="Age", condition1="Young", condition2="Old", layer="logged_counts", obsm_key="X_pca",
          gp=kd.GPSettings(n_landmarks=60), fdr=kd.FDRSettings(null_genes=40),
          output=kd.OutputSettings(progress=False), compute=kd.ComputeSettings(cell_chunk=256, gene_block=128))
LAYERS = ("kompot_de_Young_imputed", "kompot_de_Old_imputed", "kompot_de_Young_to_Old_fold_change")


@pytest.fixture
def written(tmp_path):
    """The same AnnData written by anndata in zarr format 2 and 3."""
    adata = make_synthetic_adata(SPEC)
    paths = {}
    for fmt in (2, 3):
        paths[fmt] = str(tmp_path / f"v{fmt}.zarr")
        with ad.settings.override(zarr_write_format=fmt):
            adata.write_zarr(paths[fmt])
    return paths


def _files(path: str) -> int:
    return sum(len(files) for _, _, files in os.walk(path))


def test_de__a_zarr_v3_store_gets_sharded_layers_equal_to_v2(written, client):
    for path in written.values():
        kd.de(path, **KW, client=client)
    v2, v3 = (zarr.open_group(written[f], mode="r") for f in (2, 3))
    assert v3.metadata.zarr_format == 3
    for name in LAYERS:
        a2, a3 = v2["layers"][name], v3["layers"][name]
        assert a3.metadata.zarr_format == 3 and a2.metadata.zarr_format == 2
        rows = _layout.shard_rows(256, 128, 4, SPEC.n_obs, 3)
        assert a3.shards == (rows, 128) and a3.chunks == (256, 64) and rows > 256
        assert a2.shards is None and a2.chunks == (256, 128)
        np.testing.assert_array_equal(a3[...], a2[...])
        # one file per shard (plus metadata): fewer than the v2 layer's chunk files
        assert _files(os.path.join(written[3], "layers", name)) < _files(os.path.join(written[2], "layers", name))
    r2, r3 = ad.read_zarr(written[2]), ad.read_zarr(written[3])  # anndata reads both back
    for column in r2.var.columns:
        np.testing.assert_array_equal(r3.var[column].to_numpy(), r2.var[column].to_numpy())
    np.testing.assert_array_equal(r3.layers[LAYERS[2]], r2.layers[LAYERS[2]])
    assert kd.RunInfo(written[3], 0).record["fields_written"] == kd.RunInfo(written[2], 0).record["fields_written"]


def test_plan__counts_the_shard_a_task_writes(written, client):
    """A gene-block task holds one shard of each output layer: the plan's task memory grows
    with the shard's rows."""
    plans = {f: kd.plan(p, **{k: v for k, v in KW.items() if k != "output"}, client=client)
             for f, p in written.items()}
    assert plans[3].inputs.zarr_format == 3 and plans[2].inputs.zarr_format == 2
    rows = _layout.shard_rows(256, 128, 4, SPEC.n_obs, 3)
    grown = 3 * (rows - 256) * 128 * 4
    real = {f: next(a["bytes"] for a in p.memory_allocations if a["what"].startswith("gene-block task"))
            for f, p in plans.items()}
    assert real[3] >= real[2] + grown > real[2]  # here the layer prediction is the task's largest phase


def test_zarr_v3__plots_results_and_cleanup_on_sharded_layers(written, client):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for path in written.values():
        kd.de(path, **KW, client=client)
    figs = {f: kd.plot.plot_gene_expression(p, "gene_7", basis="X_pca", return_fig=True) for f, p in written.items()}
    for panel in ("observed", "imputed1", "imputed2", "fold_change"):
        np.testing.assert_array_equal(figs[3].kompot_data["panels"][panel], figs[2].kompot_data["panels"][panel])
    plt.close("all")
    r2, r3 = kd.results(written[2]), kd.results(written[3])
    np.testing.assert_array_equal(r3["fold_change"].sel(gene=["gene_3", "gene_140"]).values,
                                  r2["fold_change"].sel(gene=["gene_3", "gene_140"]).values)
    kd.cleanup(written[3], run_ids=0)
    assert not set(LAYERS) & set(zarr.open_group(written[3], mode="r")["layers"].keys())
    assert ad.read_zarr(written[3]).n_vars == SPEC.n_vars

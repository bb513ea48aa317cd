"""kd.extract_null_distribution and kd.recompute_fdr: a control run's distances as the null
of another run, on a store (one journaled change, noted in the run history) and on an
AnnData; the numbers are those of kompot 0.8.0's FDR on the same inputs."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
from conftest import tree_digest

import kompot_dask as kd
from kompot_dask._numerics import fdr as fdr_mod
from kompot_dask.testing import SyntheticSpec, make_synthetic_adata, write_synthetic_store

SPEC = SyntheticSpec(n_obs=900, n_vars=60, n_dims=6, seed=21, conditions=("Young", "Mid", "Old"))
KW = dict(groupby="Age", layer="logged_counts", obsm_key="X_pca", gp=kd.GPSettings(n_landmarks=100, ls=40.0),
          fdr=kd.FDRSettings(null_genes=60), output=kd.OutputSettings(progress=False),
          storage=kd.StorageSettings(store_additional_stats=True))
PAIR = "kompot_de_Young_to_Old"


def test_recompute_fdr__store_control_null_replaces_the_columns_in_one_commit(tmp_path, client):
    store = write_synthetic_store(tmp_path / "s.zarr", SPEC, cell_chunk=256, gene_chunk=32)
    kd.de(store, condition1="Young", condition2="Mid", client=client, **KW)  # run 0: the "control"
    kd.de(store, condition1="Young", condition2="Old", client=client, **KW)  # run 1
    null = kd.extract_null_distribution(store, run_id=0)
    a0 = ad.read_zarr(store)
    np.testing.assert_array_equal(null, a0.var["kompot_de_Young_to_Mid_mahalanobis"].dropna().to_numpy())
    before = a0.var.copy()

    snapshot = tree_digest(store)
    table = kd.recompute_fdr(store, null, threshold=0.1, run_id=1, inplace=False)
    assert tree_digest(store) == snapshot  # inplace=False reads only
    expected = fdr_mod.compute_fdr(before[f"{PAIR}_mahalanobis"].to_numpy(float), null, 0.1)
    np.testing.assert_array_equal(table["local_fdr"].to_numpy(), expected.local_fdr)
    np.testing.assert_array_equal(table["is_de"].to_numpy(), expected.is_de)
    assert list(table.index) == list(before.index)

    kd.recompute_fdr(store, null, threshold=0.1, run_id=1)
    after = ad.read_zarr(store).var
    for col, role in ((f"{PAIR}_mahalanobis_local_fdr", "local_fdr"), (f"{PAIR}_is_de", "is_de"),
                      (f"{PAIR}_mahalanobis_pvalue", "pvalue"), (f"{PAIR}_mahalanobis_tail_fdr", "tail_fdr")):
        np.testing.assert_array_equal(after[col].to_numpy(), table[role].to_numpy(), err_msg=col)
    untouched = [c for c in before.columns if not c.startswith(PAIR) or c.endswith(("_mahalanobis", "_mean_lfc",
                                                                                     "_neg_log10_ptp"))]
    assert after[untouched].equals(before[untouched])
    # the history notes it; every field is still the run's own and present
    notes = ad.read_zarr(store).uns["kompot_de"]["fdr_recomputed"]
    assert '"1"' in str(notes) and "n_null" in str(notes)
    assert kd.get_run_fields(store, 1).run_id == 1 and not kd.RunInfo(store, 1).missing_fields
    assert kd.verify(store).ok


def test_recompute_fdr__anndata_and_refusals(client):
    adata = make_synthetic_adata(SPEC)
    kd.de(adata, condition1="Young", condition2="Old", client=client, **dict(KW, storage=None))
    null = np.random.default_rng(0).gamma(2.0, 1.0, size=200)
    table = kd.recompute_fdr(adata, null, run_id=-1)
    np.testing.assert_array_equal(adata.var[f"{PAIR}_is_de"].to_numpy(), table["is_de"].to_numpy())
    assert "fdr_recomputed" in str(adata.uns["kompot_de"])
    with pytest.raises(ValueError, match="null_mahalanobis has 1 value"):
        kd.recompute_fdr(adata, [1.0])
    with pytest.raises(ValueError, match="threshold=2"):
        kd.recompute_fdr(adata, null, threshold=2)
    nofdr = make_synthetic_adata(SPEC)
    kd.de(nofdr, condition1="Young", condition2="Old", client=client,
          **dict(KW, storage=None, output=kd.OutputSettings(progress=False, compute_mahalanobis=False)))
    with pytest.raises(KeyError, match="compute_mahalanobis=False"):
        kd.extract_null_distribution(nofdr)

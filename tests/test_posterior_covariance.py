"""StorageSettings(store_posterior_covariance=True): kompot 0.8.0's obsp matrix, Σ₁ + Σ₂
between every two predicted cells (zero outside the cell filter), written by one task into
the store; refused by the plan above the cell count one worker holds, which it names.

Parity with kompot (in a subprocess on the same input): measured 4.5e-13 max absolute
difference on values up to 0.025 (2e-11 of the largest).
"""

from __future__ import annotations

import importlib.util

import anndata as ad
import numpy as np
import pytest
from test_parity import run_reference
from test_plan import _inputs, _plan, _resources

import kompot_dask as kd
from kompot_dask.testing import SyntheticSpec, make_synthetic_adata

needs_kompot = pytest.mark.skipif(
    importlib.util.find_spec("kompot") is None, reason="the reference oracle kompot==0.8.0 is a test extra"
)

KEY = "kompot_de_Young_to_Old_posterior_covariance"
CALL = dict(groupby="Age", condition1="Young", condition2="Old", layer="logged_counts", obsm_key="X_pca")


@pytest.mark.slow  # kompot parity of a niche option: `pytest -m slow` (suite time, CI's 15 minutes)
@needs_kompot
def test_posterior_covariance_parity(tmp_path, client):
    adata = make_synthetic_adata(SyntheticSpec(n_obs=400, n_vars=12, n_dims=6, seed=12))
    from sklearn.cluster import k_means

    landmarks = k_means(adata.obsm["X_pca"].astype(np.float64), 60, n_init=1, random_state=0)[0]
    np.save(tmp_path / "landmarks.npy", landmarks)
    keep = np.ones(adata.n_obs, dtype=bool)
    keep[::7] = False  # cells outside the filter: zero rows and columns
    adata.obs["keep"] = keep
    ref = run_reference(tmp_path, adata, {
        **CALL, "gp": {"ls": 200.0, "landmarks_npy": str(tmp_path / "landmarks.npy")}, "fdr": {"null_genes": 0},
        "storage": {"store_posterior_covariance": True}, "filter": {"cell_filter": "keep"},
    })
    store = kd.ingest(adata, tmp_path / "p.zarr", progress=False)
    kd.de(store, **CALL, gp=kd.GPSettings(ls=200.0, landmarks=landmarks), fdr=kd.FDRSettings(null_genes=0),
          storage=kd.StorageSettings(store_posterior_covariance=True), filter=kd.FilterSettings(cell_filter="keep"),
          output=kd.OutputSettings(progress=False), client=client)
    got = np.asarray(ad.read_zarr(store).obsp[KEY])
    want = ref[f"obsp/{KEY}"]
    assert got.shape == (adata.n_obs, adata.n_obs)
    scale = np.abs(want).max()
    assert scale > 1e-3 and np.abs(got - want).max() <= 1e-9 * scale
    assert not got[~keep].any() and not got[:, ~keep].any()
    np.testing.assert_array_equal(got, got.T)
    rec = kd.RunInfo(store).run_record
    assert rec.posterior_covariance_key == KEY and f"obsp/{KEY}" in rec.fields_written


def test_posterior_covariance_in_memory_and_refusals(client):
    adata = make_synthetic_adata(SyntheticSpec(n_obs=300, n_vars=10, n_dims=5, seed=13, samples_per_condition=2))
    kd.de(adata, **CALL, gp=kd.GPSettings(n_landmarks=40, ls=200.0), fdr=kd.FDRSettings(null_genes=0),
          storage=kd.StorageSettings(store_posterior_covariance=True), output=kd.OutputSettings(progress=False),
          client=client)
    cov = np.asarray(adata.obsp[KEY])
    assert cov.shape == (300, 300) and np.all(np.diag(cov) > 0)
    assert np.linalg.eigvalsh(cov).min() > -1e-8 * np.abs(cov).max()  # a covariance
    with pytest.raises(kd.SettingsError, match="store_posterior_covariance=True\\) with sample_col='sample'"):
        kd.de(adata, **CALL, sample_col="sample", storage=kd.StorageSettings(store_posterior_covariance=True),
              client=client)


def test_posterior_covariance_plan_names_the_cells_that_fit():
    fields = (("mahalanobis", "var", "d"), ("posterior_covariance", "obsp", "p"))
    small = _plan(_inputs(n_obs=20_000, n_pred=20_000, n1=10_000, n2=10_000, fields=fields), _resources(8))
    assert small.feasible and any("posterior covariance" in i for i in small.info)
    big = _plan(_inputs(fields=fields), _resources(8))  # 100,000 cells: 80 GB
    assert not big.feasible
    msg = str(big)
    assert "store_posterior_covariance=True" in msg and "room for" in msg
    most = int(msg.split("room for ")[1].split(" cells")[0].replace(",", ""))
    assert 10_000 < most < 40_000
    ok = _plan(_inputs(n_obs=most, n_pred=most, n1=most // 2, n2=most - most // 2, fields=fields), _resources(8))
    assert not any("store_posterior_covariance" in str(e) for e in ok.errors)

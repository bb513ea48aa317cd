"""sample_col: kompot 0.8.0's sample variance (per-sample models on the shared landmarks),
and GPSettings(use_empirical_variance=True), its empirical variance.

Parity with kompot (run in a subprocess on the same input, like tests/test_parity.py):
Mahalanobis distances with the gene-specific covariance ≤ 1e-8 relative (measured 8e-11),
mean_lfc ≤ 1e-10, the std and z-score layers (float32) ≤ 5e-7, field names and locations as
kompot writes them. The low-rank form of the per-gene covariance is compared with the direct
per-gene Cholesky on well- and ill-conditioned cases.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os

import anndata as ad
import numpy as np
import pytest
from test_parity import run_reference

import kompot_dask as kd
from kompot_dask._numerics import gp as gp_mod
from kompot_dask.testing import SyntheticSpec, make_synthetic_adata

needs_kompot = pytest.mark.skipif(
    importlib.util.find_spec("kompot") is None, reason="the reference oracle kompot==0.8.0 is a test extra"
)

PAIR = "kompot_de_Young_to_Old"


def _data(tmp_path, seed: int, samples: int = 3, **spec):
    adata = make_synthetic_adata(SyntheticSpec(n_obs=900, n_vars=40, n_dims=8, seed=seed, de_fraction=0.2,
                                               samples_per_condition=samples, **spec))
    from sklearn.cluster import k_means

    landmarks = k_means(adata.obsm["X_pca"].astype(np.float64), 120, n_init=1, random_state=0)[0]
    np.save(tmp_path / "landmarks.npy", landmarks)
    return adata, landmarks


def _reference(tmp_path, adata, extra: dict) -> dict:
    return run_reference(tmp_path, adata, {
        "groupby": "Age", "condition1": "Young", "condition2": "Old", "layer": "logged_counts", "obsm_key": "X_pca",
        "sample_col": "sample", "gp": {"ls": 200.0, "landmarks_npy": str(tmp_path / "landmarks.npy")}, **extra,
    })


def _ours(tmp_path, adata, landmarks, client, **kw):
    store = kd.ingest(adata, tmp_path / "syn.zarr", progress=False, overwrite=True)
    out = kd.de(store, groupby="Age", condition1="Young", condition2="Old", layer="logged_counts", obsm_key="X_pca",
                sample_col="sample", gp=kw.pop("gp", kd.GPSettings(ls=200.0, landmarks=landmarks)), client=client,
                output=kd.OutputSettings(progress=False, return_full_results=True,
                                         **kw.pop("output", {})), **kw)
    return store, ad.read_zarr(store), out


def _kompot_fields(ref: dict) -> dict[str, list[str]]:
    return {loc: sorted(k.split("/", 1)[1] for k in ref if k.startswith(f"{loc}/")) for loc in ("var", "obs", "layers")}


def _our_fields(got: ad.AnnData) -> dict[str, list[str]]:
    # kompot names the imputed layers "smoothed"; kompot_dask keeps its "imputed" (docs/kompot_compat.md)
    layers = [k.replace("_imputed", "_smoothed") for k in got.layers.keys() if k.startswith("kompot")]
    return {"var": sorted(c for c in got.var if c.startswith("kompot")),
            "obs": sorted(c for c in got.obs if c.startswith("kompot")), "layers": sorted(layers)}


@needs_kompot
@pytest.mark.slow  # suite time: sample_col's end-to-end and CLI tests stay in make test
def test_sample_col_parity(tmp_path, client):
    """Three donors per condition, with kompot's additional statistics: every field kompot
    writes, under its names and locations, with its values."""
    adata, landmarks = _data(tmp_path, seed=3)
    ref = _reference(tmp_path, adata, {"storage": {"store_additional_stats": True}})
    store, got, out = _ours(tmp_path, adata, landmarks, client,
                            storage=kd.StorageSettings(store_additional_stats=True))
    assert _our_fields(got) == _kompot_fields(ref)
    assert f"{PAIR}_mahalanobis_sample_var" in got.var and f"{PAIR}_fold_change_zscores_sample_var" in got.layers
    d = got.var[f"{PAIR}_mahalanobis_sample_var"].to_numpy(float)
    d_ref = ref[f"var/{PAIR}_mahalanobis_sample_var"].astype(float)
    assert np.max(np.abs(d - d_ref) / d_ref) <= 1e-8
    ptp = got.var[f"{PAIR}_neg_log10_ptp_sample_var"].to_numpy(float)
    np.testing.assert_allclose(ptp, ref[f"var/{PAIR}_neg_log10_ptp_sample_var"].astype(float), rtol=1e-7)
    assert np.max(np.abs(got.var[f"{PAIR}_mean_lfc"].to_numpy(float) - ref[f"var/{PAIR}_mean_lfc"])) <= 1e-10
    for c in ("Young", "Old"):
        assert np.max(np.abs(np.asarray(got.layers[f"kompot_de_{c}_std"], float)
                             - ref[f"layers/kompot_de_{c}_std"])) <= 5e-7
        assert np.max(np.abs(np.asarray(got.layers[f"kompot_de_{c}_imputed"], float)
                             - ref[f"layers/kompot_de_{c}_smoothed"])) <= 5e-7
    z = np.asarray(got.layers[f"{PAIR}_fold_change_zscores_sample_var"], float)
    assert np.max(np.abs(z - ref[f"layers/{PAIR}_fold_change_zscores_sample_var"])) <= 5e-6  # z ~ 10
    # the sample variance is not zero: the std layers exceed the pooled posterior std
    assert np.all(np.asarray(got.layers["kompot_de_Young_std"]).std(axis=1) > 0)
    # null_genes="auto" is 0 with sample_col: no FDR, as in kompot
    assert out["fdr_summary"] is None and f"{PAIR}_is_de_sample_var" not in got.var
    info = kd.RunInfo(store, run_id=-1)
    assert info.params["sample_col"] == "sample" and info.params["fdr"]["null_genes"] == 0
    assert info.record["uses_sample_variance"] is True
    assert info.call_args()["sample_col"] == "sample"
    mapping = info.record["field_mapping"]
    assert mapping["kompot_de_Old_std"] == {"location": "layers", "type": "std_with_sample_var",
                                            "description": mapping["kompot_de_Old_std"]["description"]}
    # the xarray view and the plots find the suffixed fields through the run record
    ds = kd.results(store)
    assert ds["mahalanobis"].attrs["field"] == f"{PAIR}_mahalanobis_sample_var"
    assert ds["sample_std1"].dims == ("cell", "gene") and "std1" not in ds
    np.testing.assert_array_equal(ds["sample_std2"].values, np.asarray(got.layers["kompot_de_Old_std"]))
    import matplotlib

    matplotlib.use("Agg")
    fig = kd.plot.volcano_de(store, return_fig=True)
    assert fig is not None
    matplotlib.pyplot.close(fig)


@pytest.mark.slow  # kompot parity of a niche option: `pytest -m slow` (suite time, CI's 15 minutes)
@needs_kompot
def test_sample_col_single_condition_parity(tmp_path, client):
    """Condition 2 from one donor: refused by default (kompot's error), and with
    allow_single_condition_variance condition 1's sample variance stands in for both."""
    adata, landmarks = _data(tmp_path, seed=5)
    old = (adata.obs["Age"] == "Old").to_numpy()
    adata.obs["sample"] = adata.obs["sample"].astype(str)
    adata.obs.loc[old, "sample"] = "Old_only"
    with pytest.raises(ValueError, match=r"condition2='Old' has 1 sample.*allow_single_condition_variance"):
        _ours(tmp_path, adata, landmarks, client)
    ref = _reference(tmp_path, adata, {"output": {"allow_single_condition_variance": True}})
    _, got, _ = _ours(tmp_path, adata, landmarks, client, output={"allow_single_condition_variance": True})
    d = got.var[f"{PAIR}_mahalanobis_sample_var"].to_numpy(float)
    d_ref = ref[f"var/{PAIR}_mahalanobis_sample_var"].astype(float)
    assert np.max(np.abs(d - d_ref) / d_ref) <= 1e-8
    for c in ("Young", "Old"):
        assert np.max(np.abs(np.asarray(got.layers[f"kompot_de_{c}_std"], float)
                             - ref[f"layers/kompot_de_{c}_std"])) <= 5e-7


@pytest.mark.slow  # suite time; null genes with sample_col are also in the slow empirical parity test
@needs_kompot
def test_sample_col_null_genes_parity(tmp_path, client):
    """null_genes given with sample_col: kompot fits its per-sample models to the null genes
    it appends too, so their distances carry the sample variance; the local FDR, is_de and
    the variance-stratified trend then follow from them. Parity with kompot: distances
    (real genes) to 1e-8, local FDR to 1e-8 with identical calls (which compares the null
    distances through every gene's FDR)."""
    adata, landmarks = _data(tmp_path, seed=5, effect_size=(2.0, 3.0), donor_effect=0.1)
    ref = _reference(tmp_path, adata, {"fdr": {"null_genes": 30}})
    store, got, out = _ours(tmp_path, adata, landmarks, client, fdr=kd.FDRSettings(null_genes=30))
    assert _our_fields(got) == _kompot_fields(ref)
    d = got.var[f"{PAIR}_mahalanobis_sample_var"].to_numpy(float)
    assert np.max(np.abs(d - ref[f"var/{PAIR}_mahalanobis_sample_var"]) / d) <= 1e-8
    lf = got.var[f"{PAIR}_mahalanobis_local_fdr_sample_var"].to_numpy(float)
    assert np.max(np.abs(lf - ref[f"var/{PAIR}_mahalanobis_local_fdr_sample_var"])) <= 1e-8
    np.testing.assert_array_equal(got.var[f"{PAIR}_is_de_sample_var"].to_numpy(bool),
                                  ref[f"var/{PAIR}_is_de_sample_var"].astype(bool))
    assert 0 < out["fdr_summary"]["n_significant"] < len(d)
    # the variance-stratified mode is open with them (it was refused without null genes)
    plan = kd.plan(store, groupby="Age", condition1="Young", condition2="Old", layer="logged_counts",
                   obsm_key="X_pca", sample_col="sample", gp=kd.GPSettings(ls=200.0, landmarks=landmarks),
                   client=client, fdr=kd.FDRSettings(null_genes=30, mode="variance_stratified"),
                   storage=kd.StorageSettings(result_key="strat"))
    assert plan.feasible and "strat_Young_to_Old_mahalanobis_residual_z_sample_var" in str(plan)


def test_sample_col_with_empirical_variance__plan_counts_what_the_engine_runs(tmp_path, client, caplog):
    """Both variances, with a one-cell sample: the plan counts the engine's tasks (one
    leverage task per fitted sample, the one-cell one included) and prices the per-gene
    Cholesky; the one-cell sample is fitted for its residual but kept out of the sample
    variance, and says so."""
    adata, landmarks = _data(tmp_path, seed=29)
    adata.obs["sample"] = adata.obs["sample"].astype(str)
    adata.obs.loc[adata.obs.index[np.flatnonzero(adata.obs["Age"].to_numpy() == "Old")[0]], "sample"] = "lone"
    store = kd.ingest(adata, tmp_path / "p.zarr", progress=False)
    kw = dict(groupby="Age", condition1="Young", condition2="Old", layer="logged_counts", obsm_key="X_pca",
              sample_col="sample", gp=kd.GPSettings(ls=200.0, landmarks=landmarks, use_empirical_variance=True),
              compute=kd.ComputeSettings(gene_block=16), output=kd.OutputSettings(progress=False), client=client)
    plan = kd.plan(store, **kw)
    assert plan.feasible, str(plan)
    assert plan.flops["per-gene Cholesky (sample and empirical variance)"] > 40 * 120**3 / 3
    with caplog.at_level(logging.WARNING, logger="kompot_dask"):
        kd.de(store, plan=plan, **kw)
    assert "Sample lone of condition 2 has only 1 cell(s) (< 2): left out of the sample variance" in caplog.text
    from kompot_dask._io.store import Store
    from kompot_dask._runs import history as runs

    history = runs.load_history(Store(store).read_uns_json(runs.HISTORY_KEY))
    assert history[-1]["layout"]["n_tasks"] == plan.n_tasks
    assert np.isfinite(ad.read_zarr(store).var["kompot_de_Young_to_Old_mahalanobis_sample_var"]).all()


def test_sample_col_errors(tmp_path, client, caplog):
    adata, landmarks = _data(tmp_path, seed=7)
    store = kd.ingest(adata, tmp_path / "e.zarr", progress=False)
    kw = dict(groupby="Age", condition1="Young", condition2="Old", layer="logged_counts", obsm_key="X_pca",
              gp=kd.GPSettings(ls=200.0, landmarks=landmarks), output=kd.OutputSettings(progress=False),
              client=client)
    with pytest.raises(KeyError, match=r"sample_col='donor'.*available columns"):
        kd.de(store, sample_col="donor", **kw)
    missing = adata.copy()
    missing.obs["sample"] = missing.obs["sample"].astype(object)
    missing.obs.iloc[3, missing.obs.columns.get_loc("sample")] = None
    with pytest.raises(ValueError, match=r"obs\['sample'\] \(sample_col\) is missing for 1 cell"):
        kd.de(kd.ingest(missing, tmp_path / "m.zarr", progress=False), sample_col="sample", **kw)
    # a donor with a single cell gets no model of its own (kompot's min_cells=2), with a warning
    lone = adata.copy()
    lone.obs["sample"] = lone.obs["sample"].astype(str)
    first_young = np.flatnonzero((lone.obs["Age"] == "Young").to_numpy())[0]
    lone.obs.iloc[first_young, lone.obs.columns.get_loc("sample")] = "Young_lone"
    with caplog.at_level(logging.WARNING, logger="kompot_dask"):
        kd.de(kd.ingest(lone, tmp_path / "l.zarr", progress=False), sample_col="sample",
              storage=kd.StorageSettings(store_layers=False), **kw)
    assert "Skipping sample Young_lone of condition 1 (only 1 cells < 2)" in caplog.text
    # nothing was written by the refused calls
    assert not any(c.startswith("kompot") for c in ad.read_zarr(store).var)


def _direct(Sigma, K, dw, U):
    """kompot's per-gene path: Cholesky of Σ + V_g, then ‖L_g⁻¹ δ_g‖."""
    out = []
    for j in range(dw.shape[1]):
        KU = K @ U[:, j]
        L = np.linalg.cholesky(Sigma + KU @ KU.T)
        out.append(np.linalg.norm(np.linalg.solve(L, K @ dw[:, j])))
    return np.array(out)


def _case(rng, m, g, r, cond, scale):
    q, _ = np.linalg.qr(rng.normal(size=(m, m)))
    Sigma = (q * np.logspace(0, -np.log10(cond), m)) @ q.T + 1e-8 * np.eye(m)  # + eps·I as the runs add
    K = rng.normal(size=(m, m)) / np.sqrt(m)
    R = np.linalg.solve(np.linalg.cholesky(Sigma), K)
    return Sigma, K, R, rng.normal(size=(m, g)), scale * rng.normal(size=(m, g, r))


@pytest.mark.parametrize("cond,scale,rtol", [(1e2, 1.0, 1e-12), (1e6, 1.0, 1e-9)])
def test_lowrank_matches_direct(cond, scale, rtol):
    """The low-rank form equals kompot's direct per-gene Cholesky where the latter is
    accurate: to 1e-12 on a well-conditioned Σ, and to the direct path's own accuracy
    (κ(Σ)·ε ≈ 1e-10) on Σ with κ = 10⁶."""
    rng = np.random.default_rng(0)
    Sigma, K, R, dw, U = _case(rng, 60, 12, 5, cond, scale)
    np.testing.assert_allclose(gp_mod.lowrank_mahalanobis(R, dw, U), _direct(Sigma, K, dw, U), rtol=rtol)


def test_lowrank_is_exact_where_direct_drifts():
    """κ(Σ) = 10⁶ and a sample term 10⁶ × larger: Σ + V_g has κ ≈ 10¹², and kompot's direct
    Cholesky drifts by ~1e-5 relative, while the low-rank form (which factorises only Σ and
    an r × r matrix with eigenvalues ≥ 1) stays within 1e-11 of the exact value (40-digit
    mpmath)."""
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 40
    rng = np.random.default_rng(0)
    Sigma, K, R, dw, U = _case(rng, 60, 3, 5, 1e6, 1e3)
    ours, direct = gp_mod.lowrank_mahalanobis(R, dw, U), _direct(Sigma, K, dw, U)
    for j in range(3):
        KU = mp.matrix(K) * mp.matrix(U[:, j])
        delta = mp.matrix(K) * mp.matrix(dw[:, j])
        exact = float(mp.sqrt((delta.T * mp.lu_solve(mp.matrix(Sigma) + KU * KU.T, delta))[0]))
        assert abs(ours[j] - exact) / exact < 1e-11
        assert abs(direct[j] - exact) / exact > 1e-7  # kompot's path, for the record


def test_lowrank_stays_accurate_where_woodbury_cancels():
    """δ almost inside the span of a dominant sample term: D² is tiny against ‖L⁻¹δ‖², and
    the plain Woodbury form (‖z‖² − …) loses it to cancellation; the projected form keeps it
    (checked against the exact value in extended precision)."""
    rng = np.random.default_rng(1)
    m, r = 40, 3
    R = np.eye(m)  # Σ = K = I: the whitened coordinates are the coordinates
    U = rng.normal(size=(m, 1, r)) * 1e6
    dw = (U[:, 0] @ rng.normal(size=r))[:, None] * 1e-6 + 1e-9 * rng.normal(size=(m, 1))
    exact = np.sqrt(float(np.longdouble(dw[:, 0]) @ np.linalg.solve(
        np.eye(m) + U[:, 0] @ U[:, 0].T, dw[:, 0]).astype(np.longdouble)))
    ours = gp_mod.lowrank_mahalanobis(R, dw, U)[0]
    z = dw[:, 0]
    Q = U[:, 0]
    woodbury = z @ z - (Q.T @ z) @ np.linalg.solve(np.eye(r) + Q.T @ Q, Q.T @ z)
    assert abs(ours - exact) / exact < 1e-6
    assert abs(np.sqrt(abs(woodbury)) - exact) / exact > 1e-3  # what the plain form would have given


def test_sample_spec_json_safe_params(tmp_path, client):
    """The recorded params hold the column name only; a rerun of call_args() reproduces it."""
    adata, landmarks = _data(tmp_path, seed=11)
    store = kd.ingest(adata, tmp_path / "p.zarr", progress=False)
    kd.de(store, groupby="Age", condition1="Young", condition2="Old", layer="logged_counts", obsm_key="X_pca",
          sample_col="sample", gp=kd.GPSettings(ls=200.0, landmarks=landmarks),
          storage=kd.StorageSettings(store_layers=False, store_landmarks=True), output=kd.OutputSettings(progress=False),
          client=client)
    info = kd.RunInfo(store, run_id=-1)
    json.dumps(info.params)
    first = ad.read_zarr(store).var[f"{PAIR}_mahalanobis_sample_var"].to_numpy(float)
    args = info.call_args()
    args["storage"].overwrite = True
    kd.de(store, **args, client=client)
    np.testing.assert_array_equal(ad.read_zarr(store).var[f"{PAIR}_mahalanobis_sample_var"].to_numpy(float), first)


def test_sample_col_cli(tmp_path, capsys):
    """``kompot-dask de --sample-col``: the CLI passes the column through."""
    from kompot_dask import cli

    adata, _ = _data(tmp_path, seed=13)
    store = kd.ingest(adata, tmp_path / "c.zarr", progress=False)
    rc = cli.main(["--json", "de", store, "--groupby", "Age", "--condition1", "Young", "--condition2", "Old",
                   "--layer", "logged_counts", "--obsm-key", "X_pca", "--sample-col", "sample", "--no-layers",
                   "--n-landmarks", "150", "--n-workers", "1", "--threads-per-worker", "2"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["n_de"] is None
    var = ad.read_zarr(store).var
    assert np.isfinite(var[f"{PAIR}_mahalanobis_sample_var"]).all()
    assert kd.RunInfo(store, run_id=-1).params["sample_col"] == "sample"


# ---- GPSettings(use_empirical_variance=True) ------------------------------------------------


@pytest.mark.slow  # kompot parity of a niche option: `pytest -m slow` (suite time, CI's 15 minutes)
@needs_kompot
def test_empirical_variance_parity(tmp_path, client):
    """kompot's empirical variance, null genes and additional statistics included: the
    Mahalanobis distances (factor trick), the local FDR (the null genes get their own
    variance GP), the obs std (the first tested gene's) and the z-score layer."""
    adata, landmarks = _data(tmp_path, seed=17, samples=0)
    ref = run_reference(tmp_path, adata, {
        "groupby": "Age", "condition1": "Young", "condition2": "Old", "layer": "logged_counts", "obsm_key": "X_pca",
        "gp": {"ls": 200.0, "landmarks_npy": str(tmp_path / "landmarks.npy"), "use_empirical_variance": True},
        "fdr": {"null_genes": 30}, "storage": {"store_additional_stats": True},
    })
    store = kd.ingest(adata, tmp_path / "emp.zarr", progress=False)
    kd.de(store, groupby="Age", condition1="Young", condition2="Old", layer="logged_counts", obsm_key="X_pca",
          gp=kd.GPSettings(ls=200.0, landmarks=landmarks, use_empirical_variance=True),
          fdr=kd.FDRSettings(null_genes=30), storage=kd.StorageSettings(store_additional_stats=True),
          output=kd.OutputSettings(progress=False), client=client)
    got = ad.read_zarr(store)
    assert _our_fields(got) == _kompot_fields(ref)
    d, d_ref = got.var[f"{PAIR}_mahalanobis"].to_numpy(float), ref[f"var/{PAIR}_mahalanobis"].astype(float)
    assert np.max(np.abs(d - d_ref) / d_ref) <= 1e-8  # measured 6.5e-10
    fdr, fdr_ref = (got.var[f"{PAIR}_mahalanobis_local_fdr"].to_numpy(float),
                    ref[f"var/{PAIR}_mahalanobis_local_fdr"].astype(float))
    assert np.max(np.abs(fdr - fdr_ref)) <= 1e-8  # measured 3.0e-10
    np.testing.assert_array_equal(got.var[f"{PAIR}_is_de"].to_numpy(bool), ref[f"var/{PAIR}_is_de"].astype(bool))
    for c in ("Young", "Old"):
        std, std_ref = got.obs[f"kompot_de_{c}_std"].to_numpy(float), ref[f"obs/kompot_de_{c}_std"]
        assert np.max(np.abs(std - std_ref)) <= 1e-8  # measured 3.1e-9
    z = np.asarray(got.layers[f"{PAIR}_fold_change_zscores"], float)
    assert np.max(np.abs(z - ref[f"layers/{PAIR}_fold_change_zscores"])) <= 5e-7  # float32 layer; 3.0e-8
    # the variance is not negligible here: without it the distances differ
    plain = kd.de(store, groupby="Age", condition1="Young", condition2="Old", layer="logged_counts",
                  obsm_key="X_pca", gp=kd.GPSettings(ls=200.0, landmarks=landmarks), fdr=kd.FDRSettings(null_genes=0),
                  storage=kd.StorageSettings(store_layers=False, result_key="plain"),
                  output=kd.OutputSettings(progress=False, return_full_results=True), client=client)
    assert np.max(np.abs(plain["table"]["mahalanobis"].to_numpy() - d) / d) > 1e-2


@pytest.mark.slow  # kompot parity of a niche option: `pytest -m slow` (suite time, CI's 15 minutes)
@needs_kompot
def test_empirical_variance_with_sample_col_parity(tmp_path, client):
    """Both variances at once, as kompot 0.8.0 combines them: each cell's residual from its
    own sample's model, pooled into one variance GP per condition, and each gene's distance
    from one Cholesky of Σ + V₁ + V₂ + diag(v). One sample of condition 1 has a single cell:
    kompot fits it for its residual but leaves it out of the sample variance. The null genes
    get the same treatment (their local FDR matches)."""
    adata, landmarks = _data(tmp_path, seed=3)
    single = np.flatnonzero(adata.obs["Age"].to_numpy() == "Young")[0]
    adata.obs["sample"] = adata.obs["sample"].astype(str)
    adata.obs.loc[adata.obs.index[single], "sample"] = "lone"
    ref = _reference(tmp_path, adata, {
        "gp": {"ls": 200.0, "landmarks_npy": str(tmp_path / "landmarks.npy"), "use_empirical_variance": True},
        "fdr": {"null_genes": 30}, "storage": {"store_additional_stats": True},
    })
    store, got, out = _ours(tmp_path, adata, landmarks, client,
                            gp=kd.GPSettings(ls=200.0, landmarks=landmarks, use_empirical_variance=True),
                            fdr=kd.FDRSettings(null_genes=30), storage=kd.StorageSettings(store_additional_stats=True))
    assert _our_fields(got) == _kompot_fields(ref)
    d = got.var[f"{PAIR}_mahalanobis_sample_var"].to_numpy(float)
    d_ref = ref[f"var/{PAIR}_mahalanobis_sample_var"].astype(float)
    assert np.max(np.abs(d - d_ref) / d_ref) <= 1e-8  # measured 1.5e-9 without the lone cell
    fdr = got.var[f"{PAIR}_mahalanobis_local_fdr_sample_var"].to_numpy(float)
    assert np.max(np.abs(fdr - ref[f"var/{PAIR}_mahalanobis_local_fdr_sample_var"])) <= 1e-8
    for c in ("Young", "Old"):
        assert np.max(np.abs(np.asarray(got.layers[f"kompot_de_{c}_std"], float)
                             - ref[f"layers/kompot_de_{c}_std"])) <= 5e-7  # float32 layer; 1.2e-7
    z = np.asarray(got.layers[f"{PAIR}_fold_change_zscores_sample_var"], float)
    assert np.max(np.abs(z - ref[f"layers/{PAIR}_fold_change_zscores_sample_var"])) <= 5e-6
    # the empirical variance matters here: the sample variance alone gives other distances
    plain = kd.de(store, groupby="Age", condition1="Young", condition2="Old", layer="logged_counts",
                  obsm_key="X_pca", sample_col="sample", gp=kd.GPSettings(ls=200.0, landmarks=landmarks),
                  storage=kd.StorageSettings(store_layers=False, result_key="plain"),
                  output=kd.OutputSettings(progress=False, return_full_results=True), client=client)
    assert np.max(np.abs(plain["table"]["mahalanobis"].to_numpy() - d) / d) > 1e-2


def test_direct_mahalanobis_matches_a_dense_solve():
    """The per-gene Cholesky of the sample variance with the empirical variance equals a
    dense solve of δᵀ(Σ + diag v + KU(KU)ᵀ)⁻¹δ, and a matrix that is not positive definite
    gives NaN for that gene only."""
    rng = np.random.default_rng(4)
    m, g, r = 40, 6, 3
    A = rng.normal(size=(m, m))
    cov = A @ A.T * 1e-3 + 1e-8 * np.eye(m)
    kzz, dw, U = rng.normal(size=(m, m)), rng.normal(size=(m, g)), rng.normal(size=(m, g, r))
    v = rng.uniform(1e-3, 1.0, size=(m, g))
    v[:, 5] = -10.0  # not positive definite
    got = gp_mod.direct_mahalanobis(np.asfortranarray(np.tril(cov)), kzz, dw, U, v)
    for j in range(5):
        ku = kzz @ U[:, j, :]
        delta = kzz @ dw[:, j]
        want = np.sqrt(delta @ np.linalg.solve(cov + np.diag(v[:, j]) + ku @ ku.T, delta))
        assert abs(got[j] - want) <= 1e-10 * want
    assert np.isnan(got[5])


KILL_DRIVER = """
import os, signal, sys, threading, time
import numpy as np
import kompot_dask as kd
import kompot_dask._engine.graph as eng
from kompot_dask._io import commit
from distributed import Client, LocalCluster

store, landmarks = sys.argv[1], np.load(sys.argv[2])
empirical = len(sys.argv) > 3  # the empirical variance too (then no groups: refused with both)
real = eng._sample_block_task
def slow(*a, **k):
    time.sleep(0.3)
    return real(*a, **k)
eng._sample_block_task = slow

def watch():
    while True:
        for st in commit.list_staging(store):
            done = [k for k in commit.read_markers(st.sub("markers")) if k.startswith("real-")]
            if len(done) >= 2:
                print("KILL", len(done), flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.02)

threading.Thread(target=watch, daemon=True).start()
with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cl, Client(cl) as c:
    kd.de(store, groupby="Age", condition1="Young", condition2="Old", layer="logged_counts", obsm_key="X_pca",
          sample_col="sample", gp=kd.GPSettings(ls=200.0, landmarks=landmarks, use_empirical_variance=empirical),
          filter=kd.FilterSettings(groups=None if empirical else "Age"),
          compute=kd.ComputeSettings(gene_block=8), output=kd.OutputSettings(progress=False), client=c)
print("FINISHED", flush=True)
"""


@pytest.mark.slow  # a real SIGKILL and two reruns (~45 s): `pytest -m slow`, and benchmarks/faults.py
def test_sample_col_resumes_after_sigkill(tmp_path, client):
    """The client SIGKILLed after two of five gene blocks: the store is as it was, and the
    rerun reuses the saved fit (the samples' and the groups' factors included) and the
    finished blocks, with results identical to an uninterrupted run."""
    import subprocess
    import sys

    adata, landmarks = _data(tmp_path, seed=23)
    store = kd.ingest(adata, tmp_path / "k.zarr", progress=False)
    clean = kd.ingest(adata, tmp_path / "clean.zarr", progress=False)
    proc = subprocess.run([sys.executable, "-c", KILL_DRIVER, store, str(tmp_path / "landmarks.npy")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9 and "KILL" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    assert not any(c.startswith("kompot") for c in ad.read_zarr(store).var)  # nothing half-written
    from kompot_dask._io import commit

    (staged,) = commit.list_staging(store)
    assert len([f for f in os.listdir(staged.sub("fit")) if f.startswith("sample-")]) == 6
    assert len([f for f in os.listdir(staged.sub("fit")) if f.startswith("group-")]) == 6  # 2 groups × 3 files
    kw = dict(groupby="Age", condition1="Young", condition2="Old", layer="logged_counts", obsm_key="X_pca",
              sample_col="sample", gp=kd.GPSettings(ls=200.0, landmarks=landmarks),
              filter=kd.FilterSettings(groups="Age"),
              compute=kd.ComputeSettings(gene_block=8), output=kd.OutputSettings(progress=False), client=client)
    kd.de(store, **kw)
    kd.de(clean, **kw)
    info = kd.RunInfo(store, -1).record
    assert info["resumed"]["tasks_reused"] >= 2
    a, b = ad.read_zarr(store), ad.read_zarr(clean)
    np.testing.assert_array_equal(a.var[f"{PAIR}_mahalanobis_sample_var"], b.var[f"{PAIR}_mahalanobis_sample_var"])
    np.testing.assert_array_equal(np.asarray(a.layers["kompot_de_Old_std"]), np.asarray(b.layers["kompot_de_Old_std"]))
    for key in (f"{PAIR}_mahalanobis_sample_var_groups", f"{PAIR}_mean_lfc_groups"):
        assert list(a.varm[key].columns) == ["Young", "Old"]
        np.testing.assert_array_equal(a.varm[key].to_numpy(), b.varm[key].to_numpy())


@pytest.mark.slow  # a real SIGKILL and two reruns: `pytest -m slow`
def test_sample_col_with_empirical_variance_resumes_after_sigkill(tmp_path, client):
    """The same kill with both variances: the rerun reuses the saved fit (Σ + eps·I and the
    samples' factors), the samples' leverages and the finished blocks, and its results equal
    an uninterrupted run's."""
    import subprocess
    import sys

    adata, landmarks = _data(tmp_path, seed=23)
    store = kd.ingest(adata, tmp_path / "k.zarr", progress=False)
    clean = kd.ingest(adata, tmp_path / "clean.zarr", progress=False)
    proc = subprocess.run([sys.executable, "-c", KILL_DRIVER, store, str(tmp_path / "landmarks.npy"), "emp"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9 and "KILL" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    assert not any(c.startswith("kompot") for c in ad.read_zarr(store).var)  # nothing half-written
    from kompot_dask._io import commit

    (staged,) = commit.list_staging(store)
    assert os.path.isfile(os.path.join(staged.sub("fit"), "Sigma.npy"))
    assert sum(k.startswith("levs-") for k in commit.read_markers(staged.sub("markers"))) == 6
    kw = dict(groupby="Age", condition1="Young", condition2="Old", layer="logged_counts", obsm_key="X_pca",
              sample_col="sample", gp=kd.GPSettings(ls=200.0, landmarks=landmarks, use_empirical_variance=True),
              compute=kd.ComputeSettings(gene_block=8), output=kd.OutputSettings(progress=False), client=client)
    kd.de(store, **kw)
    kd.de(clean, **kw)
    assert kd.RunInfo(store, -1).record["resumed"]["tasks_reused"] >= 2  # the blocks (the leverages not counted)
    a, b = ad.read_zarr(store), ad.read_zarr(clean)
    np.testing.assert_array_equal(a.var[f"{PAIR}_mahalanobis_sample_var"], b.var[f"{PAIR}_mahalanobis_sample_var"])
    np.testing.assert_array_equal(np.asarray(a.layers["kompot_de_Old_std"]), np.asarray(b.layers["kompot_de_Old_std"]))

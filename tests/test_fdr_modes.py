"""FDRSettings(mode=...): the variance-stratified null (upstream kompot's opt-in after 0.8.0).

The trend regression is checked against a closed form and on planted distances; a real
run is checked end to end: its raw columns are kompot's raw FDR of its own distances, its
residuals are the trend of the moments of the store's own values (real genes, and the
null genes' source columns), and is_de comes from the residual local FDR."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

import kompot_dask as kd
from kompot_dask._numerics import fdr as fdr_mod
from kompot_dask.testing import SyntheticSpec, write_synthetic_store


def test_trend__one_feature_degree_one_is_simple_linear_regression():
    """With log_mean alone and a straight line, z is the ordinary least-squares residual of
    log(1 + D²) on log(1 + mean) over the null genes, over its n − 2 d.o.f. deviation."""
    from scipy.stats import linregress

    rng = np.random.default_rng(3)
    null_mean, real_mean = rng.gamma(2.0, 1.0, 300), rng.gamma(2.0, 1.0, 80)
    null = np.sqrt(np.expm1(0.5 + 0.8 * np.log1p(null_mean) + rng.normal(0, 0.3, 300)))
    real = np.sqrt(np.expm1(0.5 + 0.8 * np.log1p(real_mean) + rng.normal(0, 0.3, 80)))
    zeros = np.zeros
    out = fdr_mod.variance_stratified_fdr(real, null, np.stack([real_mean, zeros(80)]),
                                          np.stack([null_mean, zeros(300)]), features=("log_mean",), degree=1)
    fit = linregress(np.log1p(null_mean), np.log1p(null**2))
    resid = np.log1p(null**2) - (fit.intercept + fit.slope * np.log1p(null_mean))
    sd = np.sqrt(resid @ resid / (300 - 2))
    np.testing.assert_allclose(out.null_residual_z, resid / sd, rtol=1e-10, atol=1e-12)
    x = np.clip(np.log1p(real_mean), np.log1p(null_mean).min(), np.log1p(null_mean).max())
    np.testing.assert_allclose(out.residual_z, (np.log1p(real**2) - fit.intercept - fit.slope * x) / sd,
                               rtol=1e-10, atol=1e-12)
    # the FDR is kompot's 1-D local FDR of the positive parts
    ref = fdr_mod.compute_fdr(np.maximum(out.residual_z, 0), np.maximum(out.null_residual_z, 0))
    np.testing.assert_array_equal(out.fdr.local_fdr, ref.local_fdr)
    assert out.fdr.summary["mode"] == "variance_stratified"


def test_trend__high_variance_genes_are_not_called_shifted_ones_are():
    """Planted: distances grow with each gene's variance (the trend), and the tested genes
    vary more than the null genes' sources (kompot draws those from all genes, also when
    ``genes=`` picks highly variable ones); 20 tested genes sit far above the trend. The raw
    FDR calls high-variance genes; the stratified one calls the 20 and far fewer others."""
    rng = np.random.default_rng(5)

    def genes(n, log_var_centre):
        mean = rng.gamma(2.0, 0.5, n)
        var = mean * rng.lognormal(log_var_centre, 0.8, n)
        t = 1.5 + 1.5 * np.log1p(var) + 0.2 * np.log1p(mean) + rng.normal(0, 0.25, n)
        return mean, var, t

    nm, nv, nt = genes(2000, -0.5)
    rm, rv, rt = genes(400, 0.5)
    planted = np.zeros(400, bool)
    planted[:20] = True
    rt[planted] += 2.0
    real, null = np.sqrt(np.expm1(rt)), np.sqrt(np.expm1(nt))
    raw = fdr_mod.compute_fdr(real, null)
    out = fdr_mod.variance_stratified_fdr(real, null, np.stack([rm, rv]), np.stack([nm, nv]))
    raw_false = int((raw.is_de & ~planted).sum())
    strat_false = int((out.fdr.is_de & ~planted).sum())
    assert raw_false > 10, raw_false  # the variance trend passes as DE
    # measured: raw 23 calls, 14 false; stratified 25 calls, 5 false (every planted gene found)
    assert strat_false <= raw_false / 2 and strat_false / out.fdr.is_de.sum() < 0.25, strat_false
    assert out.fdr.is_de[planted].sum() >= 18
    assert abs(np.mean(out.null_residual_z)) < 1e-8 and abs(np.std(out.null_residual_z, ddof=7) - 1) < 1e-8


def test_trend__too_few_null_genes_give_fdr_one(caplog):
    real, null = np.arange(1.0, 11.0), np.arange(1.0, 11.0)
    m = np.ones((2, 10))
    out = fdr_mod.variance_stratified_fdr(real, null, m, m)
    assert np.all(out.fdr.local_fdr == 1) and not out.fdr.is_de.any()
    assert "cannot be estimated" in caplog.text


@pytest.mark.parametrize("kwargs, match", [
    (dict(mode="stratified"), "FDRSettings.mode='stratified'"),
    (dict(null_trend_features=("log_mean", "log_mean")), "null_trend_features"),
    (dict(null_trend_features=("dispersion",)), "null_trend_features"),
    (dict(null_trend_model="poly5"), "null_trend_model"),
    (dict(mode="variance_stratified", null_mahalanobis=np.ones(5)), "per-gene expression features"),
])
def test_settings__bad_mode_fields_are_refused(kwargs, match):
    with pytest.raises(kd.SettingsError, match=match):
        kd.FDRSettings(**kwargs)


def test_de__variance_stratified_end_to_end(tmp_path, client):
    spec = SyntheticSpec(n_obs=1200, n_vars=80, n_dims=6, seed=8, variance_spread=0.6, density_skew=3.0)
    store = write_synthetic_store(tmp_path / "s.zarr", spec, cell_chunk=256, gene_chunk=32)
    fdr = kd.FDRSettings(mode="variance_stratified", null_genes=160)
    out = kd.de(store, groupby="Age", condition1="Young", condition2="Old", layer="logged_counts",
                obsm_key="X_pca", gp=kd.GPSettings(n_landmarks=120, ls=30.0), fdr=fdr,
                storage=kd.StorageSettings(store_additional_stats=True, store_layers=False),
                output=kd.OutputSettings(progress=False, return_full_results=True), client=client)
    a = ad.read_zarr(store)
    var, pair = a.var, "kompot_de_Young_to_Old"
    d, null = var[f"{pair}_mahalanobis"].to_numpy(float), out["null_mahalanobis"]
    # the raw columns are kompot's raw FDR of these distances, unchanged by the mode
    raw = fdr_mod.compute_fdr(d, null)
    np.testing.assert_array_equal(var[f"{pair}_mahalanobis_local_fdr"].to_numpy(), raw.local_fdr)
    # the moments come from the store's own values over both conditions' cells
    y = np.asarray(a.layers["logged_counts"], dtype=np.float64)[a.obs["Age"].isin(["Young", "Old"]).to_numpy()]
    sources, _ = fdr_mod.choose_null_genes(a.n_vars, 160, 42)
    real_m, null_m = np.stack([y.mean(0), y.var(0)]), np.stack([y.mean(0)[sources], y.var(0)[sources]])
    ref = fdr_mod.variance_stratified_fdr(d, null, real_m, null_m)
    np.testing.assert_allclose(var[f"{pair}_mahalanobis_residual_z"].to_numpy(), ref.residual_z, rtol=1e-9,
                               atol=1e-9)
    np.testing.assert_allclose(var[f"{pair}_mahalanobis_residual_local_fdr"].to_numpy(), ref.fdr.local_fdr,
                               atol=1e-9)
    assert f"{pair}_mahalanobis_residual_tail_fdr" in var
    np.testing.assert_array_equal(var[f"{pair}_is_de"].to_numpy(bool), ref.fdr.is_de)
    assert not np.array_equal(ref.fdr.is_de, raw.is_de)  # the mode decided the calls
    np.testing.assert_array_equal(out["table"]["local_fdr"].to_numpy(), raw.local_fdr)
    # the record, RunInfo and the volcano say which mode produced is_de
    info = kd.RunInfo(store)
    assert info.run_record.fdr_mode == "variance_stratified"
    assert info.summary()["FDR mode"].startswith("variance_stratified")
    assert "variance-stratified" in info.run_record.field_mapping[f"{pair}_is_de"]["description"]
    assert info.to_settings()["fdr"].mode == "variance_stratified"
    fig = kd.plot.volcano_de(store, return_fig=True, show=False)
    assert fig.axes[0].get_legend().get_title().get_text() == "is_de: variance-stratified FDR"
    with pytest.raises(ValueError, match="variance_stratified"):
        kd.recompute_fdr(store, null)
    # refusals that need no run: no null genes, groups
    with pytest.raises(kd.SettingsError, match="null_genes=0"):
        kd.de(store, groupby="Age", condition1="Young", condition2="Old", layer="logged_counts",
              obsm_key="X_pca", fdr=kd.FDRSettings(mode="variance_stratified", null_genes=0), client=client)


def test_neighbourhood_permutations__labels_move_only_within_a_neighbourhood():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(5000, 3))
    codes = np.where(rng.random(5000) < 0.3, 1, 2).astype(np.int8)
    codes[:100] = 0  # outside both conditions: stays
    Z = X[rng.choice(5000, 400, replace=False)]
    perms, k = fdr_mod.neighbourhood_permutations(codes, X, Z, 30, seed=4, n_permutations=2)
    assert k == 4900 // 30 and perms.shape == (2, 5000)
    # recompute the neighbourhoods: each keeps its count of each condition, and labels move
    centres = Z[np.sort(np.random.default_rng([4, 16]).choice(400, size=k, replace=False))]
    nb = np.argmin(((X[100:, None, :] - centres[None]) ** 2).sum(-1), axis=1)
    for perm in perms:
        np.testing.assert_array_equal(perm[:100], 0)
        for c in np.unique(nb):
            sel = 100 + np.flatnonzero(nb == c)
            assert np.sum(codes[sel] == 1) == np.sum(perm[sel] == 1)
        assert 0.2 < np.mean(perm[100:] != codes[100:]) < 0.6
    assert 0.2 < np.mean(perms[0] != perms[1]) < 0.6  # independent permutations
    again, _ = fdr_mod.neighbourhood_permutations(codes, X, Z, 30, seed=4, n_permutations=2)
    np.testing.assert_array_equal(again, perms)


def test_permutation_fdr__the_permuted_fits_are_the_null():
    """Planted: null genes' D and D_perm exchangeable (a structure-driven spread each gene
    has under both labellings); 25 genes have D far above their D_perm. One permutation:
    the score's negative side is the null; two: each permutation in the real one's place."""
    rng = np.random.default_rng(9)
    base = rng.lognormal(1.0, 0.7, 1000)  # each gene's own scale, as a variance trend would give
    d, dp = base * rng.lognormal(0, 0.15, 1000), base * rng.lognormal(0, 0.15, (2, 1000))
    d[:25] *= 3.0
    f = np.log1p
    w, res = fdr_mod.permutation_fdr(d, dp[:1])
    np.testing.assert_allclose(w, f(d**2) - f(dp[0] ** 2))
    ref = fdr_mod.compute_fdr(np.maximum(w, 0), np.maximum(-w, 0))
    np.testing.assert_array_equal(res.local_fdr, ref.local_fdr)
    assert res.is_de[:25].sum() >= 20 and res.is_de[25:].sum() <= 2
    w2, res2 = fdr_mod.permutation_fdr(d, dp)
    np.testing.assert_allclose(w2, f(d**2) - (f(dp[0] ** 2) + f(dp[1] ** 2)) / 2)
    null = np.concatenate([f(dp[0] ** 2) - f(dp[1] ** 2), f(dp[1] ** 2) - f(dp[0] ** 2)])
    np.testing.assert_allclose(res2.local_fdr, fdr_mod.compute_fdr(np.maximum(w2, 0), np.maximum(null, 0)).local_fdr,
                               rtol=1e-9, atol=1e-12)
    assert res2.is_de[:25].sum() >= res.is_de[:25].sum() and res2.is_de[25:].sum() <= 2
    assert res2.summary["mode"] == "calibrated" and res2.summary["n_permutations"] == 2
    np.testing.assert_allclose(f(fdr_mod.permuted_distance(dp) ** 2), f(dp**2).mean(0))
    # against a null with the typical level but not each gene's own (a gene-shuffled null):
    # 81 of the 975 unshifted genes are called (measured)
    raw = fdr_mod.compute_fdr(d, rng.lognormal(1.0, 0.3, 2000))
    assert raw.is_de[25:].sum() > 40


def test_de__calibrated_end_to_end(tmp_path, client):
    """Each permutation's distances are those of a plain run on its labels (same landmarks
    and length scale); the score, its FDR and is_de follow from them."""
    spec = SyntheticSpec(n_obs=900, n_vars=40, n_dims=6, seed=8, density_skew=3.0)
    store = write_synthetic_store(tmp_path / "s.zarr", spec, cell_chunk=256, gene_chunk=16)
    kw = dict(layer="logged_counts", obsm_key="X_pca", condition1="Young", condition2="Old", client=client)
    out = kd.de(store, groupby="Age", gp=kd.GPSettings(n_landmarks=100, ls=30.0),
                fdr=kd.FDRSettings(mode="calibrated", null_genes=0, null_neighbourhood_cells=20),
                storage=kd.StorageSettings(store_layers=False),
                output=kd.OutputSettings(progress=False, return_full_results=True), **kw)
    a = ad.read_zarr(store)
    var, pair = a.var, "kompot_de_Young_to_Old"
    codes = a.obs["Age"].map({"Young": 1, "Old": 2}).to_numpy().astype(np.int8)
    perms, k = fdr_mod.neighbourhood_permutations(codes, a.obsm["X_pca"], out["landmarks"], 20, 42, 2)
    dps = []
    for p, perm in enumerate(perms):
        a.obs[f"Perm{p}"] = np.where(perm == 1, "Young", "Old")
        ref = kd.de(a, groupby=f"Perm{p}", gp=kd.GPSettings(landmarks=out["landmarks"], ls=30.0),
                    fdr=kd.FDRSettings(null_genes=0), storage=kd.StorageSettings(store_layers=False, result_key=f"p{p}"),
                    output=kd.OutputSettings(progress=False, return_full_results=True), **kw)
        dps.append(ref["table"]["mahalanobis"].to_numpy())
    d = var[f"{pair}_mahalanobis"].to_numpy(float)
    w, fdr = fdr_mod.permutation_fdr(d, np.array(dps))
    np.testing.assert_allclose(var[f"{pair}_mahalanobis_permuted"].to_numpy(), fdr_mod.permuted_distance(np.array(dps)),
                               rtol=1e-9)
    np.testing.assert_allclose(var[f"{pair}_mahalanobis_calibrated_score"].to_numpy(), w, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(var[f"{pair}_mahalanobis_calibrated_local_fdr"].to_numpy(), fdr.local_fdr, atol=1e-8)
    np.testing.assert_array_equal(var[f"{pair}_is_de"].to_numpy(bool), fdr.is_de)
    assert f"{pair}_mahalanobis_local_fdr" not in var  # no null genes: no raw FDR
    info = kd.RunInfo(store)
    assert info.run_record.fdr_mode == "calibrated" and info.run_record.fdr_results["n_neighbourhoods"] == k
    assert info.run_record.fdr_results["n_permutations"] == 2
    assert "local_fdr" not in out["table"] and "calibrated_local_fdr" in out["table"]
    fig = kd.plot.volcano_de(store, return_fig=True, show=False)
    assert fig.axes[0].get_legend().get_title().get_text() == "is_de: calibrated FDR"
    plan = kd.plan(store, groupby="Age", fdr=kd.FDRSettings(mode="calibrated"), **kw)
    assert plan.feasible


def test_sample_permutations__balanced_distinct_and_refused_when_too_few():
    """Whole samples change sides: each relabelling keeps the counts, mixes the conditions
    as evenly as they allow, and no two are the same split (or mirror images)."""
    labels, leak = fdr_mod.sample_permutations([1, 1, 1, 2, 2, 2], 9, 4)
    assert abs(leak) == pytest.approx(1 / 3)
    splits = set()
    for row in labels:
        assert (row == 1).sum() == 3 and set(row[:3]) == {1, 2}  # one or two of each side stay
        g = tuple(np.flatnonzero(row == 1))
        splits.add(min(g, tuple(np.flatnonzero(row == 2))))
    assert len(splits) == 9  # all of 3 × 3 balanced splits, none twice
    labels, leak = fdr_mod.sample_permutations([1] * 4 + [2] * 6, 3, 0)
    assert all((row == 1).sum() == 4 for row in labels) and leak == pytest.approx(2 / 4 - 2 / 6)
    np.testing.assert_array_equal(fdr_mod.sample_permutations([1] * 20 + [2] * 20, 3, 7)[0],
                                  fdr_mod.sample_permutations([1] * 20 + [2] * 20, 3, 7)[0])
    with pytest.raises(ValueError, match="2 distinct balanced relabelling"):
        fdr_mod.sample_permutations([1, 1, 2, 2], 3, 0)


def test_de__calibrated_with_sample_col_end_to_end(tmp_path, client):
    """With sample_col the permuted labels move whole samples: each relabelling's distances
    (sample variance included) are those of a plain sample_col run on its labels, with the
    same landmarks and length scale; the score, its FDR and is_de follow from them."""
    spec = SyntheticSpec(n_obs=900, n_vars=40, n_dims=6, seed=8, samples_per_condition=3)
    store = write_synthetic_store(tmp_path / "s.zarr", spec, cell_chunk=256, gene_chunk=16)
    kw = dict(layer="logged_counts", obsm_key="X_pca", condition1="Young", condition2="Old", client=client,
              sample_col="sample")
    out = kd.de(store, groupby="Age", gp=kd.GPSettings(n_landmarks=100, ls=30.0),
                fdr=kd.FDRSettings(mode="calibrated", null_permutations=2),
                storage=kd.StorageSettings(store_layers=False),
                output=kd.OutputSettings(progress=False, return_full_results=True), **kw)
    a = ad.read_zarr(store)
    var, pair = a.var, "kompot_de_Young_to_Old"
    samples = sorted(a.obs["sample"].unique(), key=lambda s: (not s.startswith("Young"), s))  # the fitted order
    labels, _ = fdr_mod.sample_permutations([1 if s.startswith("Young") else 2 for s in samples], 2, 42)
    dps = []
    for p, row in enumerate(labels):
        side = dict(zip(samples, np.where(row == 1, "Young", "Old"), strict=True))
        a.obs[f"Perm{p}"] = a.obs["sample"].map(side).astype(str)
        assert set(a.obs.loc[a.obs[f"Perm{p}"] == "Young", "sample"].str[:3]) == {"You", "Old"}  # mixed sides
        ref = kd.de(a, groupby=f"Perm{p}", gp=kd.GPSettings(landmarks=out["landmarks"], ls=30.0),
                    storage=kd.StorageSettings(store_layers=False, result_key=f"p{p}"),
                    output=kd.OutputSettings(progress=False, return_full_results=True), **kw)
        dps.append(ref["table"]["mahalanobis"].to_numpy())
    d = var[f"{pair}_mahalanobis_sample_var"].to_numpy(float)
    w, fdr = fdr_mod.permutation_fdr(d, np.array(dps))
    np.testing.assert_allclose(var[f"{pair}_mahalanobis_permuted_sample_var"].to_numpy(),
                               fdr_mod.permuted_distance(np.array(dps)), rtol=1e-8)
    np.testing.assert_allclose(var[f"{pair}_mahalanobis_calibrated_score_sample_var"].to_numpy(), w, rtol=1e-7,
                               atol=1e-9)
    np.testing.assert_array_equal(var[f"{pair}_is_de_sample_var"].to_numpy(bool), fdr.is_de)
    info = kd.RunInfo(store)
    assert info.run_record.fdr_mode == "calibrated" and info.run_record.fdr_results["null"] == "samples"
    plan = kd.plan(store, groupby="Age", fdr=kd.FDRSettings(mode="calibrated"), **kw)
    assert plan.feasible
    a.obs["two"] = a.obs["Age"].astype(str) + np.asarray(["_a", "_b"])[np.arange(a.n_obs) % 2]
    with pytest.raises(kd.SettingsError, match="null_permutations=3.*allow 2 distinct"):
        kd.de(a, groupby="Age", fdr=kd.FDRSettings(mode="calibrated", null_permutations=3),
              **{**kw, "sample_col": "two"})


def test_cli__fdr_mode_flag_reaches_the_settings():
    from kompot_dask import cli

    args = cli.build_parser().parse_args(["de", "s.zarr", "--groupby", "Age", "--condition1", "Young", "--condition2", "Old",
                                       "--fdr-mode", "calibrated"])
    assert cli._settings_from(args, {})["fdr"].mode == "calibrated"
    args = cli.build_parser().parse_args(["de", "s.zarr", "--groupby", "Age", "--condition1", "Young",
                                          "--condition2", "Old"])
    assert cli._settings_from(args, {})["fdr"].mode == "raw"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["de", "s.zarr", "--fdr-mode", "stratified"])

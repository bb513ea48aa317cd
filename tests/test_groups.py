"""FilterSettings(groups=...): kompot 0.8.0's per-group results, from the run's own two
models — each subset's mean log fold change over its cells, its Mahalanobis distance with
the posterior covariance at its points (new k-means landmarks of a subset larger than the
run's landmark count, else its cells), its local FDR from its own null-gene distances —
as genes × subsets tables in varm, under kompot's names.

Parity with kompot (in a subprocess on the same input, like tests/test_parity.py), one
subset on its own k-means landmarks and one on its cells; measured (max relative):
Mahalanobis 5.2e-10, −log10 PTP 4.1e-9, mean_lfc 1.7e-9 (≤ 1e-10 absolute), local FDR
2.5e-9 (on values below 1e-14), identical is_de.
"""

from __future__ import annotations

import importlib.util
import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from test_parity import run_reference

import kompot_dask as kd
from kompot_dask import _groups
from kompot_dask.testing import SyntheticSpec, make_synthetic_adata

needs_kompot = pytest.mark.skipif(
    importlib.util.find_spec("kompot") is None, reason="the reference oracle kompot==0.8.0 is a test extra"
)

PAIR = "kompot_de_Young_to_Old"
CALL = dict(groupby="Age", condition1="Young", condition2="Old", layer="logged_counts", obsm_key="X_pca")


def _data(tmp_path, seed: int = 5, samples: int = 0):
    adata = make_synthetic_adata(SyntheticSpec(n_obs=900, n_vars=40, n_dims=8, n_clusters=3, seed=seed,
                                               de_fraction=0.2, cell_types=("T", "B", "NK"),
                                               samples_per_condition=samples))
    adata.obsm["X_pca"] = adata.obsm["X_pca"].astype(np.float64)
    from sklearn.cluster import k_means

    landmarks = k_means(adata.obsm["X_pca"], 120, n_init=1, random_state=0)[0]
    np.save(tmp_path / "landmarks.npy", landmarks)
    return adata, landmarks


@needs_kompot
# kompot parity of a niche option: `make test-slow` (the fast suite keeps the groups' end-to-end tests)
@pytest.mark.parametrize("empirical", [pytest.param(False, marks=pytest.mark.slow),
                                       pytest.param(True, marks=pytest.mark.slow)])
def test_groups_parity(tmp_path, client, empirical):
    """Subsets larger than the landmarks (new k-means landmarks) and smaller (their cells),
    with null genes and the additional statistics: kompot's varm tables, their columns and
    values, and the run record's subsets. With the empirical variance, each subset's
    distances take kompot's factor trick at its own points."""
    adata, landmarks = _data(tmp_path)
    rng = np.random.default_rng(0)
    few = np.zeros(adata.n_obs, dtype=bool)
    few[rng.choice(adata.n_obs, 90, replace=False)] = True  # ≤ 120 cells: the covariance at its cells
    t_cells = (adata.obs["cell_type"] == "T").to_numpy()  # ~300 cells: its own landmarks
    groups = {"T": t_cells, "few": few}
    ref = run_reference(tmp_path, adata, {
        **CALL, "gp": {"ls": 200.0, "landmarks_npy": str(tmp_path / "landmarks.npy"), "random_state": 0,
                       "use_empirical_variance": empirical},
        "fdr": {"null_genes": 40}, "storage": {"store_additional_stats": True},
        "filter": {"groups": {k: v.tolist() for k, v in groups.items()}},
    })
    store = kd.ingest(adata, tmp_path / "syn.zarr", progress=False)
    kd.de(store, **CALL, gp=kd.GPSettings(ls=200.0, landmarks=landmarks, random_state=0,
                                          use_empirical_variance=empirical),
          fdr=kd.FDRSettings(null_genes=40), storage=kd.StorageSettings(store_additional_stats=True),
          filter=kd.FilterSettings(groups=groups), output=kd.OutputSettings(progress=False), client=client)
    got = ad.read_zarr(store)
    want_keys = sorted(k[5:] for k in ref if k.startswith("varm/"))
    assert sorted(k for k in got.varm if k.startswith("kompot")) == want_keys
    assert f"{PAIR}_mahalanobis_groups" in want_keys and f"{PAIR}_is_de_groups" in want_keys
    stats = {}
    for key in want_keys:
        cols = list(ref[f"varm_columns/{key}"])
        table = got.varm[key]
        assert list(table.columns) == cols, key
        have, want = table.to_numpy(dtype=float), ref[f"varm/{key}"].astype(float)
        stats[key[len(PAIR) + 1:]] = float(np.nanmax(np.abs(have - want) / np.maximum(np.abs(want), 1e-300)))
        if key.endswith("_is_de_groups"):
            np.testing.assert_array_equal(have, want, err_msg=key)
            continue
        if key.endswith("_local_fdr_groups"):  # as tests/test_parity.py: ≤ 1e-8 absolute
            np.testing.assert_allclose(have, want, rtol=0, atol=1e-8, err_msg=key)
            continue
        tol = 1e-8 if "mahalanobis_groups" in key or "ptp" in key else 1e-10
        np.testing.assert_allclose(have, want, rtol=tol, atol=tol if "lfc" in key else 0, err_msg=key)
    print("groups parity, max relative difference:", {k: f"{v:.2g}" for k, v in stats.items()})
    # the subsets differ from each other and from the whole
    d = got.varm[f"{PAIR}_mahalanobis_groups"]
    assert not np.allclose(d["T"], d["few"]) and not np.allclose(d["T"], got.var[f"{PAIR}_mahalanobis"])
    rec = kd.RunInfo(store).run_record
    assert rec.has_groups and rec.subset_names == ["T", "few"]
    assert rec.groups_summary["cells_per_group"]["few"]["count"] == 90
    assert rec.field_mapping[f"{PAIR}_mahalanobis_groups"]["contains_subsets"] == ["T", "few"]
    assert f"varm/{PAIR}_mean_lfc_groups" in rec.fields_written


@pytest.mark.slow  # a niche combination: `pytest -m slow`
@needs_kompot
def test_groups_parity_with_sample_and_empirical_variance(tmp_path, client):
    """Both variances with per-group tables: each subset's distances from one Cholesky per
    gene of the covariance at its own points (landmarks or cells), as kompot computes them."""
    adata, landmarks = _data(tmp_path, samples=3)
    rng = np.random.default_rng(0)
    few = np.zeros(adata.n_obs, dtype=bool)
    few[rng.choice(adata.n_obs, 90, replace=False)] = True
    groups = {"T": (adata.obs["cell_type"] == "T").to_numpy(), "few": few}
    ref = run_reference(tmp_path, adata, {
        **CALL, "sample_col": "sample",
        "gp": {"ls": 200.0, "landmarks_npy": str(tmp_path / "landmarks.npy"), "random_state": 0,
               "use_empirical_variance": True},
        "fdr": {"null_genes": 20}, "filter": {"groups": {k: v.tolist() for k, v in groups.items()}},
    })
    store = kd.ingest(adata, tmp_path / "syn.zarr", progress=False)
    kd.de(store, **CALL, sample_col="sample",
          gp=kd.GPSettings(ls=200.0, landmarks=landmarks, random_state=0, use_empirical_variance=True),
          fdr=kd.FDRSettings(null_genes=20), filter=kd.FilterSettings(groups=groups),
          output=kd.OutputSettings(progress=False), client=client)
    got = ad.read_zarr(store)
    want_keys = sorted(k[5:] for k in ref if k.startswith("varm/"))
    assert sorted(k for k in got.varm if k.startswith("kompot")) == want_keys
    assert f"{PAIR}_mahalanobis_sample_var_groups" in want_keys
    for key in want_keys:
        have, want = got.varm[key].to_numpy(dtype=float), ref[f"varm/{key}"].astype(float)
        assert list(got.varm[key].columns) == list(ref[f"varm_columns/{key}"]), key
        if "_is_de" in key:
            np.testing.assert_array_equal(have, want, err_msg=key)
        elif "_local_fdr" in key:  # as tests/test_parity.py: ≤ 1e-8 absolute
            np.testing.assert_allclose(have, want, rtol=0, atol=1e-8, err_msg=key)
        elif "mahalanobis" in key:
            np.testing.assert_allclose(have, want, rtol=1e-8, atol=0, err_msg=key)
        else:
            np.testing.assert_allclose(have, want, rtol=1e-10, atol=1e-10, err_msg=key)


def test_groups_obs_column_in_memory_and_cleanup(tmp_path, client, caplog):
    """An obs column (one subset per category, in category order) on an in-memory AnnData;
    a subset too small is skipped with kompot's warning; cleanup removes the varm tables."""
    adata, _ = _data(tmp_path, seed=6)
    adata.obs["cell_type"] = adata.obs["cell_type"].cat.add_categories(["rare"])
    adata.obs.loc[adata.obs.index[:1], "cell_type"] = "rare"
    with caplog.at_level(logging.WARNING, logger="kompot_dask"):
        kd.de(adata, **CALL, gp=kd.GPSettings(n_landmarks=80, ls=200.0), fdr=kd.FDRSettings(null_genes=20),
              filter=kd.FilterSettings(groups="cell_type"), output=kd.OutputSettings(progress=False), client=client)
    assert "Subset 'rare' has fewer than 2 cells" in caplog.text
    table = adata.varm[f"{PAIR}_mahalanobis_groups"]
    assert list(table.columns) == ["T", "B", "NK"] and list(table.index) == list(adata.var_names)
    assert np.isfinite(table.to_numpy()).all()
    assert adata.varm[f"{PAIR}_is_de_groups"].dtypes.eq(bool).all()
    # kompot's volcano of one subset: its columns of the varm tables
    got = kd.plot.volcano_de(adata, group="B", return_fig=True, show=False).kompot_data
    np.testing.assert_array_equal(got["x"], adata.varm[f"{PAIR}_mean_lfc_groups"]["B"].to_numpy())
    np.testing.assert_array_equal(got["y"], table["B"].to_numpy())
    np.testing.assert_array_equal(got["significant"], adata.varm[f"{PAIR}_is_de_groups"]["B"].to_numpy())
    assert got["group"] == "B" and got["lfc_key"] == f"{PAIR}_mean_lfc_groups[B]"
    fdr = kd.plot.volcano_de(adata, group="NK", y_axis_type="local_fdr", return_fig=True, show=False)
    np.testing.assert_allclose(fdr.kompot_data["y"],
                               -np.log10(adata.varm[f"{PAIR}_mahalanobis_local_fdr_groups"]["NK"].to_numpy()))
    assert fdr.axes[0].get_title().endswith("in NK")
    with pytest.raises(KeyError, match=r"group='rare' is not a subset of run 0; its subsets: \['T', 'B', 'NK'\]"):
        kd.plot.volcano_de(adata, group="rare")
    kd.cleanup(adata, run_ids=0)
    assert not [k for k in adata.varm if k.startswith("kompot")]


def test_groups_genes_subset_and_sample_col(tmp_path, client):
    """genes= leaves NaN at the genes not tested; with sample_col the subsets' distances
    carry the gene-specific sample covariance (the low-rank term at the subset's points)."""
    adata = make_synthetic_adata(SyntheticSpec(n_obs=700, n_vars=30, n_dims=6, n_clusters=2, seed=8,
                                               samples_per_condition=3, cell_types=("X", "Y")))
    store = kd.ingest(adata, tmp_path / "s.zarr", progress=False)
    genes = list(adata.var_names[::2])
    kw = dict(**CALL, genes=genes, gp=kd.GPSettings(n_landmarks=60, ls=200.0),
              filter=kd.FilterSettings(groups="cell_type"), output=kd.OutputSettings(progress=False), client=client)
    kd.de(store, **kw)
    kd.de(store, **kw, sample_col="sample", storage=kd.StorageSettings(overwrite=True))
    got = ad.read_zarr(store)
    plain = got.varm[f"{PAIR}_mahalanobis_groups"]
    sampled = got.varm[f"{PAIR}_mahalanobis_sample_var_groups"]
    tested = adata.var_names.isin(genes)
    assert plain.loc[~tested].isna().all().all() and np.isfinite(plain.loc[tested].to_numpy()).all()
    # the donor spread only adds covariance: every subset's distances shrink
    assert (sampled.loc[tested].to_numpy() <= plain.loc[tested].to_numpy() * (1 + 1e-9)).all()
    assert (sampled.loc[tested].to_numpy() < plain.loc[tested].to_numpy()).mean() > 0.9
    # the volcano of one subset reads the tables from the store; untested genes are left out
    got = kd.plot.volcano_de(store, group="Y", return_fig=True, show=False).kompot_data
    np.testing.assert_array_equal(got["y"], sampled["Y"].to_numpy())
    assert np.isnan(got["y"][~tested]).all() and not got["significant"][~tested].any()


def test_representation_check(tmp_path, client, caplog):
    """check_representation: None warns about each underrepresented (subset, condition),
    True leaves those cells out of the run (and records it), False does not check."""
    adata, _ = _data(tmp_path, seed=9)
    young_b = ((adata.obs["cell_type"] == "B") & (adata.obs["Age"] == "Young")).to_numpy()
    keep = ~young_b | (np.cumsum(young_b) <= 3)  # 3 young B cells stay
    adata = adata[keep].copy()
    store = kd.ingest(adata, tmp_path / "r.zarr", progress=False)
    base = dict(**CALL, gp=kd.GPSettings(n_landmarks=60, ls=200.0), fdr=kd.FDRSettings(null_genes=0),
                output=kd.OutputSettings(progress=False), client=client,
                storage=kd.StorageSettings(overwrite=True))
    with caplog.at_level(logging.WARNING, logger="kompot_dask"):
        kd.de(store, **base, filter=kd.FilterSettings(groups="cell_type", min_cells=10))
    assert "Condition 'Young' has only 3 cells, below the minimum of 10 cells in group 'B'" in caplog.text
    rec = kd.RunInfo(store).run_record
    assert rec.underrepresentation == {"B": ["Young"]} and not rec.auto_filtered
    kd.de(store, **base, filter=kd.FilterSettings(groups="cell_type", min_cells=10, check_representation=True))
    rec = kd.RunInfo(store).run_record
    assert rec.auto_filtered and rec.model.n_cells_condition1 == int((adata.obs["Age"] == "Young").sum()) - 3
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kompot_dask"):
        kd.de(store, **base, filter=kd.FilterSettings(groups="cell_type", min_percentage=40.0,
                                                      check_representation=False))
    assert "Condition" not in caplog.text


def test_parse_groups_forms_and_errors():
    obs = pd.DataFrame({"ct": pd.Categorical(["a", "b", "a", "c"], categories=["c", "a", "b"]),
                        "flag": [True, False, True, True], "tissue": ["x", "x", "y", "y"],
                        "n": [1, 2, 3, 4]})
    assert _groups.parse_groups(obs, "ct").names == ("c", "a", "b")
    assert _groups.parse_groups(obs, "flag").names == ("True",)
    assert _groups.parse_groups(obs, "tissue").names == ("x", "y")
    named = _groups.parse_groups(obs, {"ax": {"ct": "a", "tissue": "x"}, "bc": {"ct": ["b", "c"]}})
    assert named.names == ("ax", "bc") and named.masks.tolist() == [[True, False, False, False],
                                                                     [False, True, False, True]]
    assert _groups.parse_groups(obs, {"ct": "a", "tissue": "y"}).names == ("ct=a_AND_tissue=y",)
    assert _groups.parse_groups(obs, [{"ct": "a"}, {"ct": ["b", "c"]}]).names == ("ct=a", "ct=b+c")
    assert _groups.parse_groups(obs, {"first": [0, 1]}).masks.tolist() == [[True, True, False, False]]
    assert _groups.parse_groups(obs, np.array([[1, 0, 0, 1], [0, 1, 1, 0]], dtype=bool)).names == ("subset1", "subset2")
    with pytest.raises(ValueError, match="obs column 'nope' not found"):
        _groups.parse_groups(obs, "nope")
    with pytest.raises(ValueError, match="is numeric"):
        _groups.parse_groups(obs, "n")
    with pytest.raises(ValueError, match="mask of 3 entries for 4 cells"):
        _groups.parse_groups(obs, {"bad": np.array([True, False, True])})
    with pytest.raises(ValueError, match="not one of the forms"):
        _groups.parse_groups(obs, 3.5)
    with pytest.raises(kd.SettingsError, match="check_representation"):
        kd.FilterSettings(check_representation=True)
    with pytest.raises(kd.SettingsError, match="min_percentage"):
        kd.FilterSettings(groups="ct", min_percentage=150)

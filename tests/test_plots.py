"""Plots drawn from a store after a real ``kd.de`` run, checked against values computed
here from the raw store (anndata/zarr), not through kompot_dask's readers.

One DE run (Young → Old, 1,200 cells × 72 genes) feeds every test; the store also gets
a ``cell_type`` obs column and an ``X_umap`` embedding (``SyntheticSpec(cell_types=..., umap=True)``).
"""

from __future__ import annotations

import logging
import subprocess
import sys

import anndata as ad
import matplotlib
import numpy as np
import pandas as pd
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import kompot_dask as kd  # noqa: E402
from kompot_dask._io.store import Store, TileReader  # noqa: E402
from kompot_dask._runs.history import RunNotFoundError
from kompot_dask.testing import SyntheticSpec, make_synthetic_adata, write_synthetic_store  # noqa: E402

SPEC = SyntheticSpec(n_obs=1200, n_vars=72, n_dims=6, n_clusters=5, seed=3, de_fraction=0.3,
                     cell_types=("Type A", "Type B", "Type C", "Type D", "Type E"), umap=True)
PREFIX = "kompot_de_Young_to_Old"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def store(tmp_path_factory, client) -> str:
    path = write_synthetic_store(tmp_path_factory.mktemp("plots") / "age.zarr", SPEC, cell_chunk=256, gene_chunk=32)
    kd.de(path, groupby="Age", condition1="Young", condition2="Old", layer="logged_counts", obsm_key="X_pca",
          gp=kd.GPSettings(n_landmarks=100), fdr=kd.FDRSettings(null_genes=200),
          output=kd.OutputSettings(progress=False), client=client)
    return path


@pytest.fixture(scope="module")
def adata(store) -> ad.AnnData:
    """The whole store in memory, read by anndata: the independent reference."""
    return ad.read_zarr(store)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def group_means(adata: ad.AnnData, genes: list[str], groups: list[str], condition: str) -> pd.DataFrame:
    """Mean of logged_counts per cell type in one condition (genes × groups), by pandas."""
    frame = pd.DataFrame(adata[:, genes].layers["logged_counts"], columns=genes, index=adata.obs_names)
    cells = (adata.obs["Age"] == condition).to_numpy()
    means = frame[cells].groupby(adata.obs["cell_type"].to_numpy()[cells]).mean()
    return means.T.reindex(columns=groups)


def is_png(path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(8) == PNG_MAGIC


def collections_by_label(ax) -> dict[str, np.ndarray]:
    return {c.get_label(): np.asarray(c.get_offsets()) for c in ax.collections}


# ---------------------------------------------------------------------------
# volcano_de
# ---------------------------------------------------------------------------


def test_volcano_de__highlighted_points_are_the_is_de_genes(store, adata, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="kompot_dask"):
        fig = kd.plot.volcano_de(store, save=tmp_path / "volcano.png")
    # saved at kompot's 300 dpi: the PNG is about 300 pixels per inch of the figure
    png = matplotlib.image.imread(tmp_path / "volcano.png")
    assert png.shape[1] >= 0.75 * 300 * fig.get_size_inches()[0]  # (a tight box trims the margins)
    assert is_png(tmp_path / "volcano.png")
    is_de = adata.var[f"{PREFIX}_is_de"].to_numpy(dtype=bool)
    lfc = adata.var[f"{PREFIX}_mean_lfc"].to_numpy()
    assert is_de.sum() >= 3, "the fixture must have DE genes for this test to mean anything"
    data = fig.kompot_data
    assert data["highlighted"] == adata.var_names[is_de].tolist()
    points = collections_by_label(fig.axes[0])
    n_up, n_down = int((is_de & (lfc > 0)).sum()), int((is_de & (lfc < 0)).sum())
    assert len(points[f"Up in Old ({n_up})"]) == n_up
    assert len(points[f"Down in Old ({n_down})"]) == n_down
    assert (points[f"Up in Old ({n_up})"][:, 0] > 0).all()
    # the drawn y values are the Mahalanobis distances of the DE genes
    drawn_y = np.sort(np.concatenate([points[f"Up in Old ({n_up})"][:, 1], points[f"Down in Old ({n_down})"][:, 1]]))
    np.testing.assert_allclose(drawn_y, np.sort(adata.var[f"{PREFIX}_mahalanobis"].to_numpy()[is_de]))
    assert f"Highlighting {is_de.sum()} genes marked as DE ({n_up} up, {n_down} down)" in caplog.text
    assert "Found DE run info for run_id=-1" in caplog.text
    # default gene_labels=10: the ten largest distances
    top = adata.var[f"{PREFIX}_mahalanobis"].sort_values(ascending=False).index[:10]
    assert {t.get_text() for t in fig.axes[0].texts} == set(top)


def test_volcano_de__float_threshold_on_local_fdr(store, adata):
    fig = kd.plot.volcano_de(store, y_axis_type="local_fdr", significance_threshold=0.3, gene_labels=0)
    fdr = adata.var[f"{PREFIX}_mahalanobis_local_fdr"].to_numpy()
    expected = adata.var_names[fdr < 0.3].tolist()
    assert len(expected) > 0
    data = fig.kompot_data
    assert data["highlighted"] == expected
    ax = fig.axes[0]
    n_drawn = sum(len(c.get_offsets()) for c in ax.collections if not c.get_label().startswith("_"))
    assert n_drawn == len(expected)
    np.testing.assert_allclose(data["y"], -np.log10(fdr))
    assert data["threshold_line"] == pytest.approx(-np.log10(0.3))
    assert any(np.allclose(line.get_ydata(), -np.log10(0.3)) for line in ax.lines)
    assert len(ax.texts) == 0


def test_volcano_de__dict_threshold_needs_both_and_draws_no_line(store, adata, caplog):
    with caplog.at_level(logging.INFO, logger="kompot_dask"):
        fig = kd.plot.volcano_de(store, significance_threshold={"local_fdr": 0.5, "mahalanobis": 4.0})
    var = adata.var
    hit = (var[f"{PREFIX}_mahalanobis_local_fdr"] < 0.5) & (var[f"{PREFIX}_mahalanobis"] > 4.0)
    assert 0 < hit.sum() < len(var)
    assert fig.kompot_data["highlighted"] == var.index[hit].tolist()
    assert fig.kompot_data["threshold_line"] is None
    assert "Skipping threshold line" in caplog.text


def test_volcano_de__highlight_groups_labels_and_ax(store, adata, tmp_path):
    fig, axes = plt.subplots(1, 2)
    groups = [{"name": "Set one", "genes": ["gene_1", "gene_2", "gene_3"], "color": "#E76F51"},
              {"name": "Set two", "genes": ["gene_10", "gene_11"], "color": "#2A9D8F"}]
    out = kd.plot.volcano_de(store, ax=axes[1], highlight_genes=groups,
                             gene_labels={"gene_1": "first", "gene_10": "tenth"}, title="custom")
    assert out is fig
    assert len(axes[0].collections) == 0 and axes[1].get_title() == "custom"
    points = collections_by_label(axes[1])
    np.testing.assert_allclose(points["Set one (3)"][:, 0], adata.var.loc[["gene_1", "gene_2", "gene_3"], f"{PREFIX}_mean_lfc"])
    assert len(points["Set two (2)"]) == 2
    legend = {t.get_text() for t in axes[1].get_legend().get_texts()}
    assert {"Set one (3)", "Set two (2)"} <= legend and any(t.startswith("Up in Old") for t in legend)
    assert {t.get_text() for t in axes[1].texts} == {"first", "tenth"}
    assert out.kompot_data["highlight_groups"] == {"Set one": ["gene_1", "gene_2", "gene_3"], "Set two": ["gene_10", "gene_11"]}


# ---------------------------------------------------------------------------
# heatmap
# ---------------------------------------------------------------------------


def test_heatmap__tiles_are_group_means_of_the_raw_layer(store, adata, client, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="kompot_dask"):
        fig = kd.plot.heatmap(store, n_top_genes=12, groupby="cell_type", exclude_groups="Type A",
                              standard_scale=None, vmax="p99", client=client, save=tmp_path / "heat.png")
    assert is_png(tmp_path / "heat.png")
    data = fig.kompot_data
    top = adata.var[f"{PREFIX}_mahalanobis"].sort_values(ascending=False).index[:12].tolist()
    assert data["genes"] == top
    groups = ["Type B", "Type C", "Type D", "Type E"]
    assert data["groups"] == groups
    for cond in ("Young", "Old"):
        expected = group_means(adata, top, groups, cond)
        np.testing.assert_allclose(data["means"][cond].to_numpy(), expected.to_numpy(), rtol=1e-6)
        np.testing.assert_allclose(data["tiles"][cond].to_numpy(), expected.to_numpy(), rtol=1e-6)
    counts = pd.crosstab(adata.obs["cell_type"], adata.obs["Age"]).loc[groups, ["Young", "Old"]]
    np.testing.assert_array_equal(data["n_cells"].to_numpy(), counts.to_numpy())
    plotted = np.concatenate([data["tiles"]["Young"].to_numpy().ravel(), data["tiles"]["Old"].to_numpy().ravel()])
    assert data["vmax"] == pytest.approx(np.percentile(plotted, 99))
    assert data["vmin"] == pytest.approx(plotted.min())
    # the drawn triangles carry the same values
    by_gid = {c.get_gid(): c for c in fig.axes[0].collections}
    np.testing.assert_allclose(by_gid["condition1"].get_array(), data["tiles"]["Young"].to_numpy().ravel())
    np.testing.assert_allclose(by_gid["condition2"].get_array(), data["tiles"]["Old"].to_numpy().ravel())
    n_excluded = int((adata.obs["cell_type"] == "Type A").sum())
    assert f"Excluded {n_excluded:,} cells from groups: Type A" in caplog.text
    assert "Creating split heatmap with 12 genes/features" in caplog.text


def test_heatmap__fold_change_mode_tiles_are_differences(store, adata, caplog):
    genes = ["gene_5", "gene_0", "gene_40", "gene_17"]
    with caplog.at_level(logging.INFO, logger="kompot_dask"):
        fig = kd.plot.heatmap(store, genes=genes, groupby="cell_type", vmin="p1", vmax="p99", fold_change_mode=True)
    data = fig.kompot_data
    groups = data["groups"]
    expected = group_means(adata, genes, groups, "Old") - group_means(adata, genes, groups, "Young")
    np.testing.assert_allclose(data["tiles"].to_numpy(), expected.to_numpy(), rtol=1e-5, atol=1e-7)
    assert data["genes"] == genes and data["standard_scale"] is None
    assert data["vmin"] == pytest.approx(np.percentile(expected.to_numpy(), 1))
    assert data["vmax"] == pytest.approx(np.percentile(expected.to_numpy(), 99))
    mesh = [c for c in fig.axes[0].collections if c.get_gid() == "fold_change"][0]
    np.testing.assert_allclose(np.asarray(mesh.get_array()).ravel(), expected.to_numpy().ravel(), rtol=1e-5, atol=1e-7)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("standard_scale='var' is ignored in fold_change_mode" in r.getMessage() for r in warnings)


@pytest.mark.parametrize("scale", ["var", "group"])
def test_heatmap__standard_scale_z_scores(store, adata, scale):
    genes = ["gene_1", "gene_2", "gene_3", "gene_4", "gene_5"]
    fig = kd.plot.heatmap(store, genes=genes, groupby="cell_type", standard_scale=scale)
    data = fig.kompot_data
    raw = np.stack([group_means(adata, genes, data["groups"], c).to_numpy() for c in ("Young", "Old")])  # 2 × genes × groups
    axes = (0, 2) if scale == "var" else (0, 1)
    z = (raw - raw.mean(axis=axes, keepdims=True)) / raw.std(axis=axes, keepdims=True)
    np.testing.assert_allclose(np.stack([data["tiles"]["Young"], data["tiles"]["Old"]]), z, rtol=1e-5, atol=1e-6)
    bound = np.abs(z).max()
    assert (data["vmin"], data["vmax"]) == pytest.approx((-bound, bound), rel=1e-5)


def test_heatmap__reads_only_the_selected_columns_and_draws_into_ax(store, adata, monkeypatch):
    seen: list[np.ndarray] = []
    original = TileReader.read

    def recording_read(self, r0, r1, cols):
        seen.append(np.asarray(cols))
        return original(self, r0, r1, cols)

    monkeypatch.setattr(TileReader, "read", recording_read)
    genes = ["gene_30", "gene_3", "gene_12"]
    fig, ax = plt.subplots()
    out = kd.plot.heatmap(store, genes=genes, groupby=None, standard_scale=None, ax=ax)  # threaded scheduler
    assert out is fig and fig.axes[0] is ax
    assert seen and set(np.concatenate(seen).tolist()) == {30, 3, 12}  # no other column read
    young = (adata.obs["Age"] == "Young").to_numpy()
    expected = adata[young, genes].layers["logged_counts"].mean(axis=0)
    np.testing.assert_allclose(out.kompot_data["means"]["Young"]["all cells"].to_numpy(), expected, rtol=1e-6)


def test_heatmap__in_memory_anndata_and_store_object_agree(store, adata):
    kwargs = dict(n_top_genes=6, groupby="cell_type", standard_scale=None)
    from_store = kd.plot.heatmap(Store(store), **kwargs).kompot_data
    from_adata = kd.plot.heatmap(adata, **kwargs).kompot_data
    assert from_store["genes"] == from_adata["genes"]
    for cond in ("Young", "Old"):
        np.testing.assert_allclose(from_store["means"][cond], from_adata["means"][cond], rtol=1e-6)


# ---------------------------------------------------------------------------
# plot_gene_expression
# ---------------------------------------------------------------------------


def test_plot_gene_expression__panels_hold_the_gene_columns(store, adata, tmp_path, monkeypatch, caplog):
    seen: list[list[int]] = []
    original = TileReader.read

    def recording_read(self, r0, r1, cols):
        seen.append(np.asarray(cols).tolist())
        return original(self, r0, r1, cols)

    monkeypatch.setattr(TileReader, "read", recording_read)
    gene = "gene_7"
    j = adata.var_names.get_loc(gene)
    with caplog.at_level(logging.INFO, logger="kompot_dask"):
        fig = kd.plot.plot_gene_expression(store, gene, save=tmp_path / "gene.png")
    assert is_png(tmp_path / "gene.png")
    assert seen and all(cols == [j] for cols in seen)
    data = fig.kompot_data
    layers = {"observed": "logged_counts", "imputed1": "kompot_de_Young_imputed", "imputed2": "kompot_de_Old_imputed",
              "fold_change": f"{PREFIX}_fold_change"}
    assert data["layers"] == layers
    for panel, layer in layers.items():
        column = np.asarray(adata.layers[layer][:, j], dtype=np.float64)
        np.testing.assert_allclose(data["panels"][panel], column)
        drawn = [c for ax in fig.axes for c in ax.collections if c.get_gid() == panel][0]
        np.testing.assert_allclose(np.sort(np.asarray(drawn.get_array())), np.sort(column))
    obs = data["panels"]["observed"]
    assert data["limits"]["observed"] == pytest.approx((np.percentile(obs, 2), np.percentile(obs, 98)))
    both = np.concatenate([data["panels"]["imputed1"], data["panels"]["imputed2"]])
    assert data["limits"]["imputed1"] == pytest.approx((np.percentile(both, 2), np.percentile(both, 98)))
    fc = data["panels"]["fold_change"]
    bound = max(abs(np.percentile(fc, 2)), abs(np.percentile(fc, 98)))
    assert data["limits"]["fold_change"] == pytest.approx((-bound, bound))
    assert data["mean_lfc"] == pytest.approx(adata.var.loc[gene, f"{PREFIX}_mean_lfc"])
    assert "Using imputed layer 'kompot_de_Old_imputed' for 'Old'" in caplog.text


def test_plot_gene_expression__on_anndata_with_fixed_limits(adata):
    fig = kd.plot.plot_gene_expression(adata, "gene_2", basis="umap", vmin=0.0, vmax=3.0, frameon=False)
    data = fig.kompot_data
    assert data["basis"] == "X_umap"
    assert data["limits"]["observed"] == (0.0, 3.0) and data["limits"]["fold_change"] == (-3.0, 3.0)
    np.testing.assert_allclose(data["panels"]["imputed2"], adata[:, "gene_2"].layers["kompot_de_Old_imputed"].ravel())


# ---------------------------------------------------------------------------
# embedding
# ---------------------------------------------------------------------------


def test_embedding__mgroups_panels_show_the_selected_cells(store, adata, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="kompot_dask"):
        fig = kd.plot.embedding(store, "umap", color="gene_4", layer="logged_counts",
                                mgroups=[{"Age": "Young"}, {"Age": "Old"}], vmax="p99", save=tmp_path / "emb.png")
    assert is_png(tmp_path / "emb.png")
    data = fig.kompot_data
    counts = adata.obs["Age"].value_counts()
    for panel, cond in zip(data["panels"], ("Young", "Old"), strict=True):
        assert panel["n_cells"] == counts[cond]
        assert f"Selected {counts[cond]:,} cells out of {adata.n_obs:,} total cells." in caplog.text
    plot_axes = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in plot_axes] == ["gene_4 | Age: Young", "gene_4 | Age: Old"]
    for ax, cond in zip(plot_axes, ("Young", "Old"), strict=True):
        background, selected = ax.collections
        assert len(selected.get_offsets()) == counts[cond]
        assert len(background.get_offsets()) == adata.n_obs - counts[cond]
        cells = (adata.obs["Age"] == cond).to_numpy()
        np.testing.assert_allclose(np.sort(selected.get_array()), np.sort(adata[cells, "gene_4"].layers["logged_counts"].ravel()))
    expression = adata[:, "gene_4"].layers["logged_counts"].ravel()
    assert data["vmax"] == pytest.approx(np.percentile(expression, 99))


def test_embedding__categorical_colour_and_combined_selection(store, adata):
    fig = kd.plot.embedding(store, "X_umap", color="cell_type",
                            mgroups=[{"Age": "Old", "cell_type": ["Type A", "Type B"]}], frameon=False)
    data = fig.kompot_data
    expected = ((adata.obs["Age"] == "Old") & adata.obs["cell_type"].isin(["Type A", "Type B"])).to_numpy()
    assert data["color_kind"] == "categorical"
    np.testing.assert_array_equal(data["panels"][0]["mask"], expected)
    selected = [c for c in fig.axes[0].collections if c.get_gid() == "selected"][0]
    assert len(selected.get_offsets()) == expected.sum()
    legend = {t.get_text() for t in fig.axes[0].get_legend().get_texts()}
    assert legend == {"Type A", "Type B"}


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------


def test_volcano_de__missing_gene_labels_are_warned_about_and_skipped(store, caplog):
    """As kompot: a label for a gene the data lacks is named in a warning, the rest are drawn."""
    with caplog.at_level(logging.WARNING, logger="kompot_dask"):
        fig = kd.plot.volcano_de(store, gene_labels=["gene_1", "missing_gene", "gene_10"])
    assert "gene_labels: 1 gene(s) not in var_names are not labelled: ['missing_gene']" in caplog.text
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert "gene_1" in texts and "gene_10" in texts and "missing_gene" not in texts
    with caplog.at_level(logging.WARNING, logger="kompot_dask"):
        fig = kd.plot.volcano_de(store, gene_labels={"nope": "x"})
    assert not fig.axes[0].texts
    plt.close("all")


def test_plots__clear_errors(store, tmp_path):
    with pytest.raises(KeyError, match="'no_such_gene'.*not found in var_names"):
        kd.plot.plot_gene_expression(store, "no_such_gene")
    with pytest.raises(KeyError, match="basis='X_tsne' is not in obsm.*X_umap"):
        kd.plot.plot_gene_expression(store, "gene_1", basis="X_tsne")
    with pytest.raises(KeyError, match=r"genes: \['nope'\] not found"):
        kd.plot.heatmap(store, genes=["gene_1", "nope"], groupby="cell_type")
    with pytest.raises(ValueError, match=r"genes lists \['gene_1'\] more than once"):
        kd.plot.heatmap(store, genes=["gene_1", "gene_2", "gene_1"], groupby="cell_type")
    with pytest.raises(KeyError, match="layer=None means X, but the store .* has no X"):
        kd.plot.embedding(store, "umap", color="gene_1")
    with pytest.raises(KeyError, match="groupby='tissue' is not an obs column"):
        kd.plot.heatmap(store, groupby="tissue")
    with pytest.raises(ValueError, match=r"exclude_groups: \['Type Z'\] are not groups"):
        kd.plot.heatmap(store, groupby="cell_type", exclude_groups=["Type Z"])
    with pytest.raises(ValueError, match="vmax='q99' is not understood.*'p99'"):
        kd.plot.heatmap(store, groupby="cell_type", vmax="q99")
    with pytest.raises(ValueError, match="standard_scale='z'"):
        kd.plot.heatmap(store, standard_scale="z")
    with pytest.raises(ValueError, match="y_axis_type='pvalue'"):
        kd.plot.volcano_de(store, y_axis_type="pvalue")
    with pytest.raises(ValueError, match=r"significance_threshold keys \['fdr'\]"):
        kd.plot.volcano_de(store, significance_threshold={"fdr": 0.1})
    with pytest.raises(ValueError, match=r"mgroups: value\(s\) \['Middle'\] not found in obs column 'Age'"):
        kd.plot.embedding(store, "umap", mgroups=[{"Age": "Middle"}])
    with pytest.raises(KeyError, match="color='nothing' is neither an obs column nor a gene"):
        kd.plot.embedding(store, "umap", color="nothing")
    with pytest.raises(TypeError, match="zarr store path"):
        kd.plot.volcano_de(42)
    with pytest.raises(RunNotFoundError, match="out of range"):
        kd.plot.volcano_de(store, run_id=3)
    fresh = write_synthetic_store(tmp_path / "fresh.zarr", SPEC, cell_chunk=256, gene_chunk=32)
    with pytest.raises(RunNotFoundError, match="no DE runs are recorded.*run kompot_dask.de first"):
        kd.plot.heatmap(fresh, groupby="Age")
    with pytest.raises(RunNotFoundError, match="no DE runs"):
        kd.plot.volcano_de(make_synthetic_adata(SPEC))


def test_plots__scanpy_is_not_needed(store, tmp_path):
    code = (
        "import sys; sys.modules['scanpy'] = None\n"
        "import matplotlib; matplotlib.use('Agg')\n"
        "import kompot_dask as kd\n"
        f"kd.plot.embedding({store!r}, 'umap', color='Age', save={str(tmp_path / 'e.png')!r})\n"
        "assert 'scanpy' not in {m.split('.')[0] for m, v in sys.modules.items() if v is not None}\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(tmp_path), env=_env())
    assert is_png(tmp_path / "e.png")


def _env() -> dict[str, str]:
    import os

    import kompot_dask

    root = os.path.dirname(os.path.dirname(kompot_dask.__file__))
    return {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}


@pytest.mark.filterwarnings("ignore:Writing zarr v2 data")
@pytest.mark.parametrize("layout", ["dense_small_blocks", "csr", "csc"])
def test_heatmap__layer_layout_and_blocking_do_not_change_means(store, adata, tmp_path, monkeypatch, layout):
    """The same means from a dense layer read in many small cell blocks, and from CSR and
    CSC copies of the layer written by anndata."""
    import scipy.sparse as sp

    from kompot_dask.plot import _common

    monkeypatch.setattr(_common, "_DENSE_BLOCK_ROWS", 1)  # rounds up to one on-disk chunk (256 cells)
    monkeypatch.setattr(_common, "_SPARSE_BLOCK_NNZ", 5_000)
    path = store
    if layout != "dense_small_blocks":
        copy = adata.copy()
        fmt = sp.csr_matrix if layout == "csr" else sp.csc_matrix
        copy.layers["logged_counts"] = fmt(copy.layers["logged_counts"])
        path = str(tmp_path / f"{layout}.zarr")
        copy.write_zarr(path)
    genes = ["gene_9", "gene_2", "gene_33"]
    data = kd.plot.heatmap(path, genes=genes, groupby="cell_type", standard_scale=None).kompot_data
    for cond in ("Young", "Old"):
        np.testing.assert_allclose(data["means"][cond], group_means(adata, genes, data["groups"], cond), rtol=1e-6)

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
        fig = kd.plot.volcano_de(store, save=tmp_path / "volcano.png", return_fig=True)
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
    fig = kd.plot.volcano_de(store, y_axis_type="local_fdr", significance_threshold=0.3, gene_labels=0, return_fig=True)
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
        fig = kd.plot.volcano_de(store, significance_threshold={"local_fdr": 0.5, "mahalanobis": 4.0}, return_fig=True)
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
                             gene_labels={"gene_1": "first", "gene_10": "tenth"}, title="custom", return_fig=True)
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
                              standard_scale=None, vmax="p99", client=client, save=tmp_path / "heat.png", return_fig=True)
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
        fig = kd.plot.heatmap(store, genes=genes, groupby="cell_type", vmin="p1", vmax="p99", fold_change_mode=True, return_fig=True)
    data = fig.kompot_data
    groups = data["groups"]
    expected = group_means(adata, genes, groups, "Old") - group_means(adata, genes, groups, "Young")
    np.testing.assert_allclose(data["tiles"].to_numpy(), expected.to_numpy(), rtol=1e-5, atol=1e-7)
    assert data["genes"] == genes and data["standard_scale"] is None
    # symmetric around 0: the percentile further from it sets both ends
    half = np.abs(np.percentile(expected.to_numpy(), [1, 99])).max()
    assert data["vmin"] == pytest.approx(-half) and data["vmax"] == pytest.approx(half)
    mesh = [c for c in fig.axes[0].collections if c.get_gid() == "fold_change"][0]
    np.testing.assert_allclose(np.asarray(mesh.get_array()).ravel(), expected.to_numpy().ravel(), rtol=1e-5, atol=1e-7)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("standard_scale='var' is ignored in fold_change_mode" in r.getMessage() for r in warnings)


@pytest.mark.parametrize("scale", ["var", "group"])
def test_heatmap__standard_scale_z_scores(store, adata, scale):
    genes = ["gene_1", "gene_2", "gene_3", "gene_4", "gene_5"]
    fig = kd.plot.heatmap(store, genes=genes, groupby="cell_type", standard_scale=scale, return_fig=True)
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
    out = kd.plot.heatmap(store, genes=genes, groupby=None, standard_scale=None, ax=ax, return_fig=True)  # threaded scheduler
    assert out is fig and fig.axes[0] is ax
    assert seen and set(np.concatenate(seen).tolist()) == {30, 3, 12}  # no other column read
    young = (adata.obs["Age"] == "Young").to_numpy()
    expected = adata[young, genes].layers["logged_counts"].mean(axis=0)
    np.testing.assert_allclose(out.kompot_data["means"]["Young"]["all cells"].to_numpy(), expected, rtol=1e-6)


def test_heatmap__in_memory_anndata_and_store_object_agree(store, adata):
    kwargs = dict(n_top_genes=6, groupby="cell_type", standard_scale=None)
    from_store = kd.plot.heatmap(Store(store), **kwargs, return_fig=True).kompot_data
    from_adata = kd.plot.heatmap(adata, **kwargs, return_fig=True).kompot_data
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
        fig = kd.plot.plot_gene_expression(store, gene, save=tmp_path / "gene.png", return_fig=True)
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
    fig = kd.plot.plot_gene_expression(adata, "gene_2", basis="umap", vmin=0.0, vmax=3.0, frameon=False, return_fig=True)
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
                                mgroups=[{"Age": "Young"}, {"Age": "Old"}], vmax="p99", save=tmp_path / "emb.png", return_fig=True)
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
                            mgroups=[{"Age": "Old", "cell_type": ["Type A", "Type B"]}], frameon=False, return_fig=True)
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
        fig = kd.plot.volcano_de(store, gene_labels=["gene_1", "missing_gene", "gene_10"], return_fig=True)
    assert "gene_labels: 1 gene(s) not in var_names are not labelled: ['missing_gene']" in caplog.text
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert "gene_1" in texts and "gene_10" in texts and "missing_gene" not in texts
    with caplog.at_level(logging.WARNING, logger="kompot_dask"):
        fig = kd.plot.volcano_de(store, gene_labels={"nope": "x"}, return_fig=True)
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
    data = kd.plot.heatmap(path, genes=genes, groupby="cell_type", standard_scale=None, return_fig=True).kompot_data
    for cond in ("Young", "Old"):
        np.testing.assert_allclose(data["means"][cond], group_means(adata, genes, data["groups"], cond), rtol=1e-6)


# ---------------------------------------------------------------------------
# kompot's and scanpy's conventions: what a plot returns and shows, dpi, legends,
# scanpy's colours, colour scales and their units, titles of overwritten runs
# ---------------------------------------------------------------------------


def _png_width(path) -> int:
    with open(path, "rb") as fh:
        head = fh.read(24)
    return int.from_bytes(head[16:20], "big")


PLOTS = {
    "volcano_de": lambda s, **kw: kd.plot.volcano_de(s, **kw),
    "heatmap": lambda s, **kw: kd.plot.heatmap(s, n_top_genes=5, groupby="cell_type", **kw),
    "plot_gene_expression": lambda s, **kw: kd.plot.plot_gene_expression(s, "gene_4", basis="umap", **kw),
    "embedding": lambda s, **kw: kd.plot.embedding(s, "umap", color="cell_type", **kw),
}


@pytest.mark.parametrize("name", sorted(PLOTS))
def test_plots__return_nothing_unless_asked_and_stay_open_for_savefig(store, name, recwarn):
    """kompot returns the figure only with return_fig=True: a notebook cell ending in a plot
    call then shows it once (the inline backend), not a second time as the cell's value.
    Under Agg nothing is shown and no "cannot be shown" warning appears; the figure stays
    open for plt.savefig()."""
    before = set(plt.get_fignums())
    assert PLOTS[name](store) is None
    opened = set(plt.get_fignums()) - before
    assert len(opened) == 1
    assert plt.gcf().number in opened
    assert not [w for w in recwarn if "non-interactive" in str(w.message)]
    fig = PLOTS[name](store, return_fig=True)
    assert isinstance(fig, matplotlib.figure.Figure) and isinstance(fig.kompot_data, dict)
    with pytest.raises(TypeError, match="return_fig"):
        PLOTS[name](store, return_fig="yes")


def test_plots__shown_once_on_a_screen_or_notebook_backend(store, monkeypatch):
    from kompot_dask.plot import _common

    shown = []
    monkeypatch.setattr(_common, "interactive_backend", lambda: True)
    monkeypatch.setattr(plt, "show", lambda *a, **k: shown.append(1))
    assert kd.plot.volcano_de(store) is None
    assert len(shown) == 1
    kd.plot.volcano_de(store, return_fig=True)  # the caller has the figure: not shown
    kd.plot.volcano_de(store, show=False)
    _, ax = plt.subplots()
    kd.plot.volcano_de(store, ax=ax)  # drawn into the caller's axes: the caller shows it
    assert len(shown) == 1
    kd.plot.volcano_de(store, ax=ax, show=True)
    assert len(shown) == 2


def test_plots__dpi_sets_the_saved_resolution(store, tmp_path):
    kd.plot.volcano_de(store, save=tmp_path / "default.png", figsize=(4, 3))
    kd.plot.volcano_de(store, save=tmp_path / "low.png", figsize=(4, 3), dpi=50)
    ratio = _png_width(tmp_path / "default.png") / _png_width(tmp_path / "low.png")
    assert 5.0 < ratio < 7.0  # 300 dpi (kompot's) against 50
    with pytest.raises(ValueError, match="dpi"):
        kd.plot.volcano_de(store, dpi=0)


def test_volcano__legend_loc_show_legend_labels_and_condition_names(store):
    fig = kd.plot.volcano_de(store, legend_loc="upper left", condition1="young mice", condition2="old mice",
                             xlabel="LFC", ylabel="distance", return_fig=True)
    ax = fig.axes[0]
    legend = ax.get_legend()
    assert legend is not None and legend._loc == 2  # matplotlib's code of "upper left"
    assert any("old mice" in t.get_text() for t in legend.get_texts())
    assert ax.get_xlabel() == "LFC" and ax.get_ylabel() == "distance"
    assert ax.get_title() == "young mice to old mice"
    assert kd.plot.volcano_de(store, legend_loc="none", return_fig=True).axes[0].get_legend() is None
    assert kd.plot.volcano_de(store, show_legend=False, return_fig=True).axes[0].get_legend() is None
    with pytest.raises(ValueError, match="legend_loc='top left' is not supported"):
        kd.plot.volcano_de(store, legend_loc="top left")


def test_embedding__legend_on_data_and_into_a_given_axes(store, adata):
    _, ax = plt.subplots()
    kd.plot.embedding(store, "umap", color="cell_type", legend_loc="on data", ax=ax)
    texts = {t.get_text(): t.get_position() for t in ax.texts}
    assert set(texts) == set(adata.obs["cell_type"].cat.categories)
    xy = adata.obsm["X_umap"][:, :2]
    for name, pos in texts.items():
        cells = (adata.obs["cell_type"] == name).to_numpy()
        np.testing.assert_allclose(pos, np.median(xy[cells], axis=0))
    assert ax.get_legend() is None
    with pytest.raises(ValueError, match="ax= takes one panel"):
        kd.plot.embedding(store, "umap", mgroups=[{"Age": "Young"}, {"Age": "Old"}], ax=ax)


def _with_uns_colors(store: str, tmp_path, colors: list[str]) -> str:
    """The store as scanpy leaves it after a categorical plot: written by anndata, with
    uns['cell_type_colors']."""
    adata = ad.read_zarr(store)
    adata.uns["cell_type_colors"] = np.array(colors, dtype=object)
    copy = str(tmp_path / "colored.zarr")
    adata.write_zarr(copy)
    return copy


def test_embedding__scanpys_uns_colors_are_used(store, adata, tmp_path):
    categories = list(adata.obs["cell_type"].cat.categories)
    colors = ["#112233", "#445566", "#778899", "#AABBCC", "#DDEEFF"][: len(categories)]
    colored = _with_uns_colors(store, tmp_path, colors)
    data = kd.plot.embedding(colored, "umap", color="cell_type", return_fig=True).kompot_data
    assert data["palette"] == dict(zip(categories, colors, strict=True))
    in_memory = adata.copy()
    in_memory.uns["cell_type_colors"] = np.array(colors)
    data = kd.plot.embedding(in_memory, "umap", color="cell_type", return_fig=True).kompot_data
    assert data["palette"] == dict(zip(categories, colors, strict=True))
    # an explicit palette wins; too few colours fall back to the default palette
    data = kd.plot.embedding(colored, "umap", color="cell_type", palette=["red"] * len(categories),
                             return_fig=True).kompot_data
    assert set(data["palette"].values()) == {"red"}
    (tmp_path / "short").mkdir()
    short = _with_uns_colors(store, tmp_path / "short", colors[:2])
    data = kd.plot.embedding(short, "umap", color="cell_type", return_fig=True).kompot_data
    assert list(data["palette"].values())[:2] != colors[:2]


def test_heatmap__centred_scale_is_symmetric_and_the_legend_sits_inside_the_figure(store):
    """vmin="p1", vmax="p99" on z-scores: the further limit sets both ends, so −x and +x
    are equally saturated (a TwoSlopeNorm on ±p1/p99 made −1.0 as dark as +2.7)."""
    fig = kd.plot.heatmap(store, n_top_genes=8, groupby="cell_type", vmin="p1", vmax="p99", return_fig=True)
    data = fig.kompot_data
    assert data["vmin"] == pytest.approx(-data["vmax"])
    plotted = np.stack([t.to_numpy() for t in data["tiles"].values()])
    lo, hi = np.nanpercentile(plotted, [1, 99])
    assert data["vmax"] == pytest.approx(max(abs(lo), abs(hi)))
    ax = fig.axes[0]
    norm = ax.collections[0].norm
    assert norm(1.0) - 0.5 == pytest.approx(0.5 - norm(-1.0))
    assert "z-score" in fig.axes[1].get_ylabel() and "logged_counts" in fig.axes[1].get_ylabel()
    fig.canvas.draw()
    legend = ax.get_legend()
    assert legend is not None and min(t.get_fontsize() for t in legend.get_texts()) >= 9
    box, frame = legend.get_window_extent(), fig.bbox
    assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
    assert ax.title.get_window_extent().y0 >= box.y1 - 1  # the title sits above the legend
    fold = kd.plot.heatmap(store, n_top_genes=8, groupby="cell_type", fold_change_mode=True, standard_scale=None,
                           vcenter=0.5, colorbar_title="LFC", return_fig=True)
    d = fold.kompot_data
    assert (d["vmin"] + d["vmax"]) / 2 == pytest.approx(0.5)
    assert fold.axes[1].get_ylabel() == "LFC"


def test_plots__colour_bars_name_their_units(store):
    fig = kd.plot.plot_gene_expression(store, "gene_4", basis="umap", return_fig=True)
    labels = [a.get_ylabel() for a in fig.axes[4:]]
    assert labels[0] == "expression (logged_counts)"
    assert labels[1] == labels[2] == "imputed expression"
    assert labels[3].startswith("log fold change")
    emb = kd.plot.embedding(store, "umap", color="gene_4", layer="logged_counts", return_fig=True)
    assert emb.axes[1].get_ylabel() == "gene_4 (logged_counts)"


def test_plot_gene_expression__kompots_argument_names(store):
    fig = kd.plot.plot_gene_expression(store, "gene_4", basis="umap", cmap_expression="magma",
                                       cmap_fold_change="PiYG", title="gene 4", return_fig=True)
    cmaps = [a.collections[-1].get_cmap().name for a in fig.axes[:4]]
    assert cmaps[:3] == ["magma"] * 3 and cmaps[3] == "PiYG"
    assert fig._suptitle.get_text() == "gene 4"
    with pytest.raises(ValueError, match="name the same setting"):
        kd.plot.plot_gene_expression(store, "gene_4", basis="umap", cmap_expression="magma", cmap="plasma")


def test_plots__titles_say_when_a_later_run_overwrote_the_fields(store, tmp_path, client):
    """Run 0's fields overwritten by run 1 (same conditions, same field names): a plot of
    run 0 says whose values it shows, as the warning does."""
    import shutil

    copy = str(tmp_path / "twice.zarr")
    shutil.copytree(store, copy)
    kd.de(copy, groupby="Age", condition1="Young", condition2="Old", layer="logged_counts", obsm_key="X_pca",
          gp=kd.GPSettings(n_landmarks=80), fdr=kd.FDRSettings(null_genes=200),
          storage=kd.StorageSettings(overwrite=True),
          output=kd.OutputSettings(progress=False), client=client)
    fig = kd.plot.volcano_de(copy, run_id=0, return_fig=True)
    assert "values of run 1" in fig.axes[0].get_title()
    assert fig.kompot_data["overwritten"]["mahalanobis"] == 1
    latest = kd.plot.volcano_de(copy, return_fig=True)
    assert "values of run" not in latest.axes[0].get_title() and latest.kompot_data["overwritten"] == {}
    gene = kd.plot.plot_gene_expression(copy, "gene_4", basis="umap", run_id=0, return_fig=True)
    assert "values of run 1" in gene._suptitle.get_text()


def test_volcano__kompots_other_arguments(store, adata):
    lfc, score = f"{PREFIX}_mean_lfc", f"{PREFIX}_mahalanobis"
    fig = kd.plot.volcano_de(store, color=lfc, vcenter=0.0, n_x_ticks=3, grid=True, text_offset=(5, 8),
                             text_kwargs={"color": "red"}, gene_labels=3, sort_key=lfc, zorder=1.5,
                             legend_ncol=2, return_fig=True)
    ax = fig.axes[0]
    background = [c for c in ax.collections if c.get_label() == "_not significant"][0]
    rest = ~fig.kompot_data["significant"] & np.isfinite(fig.kompot_data["x"])
    np.testing.assert_allclose(np.asarray(background.get_array()), adata.var[lfc].to_numpy()[rest])
    assert background.get_zorder() == 1.5  # **kwargs go to the background scatter
    assert len(fig.axes) == 2 and fig.axes[1].get_ylabel() == lfc  # the colour bar of `color`
    norm = background.norm
    assert norm.vmin == pytest.approx(-norm.vmax)  # symmetric around vcenter=0
    fig.canvas.draw()
    assert len([t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]) <= 3
    assert all(line.get_visible() for line in ax.get_xgridlines())
    top3 = adata.var[lfc].sort_values(ascending=False).index[:3].tolist()
    assert sorted(fig.kompot_data["labels"]) == sorted(top3)  # ranked by sort_key, not the y-axis
    assert {t.get_color() for t in ax.texts} == {"red"}
    assert ax.get_legend()._ncols == 2

    top = kd.plot.volcano_de(store, n_top_genes=5, return_fig=True).kompot_data
    assert sorted(top["highlighted"]) == sorted(adata.var[score].sort_values(ascending=False).index[:5])
    flagged = kd.plot.volcano_de(store, significance_threshold=4.0, show_thresholds=False, return_fig=True)
    assert flagged.kompot_data["threshold_line"] == 4.0
    assert not [ln for ln in flagged.axes[0].lines if list(ln.get_ydata()) == [4.0, 4.0]]
    is_de = f"{PREFIX}_is_de"
    cat = kd.plot.volcano_de(store, color=is_de, color_discrete_map={False: "#000000", True: "#FF0000"},
                             return_fig=True)
    back = [c for c in cat.axes[0].collections if c.get_label() == "_not significant"][0]
    assert {tuple(c) for c in back.get_facecolors()} == {(0.0, 0.0, 0.0, 0.6)}
    with pytest.raises(ValueError, match="n_top_genes= and significance_threshold="):
        kd.plot.volcano_de(store, n_top_genes=5, significance_threshold=1.0)
    with pytest.raises(ValueError, match="group='Type A': run .* has no per-group results"):
        kd.plot.volcano_de(store, group="Type A")
    with pytest.raises(ValueError, match="never writes to the data"):
        kd.plot.volcano_de(store, update_de_classification=True)


def test_heatmap__kompots_other_arguments(store, adata):
    from scipy.cluster.hierarchy import leaves_list, linkage

    genes = ["gene_1", "gene_2", "gene_3", "gene_4", "gene_5", "gene_6"]
    base = dict(groupby="cell_type", standard_scale=None, fold_change_mode=True)
    plain = kd.plot.heatmap(store, var_names=genes, **base, return_fig=True).kompot_data
    assert plain["genes"] == genes
    tiles = plain["tiles"].to_numpy()
    rows = leaves_list(linkage(np.nan_to_num(tiles), method="average"))
    cols = leaves_list(linkage(np.nan_to_num(tiles.T), method="average"))
    clustered = kd.plot.heatmap(store, genes=genes, cluster_rows=True, cluster_cols=True, **base, return_fig=True)
    data = clustered.kompot_data
    assert data["genes"] == [genes[k] for k in rows]
    assert data["groups"] == [plain["groups"][k] for k in cols]
    np.testing.assert_allclose(data["tiles"].to_numpy(), tiles[np.ix_(rows, cols)])

    score = adata.var[f"{PREFIX}_mahalanobis"].loc[genes]
    by_score = kd.plot.heatmap(store, genes=genes, sort_genes=True, **base, return_fig=True).kompot_data
    assert by_score["genes"] == score.sort_values(ascending=False).index.tolist()

    fig = kd.plot.heatmap(store, genes=genes, **base, draw_values=True, show_gene_labels=False,
                          group_labels_size=5, n_colorbar_ticks=3, tile_size=0.5, return_fig=True)
    ax = fig.axes[0]
    assert len(ax.texts) == int(np.isfinite(tiles).sum())
    assert sorted(float(t.get_text()) for t in ax.texts) == pytest.approx(
        sorted(float(f"{v:.2g}") for v in tiles[np.isfinite(tiles)]))
    assert list(ax.get_yticks()) == []
    assert {t.get_fontsize() for t in ax.get_xticklabels()} == {5}
    np.testing.assert_allclose(fig.axes[1].get_yticks(), np.linspace(fig.kompot_data["vmin"],
                                                                     fig.kompot_data["vmax"], 3))
    assert fig.get_size_inches()[1] == pytest.approx(len(genes) * 0.5 + 2.2)

    split = kd.plot.heatmap(store, genes=genes, groupby="cell_type", condition1_name="young",
                            condition2_name="old", return_fig=True)
    assert [t.get_text() for t in split.axes[0].get_legend().get_texts()] == ["young (lower left)",
                                                                            "old (upper right)"]
    returned = kd.plot.heatmap(store, genes=genes, **base, return_data=True)
    assert isinstance(returned, dict) and returned["genes"] == genes
    both = kd.plot.heatmap(store, genes=genes, **base, return_data=True, return_fig=True)
    assert isinstance(both[0], matplotlib.figure.Figure) and both[1]["genes"] == genes
    with pytest.raises(ValueError, match="not supported yet"):
        kd.plot.heatmap(store, genes=genes, groupby="cell_type", dendrogram=True)
    with pytest.raises(ValueError, match="name the same setting"):
        kd.plot.heatmap(store, genes=genes, var_names=genes[:2], groupby="cell_type")


def test_embedding__groups_and_background_scatter_arguments(store, adata):
    fig = kd.plot.embedding(store, "umap", color="cell_type", groups=["Type A", "Type C"],
                            matplotlib_scatter_kwargs={"zorder": 0.5}, return_fig=True)
    ax = fig.axes[0]
    assert set(fig.kompot_data["palette"]) == {"Type A", "Type C"}
    selected = [c for c in ax.collections if c.get_gid() == "selected"][0]
    shown = set(adata.obs["cell_type"].to_numpy()[selected.kompot_cells])
    assert shown == {"Type A", "Type C"}
    background = [c for c in ax.collections if c.get_gid() != "selected"][0]
    assert background.get_zorder() == 0.5
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["Type A", "Type C"]
    with pytest.raises(ValueError, match="are not categories"):
        kd.plot.embedding(store, "umap", color="cell_type", groups=["Type Z"])
    gene = kd.plot.plot_gene_expression(store, "gene_4", basis="umap", alpha=0.4, return_fig=True)
    assert {c.get_alpha() for a in gene.axes[:4] for c in a.collections if c.get_gid() in _PANEL_GIDS} == {0.4}


_PANEL_GIDS = {"observed", "imputed1", "imputed2", "fold_change"}

"""Plots in a real Jupyter kernel (ipykernel, run by nbclient, matplotlib's inline backend):
each plot call shows its figure once, as scanpy's and kompot's plots do, never a second
time as the cell's value."""

from __future__ import annotations

import pytest

import kompot_dask as kd
from kompot_dask.testing import SyntheticSpec, write_synthetic_store

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")


def test_notebook__each_plot_shows_its_figure_once(tmp_path, client):
    spec = SyntheticSpec(n_obs=500, n_vars=24, n_dims=5, seed=8, cell_types=("A", "B", "C"), umap=True)
    store = write_synthetic_store(tmp_path / "nb.zarr", spec, cell_chunk=256, gene_chunk=8)
    kd.de(store, groupby="Age", condition1="Young", condition2="Old", layer="logged_counts", obsm_key="X_pca",
          gp=kd.GPSettings(n_landmarks=40), fdr=kd.FDRSettings(null_genes=30),
          output=kd.OutputSettings(progress=False), client=client)
    cells = [
        f"%matplotlib inline\nimport kompot_dask as kd\nstore = {store!r}",
        "kd.plot.volcano_de(store)",
        "kd.plot.heatmap(store, n_top_genes=5, groupby='cell_type')",
        "kd.plot.plot_gene_expression(store, 'gene_3', basis='umap')",
        "kd.plot.embedding(store, 'umap', color='cell_type')",
        "fig = kd.plot.volcano_de(store, return_fig=True)",  # assigned: shown once, at the cell's end
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
                            ).execute()
    for cell in nb.cells[1:]:
        images = [o for o in cell.outputs if "image/png" in o.get("data", {})]
        values = [o for o in cell.outputs if o.output_type == "execute_result"]
        assert len(images) == 1 and not values, (cell.source, [o.output_type for o in cell.outputs])

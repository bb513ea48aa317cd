"""Draw the images of docs/plots.md from a small synthetic store.

Writes a 3,000-cell × 200-gene store (Age ∈ {Young, Old}), adds a ``cell_type`` obs
column (k-means on ``X_pca``) and an ``X_umap`` embedding (2-D PCA of ``X_pca``), runs
``kd.de`` once, and saves every example of the page into ``docs/images/`` at 80 dpi.

    PYTHONPATH=. .venv/bin/python docs/make_plot_images.py [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
IMAGES = os.path.join(HERE, "images")


def make_store(path: str) -> str:
    import anndata as ad
    import numpy as np
    import pandas as pd
    import zarr
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    from kompot_dask.testing import SyntheticSpec, write_synthetic_store

    spec = SyntheticSpec(n_obs=3000, n_vars=200, n_dims=10, n_clusters=6, de_fraction=0.15, seed=7)
    write_synthetic_store(path, spec, cell_chunk=1024, gene_chunk=64)
    g = zarr.open_group(path, mode="r+", use_consolidated=False)
    X = np.asarray(g["obsm"]["X_pca"][...], dtype=np.float64)
    labels = KMeans(n_clusters=6, n_init=4, random_state=0).fit_predict(X)
    names = ["B cell", "T cell", "Monocyte", "Erythroid", "HSC", "Neutrophil"]
    obs = ad.io.read_elem(g["obs"])
    obs["cell_type"] = pd.Categorical([names[k] for k in labels], categories=names)
    ad.io.write_elem(g, "obs", obs)
    ad.io.write_elem(g["obsm"], "X_umap", PCA(n_components=2, random_state=0).fit_transform(X).astype(np.float32))
    zarr.consolidate_metadata(path)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=None)
    args = p.parse_args()

    import kompot_dask as kd

    work = args.workdir or tempfile.mkdtemp(prefix="kd_plot_docs_")
    store = make_store(os.path.join(work, "age.zarr"))
    kd.de(store, groupby="Age", condition1="Young", condition2="Old", layer="logged_counts",
          obsm_key="X_pca", gp=kd.GPSettings(n_landmarks=300), fdr=kd.FDRSettings(null_genes=500),
          output=kd.OutputSettings(progress=False))

    os.makedirs(IMAGES, exist_ok=True)
    plt.rcParams.update({"savefig.dpi": 80, "axes.spines.right": False, "axes.spines.top": False})

    def out(name: str) -> str:
        return os.path.join(IMAGES, name)

    volcano = kd.plot.volcano_de(store, save=out("volcano.png"), return_fig=True).kompot_data
    kd.plot.volcano_de(store, y_axis_type="local_fdr", significance_threshold=0.02,
                       save=out("volcano_local_fdr.png"))
    set_one = volcano["up"][:3] + ["gene_1"]
    set_two = volcano["down"][:3]
    gene_sets = [
        {"name": "Set one", "genes": set_one, "color": "#E76F51"},
        {"name": "Set two", "genes": set_two, "color": "#2A9D8F"},
    ]
    kd.plot.volcano_de(store, significance_threshold={"local_fdr": 0.02, "mahalanobis": 5},
                       gene_labels=set_two, highlight_genes=gene_sets,
                       save=out("volcano_gene_sets.png"))
    kd.plot.heatmap(store, n_top_genes=20, groupby="cell_type", exclude_groups="HSC",
                    standard_scale=None, vmax="p99", save=out("heatmap.png"))
    top = kd.plot.heatmap(store, n_top_genes=8, groupby="cell_type", return_fig=True).kompot_data["genes"]
    kd.plot.heatmap(store, genes=top, groupby="cell_type", vmin="p1", vmax="p99",
                    save=out("heatmap_zscore.png"))
    kd.plot.heatmap(store, genes=top, groupby="cell_type", fold_change_mode=True,
                    standard_scale=None, save=out("heatmap_fold_change.png"))
    kd.plot.plot_gene_expression(store, top[0], basis="umap", frameon=False,
                                 save=out("gene_expression.png"))
    kd.plot.embedding(store, "umap", color=top[0], layer="logged_counts", frameon=False,
                      mgroups=[{"Age": "Young"}, {"Age": "Old"}], save=out("embedding_mgroups.png"))
    kd.plot.embedding(store, "umap", color="cell_type", frameon=False, save=out("embedding_cell_type.png"))
    plt.close("all")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    print(f"images written to {IMAGES}")


if __name__ == "__main__":
    main()

"""Plots of DE runs drawn with matplotlib from a zarr store (or an in-memory AnnData),
never holding a cells × genes layer in memory.

Every function returns the matplotlib Figure, with the plotted data attached as
``fig.kompot_data`` (a dict; each function's Returns section lists its keys), and takes
``save=`` (a path). scanpy is not needed.
"""

from __future__ import annotations

from ._common import DATA_ATTRIBUTE
from ._embedding import embedding
from ._expression import plot_gene_expression
from ._heatmap import heatmap
from ._volcano import volcano_de

__all__ = ["volcano_de", "heatmap", "plot_gene_expression", "embedding", "DATA_ATTRIBUTE"]

"""The only code that touches zarr paths or anndata's I/O.

- :mod:`.store`: opening and validating stores; obs/var/obsm/uns reads; field removal;
- :mod:`.tiles`: tile readers for workers and region writes into staged arrays;
- :mod:`.commit`: the staging area, the journaled commit and its recovery;
- :mod:`.lease`: one writer per store;
- :mod:`.ingest`: h5ad / AnnData → zarr store;
- :mod:`.manifest`: chunk manifests and the chunk checks of ``verify``;
- :mod:`.source`: the one place that decides between a path, a Store and an AnnData.
"""

from .lease import StoreLockedError, store_lock
from .store import Store, StoreError, StoreHandle
from .tiles import LayerInfo, TileReader, write_tile

__all__ = [
    "LayerInfo", "Store", "StoreError", "StoreHandle", "StoreLockedError", "TileReader",
    "store_lock", "write_tile",
]

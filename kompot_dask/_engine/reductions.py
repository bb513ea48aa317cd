"""The plots' reductions over a store: per-group sums of a few gene columns, one task per
cell block, on the caller's Dask client, the current one, or Dask's threaded scheduler."""

from __future__ import annotations

from typing import Any

import dask
import numpy as np
import scipy.sparse as sp


def block_sums(reader: Any, r0: int, r1: int, cols: np.ndarray, codes: np.ndarray,
               n_codes: int) -> tuple[np.ndarray, np.ndarray]:
    """Sums and counts of the finite values of ``cols`` in cells ``r0:r1``, per code
    (n_codes × len(cols) each; cells with code ``-1`` are left out)."""
    tile = np.asarray(reader.read(r0, r1, cols), dtype=np.float64)
    keep = codes >= 0
    tile, codes = tile[keep], codes[keep]
    finite = np.isfinite(tile)
    indicator = sp.csr_matrix(
        (np.ones(len(codes)), (codes, np.arange(len(codes)))), shape=(n_codes, len(codes))
    )
    return (np.asarray(indicator @ np.where(finite, tile, 0.0)),
            np.asarray(indicator @ finite.astype(np.float64)))


def current_client(client: Any = None) -> Any:
    """``client``, else the current distributed client, else ``None``."""
    if client is not None:
        return client
    try:
        from distributed import get_client

        return get_client()
    except (ImportError, ValueError):
        return None


def group_block_sums(reader: Any, blocks: list[tuple[int, int]], cols: np.ndarray, codes: np.ndarray,
                     n_codes: int, client: Any = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """:func:`block_sums` of every cell block ``(r0, r1)`` in ``blocks``, as Dask tasks."""
    # Not pure: the key must not be a hash of the reader, whose store may change between plots.
    tasks = [dask.delayed(block_sums, pure=False)(reader, r0, r1, cols, codes[r0:r1], n_codes)
             for r0, r1 in blocks]
    client = current_client(client)
    if client is not None:
        return list(client.gather(client.compute(tasks)))
    return list(dask.compute(*tasks, scheduler="threads"))

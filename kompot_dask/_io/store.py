"""The zarr-backed AnnData store: lazy reads, tile readers for workers, element writes.

This is the only module that touches zarr paths. Reads never load a cells × genes
element; writes go element by element (anndata's ``write_elem``) or region by region
(workers filling staged layer arrays), and become visible only at :meth:`Store.commit`,
which renames the staged arrays into place and reconsolidates the metadata once.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import uuid
import warnings
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr

from .tiles import LayerInfo, TileReader, clear_caches, write_tile  # noqa: F401

logger = logging.getLogger("kompot_dask")

_ARRAY_ATTRS = {"encoding-type": "array", "encoding-version": "0.2.0"}
STAGING_PREFIX = "_kompot_staging_"


class StoreError(ValueError):
    """The store cannot be used as asked (missing, not AnnData, read-only, ...)."""


def _local_path(path: str | os.PathLike) -> str:
    p = os.fspath(path)
    if p.startswith("file://"):
        p = p[len("file://") :]
    elif "://" in p:
        scheme = p.split("://", 1)[0]
        raise StoreError(
            f"store URL {p!r}: {scheme}:// stores are not supported yet — results are committed by "
            "renaming staged arrays, which object stores cannot do atomically. Put the store on a "
            "shared file system (or mount the bucket with a POSIX layer) and pass its path or a file:// URL."
        )
    return os.path.abspath(p)


TRASH_PREFIX = ".kompot_trash_"
"""Hidden directory at the store root where removed elements wait for deletion."""

_DATAFRAME_LOCATIONS = ("obs", "var")
_ELEMENT_LOCATIONS = ("layers", "obsm", "varm", "obsp")


def _open_anndata_root(path: str) -> Any:
    if not os.path.exists(path):
        raise StoreError(
            f"store path {path!r} does not exist. Create it with "
            "kompot_dask.ingest('data.h5ad', 'data.zarr') or pass an existing zarr AnnData store."
        )
    try:
        root = zarr.open_group(store=path, mode="r")
    except Exception as exc:  # zarr raises several types for non-stores
        raise StoreError(
            f"{path!r} is not a zarr store ({type(exc).__name__}: {exc}). "
            "Convert an .h5ad with kompot_dask.ingest(src, dest)."
        ) from None
    if root.attrs.get("encoding-type") != "anndata":
        raise StoreError(
            f"{path!r} is a zarr group but not an AnnData store "
            f"(attribute encoding-type={root.attrs.get('encoding-type')!r}, expected 'anndata'). "
            "Write it with anndata's write_zarr or kompot_dask.ingest."
        )
    return root


def directory_nbytes(path: str) -> int:
    """Bytes of every file under ``path`` (0 when it does not exist)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                continue
    return total


class StoreHandle:
    """An opened zarr AnnData store without its obs/var loaded: what it holds, its ``uns``
    entries, and removal of fields (:meth:`remove_fields`).

    Cheap to open on an atlas: field names come from the element metadata only.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = _local_path(path)
        self.root = _open_anndata_root(self.path)
        self.zarr_format = self.root.metadata.zarr_format

    def _reopen(self) -> None:
        clear_caches()
        self.root = zarr.open_group(store=self.path, mode="r")

    def obsm_keys(self) -> list[str]:
        return sorted(self.root["obsm"].keys()) if "obsm" in self.root else []

    def layer_keys(self) -> list[str]:
        return sorted(k for k in self.root["layers"].keys() if not k.startswith(STAGING_PREFIX)) if "layers" in self.root else []

    def field_names(self, location: str) -> list[str]:
        """Names held at ``location``: obs/var column names, or layers/obsm/varm/obsp keys."""
        if location in _DATAFRAME_LOCATIONS:
            if location not in self.root:
                return []
            return [str(c) for c in self.root[location].attrs.get("column-order", [])]
        if location in _ELEMENT_LOCATIONS:
            if location not in self.root:
                return []
            return sorted(k for k in self.root[location].keys() if not k.startswith(STAGING_PREFIX))
        raise ValueError(
            f"location={location!r} is not a field location of an AnnData store; "
            f"use one of {list(_DATAFRAME_LOCATIONS + _ELEMENT_LOCATIONS)}"
        )

    def read_uns_json(self, key: str) -> dict[str, Any]:
        """``uns[key]`` as a dict (JSON strings decoded), or {} when absent."""
        if "uns" not in self.root or key not in self.root["uns"]:
            return {}
        raw = ad.io.read_elem(self.root["uns"][key])
        return {k: _maybe_json(v) for k, v in raw.items()} if isinstance(raw, dict) else {}

    def read_uns_item(self, key: str, item: str) -> Any:
        """``uns[key][item]`` as anndata reads it, or ``None`` when absent."""
        if "uns" not in self.root or key not in self.root["uns"]:
            return None
        group = self.root["uns"][key]
        if not isinstance(group, zarr.Group) or item not in group:
            return None
        return ad.io.read_elem(group[item])

    def check_writable(self) -> None:
        """Raise PermissionError if a directory that a run writes into is read-only.

        ``os.access`` answers for the caller, and for root it says every directory of a
        read-write file system is writable whatever its mode; so a directory without any
        write permission bit (``chmod -R a-w``) also counts as read-only, for every user.
        """
        probe_dirs = [self.path] + [os.path.join(self.path, d) for d in ("layers", "obs", "var", "uns") if os.path.isdir(os.path.join(self.path, d))]
        for d in probe_dirs:
            no_write_bits = not os.stat(d).st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
            if no_write_bits or not os.access(d, os.W_OK):
                raise PermissionError(
                    f"the store {self.path!r} is read-only ({d!r} is not writable); results are written "
                    "back into the store. Make it writable or copy it first."
                )

    def _rw_group(self) -> Any:
        return zarr.open_group(store=self.path, mode="r+", use_consolidated=False)

    # ---- removal -------------------------------------------------------------------

    def element_nbytes(self, location: str, name: str) -> int:
        """Bytes on disk of one field (a layer's directory, an obs/var column's arrays)."""
        return directory_nbytes(os.path.join(self.path, location, name))

    def _drop_consolidated_metadata(self) -> None:
        """Make readers walk the tree: stale consolidated metadata would make zarr serve
        removed arrays as fill values instead of failing."""
        if self.zarr_format == 2:
            try:
                os.remove(os.path.join(self.path, ".zmetadata"))
            except FileNotFoundError:
                pass
            return
        meta_path = os.path.join(self.path, "zarr.json")
        with open(meta_path, encoding="utf-8") as fh:
            meta = json.load(fh)
        if meta.pop("consolidated_metadata", None) is None:
            return
        tmp = f"{meta_path}.{uuid.uuid4().hex[:8]}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(meta, fh, indent=2)
        os.replace(tmp, meta_path)

    def sweep_trash(self) -> int:
        """Delete removal leftovers of an interrupted :meth:`remove_fields`; returns bytes freed.

        Call only while holding the store's lease, so that no other removal owns them.
        """
        freed = 0
        for entry in os.listdir(self.path):
            if entry.startswith(TRASH_PREFIX):
                full = os.path.join(self.path, entry)
                freed += directory_nbytes(full)
                shutil.rmtree(full, ignore_errors=True)
        return freed

    def remove_fields(self, fields: list[tuple[str, str]]) -> dict[tuple[str, str], int]:
        """Delete ``(location, name)`` fields from the store and free their disk space.

        The store stays readable by anndata if this is interrupted at any point: the
        consolidated metadata is dropped first (stale, it would make zarr serve removed
        arrays as fill values; without it readers walk the tree); each layer (or
        obsm/varm/obsp entry) leaves its group by one atomic rename into a hidden trash
        directory at the store root; obs/var columns first leave the dataframe's
        ``column-order`` and then move out the same way; the trash is deleted; the metadata
        is reconsolidated. A trash directory left by an interruption is invisible to
        readers and deleted by :meth:`sweep_trash`. Fields that are not in the store are
        skipped. Call only while holding the store's lease.

        Returns
        -------
        Bytes freed per removed ``(location, name)``.
        """
        self.check_writable()
        present = {loc: set(self.field_names(loc)) for loc in {loc for loc, _ in fields}}
        todo = [(loc, name) for loc, name in dict.fromkeys(fields) if name in present[loc]]
        if not todo:
            return {}
        sizes = {(loc, name): self.element_nbytes(loc, name) for loc, name in todo}
        trash = os.path.join(self.path, f"{TRASH_PREFIX}{uuid.uuid4().hex[:8]}")
        self._drop_consolidated_metadata()
        os.makedirs(trash)
        g = self._rw_group()
        for loc in _DATAFRAME_LOCATIONS:
            names = [name for l_, name in todo if l_ == loc]
            if names:
                order = [c for c in g[loc].attrs.get("column-order", []) if c not in set(names)]
                g[loc].attrs["column-order"] = order
        for i, (loc, name) in enumerate(todo):
            os.replace(os.path.join(self.path, loc, name), os.path.join(trash, f"{i}_{loc}"))
        shutil.rmtree(trash)
        with warnings.catch_warnings():
            # our lease file at the root is not a zarr node; zarr says so while walking
            warnings.filterwarnings("ignore", message=".*not recognized as a component of a Zarr hierarchy")
            zarr.consolidate_metadata(self.path)
        self._reopen()
        return sizes


class Store(StoreHandle):
    """A zarr AnnData store opened for a kompot_dask run.

    obs, var and the embedding are read into memory; expression elements stay on disk
    and are read tile by tile through :class:`TileReader`.
    """

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        self.obs: pd.DataFrame = ad.io.read_elem(self.root["obs"])
        self.var: pd.DataFrame = ad.io.read_elem(self.root["var"])

    def _reopen(self) -> None:
        super()._reopen()
        self.obs = ad.io.read_elem(self.root["obs"])
        self.var = ad.io.read_elem(self.root["var"])

    # ---- reading -------------------------------------------------------------------

    @property
    def n_obs(self) -> int:
        return len(self.obs)

    @property
    def n_vars(self) -> int:
        return len(self.var)

    def read_obsm(self, key: str) -> np.ndarray:
        if key not in self.obsm_keys():
            raise KeyError(
                f"obsm key {key!r} not found in the store; available: {self.obsm_keys()}. "
                "Pass obsm_key= one of these."
            )
        value = ad.io.read_elem(self.root["obsm"][key])
        if isinstance(value, pd.DataFrame):
            value = value.to_numpy()
        if sp.issparse(value):
            value = value.toarray()
        return np.asarray(value)

    def layer_info(self, layer: str | None) -> LayerInfo:
        if layer is None:
            if "X" not in self.root:
                raise KeyError("the store has no X; pass layer= one of " f"{self.layer_keys()}")
            elem_path = "X"
        else:
            if layer not in self.layer_keys():
                raise KeyError(
                    f"layer {layer!r} not found in the store; available layers: {self.layer_keys()}. "
                    "Pass layer=None to use X."
                )
            elem_path = f"layers/{layer}"
        elem = self.root[elem_path]
        enc = elem.attrs.get("encoding-type", "array")
        if enc in ("csr_matrix", "csc_matrix"):
            shape = tuple(int(s) for s in elem.attrs["shape"])
            dtype = np.dtype(elem["data"].dtype)
            info = LayerInfo(elem_path, enc[:3], shape, dtype, None)
        elif isinstance(elem, zarr.Array):
            info = LayerInfo(elem_path, "dense", tuple(elem.shape), np.dtype(elem.dtype), tuple(elem.chunks))
        else:
            raise TypeError(f"{elem_path} has encoding {enc!r}; expected a dense array or a CSR/CSC matrix")
        if not (np.issubdtype(info.dtype, np.floating) or np.issubdtype(info.dtype, np.integer)) or info.dtype == np.bool_:
            raise TypeError(
                f"{elem_path} has dtype {info.dtype}, which is not numeric; expected log-scale floats. "
                "Pass layer= a numeric expression layer."
            )
        if info.shape != (self.n_obs, self.n_vars):
            raise ValueError(f"{elem_path} has shape {info.shape}, expected {(self.n_obs, self.n_vars)}")
        return info

    def layer_as_dask(self, layer: str | None, chunks: tuple[int, int] | None = None) -> Any:
        """The expression element as a lazy dask array (anndata's ``read_elem_lazy``);
        dense layers keep their on-disk chunks, CSR/CSC ones are chunked along their major axis."""
        info = self.layer_info(layer)
        elem = zarr.open_group(store=self.path, mode="r", use_consolidated=False)[info.elem_path]
        kwargs = {} if chunks is None else {"chunks": chunks}
        return ad.experimental.read_elem_lazy(elem, **kwargs)

    def tile_reader(self, info: LayerInfo) -> TileReader:
        return TileReader(self.path, info)

    # ---- writing -------------------------------------------------------------------

    def stage_layer(self, name: str, shape: tuple[int, int], chunks: tuple[int, int], dtype: str) -> str:
        """Create an empty (NaN) staged array for layer ``name``; returns its element path."""
        g = self._rw_group()
        layers = g.require_group("layers")
        if "encoding-type" not in layers.attrs:
            layers.attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})
        staged = f"{STAGING_PREFIX}{uuid.uuid4().hex[:8]}_{name}"
        layers.create_array(
            staged, shape=shape, chunks=chunks, dtype=dtype, fill_value=np.nan,
            attributes=dict(_ARRAY_ATTRS),
        )
        return f"layers/{staged}"

    def discard_staged(self, elem_paths: list[str]) -> None:
        for p in elem_paths:
            full = os.path.join(self.path, p)
            if os.path.isdir(full):
                shutil.rmtree(full)

    def commit(
        self,
        staged_layers: dict[str, str],
        obs_columns: dict[str, np.ndarray],
        var_columns: dict[str, np.ndarray],
        uns_updates: dict[str, dict[str, Any]],
    ) -> None:
        """Make a run's outputs visible: layers renamed into place, obs/var/uns written,
        metadata reconsolidated once. On failure the previous obs/var/uns are restored."""
        g = self._rw_group()
        old_obs = ad.io.read_elem(g["obs"])
        old_var = ad.io.read_elem(g["var"])
        old_uns = {k: ad.io.read_elem(g["uns"][k]) for k in uns_updates if "uns" in g and k in g["uns"]}
        moved: list[tuple[str, str]] = []  # (staged, final)
        backups: list[tuple[str, str]] = []  # (final, backup) of layers being replaced
        try:
            for name, elem_path in staged_layers.items():
                src = os.path.join(self.path, elem_path)
                dst = os.path.join(self.path, "layers", name)
                if os.path.isdir(dst):
                    backup = f"{src}_previous"
                    os.replace(dst, backup)
                    backups.append((dst, backup))
                os.replace(src, dst)
                moved.append((src, dst))
            if obs_columns:
                obs = old_obs.copy()
                for k, v in obs_columns.items():
                    obs[k] = v
                ad.io.write_elem(g, "obs", obs)
            if var_columns:
                var = old_var.copy()
                for k, v in var_columns.items():
                    var[k] = v
                ad.io.write_elem(g, "var", var)
            uns = g.require_group("uns")
            if "encoding-type" not in uns.attrs:
                uns.attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})
            for key, value in uns_updates.items():
                ad.io.write_elem(uns, key, value)
        except BaseException:
            logger.error("Commit failed; restoring obs, var, uns and layers of %s", self.path)
            ad.io.write_elem(g, "obs", old_obs)
            ad.io.write_elem(g, "var", old_var)
            for key, value in old_uns.items():
                ad.io.write_elem(g["uns"], key, value)
            for src, dst in reversed(moved):
                os.replace(dst, src)
            for dst, backup in backups:
                os.replace(backup, dst)
            raise
        for _, backup in backups:
            shutil.rmtree(backup, ignore_errors=True)
        with warnings.catch_warnings():
            # our lease file at the root is not a zarr node; zarr says so while walking
            warnings.filterwarnings("ignore", message=".*not recognized as a component of a Zarr hierarchy")
            zarr.consolidate_metadata(self.path)
        clear_caches()
        self.root = zarr.open_group(store=self.path, mode="r")
        self.obs = ad.io.read_elem(self.root["obs"])
        self.var = ad.io.read_elem(self.root["var"])

    def read_layer_dense(self, name: str) -> np.ndarray:
        """A whole layer in memory (small, in-memory AnnData path only)."""
        return np.asarray(zarr.open_array(store=self.path, path=f"layers/{name}", mode="r")[...])


def _maybe_json(value: Any) -> Any:
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value

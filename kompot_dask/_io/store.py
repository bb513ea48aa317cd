"""The zarr-backed AnnData store: lazy reads, tile readers for workers, element writes.

This is the only module that touches zarr paths. Reads never load a cells × genes
element; writes go element by element (anndata's ``write_elem``) or region by region
(workers filling staged layer arrays), and become visible only at :meth:`Store.commit`,
which renames the staged arrays into place and reconsolidates the metadata once.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import time
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr
from dask.utils import format_bytes

from . import commit
from .tiles import EmbeddingReader, LayerInfo, RowSubset, TileReader, clear_caches, write_tile  # noqa: F401

logger = logging.getLogger("kompot_dask")



RESULTS_INPUT_KEY = "kompot_dask_input"
"""``uns`` entry of a results store: where its read-only input is (see
:func:`kompot_dask._io.source.results_store_for`)."""

READ_WAIT_SECONDS = 120.0
"""How long a reader waits for a commit in progress before it gives up."""


class StoreError(ValueError):
    """The store cannot be used as asked (missing, not AnnData, read-only, ...)."""


class StoreDiskFullError(OSError):
    """The disk holding the store filled up while a run wrote to it."""


def disk_full_error(store_path: str, exc: OSError) -> StoreDiskFullError:
    """ENOSPC raised anywhere in a run (a worker's tile write, the commit, the lease), said
    in terms of the store: what happened to it, what was kept, what to do."""
    import shutil as _shutil

    from .commit import staged_bytes

    try:
        free = format_bytes(_shutil.disk_usage(store_path).free)
    except OSError:
        free = "?"
    kept = staged_bytes(store_path) if os.path.isdir(store_path) else 0
    keep = (f" {format_bytes(kept)} of finished work is kept in {store_path}/.kompot/staging for a resume "
            "(kompot_dask.cleanup(store, staged=True) frees it)." if kept else "")
    err = StoreDiskFullError(
        errno.ENOSPC,
        f"no space left on the disk holding the store {store_path} ({free} free; {exc.filename or 'a write'} "
        f"failed): no results were written and the store's data is unchanged.{keep} Free disk space and "
        "rerun the same call, or check the plan's disk estimate with kompot_dask.plan(...).",
    )
    return err


def is_remote(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a URL of a remote store (``s3://``, ``gs://``, ``https://``, ...)."""
    p = os.fspath(path)
    return "://" in p and not p.startswith("file://")


def _local_path(path: str | os.PathLike, *, remote: bool = False) -> str:
    """An absolute local path; a remote URL is kept as it is where ``remote`` allows it
    (stores that are only read), and refused where a store is written."""
    p = os.fspath(path)
    if p.startswith("file://"):
        p = p[len("file://") :]
    elif "://" in p:
        if remote:
            return p
        scheme = p.split("://", 1)[0]
        raise StoreError(
            f"store URL {p!r}: kompot_dask writes only to stores on a file system (results are committed by "
            f"renaming staged arrays, which {scheme}:// object stores cannot do atomically). Read it as an input "
            "and write the results beside it: kompot_dask.de(url, ..., output='results.zarr')."
        )
    return os.path.abspath(p)


def remote_info(url: str) -> dict[str, Any] | None:
    """fsspec's ``info`` of one object of a remote store, or None when it does not exist."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    try:
        return dict(fs.info(root))
    except FileNotFoundError:
        return None



_DATAFRAME_LOCATIONS = ("obs", "var")
_ELEMENT_LOCATIONS = ("layers", "obsm", "varm", "obsp")


def _open_anndata_root(path: str) -> Any:
    if not is_remote(path) and not os.path.exists(path):
        raise StoreError(
            f"store path {path!r} does not exist. Create it with "
            "kompot_dask.ingest('data.h5ad', 'data.zarr') or pass an existing zarr AnnData store."
        )
    try:
        root = zarr.open_group(store=path, mode="r")
    except Exception as exc:  # zarr raises several types for non-stores
        if is_remote(path):
            raise StoreError(
                f"the remote store {path!r} could not be opened ({type(exc).__name__}: {exc}). Check the URL, and "
                "the credentials and endpoint its fsspec backend reads (for s3:// the AWS_* variables or "
                "~/.aws; the workers need them too)."
            ) from None
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
        self.path = _local_path(path, remote=True)
        self.remote = is_remote(self.path)
        _open_anndata_root(self.path)  # clear errors for what is not a store
        self._state = self._settled_state()
        self.root = _open_anndata_root(self.path)
        self.zarr_format = self.root.metadata.zarr_format

    def _reopen(self) -> None:
        clear_caches()
        self._state = self._settled_state()
        self.root = zarr.open_group(store=self.path, mode="r")

    def _settled_state(self) -> tuple[bool, str]:
        """The store's commit state once no commit is pending. A commit left by a dead
        writer is completed here when the store is writable (taking the lease)."""
        from .lease import StoreLockedError, lock_holder, store_lock

        deadline = time.monotonic() + READ_WAIT_SECONDS
        while True:
            state = commit.commit_state(self.path)
            if not state[0]:
                return state
            if lock_holder(self.path) is None and os.access(self.path, os.W_OK):
                try:
                    with store_lock(self.path, "completing an interrupted commit"):
                        pass
                    continue
                except StoreLockedError:
                    pass
            if time.monotonic() > deadline:
                raise StoreError(
                    f"the store {self.path} has had a commit in progress for over {READ_WAIT_SECONDS:.0f} s "
                    f"and its writer ({lock_holder(self.path) or 'unknown'}) holds the lease. Wait for it, or "
                    "open the store with kompot_dask once it is gone (kd.RunInfo, kd.de, kd.cleanup or `kompot-dask verify STORE`): the commit is then completed."
                )
            time.sleep(0.05)

    def consistent(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` on a state that no commit changed while it ran (retried otherwise):
        readers of several elements (the run history with its fields) never mix two states."""
        while True:
            if commit.commit_state(self.path) != self._state:
                self._reopen()
            before = self._state
            try:
                result, error = fn(*args), None
            except (KeyError, ValueError, OSError) as exc:  # an element moved under the read
                result, error = None, exc
            if commit.commit_state(self.path) == before:
                if error is not None:
                    raise error
                return result

    def names(self, location: str) -> pd.Index:
        """The obs or var names alone (the index array, not the other columns)."""
        group = self.root[location]
        return pd.Index(ad.io.read_elem(group[group.attrs.get("_index", "_index")])).astype(str)

    def has_element(self, elem_path: str) -> bool:
        """Whether the store holds ``elem_path`` (e.g. ``"X"``)."""
        return elem_path in self.root

    def obsm_keys(self) -> list[str]:
        return sorted(self.root["obsm"].keys()) if "obsm" in self.root else []

    def layer_keys(self) -> list[str]:
        return sorted(k for k in self.root["layers"].keys() if not k.startswith(commit.LEGACY_STAGING_PREFIX)) if "layers" in self.root else []

    def field_names(self, location: str) -> list[str]:
        """Names held at ``location``: obs/var column names, or layers/obsm/varm/obsp keys."""
        if location in _DATAFRAME_LOCATIONS:
            if location not in self.root:
                return []
            return [str(c) for c in self.root[location].attrs.get("column-order", [])]
        if location in _ELEMENT_LOCATIONS:
            if location not in self.root:
                return []
            return sorted(k for k in self.root[location].keys() if not k.startswith(commit.LEGACY_STAGING_PREFIX))
        raise ValueError(
            f"location={location!r} is not a field location of an AnnData store; "
            f"use one of {list(_DATAFRAME_LOCATIONS + _ELEMENT_LOCATIONS)}"
        )

    def read_uns_json(self, key: str) -> dict[str, Any]:
        """``uns[key]`` as a dict (JSON strings decoded), or {} when absent."""
        return self.consistent(self._read_uns_json, key)

    def _read_uns_json(self, key: str) -> dict[str, Any]:
        if "uns" not in self.root or key not in self.root["uns"]:
            return {}
        raw = ad.io.read_elem(self.root["uns"][key])
        return {k: _maybe_json(v) for k, v in raw.items()} if isinstance(raw, dict) else {}

    def read_uns_value(self, key: str) -> Any:
        """``uns[key]`` as anndata reads it (an array, a dict, a scalar), or ``None`` when absent."""
        return self.consistent(self._read_uns_value, key)

    def _read_uns_value(self, key: str) -> Any:
        if "uns" not in self.root or key not in self.root["uns"]:
            return None
        return ad.io.read_elem(self.root["uns"][key])

    def read_varm(self, key: str) -> pd.DataFrame | None:
        """``varm[key]`` as anndata reads it (a genes × columns DataFrame or array), or
        ``None`` when absent."""
        return self.consistent(self._read_varm, key)

    def _read_varm(self, key: str) -> Any:
        if "varm" not in self.root or key not in self.root["varm"]:
            return None
        return ad.io.read_elem(self.root["varm"][key])

    def read_uns_item(self, key: str, item: str) -> Any:
        """``uns[key][item]`` as anndata reads it, or ``None`` when absent."""
        return self.consistent(self._read_uns_item, key, item)

    def _read_uns_item(self, key: str, item: str) -> Any:
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
        if self.remote:
            raise PermissionError(
                f"the store {self.path!r} is remote: kompot_dask only reads remote stores. Write the results to a "
                "store on a file system: kompot_dask.de(url, ..., output='results.zarr')."
            )
        probe_dirs = [self.path] + [os.path.join(self.path, d) for d in ("layers", "obs", "var", "uns") if os.path.isdir(os.path.join(self.path, d))]
        for d in probe_dirs:
            no_write_bits = not os.stat(d).st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
            if no_write_bits or not os.access(d, os.W_OK):
                raise PermissionError(
                    f"the store {self.path!r} is read-only ({d!r} is not writable); results are written "
                    "back into the store. Make it writable or copy it first."
                )

    def check_new_field_names(self, fields: list[tuple[str, str]], fix: str) -> None:
        """Refuse output names that the store's file system or zarr cannot hold, before any
        compute: reserved or hidden names and names or paths longer than the system allows."""
        try:
            name_max = os.pathconf(self.path, "PC_NAME_MAX")
            path_max = os.pathconf(self.path, "PC_PATH_MAX")
        except (OSError, ValueError):
            name_max, path_max = 255, 4096
        for loc, name in fields:
            if name in (".", "..") or "/" in name or "\\" in name or name.startswith((".", "__")):
                raise ValueError(f"the {loc} field name {name!r} is reserved or hidden in a zarr store. {fix}")
            n = len(name.encode())
            if n > name_max:
                raise ValueError(
                    f"the {loc} field name {name!r} is {n} bytes long; the file system of {self.path} "
                    f"allows {name_max} per name. {fix}"
                )
            # the deepest path a run creates for it: a chunk of the staged copy
            deepest = os.path.join(self.path, commit.STAGING_DIR, "t" * 12, "elements", loc, name,
                                   "c", "9" * 10, "9" * 10)
            if len(deepest.encode()) > path_max:
                raise ValueError(
                    f"the {loc} field {name!r} would need paths of {len(deepest.encode())} bytes under "
                    f"{self.path}; the system allows {path_max}. {fix}"
                )

    def element_signature(self, elem_path: str) -> list[Any]:
        """Sizes and modification times of an element's metadata files: they change whenever
        the element is rewritten (anndata deletes and recreates it), so a resumed run can
        tell that its input is still the one it started on."""
        sig: list[Any] = [elem_path]
        base = os.path.join(self.path, elem_path)
        for sub in ("", "data", "indices", "indptr"):
            for name in (".zarray", ".zattrs", ".zgroup", "zarr.json"):
                p = os.path.join(base, sub, name)
                if self.remote:  # size and the object's version tag or time
                    info = remote_info(p)
                    if info is not None:
                        sig.append([sub, name, info.get("size"), str(info.get("ETag") or info.get("LastModified")
                                                                     or info.get("mtime") or "")])
                elif os.path.exists(p):
                    st = os.stat(p)
                    sig.append([sub, name, st.st_size, st.st_mtime_ns])
        return sig

    def element_nbytes(self, location: str, name: str) -> int:
        """Bytes on disk of one field (a layer's directory, an obs/var column's arrays)."""
        return directory_nbytes(os.path.join(self.path, location, name))

    def remove_fields(self, fields: list[tuple[str, str]],
                      uns_updates: dict[str, Any] | None = None) -> dict[tuple[str, str], int]:
        """Delete ``(location, name)`` fields from the store and free their disk space, and
        write ``uns_updates`` (the run history noting the removal) in the same step.

        One journaled change (:mod:`kompot_dask._io.commit`): an interruption at any point
        is completed by the next kompot_dask opener. Fields that are not in the store are
        skipped. Call only while holding the lease.

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
        staging = commit.Staging.create(self.path)
        try:
            journal = commit.change_journal(self.path, staging, remove=todo, uns=uns_updates)
            commit.begin(self.path, journal)
        except BaseException:
            staging.remove()
            raise
        commit.apply_journal(self.path)
        self._reopen()
        return sizes


class Store(StoreHandle):
    """A zarr AnnData store opened for a kompot_dask run.

    obs and var are read into memory; expression elements stay on disk and are read tile
    by tile through :class:`TileReader`, a dense embedding band by band through
    :class:`EmbeddingReader`.
    """

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        self.input: Store | None = None
        self.input = self._open_input()
        self.obs, self.var = self.consistent(self._read_frames)

    def _open_input(self) -> Store | None:
        """The read-only input of a results store (:func:`kompot_dask._io.source.results_store_for`),
        or ``None`` for a store that holds its own data."""
        rec = self.read_uns_json(RESULTS_INPUT_KEY)
        if not rec:
            return None
        where = rec.get("path")
        if not isinstance(where, str) or not (is_remote(where) or os.path.exists(where)):
            raise StoreError(
                f"{self.path} is a results store whose input {where!r} is gone (moved or deleted): its results "
                "are readable with anndata.read_zarr, but the expression and embedding it was computed on "
                "are not. Put the input back at that path."
            )
        source = Store(where)
        if (source.n_obs, source.n_vars) != (int(rec.get("n_obs", -1)), int(rec.get("n_vars", -1))):
            raise StoreError(
                f"the input {where} of the results store {self.path} now has {source.n_obs:,} cells × "
                f"{source.n_vars:,} genes; the results store was made for {rec.get('n_obs')} × {rec.get('n_vars')}. "
                "Use a new results store for the changed input."
            )
        return source

    def _read_frames(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        obs, var = ad.io.read_elem(self.root["obs"]), ad.io.read_elem(self.root["var"])
        if self.input is None:
            return obs, var
        # A results store: the input's columns, then this store's own (which win on a name)
        return _overlay(self.input.obs, obs), _overlay(self.input.var, var)

    def _reopen(self) -> None:
        super()._reopen()
        self.obs, self.var = self._read_frames()

    def _holder(self, elem_path: str) -> Store:
        """The store that holds ``elem_path``: this one, or the input of a results store."""
        if self.input is None or elem_path in self.root:
            return self
        return self.input

    # ---- reading through a results store's input --------------------------------------

    def has_element(self, elem_path: str) -> bool:
        return elem_path in self.root or (self.input is not None and self.input.has_element(elem_path))

    def obsm_keys(self) -> list[str]:
        own = super().obsm_keys()
        return own if self.input is None else sorted(set(own) | set(self.input.obsm_keys()))

    def layer_keys(self) -> list[str]:
        own = super().layer_keys()
        return own if self.input is None else sorted(set(own) | set(self.input.layer_keys()))

    def element_signature(self, elem_path: str) -> list[Any]:
        holder = self._holder(elem_path)
        return super().element_signature(elem_path) if holder is self else holder.element_signature(elem_path)

    def read_uns_value(self, key: str) -> Any:
        value = super().read_uns_value(key)
        return value if value is not None or self.input is None else self.input.read_uns_value(key)

    # ---- reading -------------------------------------------------------------------

    @property
    def n_obs(self) -> int:
        return len(self.obs)

    @property
    def n_vars(self) -> int:
        return len(self.var)

    def read_obsm(self, key: str) -> np.ndarray:
        holder = self._holder(f"obsm/{key}")
        if holder is not self:
            return holder.read_obsm(key)
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

    def embedding_reader(self, key: str) -> EmbeddingReader | None:
        """A band reader of ``obsm[key]`` when it is a dense numeric array in the store;
        ``None`` for other encodings (a DataFrame, a sparse matrix), which
        :meth:`read_obsm` reads whole."""
        holder = self._holder(f"obsm/{key}")
        if holder is not self:
            return holder.embedding_reader(key)
        if key not in self.obsm_keys():
            self.read_obsm(key)  # raises the KeyError that names the available keys
        node = self.root["obsm"][key]
        if not isinstance(node, zarr.Array) or node.ndim != 2 or not np.issubdtype(node.dtype, np.number):
            return None
        elem = f"obsm/{key}"
        token = json.dumps(self.element_signature(elem))
        return EmbeddingReader.open(self.path, elem, token)

    def layer_info(self, layer: str | None) -> LayerInfo:
        holder = self._holder("X" if layer is None else f"layers/{layer}")
        if holder is not self:
            return holder.layer_info(layer)
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
            info = LayerInfo(elem_path, enc[:3], shape, dtype, None, int(elem["data"].shape[0]))
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

    def tile_reader(self, info: LayerInfo) -> TileReader:
        return TileReader(self._holder(info.elem_path).path, info)

    # ---- writing -------------------------------------------------------------------

    def commit(self, staging: commit.Staging, *, layers: dict[str, str], obs_columns: dict[str, np.ndarray],
               var_columns: dict[str, np.ndarray], uns_updates: dict[str, Any],
               varm: dict[str, pd.DataFrame] | None = None, obsp: dict[str, str] | None = None) -> None:
        """Make a run's outputs visible in one journaled step (see :mod:`kompot_dask._io.commit`):
        a kill at any instant leaves the previous state or, once the journal is written, a
        change that the next opener completes. Call only while holding the lease."""
        journal = commit.change_journal(self.path, staging, layers=layers, obs=obs_columns,
                                        var=var_columns, uns=uns_updates, varm=varm, obsp=obsp)
        commit.begin(self.path, journal)
        commit.apply_journal(self.path)
        self._reopen()

    def read_layer_dense(self, name: str) -> np.ndarray:
        """A whole layer in memory (small, in-memory AnnData path only)."""
        return np.asarray(zarr.open_array(store=self.path, path=f"layers/{name}", mode="r")[...])


def _overlay(base: pd.DataFrame, own: pd.DataFrame) -> pd.DataFrame:
    """``base``'s columns with ``own``'s added (``own`` wins on a shared name); rows are the
    base's, in its order (a results store was written with the input's names)."""
    own = own.set_axis(base.index, axis=0)
    kept = base.drop(columns=[c for c in own.columns if c in base.columns])
    return pd.concat([kept, own], axis=1) if len(own.columns) else base


def _maybe_json(value: Any) -> Any:
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value

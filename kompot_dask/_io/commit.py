"""Staging and the journaled commit: how a run's results enter a user's store safely.

Everything a run writes goes first into its own staging directory, ``.kompot/staging/<token>``
at the store root. That directory is hidden from anndata and zarr (no node is named
``.kompot``), so a staged array never shows up in ``ad.read_zarr(store).layers``.

A commit (or a field removal) is a *journal* (:func:`change_journal`): a short JSON list of
directory renames plus the new ``column-order`` of obs/var. It is written atomically to
``.kompot/journal.json``; from that instant the change is decided, and :func:`apply_journal`
carries it out. Every step is idempotent (each staged directory is recognised by its inode),
so a process killed at any point leaves a journal that the next opener rolls forward with
:func:`recover`; a process killed before the journal leaves only staging, which is swept.
User elements are never rewritten: new columns and layers are moved in beside them, and a
field replaced by a newer run is swapped out by one atomic exchange where the file system
supports it.

What a plain ``anndata.read_zarr`` may see while a commit runs (milliseconds on a local
disk): the consolidated metadata is dropped first, so readers walk the tree; every element
they read is whole (old or new), but some of the run's own fields may already be new while
others are still old, and the run record (``uns``) moves last. User data is never partial.
kompot_dask's own readers check :func:`commit_state` before and after reading and retry.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import shutil
import uuid
import warnings
from dataclasses import dataclass
from typing import Any

import anndata as ad
import numpy as np
import zarr

logger = logging.getLogger("kompot_dask")

KOMPOT_DIR = ".kompot"
"""Hidden directory at the store root holding staging, the journal and the generation."""
STAGING_DIR = f"{KOMPOT_DIR}/staging"
JOURNAL = f"{KOMPOT_DIR}/journal.json"
GENERATION = f"{KOMPOT_DIR}/generation"
_RESERVE = f"{KOMPOT_DIR}/reserve"
LEGACY_STAGING_PREFIX = "_kompot_staging_"
"""Staged layers of kompot_dask < 0.2 lived in ``layers/`` under this prefix."""
LEGACY_TRASH_PREFIX = ".kompot_trash_"

_ARRAY_ATTRS = {"encoding-type": "array", "encoding-version": "0.2.0"}
_DICT_ATTRS = {"encoding-type": "dict", "encoding-version": "0.1.0"}


class CommitError(RuntimeError):
    """A journal cannot be carried out (the store was changed by hand in between)."""


# --------------------------------------------------------------------------------------
# Small durable file operations


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes | Any) -> None:
    """Replace ``path`` by ``data`` so that readers see the old or the new file, never a part.

    ``data`` is bytes, or a function that writes into the open binary file (to stream
    large content without holding it as bytes too).
    """
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "wb") as fh:
            if callable(data):
                data(fh)
            else:
                fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(os.path.dirname(path))


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, indent=2, sort_keys=False).encode("utf-8")


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_libc: Any = None


def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.renameat2  # noqa: B018 - probe: older C libraries lack it
        except (OSError, AttributeError):
            _libc = False
    if _libc is False:
        return False
    rc = _libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False  # this file system cannot exchange: fall back to two renames
    raise OSError(err, os.strerror(err), a)


# --------------------------------------------------------------------------------------
# Consolidated metadata, written atomically


def _hidden(name: str) -> bool:
    return name.startswith(".") and name not in (".zattrs", ".zgroup", ".zarray")


def _walk_nodes(root: str) -> list[str]:
    """Relative paths of the zarr nodes under ``root`` (hidden directories skipped)."""
    out = []
    stack = [""]
    while stack:
        rel = stack.pop()
        full = os.path.join(root, rel) if rel else root
        try:
            entries = sorted(os.listdir(full))
        except FileNotFoundError:
            continue
        is_group = any(m in entries for m in (".zgroup",)) or (
            "zarr.json" in entries and _node_type(os.path.join(full, "zarr.json")) == "group"
        )
        if rel:
            out.append(rel)
        if not is_group:
            continue
        for e in entries:
            if _hidden(e) or e in ("zarr.json",):
                continue
            child = os.path.join(full, e)
            if os.path.isdir(child) and (
                os.path.exists(os.path.join(child, ".zgroup"))
                or os.path.exists(os.path.join(child, ".zarray"))
                or os.path.exists(os.path.join(child, "zarr.json"))
            ):
                stack.append(f"{rel}/{e}" if rel else e)
    return out


def _node_type(meta_path: str) -> str | None:
    try:
        with open(meta_path, encoding="utf-8") as fh:
            return json.load(fh).get("node_type")
    except (OSError, ValueError):
        return None


def _read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def zarr_format_of(store_path: str) -> int:
    return 3 if os.path.exists(os.path.join(store_path, "zarr.json")) else 2


def write_consolidated(store_path: str) -> None:
    """Consolidated metadata of the whole store, replacing the old one in one atomic step
    (zarr's own ``consolidate_metadata`` rewrites the file in place, so a reader racing it
    can read a torn file)."""
    nodes = _walk_nodes(store_path)
    if zarr_format_of(store_path) == 2:
        meta: dict[str, Any] = {}
        for name in (".zattrs", ".zgroup"):
            p = os.path.join(store_path, name)
            if os.path.exists(p):
                meta[name] = _read_json(p)
        for rel in nodes:
            for name in (".zattrs", ".zgroup", ".zarray"):
                p = os.path.join(store_path, rel, name)
                if os.path.exists(p):
                    doc = _read_json(p)
                    if name == ".zgroup":  # as zarr-python 3 writes it: subgroups marked consolidated too
                        doc["consolidated_metadata"] = {"metadata": {}, "must_understand": False, "kind": "inline"}
                    meta[f"{rel}/{name}"] = doc
        write_atomic(os.path.join(store_path, ".zmetadata"),
                     _json_bytes({"metadata": meta, "zarr_consolidated_format": 1}))
        return
    entries: dict[str, Any] = {}
    for rel in nodes:
        node = _read_json(os.path.join(store_path, rel, "zarr.json"))
        if node.get("node_type") == "group":
            node["consolidated_metadata"] = {"kind": "inline", "must_understand": False, "metadata": {}}
        entries[rel] = node
    root_path = os.path.join(store_path, "zarr.json")
    root = _read_json(root_path)
    root["consolidated_metadata"] = {"kind": "inline", "must_understand": False, "metadata": entries}
    write_atomic(root_path, _json_bytes(root))


def drop_consolidated(store_path: str) -> None:
    """Remove the consolidated metadata (atomically), so readers walk the tree: stale, it
    would describe elements that are being moved."""
    if zarr_format_of(store_path) == 2:
        try:
            os.remove(os.path.join(store_path, ".zmetadata"))
        except FileNotFoundError:
            pass
        return
    root_path = os.path.join(store_path, "zarr.json")
    root = _read_json(root_path)
    if root.pop("consolidated_metadata", None) is not None:
        write_atomic(root_path, _json_bytes(root))


def _attrs_path(store_path: str, group: str) -> str:
    if zarr_format_of(store_path) == 2:
        return os.path.join(store_path, group, ".zattrs")
    return os.path.join(store_path, group, "zarr.json")


def read_group_attrs(store_path: str, group: str) -> dict[str, Any]:
    path = _attrs_path(store_path, group)
    if not os.path.exists(path):
        return {}
    doc = _read_json(path)
    return doc if zarr_format_of(store_path) == 2 else doc.get("attributes", {})


def _write_group_attrs(store_path: str, group: str, attrs: dict[str, Any]) -> None:
    path = _attrs_path(store_path, group)
    if zarr_format_of(store_path) == 2:
        write_atomic(path, _json_bytes(attrs))
        return
    doc = _read_json(path)
    doc["attributes"] = attrs
    write_atomic(path, _json_bytes(doc))


# --------------------------------------------------------------------------------------
# Staging


@dataclass(frozen=True)
class Staging:
    """One run's staging directory: ``<store>/.kompot/staging/<token>``."""

    store_path: str
    token: str

    @classmethod
    def create(cls, store_path: str, token: str | None = None) -> Staging:
        staging = cls(store_path, token or uuid.uuid4().hex[:12])
        os.makedirs(staging.path, exist_ok=True)
        return staging

    @property
    def path(self) -> str:
        return os.path.join(self.store_path, STAGING_DIR, self.token)

    def sub(self, *parts: str) -> str:
        return os.path.join(self.path, *parts)

    def create_layer(self, name: str, shape: tuple[int, int], chunks: tuple[int, int], dtype: str,
                     shards: tuple[int, int] | None = None, location: str = "layers",
                     fill_value: float = np.nan) -> str:
        """An empty (NaN) dense array in anndata's encoding for layer ``name`` (in the store's
        zarr format; ``shards`` for a format 3 store); returns its directory, which workers
        open with :func:`kompot_dask._io.tiles.write_tile`. ``location="obsp"``: a cells ×
        cells matrix instead (filled with ``fill_value``)."""
        path = self.sub(location, name)
        if os.path.isdir(path):
            return path  # resumed run: keep the tiles already written
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fmt = zarr_format_of(self.store_path)
        zarr.create_array(
            store=path, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill_value,
            attributes=dict(_ARRAY_ATTRS), zarr_format=fmt, **({"shards": shards} if shards and fmt == 3 else {}),
        )
        return path

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        prune_empty(self.store_path)


def prune_empty(store_path: str) -> None:
    """Remove kompot_dask's hidden directories when nothing is left in them."""
    for rel in (STAGING_DIR, f"{KOMPOT_DIR}/trash", KOMPOT_DIR):
        try:
            os.rmdir(os.path.join(store_path, rel))
        except OSError:
            pass


def list_staging(store_path: str) -> list[Staging]:
    root = os.path.join(store_path, STAGING_DIR)
    if not os.path.isdir(root):
        return []
    return [Staging(store_path, t) for t in sorted(os.listdir(root)) if os.path.isdir(os.path.join(root, t))]


def staged_bytes(store_path: str) -> int:
    """Bytes held by staging directories and removal leftovers (what ``cleanup(staged=True)`` frees)."""
    from .store import directory_nbytes

    total = directory_nbytes(os.path.join(store_path, STAGING_DIR))
    total += directory_nbytes(os.path.join(store_path, KOMPOT_DIR, "trash"))
    for rel in _legacy_leftovers(store_path):
        total += directory_nbytes(os.path.join(store_path, rel))
    return total


def _legacy_leftovers(store_path: str) -> list[str]:
    out = [e for e in os.listdir(store_path) if e.startswith(LEGACY_TRASH_PREFIX)]
    layers = os.path.join(store_path, "layers")
    if os.path.isdir(layers):
        out += [f"layers/{e}" for e in os.listdir(layers) if e.startswith(LEGACY_STAGING_PREFIX)]
    return out


def sweep(store_path: str, keep: set[str] = frozenset()) -> int:
    """Delete dead staging (all tokens but ``keep``), removal trash and pre-0.2 leftovers;
    returns bytes freed. Call only while holding the store's lease."""
    from .store import directory_nbytes

    freed = 0
    doomed = [s.path for s in list_staging(store_path) if s.token not in keep]
    doomed.append(os.path.join(store_path, KOMPOT_DIR, "trash"))
    legacy = _legacy_leftovers(store_path)
    doomed += [os.path.join(store_path, rel) for rel in legacy]
    for path in doomed:
        if os.path.isdir(path):
            freed += directory_nbytes(path)
            shutil.rmtree(path, ignore_errors=True)
    if any(rel.startswith("layers/") for rel in legacy):
        # the old layout made these visible as layers: the metadata must forget them
        drop_consolidated(store_path)
        write_consolidated(store_path)
    return freed


# --------------------------------------------------------------------------------------
# The journal


def _rel(store_path: str, path: str) -> str:
    return os.path.relpath(path, store_path)


def commit_state(store_path: str) -> tuple[bool, str]:
    """(a journal is pending, generation): readers compare it before and after a read."""
    pending = os.path.exists(os.path.join(store_path, JOURNAL))
    try:
        with open(os.path.join(store_path, GENERATION), encoding="utf-8") as fh:
            gen = fh.read().strip()
    except OSError:
        gen = ""
    return pending, gen


def _stage_elements(staging: Staging, obs: dict[str, np.ndarray], var: dict[str, np.ndarray],
                    uns: dict[str, Any], zarr_format: int, varm: dict[str, Any] | None = None) -> None:
    """obs/var columns, varm tables and uns entries written with anndata into the staging directory."""
    g = zarr.open_group(staging.sub("elements"), mode="w", zarr_format=zarr_format)
    if varm:
        sub = g.require_group("varm")
        for name, table in varm.items():
            ad.io.write_elem(sub, name, table)
    for loc, cols in (("obs", obs), ("var", var)):
        if cols:
            sub = g.require_group(loc)
            for name, values in cols.items():
                ad.io.write_elem(sub, name, np.asarray(values))
    if uns:
        sub = g.require_group("uns")
        for key, value in uns.items():
            ad.io.write_elem(sub, key, value)


def _move(store_path: str, src: str, dst: str, trash: str | None = None) -> dict[str, Any]:
    ino = os.stat(os.path.join(store_path, src)).st_ino
    return {"src": src, "dst": dst, "ino": ino, "trash": trash}


def change_journal(store_path: str, staging: Staging, *, layers: dict[str, str] | None = None,
                   obs: dict[str, np.ndarray] | None = None, var: dict[str, np.ndarray] | None = None,
                   uns: dict[str, Any] | None = None,
                   remove: list[tuple[str, str]] | None = None,
                   varm: dict[str, Any] | None = None, obsp: dict[str, str] | None = None) -> dict[str, Any]:
    """Stage obs/var/uns and describe one whole change; nothing in the store changes yet.

    ``layers`` maps a final layer name to its staged directory (from
    :meth:`Staging.create_layer`); ``obs``/``var`` columns and ``uns`` entries are written
    into the staging here, and so are ``varm`` tables (genes × columns DataFrames); ``obsp``
    maps a final obsp name to its staged matrix (``create_layer(location="obsp")``);
    ``remove`` lists ``(location, name)`` fields to delete. Fields
    that already exist are replaced; their previous version goes to the trash and is
    deleted when the change is done.
    """
    layers, obs, var, uns, remove, varm = layers or {}, obs or {}, var or {}, uns or {}, remove or [], varm or {}
    _stage_elements(staging, obs, var, uns, zarr_format_of(store_path), varm)
    trash = f"{KOMPOT_DIR}/trash/{staging.token}"
    removals = [_move(store_path, f"{loc}/{name}", f"{trash}/r{i}") for i, (loc, name) in enumerate(remove)]
    moves = [_move(store_path, _rel(store_path, src), f"layers/{name}", f"{trash}/L{i}")
             for i, (name, src) in enumerate(layers.items())]
    moves += [_move(store_path, _rel(store_path, staging.sub("elements", "varm", name)), f"varm/{name}",
                    f"{trash}/M{i}") for i, name in enumerate(varm)]
    obsp = obsp or {}
    moves += [_move(store_path, _rel(store_path, src), f"obsp/{name}", f"{trash}/P{i}")
              for i, (name, src) in enumerate(obsp.items())]
    attrs_removed: dict[str, Any] = {}
    attrs_final: dict[str, Any] = {}
    for loc, cols in (("obs", obs), ("var", var)):
        gone = {n for lo, n in remove if lo == loc}
        if not cols and not gone:
            continue
        current = read_group_attrs(store_path, loc)
        order = [c for c in current.get("column-order", []) if c not in gone]
        attrs_removed[loc] = {**current, "column-order": order}
        attrs_final[loc] = {**current, "column-order": order + [c for c in cols if c not in order]}
        for i, name in enumerate(cols):
            src = _rel(store_path, staging.sub("elements", loc, name))
            moves.append(_move(store_path, src, f"{loc}/{name}", f"{trash}/{loc[0]}{i}"))
    records = [_move(store_path, _rel(store_path, staging.sub("elements", "uns", key)), f"uns/{key}", f"{trash}/u{i}")
               for i, key in enumerate(uns)]
    return {"token": staging.token, "removals": removals, "moves": moves, "records": records,
            "attrs_removed": attrs_removed, "attrs_final": attrs_final,
            "needs_groups": {"layers": bool(layers), "uns": bool(uns), "varm": bool(varm), "obsp": bool(obsp)},
            "cleanup": [_rel(store_path, staging.path), trash]}


def begin(store_path: str, journal: dict[str, Any]) -> None:
    """The commit point: once the journal is on disk the change will be completed."""
    os.makedirs(os.path.join(store_path, KOMPOT_DIR), exist_ok=True)
    # Room for the metadata written after the commit point (the consolidated metadata is
    # the largest): reserved now, released right before it is needed, so a full disk
    # fails the commit here, while nothing has changed, rather than half-way.
    reserve = os.path.join(store_path, _RESERVE)
    meta = os.path.join(store_path, ".zmetadata" if zarr_format_of(store_path) == 2 else "zarr.json")
    size = 2 * (os.path.getsize(meta) if os.path.exists(meta) else 0) + (1 << 20)
    try:
        with open(reserve, "wb") as fh:
            fh.truncate(0)
            fh.write(b"\0" * size)
            fh.flush()
            os.fsync(fh.fileno())
        write_atomic(os.path.join(store_path, JOURNAL), _json_bytes(journal))
    except BaseException:
        try:
            os.remove(reserve)
        except FileNotFoundError:
            pass
        raise


def _do_move(store_path: str, mv: dict[str, Any]) -> None:
    src = os.path.join(store_path, mv["src"])
    dst = os.path.join(store_path, mv["dst"])
    trash = os.path.join(store_path, mv["trash"]) if mv.get("trash") else None

    def ino(p: str) -> int | None:
        try:
            return os.stat(p).st_ino
        except FileNotFoundError:
            return None

    if ino(dst) != mv["ino"]:
        if ino(src) != mv["ino"]:
            raise CommitError(
                f"cannot complete the interrupted change of {store_path}: neither {mv['src']} nor "
                f"{mv['dst']} holds the staged element. The store was modified by hand; run "
                "`kompot-dask verify STORE` to see which fields are affected."
            )
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if os.path.exists(dst):
            if trash is None:
                raise CommitError(f"{mv['dst']} exists in {store_path}; refusing to overwrite it")
            os.makedirs(os.path.dirname(trash), exist_ok=True)
            if not _exchange(src, dst):
                os.replace(dst, trash)
                os.replace(src, dst)
        else:
            os.replace(src, dst)
    # After an exchange the previous version sits at the staged path.
    if trash is not None and os.path.exists(src) and ino(src) != mv["ino"]:
        os.makedirs(os.path.dirname(trash), exist_ok=True)
        os.replace(src, trash)


def _ensure_dict_group(store_path: str, group: str) -> None:
    if os.path.isdir(os.path.join(store_path, group)):
        return
    g = zarr.open_group(store_path, mode="r+", use_consolidated=False)
    g.require_group(group).attrs.update(_DICT_ATTRS)


def apply_journal(store_path: str) -> bool:
    """Carry out the pending journal, if any (idempotent); returns whether there was one.

    Order: consolidated metadata dropped (readers walk the tree); removed columns leave
    their ``column-order``; removed fields leave; new and replaced fields enter; the new
    ``column-order``; the run record (uns) last; the consolidated metadata rewritten.
    """
    jpath = os.path.join(store_path, JOURNAL)
    try:
        journal = _read_json(jpath)
    except FileNotFoundError:
        return False
    drop_consolidated(store_path)
    for group, needed in journal.get("needs_groups", {}).items():
        if needed:
            _ensure_dict_group(store_path, group)
    for loc, attrs in journal["attrs_removed"].items():
        _write_group_attrs(store_path, loc, attrs)
    for mv in journal["removals"] + journal["moves"]:
        _do_move(store_path, mv)
    for loc, attrs in journal["attrs_final"].items():
        _write_group_attrs(store_path, loc, attrs)
    for mv in journal["records"]:
        _do_move(store_path, mv)
    try:
        os.remove(os.path.join(store_path, _RESERVE))
    except FileNotFoundError:
        pass
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not recognized as a component of a Zarr hierarchy")
        write_consolidated(store_path)
    _bump_generation(store_path)
    os.remove(jpath)
    _fsync_dir(os.path.dirname(jpath))
    for rel in journal.get("cleanup", []):
        shutil.rmtree(os.path.join(store_path, rel), ignore_errors=True)
    prune_empty(store_path)
    from .tiles import clear_caches

    clear_caches()
    return True


def _bump_generation(store_path: str) -> None:
    write_atomic(os.path.join(store_path, GENERATION), uuid.uuid4().hex.encode())


def recover(store_path: str) -> bool:
    """Finish an interrupted commit or removal (call while holding the lease)."""
    if not os.path.exists(os.path.join(store_path, JOURNAL)):
        return False
    logger.warning("Completing an interrupted kompot_dask commit in %s", store_path)
    return apply_journal(store_path)


# --------------------------------------------------------------------------------------
# Resume: per-task markers in the staging directory


def write_marker(marker_dir: str, name: str, arrays: dict[str, np.ndarray]) -> None:
    """Record that a task finished (called on workers after its tiles are written): its
    small results, durably and atomically, so that a rerun can reuse them."""
    import io

    os.makedirs(marker_dir, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_atomic(os.path.join(marker_dir, f"{name}.npz"), buf.getvalue())


def read_markers(marker_dir: str) -> dict[str, dict[str, np.ndarray]]:
    """The finished tasks' results by marker name; unreadable markers are ignored (their
    task runs again)."""
    out: dict[str, dict[str, np.ndarray]] = {}
    if not os.path.isdir(marker_dir):
        return out
    for entry in os.listdir(marker_dir):
        if not entry.endswith(".npz"):
            continue
        try:
            with np.load(os.path.join(marker_dir, entry)) as data:
                out[entry[:-4]] = {k: data[k] for k in data.files}
        except (OSError, ValueError, EOFError):
            continue
    return out


def write_json(path: str, value: Any) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_atomic(path, _json_bytes(value))


def read_json(path: str) -> Any:
    try:
        return _read_json(path)
    except (OSError, ValueError):
        return None


RUN_STATE = "run.json"
MODEL_STATE = "model.npz"


def open_run_staging(store_path: str, fingerprint: str, resume: bool) -> tuple[Staging, dict[str, Any] | None]:
    """The staging for a new run: a dead run's staging with the same fingerprint when
    ``resume`` (returned with its saved state), else a new one. Every other dead staging is
    swept. Call only while holding the lease (so no live run owns any staging)."""
    found: tuple[Staging, dict[str, Any]] | None = None
    if resume:
        for staging in list_staging(store_path):
            state = read_json(staging.sub(RUN_STATE))
            if state and state.get("fingerprint") == fingerprint and os.path.exists(staging.sub(MODEL_STATE)):
                with np.load(staging.sub(MODEL_STATE)) as model:
                    state["Z"] = model["Z"]
                found = (staging, state)
                break
    freed = sweep(store_path, keep={found[0].token} if found else set())
    if freed:
        from dask.utils import format_bytes

        logger.info("Removed %s of staging left by interrupted runs", format_bytes(freed))
    if found:
        return found
    return Staging.create(store_path), None


def save_run_state(staging: Staging, fingerprint: str, state: dict[str, Any], Z: np.ndarray) -> None:
    """What a resumed run must reuse to continue this one (its layout and its model)."""
    import io

    buf = io.BytesIO()
    np.savez(buf, Z=Z)
    write_atomic(staging.sub(MODEL_STATE), buf.getvalue())
    write_json(staging.sub(RUN_STATE), {**state, "fingerprint": fingerprint})


# --------------------------------------------------------------------------------------
# Resume: the run's fitted factors in the staging directory


def write_array_atomic(path: str, array: np.ndarray) -> None:
    """Write ``array`` as ``.npy`` at ``path``: readers see the whole file or none.

    Streams into a temporary file beside ``path`` and renames it over ``path`` (an m × m
    factor is hundreds of MB: :func:`write_atomic` would need it as bytes in memory too).
    """
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_atomic(path, lambda fh: np.save(fh, np.asarray(array), allow_pickle=False))


def read_array(path: str) -> np.ndarray:
    """An array written by :func:`write_array_atomic` (writable, in its saved order)."""
    return np.load(path, allow_pickle=False)


def array_paths(directory: str, names: tuple[str, ...]) -> dict[str, str]:
    """name → ``<directory>/<name>.npy``: where one set of named arrays is kept."""
    return {name: os.path.join(directory, f"{name}.npy") for name in names}


def saved_arrays(directory: str, names: tuple[str, ...]) -> dict[str, str] | None:
    """The paths of :func:`array_paths` when every one of ``names`` was saved, else None."""
    paths = array_paths(directory, names)
    return paths if all(os.path.isfile(p) for p in paths.values()) else None


# --------------------------------------------------------------------------------------
# Calibration: the speed of a region write


def scratch_write_seconds(data: np.ndarray) -> float:
    """Seconds to write ``data`` as one chunk of a zarr array in a scratch directory (the
    planner's estimate of the layer writes; the scratch array is removed again)."""
    import tempfile
    import time

    scratch = tempfile.mkdtemp(prefix="kompot_dask_cal_")
    try:
        arr = zarr.create_array(store=scratch, shape=data.shape, chunks=data.shape, dtype=data.dtype,
                                zarr_format=2)
        t = time.perf_counter()
        arr[:, :] = data
        return time.perf_counter() - t
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

"""Chunk manifests of expression elements, the checks the tile reader makes against them,
and :func:`verify`.

zarr does not write a chunk that equals the fill value, and reads an absent chunk as the
fill value; so a deleted chunk file of an expression layer reads as zeros, silently. A
manifest records, for each zarr array of an element (a dense array; the ``data``,
``indices`` and ``indptr`` of a CSR/CSC matrix), every chunk file that *was* written,
with its size and CRC32C. With it, an absent file listed in the manifest is damage, and an
absent file not listed is a legitimately empty chunk.

Manifests live in ``<store>/.kompot/manifests/<element path, %-quoted>.json``: a hidden
directory that anndata never reads and zarr skips (with a warning that our code filters)
when it walks the tree. Each manifest carries an id that is also written into the
element's own attributes (``kompot_manifest_id``); an element rewritten after recording
(anndata's ``write_elem``, a kompot_dask commit replacing a layer) no longer carries it, so
its manifest is recognised as stale instead of raising false alarms. Copies of the store
keep both, so the checks stay on in a restored copy.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import google_crc32c
import numpy as np
import zarr

from .store import StoreError, StoreHandle, _local_path

logger = logging.getLogger("kompot_dask")

MANIFEST_DIR = os.path.join(".kompot", "manifests")
MANIFEST_FORMAT = "kompot-dask chunk manifest"
MANIFEST_VERSION = 1
ID_ATTR = "kompot_manifest_id"
"""Element attribute that ties an element to its manifest."""

_METADATA_FILES = frozenset({".zarray", ".zattrs", ".zgroup", ".zmetadata", "zarr.json"})
_SPARSE_ARRAYS = ("data", "indices", "indptr")
_READ_BLOCK = 4 << 20
CHECK_TTL_SECONDS = 60.0
"""How long a chunk file found intact stays trusted in a process. Workers outlive runs;
a chunk lost between two runs on a long-lived cluster must still be noticed."""

FIX = ("The store is damaged: restore it from a copy or re-ingest; "
       "`kompot-dask verify STORE` lists every damaged chunk")


class StoreIntegrityError(StoreError):
    """A chunk of an expression element is missing, has the wrong size, or cannot be
    decoded.

    Parameters
    ----------
    message
        The full message (names the store, the element, the chunk key and the fix).
    store, elem_path, chunk_key
        Where the damage is, for programs that handle the error.
    """

    def __init__(self, message: str, store: str | None = None, elem_path: str | None = None,
                 chunk_key: str | None = None):
        super().__init__(message)
        self.store = store
        self.elem_path = elem_path
        self.chunk_key = chunk_key

    def __reduce__(self) -> tuple[Any, ...]:
        # Raised on Dask workers and unpickled on the client: rebuild with every field.
        return (type(self), (self.args[0], self.store, self.elem_path, self.chunk_key))


def _integrity_error(store: str, elem_path: str, array: str, key: str, what: str) -> StoreIntegrityError:
    where = f"{elem_path}/{array}" if array else elem_path
    return StoreIntegrityError(
        f"store {store!r}: chunk {key!r} of {_element_label(elem_path)} ({'array' if array else 'element'} "
        f"{where!r}) {what}. {FIX.replace('STORE', store)}",
        store, elem_path, f"{where}/{key}",
    )


def _element_label(elem_path: str) -> str:
    return "X" if elem_path == "X" else f"layer {elem_path.split('/', 1)[-1]!r}"


# --------------------------------------------------------------------------------------
# Files and records


def manifest_path(store: str, elem_path: str) -> str:
    """Path of the manifest of ``elem_path`` (``"X"`` or ``"layers/<name>"``) in ``store``."""
    return os.path.join(store, MANIFEST_DIR, urllib.parse.quote(elem_path, safe="") + ".json")


def read_manifest(store: str, elem_path: str) -> dict[str, Any] | None:
    """The manifest of ``elem_path``, or ``None`` when none was recorded.

    Raises
    ------
    StoreIntegrityError
        The manifest file exists but is not a readable manifest.
    """
    path = manifest_path(store, elem_path)
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise StoreIntegrityError(
            f"store {store!r}: the chunk manifest {path!r} of {elem_path!r} is unreadable ({exc}). "
            f"Delete it and record a new one with `kompot-dask verify {store} --record` if the "
            "element itself is intact.", store, elem_path, None,
        ) from None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise StoreIntegrityError(
            f"store {store!r}: {path!r} is not a kompot-dask chunk manifest (no format={MANIFEST_FORMAT!r}). "
            f"Delete it and run `kompot-dask verify {store} --record`.", store, elem_path, None,
        )
    return data


def _write_json_atomic(path: str, payload: dict[str, Any]) -> None:
    from .commit import write_atomic  # commit imports this package's store: import at call time

    os.makedirs(os.path.dirname(path), exist_ok=True)
    # A reader sees either the old manifest or the new one, never half of one.
    write_atomic(path, json.dumps(payload, separators=(",", ":")).encode("utf-8"))


def _crc32c(path: str) -> tuple[int, str]:
    crc = 0
    size = 0
    with open(path, "rb") as fh:
        while block := fh.read(_READ_BLOCK):
            crc = google_crc32c.extend(crc, block)
            size += len(block)
    return size, f"{crc:08x}"


def _stored_keys(array_dir: str) -> list[str]:
    """Chunk (or shard) keys that have a file: the file's path below the array directory,
    which is the key in every zarr key encoding (``0.0``, ``0/0``, ``c/0/0``)."""
    keys = []
    for root, dirs, files in os.walk(array_dir):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            # metadata and hidden files (editor/OS droppings, temp files) are not chunks
            if name in _METADATA_FILES or name.startswith("."):
                continue
            rel = os.path.relpath(os.path.join(root, name), array_dir)
            keys.append(rel.replace(os.sep, "/"))
    return sorted(keys)


def element_arrays(root: Any, elem_path: str) -> tuple[str, dict[str, Any]]:
    """The encoding of an expression element and its zarr arrays (``""`` for a dense one).

    Raises
    ------
    TypeError
        The element is neither a dense array nor a CSR/CSC matrix.
    """
    elem = root[elem_path]
    if isinstance(elem, zarr.Array):
        return "array", {"": elem}
    enc = elem.attrs.get("encoding-type")
    if enc in ("csr_matrix", "csc_matrix"):
        return enc, {name: elem[name] for name in _SPARSE_ARRAYS}
    raise TypeError(f"{elem_path} has encoding {enc!r}; expected a dense array or a CSR/CSC matrix")


def _grid(arr: Any) -> list[int]:
    # The storage unit: the chunk, or the shard of a sharded v3 array.
    return [int(c) for c in arr.metadata.chunk_grid.chunk_shape]


def _array_record(arr: Any, array_dir: str) -> dict[str, Any]:
    chunks = {}
    for key in _stored_keys(array_dir):
        size, crc = _crc32c(os.path.join(array_dir, *key.split("/")))
        chunks[key] = [size, crc]
    return {"zarr_format": int(arr.metadata.zarr_format), "shape": [int(s) for s in arr.shape],
            "grid": _grid(arr), "sharded": arr.shards is not None, "dtype": str(arr.dtype),
            "chunks": chunks}


def new_manifest_id() -> str:
    """A fresh id for :data:`ID_ATTR` (ingest writes it with the element's attributes)."""
    return uuid.uuid4().hex


def record_manifest(store: str | os.PathLike, elem_path: str) -> tuple[dict[str, Any], bool]:
    """Checksum every chunk file of ``elem_path`` and write its manifest (atomically).

    The element's ``kompot_manifest_id`` attribute is reused when present and written
    otherwise; the caller then owns reconsolidating the store's metadata.

    Returns
    -------
    The manifest, and whether the element's attributes were changed.
    """
    path = _local_path(store)
    root = zarr.open_group(store=path, mode="r", use_consolidated=False)
    encoding, arrays = element_arrays(root, elem_path)
    attrs_changed = False
    manifest_id = root[elem_path].attrs.get(ID_ATTR)
    if not isinstance(manifest_id, str):
        manifest_id = new_manifest_id()
        zarr.open_group(store=path, mode="r+", use_consolidated=False)[elem_path].attrs[ID_ATTR] = manifest_id
        attrs_changed = True
    manifest = {
        "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "element": elem_path,
        "encoding": encoding, "id": manifest_id, "checksum": "crc32c",
        "recorded": datetime.now().isoformat(timespec="seconds"),
        "arrays": {name: _array_record(arr, os.path.join(path, elem_path, name) if name else os.path.join(path, elem_path))
                   for name, arr in arrays.items()},
    }
    _write_json_atomic(manifest_path(path, elem_path), manifest)
    return manifest, attrs_changed


# --------------------------------------------------------------------------------------
# Checks on tile reads (workers)


def _chunk_ids(sel: slice | np.ndarray | tuple[int, int], n: int, c: int) -> list[int]:
    if isinstance(sel, tuple):
        lo, hi = sel
    elif isinstance(sel, slice):
        lo, hi, step = sel.indices(n)
        if step != 1:
            idx = np.arange(lo, hi, step)
            return np.unique(idx // c).tolist()
    else:
        idx = np.asarray(sel, dtype=np.int64)
        return np.unique(idx // c).tolist() if idx.size else []
    if hi <= lo:
        return []
    return list(range(lo // c, (hi - 1) // c + 1))


_logged_off: set[tuple[str, str]] = set()
_stores_told: set[str] = set()


def _same_layout(manifest: dict[str, Any], arrays: dict[str, Any]) -> bool:
    recs = manifest.get("arrays", {})
    return set(recs) == set(arrays) and all(
        recs[name].get("shape") == [int(s) for s in arr.shape] and recs[name].get("grid") == _grid(arr)
        for name, arr in arrays.items()
    )


class ChunkGuard:
    """Checks the chunk files a tile read touches against the element's manifest.

    Built once per process and element (see :func:`guard_for`); a chunk key is checked
    (one ``stat``, never a checksum) when a read touches it, then trusted for
    :data:`CHECK_TTL_SECONDS`.
    """

    def __init__(self, store: str, elem_path: str, manifest: dict[str, Any] | None, arrays: dict[str, Any],
                 element_id: Any):
        self.store = store
        self.elem_path = elem_path
        self.arrays = arrays
        self.manifest = None
        if manifest is None:
            self._log_off(logging.INFO, "it has no chunk manifest")
        elif manifest.get("id") != element_id:
            self._log_off(logging.WARNING, "its chunk manifest is stale (the element was rewritten after "
                                           "the manifest was recorded)")
        elif not _same_layout(manifest, arrays):
            self._log_off(logging.WARNING, "its chunk manifest is stale (the element's shape or chunking "
                                           "changed after the manifest was recorded)")
        else:
            self.manifest = manifest
        self._checked: dict[tuple[str, str], float] = {}

    def _log_off(self, level: int, why: str) -> None:
        if (self.store, self.elem_path) in _logged_off:
            return
        _logged_off.add((self.store, self.elem_path))
        if level == logging.INFO:  # no manifest: said once per store (every element is alike)
            if self.store in _stores_told:
                logger.debug("Integrity checks are off for %s of %s: %s", self.elem_path, self.store, why)
                return
            _stores_told.add(self.store)
        if "://" in self.store and not self.store.startswith("file://"):
            logger.log(level, "Integrity checks are off for %s of the remote store %s: %s (chunk manifests are "
                       "checked on file-system stores only); a missing chunk object would read as zeros.",
                       self.elem_path, self.store, why)
            return
        logger.log(level, "Integrity checks are off for %s of %s: %s, so a missing chunk file would read as "
                   "zeros. Turn them on with `kompot-dask verify %s --record` (or kompot_dask.verify(store, "
                   "record=True)).", self.elem_path, self.store, why, self.store)

    def touched(self, array: str, region: Sequence[slice | np.ndarray | tuple[int, int]]) -> list[tuple[tuple[int, ...], str]]:
        """(chunk coordinates, key) of every storage chunk that ``region`` of ``array`` touches."""
        arr = self.arrays[array]
        grid = _grid(arr)
        per_dim = [_chunk_ids(sel, n, c) for sel, n, c in zip(region, arr.shape, grid, strict=True)]
        encode = arr.metadata.encode_chunk_key
        return [(coords, encode(coords)) for coords in itertools.product(*per_dim)]

    def check(self, array: str, touched: Iterable[tuple[tuple[int, ...], str]]) -> None:
        """Raise :class:`StoreIntegrityError` if a touched chunk that the manifest lists is
        absent or has another size, or one it does not list (written as empty) exists."""
        if self.manifest is None:
            return
        listed = self.manifest["arrays"][array]["chunks"]
        base = os.path.join(self.store, self.elem_path, array) if array else os.path.join(self.store, self.elem_path)
        now = time.monotonic()
        for _, key in touched:
            if now - self._checked.get((array, key), -np.inf) < CHECK_TTL_SECONDS:
                continue
            full = os.path.join(base, *key.split("/"))
            try:
                size = os.stat(full).st_size
            except FileNotFoundError:
                size = None
            expected = listed.get(key)
            if expected is None:
                if size is not None:
                    raise _integrity_error(self.store, self.elem_path, array, key,
                                           f"exists ({size} bytes) but the manifest records it as never written "
                                           "(an all-fill-value chunk): the element changed after the manifest")
            elif size is None:
                raise _integrity_error(self.store, self.elem_path, array, key,
                                       f"is missing (the manifest records {expected[0]} bytes; zarr would "
                                       "have read it as fill values)")
            elif size != expected[0]:
                raise _integrity_error(self.store, self.elem_path, array, key,
                                       f"has {size} bytes, the manifest records {expected[0]} (truncated or "
                                       "overwritten)")
            self._checked[(array, key)] = now

    def diagnose(self, array: str, touched: Iterable[tuple[tuple[int, ...], str]]) -> StoreIntegrityError | None:
        """After a failed read, read the touched chunks one by one; the error naming the
        first that fails to decode, or ``None`` when each reads fine or fails for another
        reason than its content (the failure was not a damaged chunk)."""
        arr = self.arrays[array]
        grid = _grid(arr)
        for coords, key in touched:
            sel = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(coords, grid, arr.shape, strict=True))
            try:
                arr[sel]
            except (OSError, MemoryError):
                return None  # permissions, I/O, memory: the file's content is not to blame
            except Exception as chunk_exc:  # codecs raise many types (blosc, zstd, ValueError, ...)
                detail = " ".join(f"{type(chunk_exc).__name__}: {chunk_exc}".split())
                return _integrity_error(self.store, self.elem_path, array, key,
                                        f"cannot be decoded ({detail}); the file is truncated or corrupt")
        return None


def guard_for(store: str, elem_path: str, element_id: Any, open_arrays: Callable[[], dict[str, Any]]) -> ChunkGuard:
    """The process's :class:`ChunkGuard` of an element, rebuilt when its manifest file or
    the element's manifest id changes; ``open_arrays`` is called only then."""
    path = manifest_path(store, elem_path)
    try:
        st = os.stat(path)
        sig: tuple[int, ...] | None = (st.st_ino, st.st_size, st.st_mtime_ns)
    except FileNotFoundError:
        sig = None
    key = (store, elem_path, sig, element_id)
    guard = _guards.get(key)
    if guard is None:
        manifest = read_manifest(store, elem_path) if sig else None
        guard = ChunkGuard(store, elem_path, manifest, open_arrays(), element_id)
        if len(_guards) > 64:
            _guards.clear()
        _guards[key] = guard
    return guard


_guards: dict[tuple[Any, ...], ChunkGuard] = {}


def clear_guards() -> None:
    """Forget the checked chunks (after the store's tree changed)."""
    _guards.clear()


# --------------------------------------------------------------------------------------
# verify


@dataclass(frozen=True)
class ChunkProblem:
    """One damaged chunk file."""

    element: str
    array: str
    key: str
    problem: str
    """``"missing"``, ``"size"``, ``"checksum"`` or ``"unexpected"`` (not in the manifest)."""
    detail: str


@dataclass
class ElementReport:
    """What :func:`verify` found for one expression element."""

    element: str
    status: str
    """``"ok"``, ``"damaged"``, ``"no manifest"``, ``"stale manifest"`` or ``"recorded"``."""
    n_chunks: int = 0
    problems: list[ChunkProblem] = field(default_factory=list)


@dataclass(frozen=True)
class RunProblem:
    """A field that a run record says is in the store but is not."""

    run_id: int
    location: str
    name: str
    status: str
    detail: str


@dataclass
class VerifyReport:
    """The result of :func:`verify`: chunk checks per expression element and the run
    history's fields."""

    store: str
    elements: list[ElementReport] = field(default_factory=list)
    runs_checked: int = 0
    run_problems: list[RunProblem] = field(default_factory=list)
    orphan_manifests: list[str] = field(default_factory=list)
    """Manifests of elements that are no longer in the store (removed by cleanup)."""

    @property
    def damaged(self) -> list[ElementReport]:
        return [e for e in self.elements if e.status == "damaged"]

    @property
    def unverifiable(self) -> list[ElementReport]:
        return [e for e in self.elements if e.status in ("no manifest", "stale manifest")]

    @property
    def ok(self) -> bool:
        """No damaged chunk and no run-history inconsistency (elements without a manifest
        cannot be checked and do not count; see :attr:`unverifiable`)."""
        return not self.damaged and not self.run_problems

    def summary(self) -> str:
        """One line: the verdict and the counts."""
        n_bad = sum(len(e.problems) for e in self.damaged)
        parts = [f"{len(self.elements)} expression element(s)"]
        if self.damaged:
            parts.append(f"{n_bad} damaged chunk(s) in {', '.join(e.element for e in self.damaged)}")
        if self.unverifiable:
            parts.append(f"{len(self.unverifiable)} not verifiable")
        parts.append(f"{self.runs_checked} run(s), {len(self.run_problems)} inconsistent field(s)")
        verdict = "OK" if self.ok else "DAMAGED"
        return f"{verdict}: {self.store}: " + "; ".join(parts)

    def __str__(self) -> str:
        lines = [f"Store {self.store}"]
        for e in self.elements:
            if e.status == "ok":
                lines.append(f"  {e.element}: ok ({e.n_chunks} chunk file(s) match the manifest)")
            elif e.status == "recorded":
                lines.append(f"  {e.element}: manifest recorded ({e.n_chunks} chunk file(s))")
            elif e.status == "damaged":
                lines.append(f"  {e.element}: DAMAGED, {len(e.problems)} of {e.n_chunks} chunk file(s):")
                lines += [f"    {p.array + '/' if p.array else ''}{p.key}: {p.detail}" for p in e.problems]
            else:
                why = "no manifest" if e.status == "no manifest" else "stale manifest: the element was rewritten"
                lines.append(f"  {e.element}: not verifiable ({why}): run `kompot-dask verify {self.store} --record`")
        for m in self.orphan_manifests:
            lines.append(f"  manifest of {m}: the element is no longer in the store (ignored)")
        if self.run_problems:
            lines.append(f"  run history: {len(self.run_problems)} inconsistent field(s):")
            lines += [f"    run {p.run_id}: {p.location}/{p.name}: {p.detail}" for p in self.run_problems]
        else:
            lines.append(f"  run history: {self.runs_checked} run(s), every field they last wrote is present")
        if self.damaged:
            lines.append(f"  {FIX.replace('STORE', self.store)}")
        lines.append(self.summary())
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "store": self.store, "ok": self.ok, "summary": self.summary(),
            "elements": [{"element": e.element, "status": e.status, "n_chunks": e.n_chunks,
                          "problems": [vars(p) for p in e.problems]} for e in self.elements],
            "runs_checked": self.runs_checked, "run_problems": [vars(p) for p in self.run_problems],
            "orphan_manifests": list(self.orphan_manifests),
        }


def expression_elements(handle: StoreHandle) -> list[str]:
    """``"X"`` (when present) and ``"layers/<name>"`` of every layer, staged ones excluded."""
    out = ["X"] if "X" in handle.root else []
    return out + [f"layers/{k}" for k in handle.layer_keys()]


def _check_element(store: str, root: Any, elem_path: str, manifest: dict[str, Any]) -> ElementReport:
    _, arrays = element_arrays(root, elem_path)
    report = ElementReport(elem_path, "ok")
    for name, arr in arrays.items():
        rec = manifest["arrays"].get(name)
        array_dir = os.path.join(store, elem_path, name) if name else os.path.join(store, elem_path)
        if rec is None or rec["shape"] != [int(s) for s in arr.shape] or rec["grid"] != _grid(arr):
            # same id but another layout: written into after recording, not damaged on disk
            report.problems.append(ChunkProblem(elem_path, name, "", "layout",
                                                "shape or chunking differs from the manifest"))
            continue
        listed = rec["chunks"]
        report.n_chunks += len(listed)
        for key, (size, crc) in sorted(listed.items()):
            full = os.path.join(array_dir, *key.split("/"))
            if not os.path.exists(full):
                report.problems.append(ChunkProblem(elem_path, name, key, "missing", f"missing (recorded {size} bytes)"))
                continue
            found_size, found_crc = _crc32c(full)
            if found_size != size:
                report.problems.append(ChunkProblem(elem_path, name, key, "size",
                                                    f"{found_size} bytes, recorded {size} (truncated or overwritten)"))
            elif found_crc != crc:
                report.problems.append(ChunkProblem(elem_path, name, key, "checksum",
                                                    f"CRC32C {found_crc}, recorded {crc} (corrupt content)"))
        for key in _stored_keys(array_dir):
            if key not in listed:
                report.problems.append(ChunkProblem(elem_path, name, key, "unexpected",
                                                    "present but not in the manifest (written after recording)"))
    if report.problems:
        report.status = "damaged"
    return report


def _reconsolidate(path: str) -> None:
    from .commit import write_consolidated

    write_consolidated(path)  # atomically: readers never see a torn index


def _is_consolidated(handle: StoreHandle) -> bool:
    if handle.zarr_format == 2:
        return os.path.exists(os.path.join(handle.path, ".zmetadata"))
    with open(os.path.join(handle.path, "zarr.json"), encoding="utf-8") as fh:
        return json.load(fh).get("consolidated_metadata") is not None


def verify_elements(store: str | os.PathLike, record: bool = False) -> VerifyReport:
    """The chunk half of :func:`kompot_dask._runs.verify.verify` (which documents the
    arguments): each expression element against its chunk manifest."""
    handle = StoreHandle(store)
    path = handle.path
    report = VerifyReport(path)
    root = zarr.open_group(store=path, mode="r", use_consolidated=False)
    elements = expression_elements(handle)
    to_record = []
    for elem_path in elements:
        manifest = read_manifest(path, elem_path)
        element_id = root[elem_path].attrs.get(ID_ATTR)
        if manifest is None or manifest.get("id") != element_id:
            status = "no manifest" if manifest is None else "stale manifest"
            report.elements.append(ElementReport(elem_path, status))
            to_record.append(elem_path)
            continue
        report.elements.append(_check_element(path, root, elem_path, manifest))
    manifest_dir = os.path.join(path, MANIFEST_DIR)
    if os.path.isdir(manifest_dir):
        known = {os.path.basename(manifest_path(path, e)) for e in elements}
        report.orphan_manifests = sorted(urllib.parse.unquote(n[: -len(".json")]) for n in os.listdir(manifest_dir)
                                         if n.endswith(".json") and n not in known)
    if record and (to_record or report.orphan_manifests):
        from .lease import store_lock

        handle.check_writable()
        with store_lock(path, "kompot_dask.verify --record"):
            consolidated = _is_consolidated(handle)
            attrs_changed = False
            for e in report.elements:
                if e.element in to_record:
                    manifest, changed = record_manifest(path, e.element)
                    attrs_changed |= changed
                    e.status = "recorded"
                    e.n_chunks = sum(len(a["chunks"]) for a in manifest["arrays"].values())
            for orphan in report.orphan_manifests:
                os.remove(manifest_path(path, orphan))
            report.orphan_manifests = []
            if attrs_changed and consolidated:
                _reconsolidate(path)
        clear_guards()
    return report

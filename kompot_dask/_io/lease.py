"""A lease on a zarr store, so that two writers never interleave on the same store.

The lease is a small JSON file ``.kompot_lock`` at the store root, created atomically
(``O_CREAT | O_EXCL``). It names the holder (host, process id, user, what it is doing,
since when). A lease left behind by a process that died on this host is taken over; one
held by another host is refused, with the file's path so a user who knows it is stale can
remove it.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime

import psutil

LOCK_NAME = ".kompot_lock"


class StoreLockedError(RuntimeError):
    """Another kompot_dask process is writing to the store."""


def _holder(purpose: str) -> dict:
    try:
        user = getpass.getuser()
    except Exception:  # no passwd entry in some containers
        user = "unknown"
    return {
        "host": socket.gethostname(), "pid": os.getpid(), "user": user,
        "purpose": purpose, "since": datetime.now().isoformat(timespec="seconds"),
    }


def _read(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def _is_stale(holder: dict | None) -> bool:
    """A lease is stale when its process is gone from this host."""
    if holder is None:
        return False  # being written right now, or unreadable: do not guess
    if holder.get("host") != socket.gethostname():
        return False
    pid = holder.get("pid")
    return not isinstance(pid, int) or not psutil.pid_exists(pid)


def lock_holder(store_path: str) -> dict | None:
    """Who holds the lease on ``store_path`` (``None`` when nobody does)."""
    return _read(os.path.join(store_path, LOCK_NAME))


@contextmanager
def store_lock(store_path: str, purpose: str) -> Iterator[dict]:
    """Hold the store's lease for the body of the ``with`` block.

    Raises :class:`StoreLockedError` when another live process holds it.
    """
    path = os.path.join(store_path, LOCK_NAME)
    me = _holder(purpose)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read(path)
            if _is_stale(holder):
                try:
                    os.remove(path)
                except FileNotFoundError:
                    pass
                continue
            who = (
                f"{holder.get('purpose')} by {holder.get('user')} on {holder.get('host')} "
                f"(pid {holder.get('pid')}, since {holder.get('since')})" if holder else "another process"
            )
            raise StoreLockedError(
                f"the store {store_path} is being written by {who}. Wait for that run to finish; "
                f"if you are sure it is no longer running, delete {path} and try again."
            ) from None
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(me, fh)
        break
    else:  # pragma: no cover - two takeovers raced and the other won
        raise StoreLockedError(f"could not take the lease {path}; another process took it first")
    try:
        yield me
    finally:
        current = _read(path)
        if current is not None and current.get("pid") == me["pid"] and current.get("host") == me["host"]:
            try:
                os.remove(path)
            except FileNotFoundError:
                pass

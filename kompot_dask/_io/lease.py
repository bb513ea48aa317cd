"""One writer per store: a lease held for the whole of ``de()`` / ``cleanup()``.

The lease is filelock's :class:`~filelock.SoftFileLease`, a marker file ``.kompot_lock`` at
the store root that names its holder (host, pid) and that the holder refreshes from a
heartbeat thread. Another process on the same host takes over the lease of a dead holder at
once; a process on another host (a shared file system) takes it over once it has not been
refreshed for :data:`LEASE_SECONDS`. Taking the lease also finishes whatever a dead holder
left: an interrupted commit is rolled forward and dead staging is swept
(:func:`kompot_dask._io.commit.recover`).
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime

import filelock
import psutil

from . import commit

LOCK_NAME = ".kompot_lock"
HOLDER_NAME = f"{commit.KOMPOT_DIR}/holder.json"
LEASE_SECONDS = float(os.environ.get("KOMPOT_DASK_LEASE_SECONDS", "120"))
"""How long a lease may go unrefreshed before a process on another host may take it."""
_UNREADABLE_GRACE_S = 10.0
"""A marker with no holder record older than this was left by a writer that failed
(for example on a full disk): it is removed instead of blocking every later run."""


class StoreLockedError(RuntimeError):
    """Another kompot_dask process is writing to the store."""


def _me(purpose: str) -> dict:
    try:
        user = getpass.getuser()
    except Exception:  # no passwd entry in some containers
        user = "unknown"
    return {"host": socket.gethostname(), "pid": os.getpid(), "user": user, "purpose": purpose,
            "since": datetime.now().isoformat(timespec="seconds")}


def _marker_record(path: str) -> dict | None:
    """host/pid from filelock's marker, or None when it holds no record."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError:
        return None
    fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    if "pid" not in fields:
        return None
    return {"host": fields.get("host"), "pid": int(fields["pid"]) if fields["pid"].isdigit() else fields["pid"]}


def _is_stale(marker: dict, path: str) -> bool:
    """The holder died on this host, or has not refreshed the lease for too long."""
    if marker.get("host") == socket.gethostname():
        pid = marker.get("pid")
        return not isinstance(pid, int) or not psutil.pid_exists(pid)
    try:
        return time.time() - os.stat(path).st_mtime > LEASE_SECONDS
    except FileNotFoundError:
        return True


def lock_holder(store_path: str) -> dict | None:
    """Who holds the lease on ``store_path`` (``None`` when nobody does, or when the
    holder is gone and the lease will be taken over)."""
    path = os.path.join(store_path, LOCK_NAME)
    marker = _marker_record(path)
    if marker is None or _is_stale(marker, path):
        return None
    try:
        with open(os.path.join(store_path, HOLDER_NAME), encoding="utf-8") as fh:
            extra = json.load(fh)
    except (OSError, ValueError):
        extra = {}
    if extra.get("pid") == marker.get("pid") and extra.get("host") == marker.get("host"):
        return {**extra, **marker}
    return marker


def _legacy_is_stale(path: str) -> bool:
    """A JSON lease of kompot_dask < 0.2 whose process is gone from this host."""
    try:
        with open(path, encoding="utf-8") as fh:
            holder = json.load(fh)
    except (OSError, ValueError):
        return False
    if not isinstance(holder, dict) or holder.get("host") != socket.gethostname():
        return False
    pid = holder.get("pid")
    return not isinstance(pid, int) or not psutil.pid_exists(pid)


def _remove_unreadable_marker(path: str) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if _marker_record(path) is None and (_legacy_is_stale(path) or time.time() - st.st_mtime > _UNREADABLE_GRACE_S):
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


@contextmanager
def store_lock(store_path: str, purpose: str, *, recover: bool = True) -> Iterator[dict]:
    """Hold the store's lease for the body of the ``with`` block.

    Raises :class:`StoreLockedError` when another live process holds it. With ``recover``,
    an interrupted commit of a dead holder is completed before the body runs.
    """
    from .store import _local_path

    _local_path(store_path)  # a remote store is never written: refused with the fix
    path = os.path.join(store_path, LOCK_NAME)
    _remove_unreadable_marker(path)
    lease = filelock.SoftFileLease(path, lease_duration=LEASE_SECONDS, timeout=0)
    try:
        lease.acquire()
    except filelock.Timeout:
        holder = lock_holder(store_path)
        who = (
            f"{holder.get('purpose', 'a kompot_dask run')} by {holder.get('user', 'unknown user')} on "
            f"{holder.get('host')} (pid {holder.get('pid')}, since {holder.get('since', '?')})"
            if holder else "another process"
        )
        raise StoreLockedError(
            f"the store {store_path} is being written by {who}. Wait for that run to finish; a "
            f"lease that is no longer refreshed is taken over automatically after {LEASE_SECONDS:.0f} s "
            f"(at once when its process died on this host). The lease file is {path}."
        ) from None
    me = _me(purpose)
    try:
        try:
            os.makedirs(os.path.join(store_path, commit.KOMPOT_DIR), exist_ok=True)
            commit.write_atomic(os.path.join(store_path, HOLDER_NAME), json.dumps(me).encode())
        except OSError:
            pass  # only informational (who holds it); a full disk must not block the run here
        if recover:
            commit.recover(store_path)
        yield me
    finally:
        try:
            os.remove(os.path.join(store_path, HOLDER_NAME))
        except OSError:
            pass
        commit.prune_empty(store_path)
        lease.release()

"""One run at a time per output: a lease file that works on a disk and in an object store.

Two ingests into one `output_dir`, or two workflows on one `work_dir`, would interleave their markers and parts.
A run holds `<directory>/_lease.json` (host, pid, start, heartbeat) while it works, a thread renews the heartbeat,
and the run removes the file when it ends. A second run that finds a live lease is refused in one line. A lease is
taken over when its holder is gone: a process of this host that no longer exists, or a heartbeat older than
STALE_AFTER_S (a killed run on another machine, which cannot renew it).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator

from upath import UPath

from components import storage

LEASE = "_lease.json"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 180.0  # six missed heartbeats


class LeaseError(RuntimeError):
    """Another live run holds the directory; the message says which, in one line."""


def _holder_gone(lease: dict, now: float) -> bool:
    if now - lease.get("heartbeat", 0) > STALE_AFTER_S:
        return True
    if lease.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(lease["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@contextlib.contextmanager
def held(directory: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold `directory`'s lease while the block runs (see the module docstring); `what` names the run in the
    message another run gets ("ingest", "workflow")."""
    path = UPath(directory) / LEASE
    if path.exists():
        lease = json.loads(path.read_text())
        if not _holder_gone(lease, time.time()):
            raise LeaseError(f"{directory} is in use by another {lease.get('what', 'run')} (pid {lease['pid']} on "
                             f"{lease['host']}, since {time.ctime(lease['started'])}); wait for it, or stop it")
    token = uuid.uuid4().hex
    lease = {"what": what, "host": socket.gethostname(), "pid": os.getpid(), "token": token,
             "started": time.time(), "heartbeat": time.time()}
    UPath(directory).mkdir(parents=True, exist_ok=True)
    storage.write_text(path, json.dumps(lease))
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(HEARTBEAT_S):
            storage.write_text(path, json.dumps({**lease, "heartbeat": time.time()}))

    heartbeat = threading.Thread(target=renew, name="clipforge-lease", daemon=True)
    heartbeat.start()
    try:
        yield
    finally:
        stop.set()
        heartbeat.join()
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            if json.loads(path.read_text()).get("token") == token:  # never remove a lease taken over from us
                path.unlink()

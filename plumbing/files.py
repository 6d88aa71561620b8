"""Files a run writes and folders it holds: every write atomic (a temporary file and a rename), checkpoints
read safely, OS locks."""
import contextlib
import io
import json
import os
from pathlib import Path

import torch

from plumbing.distributed import rank
from plumbing.session import session, where_the_run_stands


def write_atomic(path, content):
    """Write `content` (bytes) to `path` through a temporary file and a rename, the one way a run writes
    its files: a run killed mid-write or a full disk never leaves a half-written file, the previous version
    stays intact until the new one is complete, and no temporary file is left. An OS error (no space left
    on the device, permission denied) is one line naming the file, the cause and where the run stands.
    Under torchrun only rank 0 writes."""
    if rank() != 0:
        return
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(content)
        os.replace(tmp, path)
    except OSError as error:
        raise SystemExit(f"error: cannot write {path} ({error.strerror or error}); "
                         f"{where_the_run_stands()}") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def save_atomic(obj, path):
    """torch.save through write_atomic (serialised in memory first, so a full disk is an OSError)."""
    if rank() != 0:
        return
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_atomic(path, buffer.getbuffer())


def save_json(obj, path):
    write_atomic(path, (json.dumps(obj, indent=1, default=str) + "\n").encode())


def load_checkpoint(path, device="cpu", mmap=False):
    """A resumable checkpoint.pt, loaded safely (weights_only), or one line saying the file is unreadable.
    mmap: map the tensors instead of reading them (for a look at the identity)."""
    try:
        return torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except Exception as error:  # torch's own message would suggest weights_only=False: never show it
        raise SystemExit(f"error: {path} is unreadable ({type(error).__name__}: truncated, corrupt or not a "
                         f"checkpoint of this code); nothing was changed. Delete it to restart that run from "
                         f"scratch, or choose another --out-dir") from None


class FileLock:
    """An OS lock (flock) on a file: held until release() or the process exits (on any exit, kill -9
    included)."""

    def __init__(self, path):
        self.path, self.handle = Path(path), None

    def acquire(self, wait=False):
        """Whether this process holds the lock now; with wait, once another process releases it."""
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks here
            return True
        self.handle = open(self.path, "a")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError:
            self.release()
            return False
        return True

    def release(self):
        if self.handle:
            self.handle.close()
            self.handle = None


def lock_dir(path, what):
    """Hold an OS lock on path/.lock until this process exits; one line and exit 1 if another process holds
    it. Folders inside one this process holds are not locked again."""
    path = Path(path).resolve()
    if any(locked == path or locked in path.parents for locked in session.folder_locks):
        return
    lock = FileLock(path / ".lock")
    if not lock.acquire():
        raise SystemExit(f"error: another process is using {what} {path} (it holds {path / '.lock'}); wait "
                         f"for it to finish, or choose another folder")
    session.folder_locks[path] = lock


def ensure_writable(path, what):
    """Create `path` and write a file in it, or one line naming the folder."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise SystemExit(f"error: cannot write to {what} {path} ({type(error).__name__}: "
                         f"{error.strerror or error}); nothing was run") from None

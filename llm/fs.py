"""One filesystem layer for run directories: local paths and object stores (`gs://`, `s3://`)
alike, through etils.epath (the layer Orbax and grain use).

Object stores have no append and no locks. Files a run appends to (metrics.jsonl, TensorBoard
events) are written to a local mirror and uploaded whole by `Mirror.sync` (every `every_s`
seconds and at the end: a hard kill loses at most that much of the log, never a checkpoint);
a resumed run first downloads them to append after. A gs:// workdir is not locked (see
WorkdirLock): do not start two runs on one bucket path.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

from etils import epath


def is_remote(path: str) -> bool:
    return "://" in str(path)


def absolute(path: str) -> str:
    """os.path.abspath for local paths; a URI unchanged (abspath would make gs://b into ./gs:/b)."""
    return str(path) if is_remote(path) else os.path.abspath(path)


def join(*parts: str) -> str:
    return str(epath.Path(*parts)) if is_remote(parts[0]) else os.path.join(*parts)


def exists(path: str) -> bool:
    return epath.Path(path).exists()


def isdir(path: str) -> bool:
    return epath.Path(path).is_dir()


def makedirs(path: str) -> None:
    epath.Path(path).mkdir(parents=True, exist_ok=True)


def read_text(path: str) -> str:
    return epath.Path(path).read_text()


def write_text(path: str, text: str) -> None:
    """Whole-file write; locally through a temporary file and a rename (never half a file)."""
    if is_remote(path):
        epath.Path(path).write_text(text)
        return
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def copy_tree(src: str, dst: str) -> None:
    """Every file under src to the same relative place under dst (either side local or remote)."""
    s, d = epath.Path(src), epath.Path(dst)
    if s.is_dir():
        d.mkdir(parents=True, exist_ok=True)
        for child in s.iterdir():
            copy_tree(str(child), str(d / child.name))
    else:
        d.write_bytes(s.read_bytes())


class Mirror:
    """Local copies of some entries of a run directory, uploaded by `sync`. For a local run
    directory the mirror is the directory itself and `sync` does nothing."""

    def __init__(self, directory: str, names: tuple[str, ...], every_s: float = 60.0):
        self.remote = directory if is_remote(directory) else None
        self.names, self.every_s, self.last = names, every_s, 0.0
        if self.remote is None:
            self.local = directory
            os.makedirs(directory, exist_ok=True)
            return
        self.local = tempfile.mkdtemp(prefix="llm-run-")
        for n in names:  # a resumed run appends after what is there
            if epath.Path(self.remote, n).exists():
                copy_tree(str(epath.Path(self.remote, n)), os.path.join(self.local, n))
        self.last = time.monotonic()

    def path(self, name: str) -> str:
        return os.path.join(self.local, name)

    def sync(self, force: bool = False) -> None:
        if self.remote is None or (not force and time.monotonic() - self.last < self.every_s):
            return
        for n in self.names:
            if os.path.exists(self.path(n)):
                copy_tree(self.path(n), str(epath.Path(self.remote, n)))
        self.last = time.monotonic()

    def close(self) -> None:
        if self.remote is not None:
            self.sync(force=True)
            shutil.rmtree(self.local, ignore_errors=True)

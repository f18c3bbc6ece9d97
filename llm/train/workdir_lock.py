"""An exclusive lock on a run directory, so two runs never write the same checkpoints."""

from __future__ import annotations

import fcntl
import os

from llm.registry import ConfigError


class WorkdirLock:
    """flock on <workdir>/.lock, held for the life of the run; the OS drops it if the process dies.
    The file names the holder's pid while held and is emptied when the run ends."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, ".lock")
        self.f = None

    def __enter__(self) -> WorkdirLock:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.f = open(self.path, "a+")
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.f.seek(0)
            holder = self.f.read().strip() or "unknown"
            self.f.close()
            raise ConfigError(
                f"another run (pid {holder}) is using {os.path.dirname(self.path)}; wait for it to "
                f"finish, stop it, or choose another --workdir"
            ) from None
        self.f.seek(0)
        self.f.truncate()
        self.f.write(str(os.getpid()))
        self.f.flush()
        return self

    def __exit__(self, *exc) -> None:
        if self.f is not None:
            self.f.truncate(0)  # no pid left behind: an empty .lock is a free workdir
            self.f.flush()
            fcntl.flock(self.f, fcntl.LOCK_UN)
            self.f.close()

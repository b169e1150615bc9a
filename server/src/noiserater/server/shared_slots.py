"""Run slots shared by the worker processes of one server (`--workers`), so that `--instances` counts the
onnxruntime runs of a model version in flight over all workers, as Triton's instance count does over its one
process. A worker that gets more connections than another (the kernel spreads connections, not requests)
can then use the slots the other leaves idle.

A slot is an exclusive lock (flock) on one of `instances` files per model version in a directory that the
supervisor makes; the kernel releases a dead worker's locks. A worker takes a slot before it forms a batch
(so requests keep joining the batch while it waits) and frees it when the run has finished. Waiting polls
every POLL_S: it happens only while every slot is running a batch, which takes longer than that.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
from pathlib import Path

POLL_S = 0.0005
_directory: Path | None = None  # set once in a worker process (configure); None: slots are per process


def configure(directory: Path | None) -> None:
    global _directory
    _directory = directory


class SharedSlots:
    def __init__(self, directory: Path, labels: tuple[str, str], count: int):
        name, version = labels
        self._fds = [os.open(directory / f"{name}.{version}.{i}.lock", os.O_RDWR | os.O_CREAT, 0o600)
                     for i in range(max(1, count))]
        self._held: set[int] = set()  # a lock this process holds would be granted to it again: skip those

    def _try(self) -> int | None:
        for index, fd in enumerate(self._fds):
            if index in self._held:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            self._held.add(index)
            return index
        return None

    async def acquire(self) -> int:
        """A free slot's index, once one is free."""
        while (index := self._try()) is None:
            await asyncio.sleep(POLL_S)
        return index

    def release(self, index: int) -> None:
        self._held.discard(index)
        fcntl.flock(self._fds[index], fcntl.LOCK_UN)

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds, self._held = [], set()


def shared_slots(labels: tuple[str, str], count: int) -> SharedSlots | None:
    """The model version's slots shared with the other workers; None outside a worker."""
    return SharedSlots(_directory, labels, count) if _directory is not None else None

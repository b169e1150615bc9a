"""Run slots shared by the worker processes of one server (`--workers`), so that `--instances` counts the
onnxruntime runs of a model version in flight over all workers, as Triton's instance count does over its one
process. A worker that gets more connections than another (the kernel spreads connections, not requests)
can then use the slots the other leaves idle.

The slots of a model version are `instances` one-byte tokens in a named pipe (FIFO) in a directory that the
supervisor makes: the worker that creates the pipe puts the tokens in, a worker takes one (a read, which the
kernel gives to one reader only) before it forms a batch, so requests keep joining the batch while it waits,
and puts it back (a write) when the run has finished. Waiting costs nothing: the event loop wakes when the
pipe becomes readable. A worker that dies takes its tokens with it, which is why the supervisor stops the
whole server when one worker exits.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

TOKEN = b"s"
_directory: Path | None = None  # set once in a worker process (configure); None: slots are per process


def configure(directory: Path | None) -> None:
    global _directory
    _directory = directory


class SharedSlots:
    def __init__(self, directory: Path, labels: tuple[str, str], count: int):
        name, version = labels
        path = directory / f"{name}.{version}.slots"
        try:
            os.mkfifo(path, 0o600)
            created = True
        except FileExistsError:
            created = False
        # Read and write ends in one descriptor: opening does not wait for a peer, and an empty pipe reads as
        # EAGAIN (a writer exists), never as end of file.
        self._fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
        if created:
            os.write(self._fd, TOKEN * max(1, count))

    async def acquire(self) -> int:
        """Take a slot, once one is free."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                if os.read(self._fd, 1):
                    return 0
            except BlockingIOError:
                pass
            readable = loop.create_future()
            loop.add_reader(self._fd, _wake, readable)
            try:
                await readable
            finally:
                loop.remove_reader(self._fd)

    def release(self, _slot: int = 0) -> None:
        os.write(self._fd, TOKEN)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _wake(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def shared_slots(labels: tuple[str, str], count: int) -> SharedSlots | None:
    """The model version's slots shared with the other workers; None outside a worker."""
    return SharedSlots(_directory, labels, count) if _directory is not None else None

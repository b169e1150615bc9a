"""A rater server on a background thread with its own event loop, for tests and benchmarks that need a
real server in the same process (the CLI runs it with `rater-server serve` instead)."""

from __future__ import annotations

import asyncio
import shutil
import threading
from pathlib import Path

from noiserater.server.app import RaterServer
from noiserater.server.config import ServerConfig


class ServerThread:
    def __init__(self, config: ServerConfig):
        self.config = config
        self.server: RaterServer | None = None
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="rater-server", daemon=True)
        self.port = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def call(self, coro, timeout: float | None = 60):
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> ServerThread:
        self._thread.start()

        async def _start() -> int:
            self.server = RaterServer(self.config)
            return await self.server.start()

        self.port = self.call(_start())
        return self

    def stop(self, grace: float | None = None) -> None:
        if self.server is not None:
            self.call(self.server.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)
        self.loop.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def make_repository(root: Path, models: dict[str, list[Path]]) -> Path:
    """<root>/<name>/<i+1>/model.onnx for each ONNX file listed under a name."""
    for name, files in models.items():
        for i, source in enumerate(files, start=1):
            target = root / name / str(i) / "model.onnx"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
    return root

"""CPU time per request on both sides of a measurement, from Linux /proc: the load generator (this process)
and, when its pid is known, the server with every process it started (worker processes, Triton's server and
backend stubs)."""

from __future__ import annotations

import os
import time
from pathlib import Path


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """The pids of every living process below `pid` (children, their children, ...)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def tree_cpu_s(pid: int) -> float:
    """CPU seconds of a process and its living descendants."""
    total = 0.0
    for each in (pid, *descendants(pid)):
        try:
            total += process_cpu_s(each)
        except OSError:
            pass
    return total


class CpuMeter:
    """Started at construction; each method reads the CPU spent since then and divides it by `requests`."""

    def __init__(self, server_pid: int | None = None):
        self.server_pid = server_pid
        self._server_s = tree_cpu_s(server_pid) if server_pid else 0.0
        self._client_s = time.process_time()

    def client_us_per_request(self, requests: int) -> float:
        return (time.process_time() - self._client_s) / requests * 1e6

    def server_us_per_request(self, requests: int) -> float:
        if not self.server_pid:
            raise ValueError("no server pid to read the CPU time of")
        return (tree_cpu_s(self.server_pid) - self._server_s) / requests * 1e6

"""Three rater-server processes sharing one repository folder (watched with --repository-poll-s) and one Redis,
as replicas behind one client: a replica killed mid-run costs no selection and the merged statistics stay
exact; a version written into the shared folder reaches every replica, a corrupt one none."""

from __future__ import annotations

import contextlib
import re
import signal
import threading
import time
import urllib.request
from pathlib import Path

import redis
import torch
from support import free_port
from support.hostile import ServerProcess, rater_stub, select_request
from support.server import make_repository

from noiserater.client.selector import NoiseSelector
from noiserater.core import codec, repository
from noiserater.core.v1 import rater_service_pb2 as pb
from noiserater.server.stats import ledger_key

B, K, D = 4, 8, 64  # the selections the clients make: B samples, K candidates each, 64-D data
STOPPED = re.compile(r"rater-server stopped: (\d+) inference requests received, (\d+) answered, (\d+) dropped")


class Replica(ServerProcess):
    """A `rater-server serve` process with --metrics-port, which says who it is in the Redis ledger."""

    def __init__(self, repo: Path, *args: str):
        self.metrics_port = free_port()
        super().__init__(repo, "--metrics-port", str(self.metrics_port), *args)

    @property
    def replica_id(self) -> str:
        found = re.search(r"flushing into Redis as replica (\S+)", self.output)
        assert found, self.output[-2000:]
        return found[1]

    def requests_ok(self, method: str) -> int:
        """OK answers to `method` so far, from /metrics."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as page:
            text = page.read().decode()
        return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
                   if line.startswith("nr_requests_total{") and f'method="{method}"' in line and 'code="OK"' in line)

    def answered(self) -> tuple[int, int]:
        """(inference requests answered, dropped), as printed once the process has stopped."""
        found = STOPPED.search(self.wait_output())
        assert found, self.output[-2000:]
        return int(found[2]), int(found[3])


@contextlib.contextmanager
def replicas(repo: Path, *args: str, count: int = 3):
    with contextlib.ExitStack() as stack:
        started = [stack.enter_context(Replica(repo, "--repository-poll-s", "1", *args)) for _ in range(count)]
        for replica in started:
            replica.wait_serving()
        yield started


def wait_until(condition, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout:g} s for {what}"
        time.sleep(0.05)


class Drivers:
    """Threads that select through one selector each, back to back, until stopped; any exception is kept."""

    def __init__(self, selectors: list[NoiseSelector], batch: int = B):
        self.selectors, self.batch = selectors, batch
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._drive, args=(selector, i), daemon=True)
                         for i, selector in enumerate(selectors)]

    def _drive(self, selector: NoiseSelector, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        try:
            while not self._stop.is_set():
                x0, t = torch.randn(self.batch, D, generator=gen), torch.randint(0, 100, (self.batch,), generator=gen)
                assert selector.select(x0, t).shape == x0.shape
        except BaseException as exc:
            self.errors.append(exc)

    def served(self) -> int:
        return sum(s.counters["served"] for s in set(self.selectors))

    def __enter__(self) -> Drivers:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)


def assert_no_failed_selection(drivers: Drivers) -> None:
    assert not drivers.errors, drivers.errors
    for selector in set(drivers.selectors):
        counters = selector.counters
        assert counters["fallback_local"] == counters["fallback_gaussian"] == counters["outages"] == 0, counters
        assert counters["served"] == counters["requests"] == counters["selections"] > 0, counters


def test_a_replica_killed_mid_run_costs_no_selection_and_the_merged_statistics_stay_exact(tmp_path, rater_onnx,
                                                                                         redis_url):
    """Six threads select through two selectors over the three replicas (one unary, balanced over all three; one
    over the default stream, which goes to one replica at a time); the replica carrying the stream is killed
    (SIGKILL) once it has flushed statistics, and selecting goes on on the survivors, which are then stopped.

    What the merged statistics must be, exactly: every flush is applied once, so the Redis buckets hold the sum
    of what the three replicas' ledgers say they merged; a survivor (stopped gracefully, so its last flush went
    out) merged exactly the B x K scores of each request it answered. The killed replica merged what it flushed
    before it died: whole requests, some of those it answered (the last half second's were lost with it) and
    perhaps requests it scored whose answers it never sent (the clients retried those on a survivor), at most
    one per thread. So, against what the clients were answered, the totals differ by at most those two."""
    repo = make_repository(tmp_path / "repo", {"digits": [rater_onnx]})
    dataset = "replicas-kill"
    store = redis.Redis.from_url(redis_url)
    with replicas(repo, "--redis-url", redis_url) as servers:
        targets = [s.target for s in servers]
        unary = NoiseSelector.remote(targets, model="digits", dataset=dataset, num_candidates=K, transport="unary",
                                     timeout_s=30, data_shape=D)
        stream = NoiseSelector.remote(",".join(targets), model="digits", dataset=dataset, num_candidates=K,
                                      timeout_s=30, data_shape=D)
        with unary, stream, Drivers([unary] * 4 + [stream] * 2) as drivers:
            wait_until(lambda: drivers.served() >= 150 or drivers.errors, "150 selections")
            victim = next(s for s in servers if s.requests_ok("SelectNoiseStream") > 0)
            victim_id = victim.replica_id
            wait_until(lambda: int(store.hget(ledger_key(victim_id), "scores") or 0) > 0, "a flush of the victim")
            victim.signal(signal.SIGKILL)
            assert victim.wait_exit(30) == -signal.SIGKILL
            served_at_kill = drivers.served()
            wait_until(lambda: drivers.served() >= served_at_kill + 150 or drivers.errors, "150 more selections")
        assert_no_failed_selection(drivers)
        served = drivers.served()
        survivors = [s for s in servers if s is not victim]
        for survivor in survivors:
            assert survivor.stop() == 0, survivor.output[-2000:]

        per_request = B * K
        merged = {s.replica_id: int(store.hget(ledger_key(s.replica_id), "scores") or 0) for s in servers}
        buckets = [store.hgetall(key) for key in store.scan_iter(match=f"nr:stats:{dataset}:digits:1:*")]
        in_redis = sum(int(b[b"count"]) for b in buckets)
        assert in_redis == sum(merged.values()), (in_redis, merged)
        answered = {}
        for survivor in survivors:
            answered[survivor.replica_id], dropped = survivor.answered()
            assert dropped == 0
            assert answered[survivor.replica_id] > 0  # the survivors took the load
            assert merged[survivor.replica_id] == answered[survivor.replica_id] * per_request
        answered_by_victim = served - sum(answered.values())
        assert answered_by_victim > 0
        flushed_by_victim = merged[victim_id]
        assert flushed_by_victim > 0 and flushed_by_victim % per_request == 0
        assert flushed_by_victim <= (answered_by_victim + len(drivers.selectors)) * per_request
        assert served * per_request - answered_by_victim * per_request <= in_redis
        assert in_redis <= (served + len(drivers.selectors)) * per_request


def default_version(server: Replica) -> tuple[int, list[int]]:
    """(default version, loaded versions) of `digits` on the server."""
    with server.channel() as channel:
        listing = rater_stub(channel).ListModels(pb.ListModelsRequest(), timeout=10)
    (model,) = [m for m in listing.models if m.name == "digits"]
    return model.default_version, [v.version for v in model.versions]


def serving_version(server: Replica) -> int:
    with server.channel() as channel:
        response = rater_stub(channel).SelectNoise(select_request(2, 2, model="digits"), timeout=30)
    assert codec.decode(response.indices).shape == (2, 1)
    return response.model.version


def test_replicas_follow_the_shared_repository(tmp_path, rater_onnx, rater_onnx_v2):
    """A version written into the shared folder as `nrctl deploy --repository` writes it is served by every
    replica; a corrupt one is refused by each (once: it is not retried at every scan) while the previous version
    keeps serving; temporary upload folders and a version folder without its model file are no versions; a
    version removed from the folder is unloaded everywhere. (That a replica's own DeployModel, which writes
    into the folder too, is not loaded again: test_server_repository_watch.py.)"""
    from typer.testing import CliRunner

    from noiserater.cli.main import app

    repo = make_repository(tmp_path / "repo", {"digits": [rater_onnx]})
    with replicas(repo) as servers:
        deployed = CliRunner().invoke(app, ["deploy", str(rater_onnx_v2), "--name", "digits", "--repository",
                                            str(repo)])
        assert deployed.exit_code == 0 and "version 2" in deployed.stdout, deployed.stderr
        for server in servers:
            wait_until(lambda s=server: default_version(s) == (2, [1, 2]), f"version 2 on {server.target}")
            assert serving_version(server) == 2

        # An interrupted upload's folder, and a version folder whose model file is not there yet: no versions.
        (repo / "digits" / f"{repository.UPLOAD_PREFIX}x").mkdir()
        (repo / "digits" / f"{repository.UPLOAD_PREFIX}x" / repository.MODEL_FILE).write_bytes(b"half")
        (repo / "digits" / "4").mkdir()
        (repo / "digits" / "4" / f"{repository.MODEL_FILE}.part").write_bytes(b"half")
        repository.write_version(repo, "digits", b"not an onnx model", 3)
        for server in servers:
            wait_until(lambda s=server: "refused digits version 3" in s.output, f"the refusal on {server.target}")
            assert default_version(server) == (2, [1, 2]) and serving_version(server) == 2

        repository.remove_version(repo, "digits", 1)
        for server in servers:
            wait_until(lambda s=server: default_version(s) == (2, [2]), f"version 1 gone on {server.target}")
            assert serving_version(server) == 2
        for server in servers:  # every one has scanned the folder again since version 3 was refused
            assert server.stop() == 0
            output = server.wait_output()
            assert output.count("refused digits version 3") == 1, output[-3000:]
            assert "version 4" not in output and ".upload" not in output
            assert "version(s) 1, no longer in the repository" in output


def test_an_in_flight_selection_moves_to_another_replica(tmp_path, rater_onnx):
    """A selection sent to a replica that then dies (frozen with SIGSTOP while it holds the request, then
    SIGKILL) is answered by another replica, over either transport, even when the request is larger than what
    gRPC keeps for its own retries (256 KiB by default)."""
    repo = make_repository(tmp_path / "repo", {"digits": [rater_onnx]})
    batch = 128  # 128 x 8 x 64 float32 candidates: 256 KiB, plus x0 and t
    with replicas(repo) as servers:
        targets = [s.target for s in servers]
        for transport, method in (("unary", "SelectNoise"), ("stream", "SelectNoiseStream")):
            alive = [s for s in servers if s.alive()]
            selector = NoiseSelector.remote(targets, model="digits", num_candidates=K, transport=transport,
                                            timeout_s=60, data_shape=D)
            with selector, Drivers([selector], batch=batch) as drivers:
                wait_until(lambda d=drivers: d.served() >= 5 or d.errors, "5 selections")
                victim = next(s for s in alive if s.requests_ok(method) > 0)
                victim.signal(signal.SIGSTOP)
                stuck = [drivers.served(), time.monotonic()]

                def held(d=drivers, s=selector, since=stuck) -> bool:
                    """One selection has been in flight, unanswered, for a second: the frozen replica holds it."""
                    if d.served() != since[0]:
                        since[:] = [d.served(), time.monotonic()]
                    counters = s.counters
                    return counters["requests"] == counters["served"] + 1 and time.monotonic() - since[1] > 1.0

                wait_until(held, "a selection held by the frozen replica")
                victim.signal(signal.SIGKILL)
                assert victim.wait_exit(30) == -signal.SIGKILL
                wait_until(lambda d=drivers, n=drivers.served(): d.served() >= n + 5 or d.errors,
                           "5 selections after the kill")
            assert_no_failed_selection(drivers)


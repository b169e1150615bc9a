"""Statistics you can see, and the metrics port: GetStats names each bucket's timestep range and a histogram
range fitted to the model, `nrctl stats` shows ranges, plots them and reads Redis without a server, and
--metrics-port serves /metrics (with the request latency histogram), /healthz and the Triton-style health
paths, 404 elsewhere."""

from __future__ import annotations

import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
from support import free_port
from support.server import ServerThread, make_repository
from typer.testing import CliRunner

from noiserater.cli.main import app
from noiserater.core import codec
from noiserater.core.v1 import rater_service_pb2 as pb
from noiserater.core.v1 import rater_service_pb2_grpc as pb_grpc
from noiserater.server.config import ServerConfig
from noiserater.server.stats import Moments, score_range

DATASET = "stats-view-test"


@pytest.fixture(scope="module")
def server(tmp_path_factory, rater_onnx, redis_url):
    repo = make_repository(tmp_path_factory.mktemp("repo"), {"digits": [rater_onnx]})
    config = ServerConfig(repository=repo, host="127.0.0.1", port=0, redis_url=redis_url, max_delay_ms=1.0,
                          stats_flush_s=0.05, metrics_port=free_port())
    with ServerThread(config) as running:
        with grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.RaterServiceStub(channel)
            rng = np.random.default_rng(0)
            x0, eps = rng.standard_normal((2, 400, 64)).astype(np.float32)
            t = rng.integers(0, 100, 400).astype(np.int64)
            stub.Score(pb.ScoreRequest(model=pb.ModelRef(name="digits"), dataset=DATASET, x0=codec.encode(x0),
                                       t=codec.encode(t), eps=codec.encode(eps)))
        yield running


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    """Tables wide enough that no cell is cut (the CLI's console sized itself when it was imported)."""
    from noiserater.cli.output import console

    monkeypatch.setattr(console, "width", 160)


def nrctl(*args: str) -> str:
    result = CliRunner().invoke(app, list(args), prog_name="nrctl", catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def http(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_buckets_name_their_timestep_range_and_spread_over_the_fitted_histogram(server):
    with grpc.insecure_channel(server.target) as channel:
        stats = pb_grpc.RaterServiceStub(channel).GetStats(pb.GetStatsRequest(dataset=DATASET))
    assert sum(b.count for b in stats.buckets) == 400 and len(stats.buckets) == 10
    for b in stats.buckets:  # T = 100: bucket i covers 10i .. 10i+9
        assert (b.num_timesteps, b.t_first, b.t_last) == (100, 10 * b.timestep_bucket, 10 * b.timestep_bucket + 9)
        assert b.hist_low < b.min and b.max < b.hist_high and sum(b.histogram) == b.count and b.hist_skipped == 0
    assert (stats.buckets[0].hist_low, stats.buckets[0].hist_high) == server.server.registry.get("digits").hist_range
    merged = np.sum([list(b.histogram) for b in stats.buckets], axis=0)
    assert np.count_nonzero(merged) > 5  # not the two bins of a fixed [-10, 10)


def test_histogram_range_is_rounded_so_replicas_agree_and_other_ranges_are_not_mixed():
    assert score_range(np.array([0.11, 0.33])) == score_range(np.array([0.11 + 1e-7, 0.33 - 1e-7])) == (-0.3, 0.8)
    a = Moments.of(np.array([0.0, 0.5]), (-1.0, 1.0), 100)
    a.merge(Moments.of(np.array([0.2]), (-2.0, 2.0), 100))
    assert a.count == 3 and a.hist.sum() == 2 and a.hist_skipped == 1


def test_nrctl_stats_shows_timestep_ranges_and_plots(server, tmp_path):
    out = nrctl("stats", "--server", server.target, "--dataset", DATASET)
    assert "0-9" in out and "90-99" in out and "timesteps" in out
    png = tmp_path / "out.png"
    nrctl("stats", "--server", server.target, "--dataset", DATASET, "--plot", str(png))
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000


def test_nrctl_stats_reads_redis_without_a_server(server, redis_url):
    with grpc.insecure_channel(server.target) as channel:  # make sure everything is flushed
        pb_grpc.RaterServiceStub(channel).GetStats(pb.GetStatsRequest(dataset=DATASET))
    out = nrctl("stats", "--redis-url", redis_url, "--dataset", DATASET, "--server", "127.0.0.1:1")
    assert "0-9" in out and "90-99" in out
    help_text = nrctl("stats", "--help")
    assert "--redis-url" in help_text and "running server" in help_text


def test_metrics_port_serves_metrics_and_health(server):
    port = server.config.metrics_port
    assert http(port, "/healthz")[0] == 200 and http(port, "/v2/health/live")[0] == 200
    assert http(port, "/v2/health/ready")[0] == 200
    assert http(port, "/nope")[0] == 404 and http(port, "/")[0] == 404
    status, text = http(port, "/metrics")
    assert status == 200
    assert 'nr_request_duration_seconds_count{code="OK",method="Score"} 1.0' in text
    assert "nr_triples_scored_total" in text and "nr_candidates_scored" not in text
    assert 'nr_cpu_fallback{model="digits",version="1"}' in text and "nr_cpu_fallbacks" not in text
    server.server.runtime.draining = True  # what stop() sets first
    try:
        assert http(port, "/v2/health/ready")[0] == 503 and http(port, "/v2/health/live")[0] == 200
    finally:
        server.server.runtime.draining = False

"""Prometheus metrics of one server (own registry, so several servers can live in one test process), and the
small HTTP server of --metrics-port: /metrics, /healthz and the Triton-style /v2/health/live and
/v2/health/ready."""

from __future__ import annotations

import threading
from collections.abc import Callable
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_REQUEST_BUCKETS = (*_LATENCY_BUCKETS, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # process_cpu_seconds_total etc.: server CPU per request
        self.requests = Counter("nr_requests", "RPCs answered, by method, model, version and status code",
                                ["method", "model", "version", "code"], registry=r)
        self.request_seconds = Histogram("nr_request_duration_seconds",
                                         "Time from a call's arrival at its handler to its answer, by method and "
                                         "status code (each request of a stream on its own)",
                                         ["method", "code"], buckets=_REQUEST_BUCKETS, registry=r)
        self.queue_seconds = Histogram("nr_queue_seconds", "Time a request waited in the batcher queue",
                                       ["model", "version"], buckets=_LATENCY_BUCKETS, registry=r)
        self.compute_seconds = Histogram("nr_compute_seconds", "onnxruntime time per run (one batch)",
                                         ["model", "version"], buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_requests = Histogram("nr_batch_requests", "Requests merged into one onnxruntime run",
                                        ["model", "version"], buckets=_BATCH_BUCKETS, registry=r)
        self.batch_triples = Histogram("nr_batch_triples", "(x0, t, eps) triples per onnxruntime run",
                                       ["model", "version"], buckets=_BATCH_BUCKETS, registry=r)
        self.triples = Counter("nr_triples_scored", "(x0, t, eps) triples scored", ["model", "version"], registry=r)
        self.queue_depth = Gauge("nr_queue_depth", "Requests waiting in the batcher queue",
                                 ["model", "version"], registry=r)
        # Read when scraped (the batcher sets a function, no cost per request): what a Pods metric of a
        # HorizontalPodAutoscaler follows, since it grows without bound once a replica falls behind.
        self.pending_triples = Gauge("nr_pending_triples", "(x0, t, eps) triples accepted and not yet answered "
                                     "(queued or running)", ["model", "version"], registry=r)
        self.cpu_fallback = Gauge("nr_cpu_fallback",
                                  "1 for a loaded model version that runs on CPU although CUDA was requested or "
                                  "auto, else 0", ["model", "version"], registry=r)
        self.redis_flush_errors = Counter("nr_redis_flush_errors", "Failed statistics flushes to Redis",
                                          registry=r)
        self.stats_flush_duplicates = Counter("nr_stats_flush_duplicates",
                                              "Retried statistics flushes that the store had applied already "
                                              "(skipped: each flush counts once)", registry=r)
        self.datasets_rejected = Counter("nr_datasets_rejected",
                                         "Requests refused because their dataset would exceed --max-datasets",
                                         registry=r)
        self.models_loaded = Gauge("nr_model_versions_loaded", "Model versions loaded and ready", registry=r)
        self.repository_refused = Counter("nr_repository_versions_refused",
                                          "Model versions the repository watch found and refused (failed "
                                          "validation or loading)", registry=r)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - no access log line per scrape or probe
        pass


def serve_http(host: str, port: int, registry: CollectorRegistry, ready: Callable[[], bool]):
    """Serve /metrics (Prometheus text), /healthz and /v2/health/live (200 while the process answers) and
    /v2/health/ready (200 when `ready()`, else 503) on a daemon thread; 404 for any other path. Returns the
    server, whose shutdown() and server_close() stop it. `ready` is called on that thread."""
    metrics_app = make_wsgi_app(registry)

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return metrics_app(environ, start_response)
        if path in ("/healthz", "/v2/health/live"):
            status, body = "200 OK", b"ok\n"
        elif path == "/v2/health/ready":
            status, body = ("200 OK", b"ready\n") if ready() else ("503 Service Unavailable", b"not ready\n")
        else:
            status, body = "404 Not Found", b"not found: try /metrics, /healthz, /v2/health/live, /v2/health/ready\n"
        start_response(status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))])
        return [body]

    httpd = make_server(host, port, app, ThreadingWSGIServer, handler_class=_QuietHandler)
    threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True).start()
    return httpd

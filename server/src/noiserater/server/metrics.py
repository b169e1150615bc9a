"""Prometheus metrics of one server (own registry, so several servers can live in one test process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # process_cpu_seconds_total etc.: server CPU per request
        self.requests = Counter("nr_requests", "RPCs answered, by method, model, version and status code",
                                ["method", "model", "version", "code"], registry=r)
        self.queue_seconds = Histogram("nr_queue_seconds", "Time a request waited in the batcher queue",
                                       ["model", "version"], buckets=_LATENCY_BUCKETS, registry=r)
        self.compute_seconds = Histogram("nr_compute_seconds", "onnxruntime time per run (one batch)",
                                         ["model", "version"], buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_requests = Histogram("nr_batch_requests", "Requests merged into one onnxruntime run",
                                        ["model", "version"], buckets=_BATCH_BUCKETS, registry=r)
        self.batch_triples = Histogram("nr_batch_triples", "(x0, t, eps) triples per onnxruntime run",
                                       ["model", "version"], buckets=_BATCH_BUCKETS, registry=r)
        self.candidates = Counter("nr_candidates_scored", "Triples scored", ["model", "version"], registry=r)
        self.queue_depth = Gauge("nr_queue_depth", "Requests waiting in the batcher queue",
                                 ["model", "version"], registry=r)
        self.cpu_fallbacks = Counter("nr_cpu_fallbacks",
                                     "Model versions running on CPU although CUDA was requested or auto",
                                     ["model", "version"], registry=r)
        self.redis_flush_errors = Counter("nr_redis_flush_errors", "Failed statistics flushes to Redis",
                                          registry=r)
        self.datasets_rejected = Counter("nr_datasets_rejected",
                                         "Requests refused because their dataset would exceed --max-datasets",
                                         registry=r)
        self.models_loaded = Gauge("nr_model_versions_loaded", "Model versions loaded and ready", registry=r)

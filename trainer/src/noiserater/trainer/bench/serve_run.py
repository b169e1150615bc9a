"""The serving benchmark (`nrctl bench serve`): throughput and latency in the manner of Triton's perf_analyzer.

For each concurrency level C, C closed-loop clients send the same SelectNoise request (B samples x K
candidates) back to back over the chosen transport (serve_load), measured in windows until the last three
agree (serve_windows). Throughput is candidates scored per second (requests x B x K / s); latency
percentiles are over the stable windows.

Measured in the same run, as references:
- the ceiling: in-process onnxruntime on the same model file and the same B x K triples per run, no gRPC,
  the better of one caller and `ceiling_callers` callers in parallel threads (a server runs several
  instances at once, so one caller alone would not be a ceiling) (serve_ceiling);
- the server with batching off: a second `rater-server serve --max-batch 0` that the bench starts on a free
  loopback port from the same ONNX file (or `unbatched_target`, one you run yourself).
Without `target` the batched server is started by the bench as well (same flags, batching on). The summary
ratios and what bounds them are assembled by serve_report.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

from noiserater.trainer.bench import perf_analyzer
from noiserater.trainer.bench.cpu import CpuMeter
from noiserater.trainer.bench.local_server import LocalServer, start_onnx_server, wait_serving
from noiserater.trainer.bench.serve_ceiling import measure_ceiling
from noiserater.trainer.bench.serve_load import make_request, measure_server
from noiserater.trainer.bench.serve_windows import Level, Windows

KINDS = ("batched", "unbatched")
SMALL_CONCURRENCY = 16  # clients of the batching on / off comparison


@dataclass(frozen=True)
class ServeSettings:
    onnx: Path  # the model's ONNX file: for the servers the bench starts and the in-process ceiling
    model: str  # model name on the servers
    levels: tuple[int, ...]  # concurrency levels of the sweep
    batch: int  # samples B per request in the sweep
    k: int  # candidates K per sample
    small_batch: int  # samples per request of the batching on / off comparison
    transport: str  # "stream" or "unary"
    server_args: tuple[str, ...]  # extra flags of the servers the bench starts
    device: str  # device of the in-process ceiling (auto|cpu|cuda)
    threads: int  # onnxruntime intra-op threads of the ceiling (0: default)
    ceiling_callers: int  # parallel in-process callers of the ceiling's second measurement
    windows: Windows
    rounds: int  # paired rounds (both sides back to back) behind each summary ratio
    target: str | None = None  # HOST:PORT of a batched server to measure; None: the bench starts one
    unbatched_target: str | None = None  # HOST:PORT of a server run with --max-batch 0; None: the bench starts one
    token_file: Path | None = None  # bearer token, for servers run with --auth-all
    tls_ca: Path | None = None  # root certificate(s) of a --target server that serves TLS
    perf_analyzer: bool = False  # also measure every level with Triton's perf_analyzer


@dataclass
class Measurements:
    """What one run measured, as the report needs it (each server-side figure as Level.report() plus CPU)."""

    data_shape: tuple[int, ...]
    num_timesteps: int
    targets: dict[str, str]
    servers_started: dict[str, list[str]]  # kind -> command line, for the servers the bench started
    levels: list[dict]  # per concurrency level: {"concurrency", "batched", "unbatched"}
    small_rounds: list[dict]  # per round: {"batched", "unbatched"} with small requests
    ceiling_rounds: list[dict]  # per round: {"server", "ceiling_one_caller", "ceiling_parallel"}
    perf_analyzer: list[dict] | None
    ceiling_one: Level
    ceiling_parallel: Level
    small_runs: Level  # in-process, one caller, small requests' triples
    select_path: Level  # in-process, one caller, the whole selection of a request
    ceiling_provider: str


def run_serve(st: ServeSettings, say: Callable[[str], None] = lambda text: None) -> Measurements:
    """Start the servers the settings do not name, measure both against each other and the ceiling."""
    from noiserater.core.scoring import RaterSession
    from noiserater.core.selection import SelectionPlan

    if st.perf_analyzer:
        perf_analyzer.find()  # fail now, with what is missing, rather than after the sweep
    info = RaterSession(st.onnx, device="cpu").info
    token = st.token_file.read_text().strip() if st.token_file else None
    tls_root_cert = st.tls_ca.read_bytes() if st.tls_ca else None
    if tls_root_cert is not None and (st.perf_analyzer or st.target is None or st.unbatched_target is None):
        raise ValueError("--tls-ca measures servers you started with TLS: give --target and --unbatched-target, "
                         "without --perf-analyzer")
    request, (x0, t, candidates) = make_request(st.model, info.data_shape, info.num_timesteps, st.batch, st.k)
    small_request, small_arrays = make_request(st.model, info.data_shape, info.num_timesteps, st.small_batch, st.k,
                                               seed=1)
    per_request, per_small = st.batch * st.k, st.small_batch * st.k
    triples, small_triples = SelectionPlan(st.k).triples(x0, t, candidates), SelectionPlan(st.k).triples(*small_arrays)

    def ceiling(arrays, candidates_per_run: int, callers: int, windows: Windows) -> Level:
        return measure_ceiling(st.onnx, st.device, st.threads, arrays, candidates_per_run, windows, callers=callers)

    one_window = replace(st.windows, max_windows=1)  # the paired rounds: one window per side
    with ExitStack() as stack:
        started = start_servers(stack, st)
        targets = {kind: started[kind].target if kind in started else named
                   for kind, named in (("batched", st.target), ("unbatched", st.unbatched_target))}

        def measure(kind: str, req, clients: int, candidates_per_request: int, windows: Windows) -> dict:
            """One level against one server, with the CPU both sides spent per request when we can see it."""
            pid = started[kind].pid if kind in started else None
            meter = CpuMeter(pid)
            level = asyncio.run(measure_server(targets[kind], req, clients, candidates_per_request, windows, token,
                                               st.transport, tls_root_cert))
            result = level.report()
            if level.requests:
                result["client_cpu_us_per_request"] = meter.client_us_per_request(level.requests)
                if pid:
                    result["server_cpu_us_per_request"] = meter.server_us_per_request(level.requests)
            return result

        rows = []
        for level in st.levels:
            row = {"concurrency": level}
            for kind in KINDS:
                say(f"{kind} server, {level} clients ...")
                row[kind] = measure(kind, request, level, per_request, st.windows)
            rows.append(row)
        say(f"paired rounds at {SMALL_CONCURRENCY} clients, small requests (B={st.small_batch}): "
            "batching on vs off ...")
        small_rounds = [{kind: measure(kind, small_request, SMALL_CONCURRENCY, per_small, one_window)
                         for kind in KINDS} for _ in range(st.rounds)]
        best = max(rows, key=lambda r: r["batched"]["throughput"])
        say(f"paired rounds: server at {best['concurrency']} clients vs in-process onnxruntime ...")
        ceiling_rounds = []
        for _ in range(st.rounds):
            server = measure("batched", request, best["concurrency"], per_request, one_window)
            one = ceiling(triples, per_request, 1, one_window)
            parallel = ceiling(triples, per_request, st.ceiling_callers, one_window)
            ceiling_rounds.append({"server": server, "ceiling_one_caller": one.report(),
                                   "ceiling_parallel": parallel.report()})
        pa_rows = None
        if st.perf_analyzer:
            say("perf_analyzer against both servers (KServe ModelInfer, unary and streaming) ...")
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nr-bench-pa-")))
            pa_rows = perf_analyzer.measure_levels(targets, st.model, triples, list(st.levels), st.windows, work)
    say("in-process onnxruntime: full-length ceiling figures and small runs ...")
    ceiling_one = ceiling(triples, per_request, 1, st.windows)
    ceiling_parallel = ceiling(triples, per_request, st.ceiling_callers, st.windows)
    small_runs = ceiling(small_triples, per_small, 1, st.windows)
    select_path = measure_ceiling(st.onnx, st.device, st.threads, triples, per_request, st.windows,
                                  select_args=(x0, t, candidates))
    return Measurements(
        data_shape=tuple(info.data_shape), num_timesteps=info.num_timesteps, targets=targets,
        servers_started={kind: srv.command for kind, srv in started.items()}, levels=rows,
        small_rounds=small_rounds, ceiling_rounds=ceiling_rounds, perf_analyzer=pa_rows, ceiling_one=ceiling_one,
        ceiling_parallel=ceiling_parallel, small_runs=small_runs, select_path=select_path,
        ceiling_provider=RaterSession(st.onnx, device=st.device).provider)


def start_servers(stack: ExitStack, st: ServeSettings) -> dict[str, LocalServer]:
    """The servers the settings do not name, started until `stack` closes (batching on, then off); the ones
    they name are waited for until they serve."""
    started: dict[str, LocalServer] = {}
    if st.target is None:
        started["batched"] = start_onnx_server(stack, st.onnx, st.model, list(st.server_args))
    else:
        wait_serving(st.target, None, timeout_s=30)
    if st.unbatched_target is None:
        started["unbatched"] = start_onnx_server(stack, st.onnx, st.model, [*st.server_args, "--max-batch", "0"])
    else:
        wait_serving(st.unbatched_target, None, timeout_s=30)
    return started

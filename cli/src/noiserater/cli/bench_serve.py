"""`nrctl bench serve`: serving throughput and latency in the manner of Triton's perf_analyzer.

For each concurrency level C, C closed-loop clients (grpc.aio, one event loop) send the same SelectNoise
request (B samples x K candidates) back to back, each over its own SelectNoiseStream (--transport stream,
the default) or as unary SelectNoise calls (--transport unary): a warm-up, then measurement windows of
--window-s until the last three agree within --stability (or --max-windows is reached). Throughput is
candidates scored per second (requests x B x K / s); latency percentiles are over the stable windows.

Measured in the same run, as references:
- the ceiling: in-process onnxruntime (`RaterSession.score`) on the same model file and the same B x K
  triples per run, no gRPC, the better of one caller and --ceiling-callers callers in parallel threads
  (a server runs several instances at once, so one caller alone would not be a ceiling);
- the server with batching off: a second `rater-server serve --max-batch 0` that the bench starts on a
  free loopback port from the same ONNX file (or --unbatched-target to use one you run yourself).
Summary ratios: `batched_vs_unbatched_at_16` (16 clients, small requests of --small-batch samples,
batching on vs off; goal >= 3) and `best_vs_ceiling` (best server throughput over the ceiling; goal >= 0.7).
Next to them the report gives what bounds the first one: how much faster per candidate onnxruntime scores
one big merged run than many small ones (the most batching can gain when requests cost nothing else), and
the CPU time per request that the server and the load generator spend (when the bench started the servers).
Without --target the batched server is started by the bench as well (same flags, batching on).
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import typer

from noiserater.cli.output import emit_json, fail, table
from noiserater.client.transports import TRANSPORTS
from noiserater.trainer.bench import perf_analyzer
from noiserater.trainer.bench.local_server import LocalServer, start_rater_server, wait_serving

GOAL_BATCHED_VS_UNBATCHED = 3.0
GOAL_BEST_VS_CEILING = 0.7


@dataclass
class Level:
    concurrency: int
    throughput: float = 0.0  # candidates scored per second
    requests_per_s: float = 0.0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    requests: int = 0
    errors: int = 0
    error_sample: str = ""
    windows: list[float] = field(default_factory=list)
    stable: bool = False
    latencies: list[list[float]] = field(default_factory=list, repr=False)  # per window (s), not reported

    def report(self) -> dict:
        out = asdict(self)
        del out["latencies"]
        return out


def start_local_server(stack: ExitStack, onnx: Path, model: str, server_args: list[str]) -> LocalServer:
    """A `rater-server serve` on a free loopback port over a temporary repository holding `onnx`."""
    repo = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nr-bench-")))
    (repo / model / "1").mkdir(parents=True)
    shutil.copyfile(onnx, repo / model / "1" / "model.onnx")
    return start_rater_server(stack, repo, server_args)


def make_request(model: str, data_shape: tuple[int, ...], num_timesteps: int, batch: int, k: int, seed: int = 0):
    from noiserater.core import codec
    from noiserater.core.v1 import rater_service_pb2 as pb

    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal((batch, *data_shape)).astype(np.float32)
    t = rng.integers(0, num_timesteps, batch).astype(np.int64)
    candidates = rng.standard_normal((batch, k, *data_shape)).astype(np.float32)
    request = pb.SelectNoiseRequest(model=pb.ModelRef(name=model), dataset="bench-serve", x0=codec.encode(x0),
                                    t=codec.encode(t), candidates=codec.encode(candidates), keep=1)
    return request, (x0, t, candidates)


def _summarise(level: Level, candidates: int) -> Level:
    latencies = [lat for window in level.latencies[-3:] for lat in window]
    used = level.windows[-3:]
    level.windows = [round(w, 1) for w in level.windows]
    level.requests_per_s = float(np.mean(used)) if used else 0.0
    level.throughput = level.requests_per_s * candidates
    level.stable = len(used) == 3 and (max(used) - min(used)) <= STABILITY[0] * float(np.mean(used))
    if latencies:
        p50, p90, p99 = np.percentile(np.asarray(latencies) * 1000.0, [50, 90, 99])
        level.p50_ms, level.p90_ms, level.p99_ms = float(p50), float(p90), float(p99)
    return level


STABILITY = [0.15]  # set from --stability


async def measure_server(target: str, request, concurrency: int, candidates: int, warmup_s: float,
                         window_s: float, max_windows: int, metadata=None, transport: str = "stream") -> Level:
    import grpc

    from noiserater.core.v1 import rater_service_pb2 as pb
    from noiserater.core.v1 import rater_service_pb2_grpc as pb_grpc

    options = [("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)]
    channels = [grpc.aio.insecure_channel(target, options=[*options, ("grpc.channel_id", i)])
                for i in range(min(4, concurrency))]
    stubs = [pb_grpc.RaterServiceStub(c) for c in channels]
    done: list[tuple[float, float]] = []  # (finish time, latency)
    level = Level(concurrency)
    stop = asyncio.Event()

    def failed(text: str) -> None:
        level.errors += 1
        level.error_sample = level.error_sample or text
        if level.errors > 100:
            stop.set()

    async def stream_client(i: int) -> None:
        """One SelectNoiseStream per client, one request in flight on it (closed loop)."""
        message = pb.SelectNoiseStreamRequest(request_id=str(i), request=request)
        call = stubs[i % len(stubs)].SelectNoiseStream(metadata=metadata)
        try:
            while not stop.is_set():
                started = time.perf_counter()
                await call.write(message)
                response = await call.read()
                if response is grpc.aio.EOF:
                    failed("stream ended by the server")
                    return
                if response.error_code:
                    failed(f"status {response.error_code}: {response.error_message}")
                    continue
                finished = time.perf_counter()
                done.append((finished, finished - started))
            await call.done_writing()
        except grpc.aio.AioRpcError as exc:
            failed(f"{exc.code().name}: {exc.details()}")

    async def client(i: int) -> None:
        if transport == "stream":
            await stream_client(i)
            return
        call = stubs[i % len(stubs)].SelectNoise
        while not stop.is_set():
            started = time.perf_counter()
            try:
                await call(request, timeout=60, metadata=metadata)
            except grpc.aio.AioRpcError as exc:
                failed(f"{exc.code().name}: {exc.details()}")
                continue
            finished = time.perf_counter()
            done.append((finished, finished - started))

    tasks = [asyncio.create_task(client(i)) for i in range(concurrency)]
    try:
        await _measure_windows(done, level, warmup_s, window_s, max_windows)
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        for channel in channels:
            await channel.close()
    return _summarise(level, candidates)


async def _measure_windows(done: list[tuple[float, float]], level: Level, warmup_s: float, window_s: float,
                           max_windows: int) -> None:
    """perf_analyzer's method over `done` (finish time, latency), which the load fills in: a warm-up, then
    windows until the last three agree within --stability or max_windows is reached."""
    await asyncio.sleep(warmup_s)
    for _ in range(max_windows):
        start_index, started = len(done), time.perf_counter()
        await asyncio.sleep(window_s)
        end_index, ended = len(done), time.perf_counter()
        level.windows.append(len(done[start_index:end_index]) / (ended - started))
        level.latencies.append([lat for _, lat in done[start_index:end_index]])
        last = level.windows[-3:]
        if len(last) == 3 and (max(last) - min(last)) <= STABILITY[0] * float(np.mean(last)):
            break
    level.requests = len(done)


def measure_ceiling(onnx: Path, device: str, threads: int, triples, candidates: int, warmup_s: float,
                    window_s: float, max_windows: int, select_args=None, callers: int = 1) -> Level:
    """In-process runs back to back, no gRPC: `callers` threads sharing one session (onnxruntime releases
    the GIL, so they run in parallel as a server's instances do); score() or, with select_args, select()."""
    from noiserater.core.scoring import RaterSession
    from noiserater.core.selection import SelectionPlan

    session = RaterSession(onnx, device=device, intra_op_threads=threads)
    plan = SelectionPlan.for_candidates(select_args[2], 1, "top_k", 1.0) if select_args is not None else None
    done: list[tuple[float, float]] = []
    stop = threading.Event()

    def caller() -> None:
        while not stop.is_set():
            started = time.perf_counter()
            if select_args is not None:
                plan.select(session.score, session.info, *select_args)
            else:
                session.score(*triples)
            finished = time.perf_counter()
            done.append((finished, finished - started))

    level = Level(callers)
    workers = [threading.Thread(target=caller, daemon=True) for _ in range(callers)]
    for worker in workers:
        worker.start()
    try:
        asyncio.run(_measure_windows(done, level, warmup_s, window_s, max_windows))
    finally:
        stop.set()
        for worker in workers:
            worker.join()
    return _summarise(level, candidates)


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _levels(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--concurrency: {text!r} is not a comma-separated list of integers") from None
    if not values or any(v < 1 for v in values):
        raise ValueError(f"--concurrency: {text!r} needs positive integers")
    return values


def bench_serve(
    target: str | None = typer.Option(None, help="HOST:PORT of the rater-server to measure (batching on). "
                                      "Default: the bench starts one from --onnx."),
    model: str = typer.Option("digits", help="Model name on the server."),
    onnx: Path = typer.Option(..., help="The same model's ONNX file: for the in-process ceiling and the "
                              "batching-off server."),
    concurrency: str = typer.Option("1,4,16,64", help="Comma-separated numbers of concurrent clients."),
    batch: int = typer.Option(64, min=1, help="Samples B per request in the sweep."),
    k: int = typer.Option(8, min=1, help="Candidates K per sample."),
    small_batch: int = typer.Option(1, min=1, help="Samples per request for batched_vs_unbatched_at_16."),
    transport: str = typer.Option("stream", help="stream (one SelectNoiseStream per client) or unary "
                                  "(one SelectNoise call per request)."),
    unbatched_target: str | None = typer.Option(None, help="HOST:PORT of a server run with --max-batch 0; "
                                                "default: the bench starts one."),
    server_args: str = typer.Option("--device auto", help="Extra flags for the servers the bench starts."),
    device: str = typer.Option("auto", help="Device of the in-process ceiling (auto|cpu|cuda)."),
    threads: int = typer.Option(0, help="onnxruntime intra-op threads of the ceiling (0: default)."),
    ceiling_callers: int = typer.Option(0, min=0, help="Parallel in-process callers of the ceiling's "
                                        "second measurement (0: one per CPU core)."),
    warmup_s: float = typer.Option(1.0, help="Warm-up per level (s)."),
    window_s: float = typer.Option(2.0, "--duration-s", "--window-s", help="Measurement window (s)."),
    max_windows: int = typer.Option(5, min=3, help="Windows per level at most (stops at 3 stable ones)."),
    stability: float = typer.Option(0.15, help="Max spread of the last 3 windows, relative to their mean."),
    rounds: int = typer.Option(5, min=1, help="Paired rounds (both sides back to back) behind each summary ratio."),
    token_file: Path | None = typer.Option(None, help="Bearer token file, when the server uses --auth-all."),
    with_perf_analyzer: bool = typer.Option(False, "--perf-analyzer", help="Also measure every level with "
                                            "Triton's perf_analyzer (KServe ModelInfer of the same B x K "
                                            "triples, unary and --streaming) against both servers."),
    out: Path | None = typer.Option(None, help="Write the report JSON here."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Throughput and latency per concurrency level, against in-process onnxruntime and batching off."""
    try:
        levels = _levels(concurrency)
        if not onnx.is_file():
            raise ValueError(f"--onnx: no such file {onnx}")
        if transport not in TRANSPORTS:
            raise ValueError(f"--transport: {transport!r} is not one of {', '.join(TRANSPORTS)}")
        settings = Settings(transport, warmup_s, window_s, max_windows, rounds, device, threads,
                            ceiling_callers or os.cpu_count() or 1, with_perf_analyzer)
        if with_perf_analyzer:
            perf_analyzer.find()  # fail now, with what is missing, rather than after the sweep
        STABILITY[0] = stability
        report = run(target, model, onnx, levels, batch, k, small_batch, unbatched_target,
                     shlex.split(server_args), token_file, as_json, settings)
    except (ValueError, RuntimeError, OSError) as exc:
        fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    report["command"] = "nrctl bench serve " + " ".join(shlex.quote(a) for a in sys.argv[3:] if a)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    if as_json:
        emit_json(report)
        return
    print_report(report, model, batch, k)
    if out is not None:
        typer.echo(f"report written to {out}")


def print_report(report: dict, model: str, batch: int, k: int) -> None:
    rows = []
    for row in report["levels"]:
        for kind in ("batched", "unbatched"):
            r = row[kind]
            rows.append([row["concurrency"], kind, round(r["throughput"]), round(r["p50_ms"], 2),
                         round(r["p90_ms"], 2), round(r["p99_ms"], 2), r["errors"], r["stable"]])
    for name, c in (("in-process, 1 caller", report["ceiling_one_caller"]),
                    (f"in-process, {report['ceiling_callers']} callers", report["ceiling_parallel"])):
        rows.append(["-", name, round(c["throughput"]), round(c["p50_ms"], 2), round(c["p90_ms"], 2),
                     round(c["p99_ms"], 2), 0, c["stable"]])
    table(f"bench serve: {model}, B={batch} x K={k} candidates per request, {report['method']['transport']}",
          ["clients", "server", "candidates/s", "p50 ms", "p90 ms", "p99 ms", "errors", "stable"], rows)
    s = report["summary"]
    for name in ("batched_vs_unbatched_at_16", "best_vs_ceiling"):
        verdict = "met" if s["goals_met"][name] else "MISSED"
        typer.echo(f"{name}: {s[name]:.2f} (goal >= {s['goals'][name]}; {verdict})")
    typer.echo(f"batching could gain at most {s['batching_gain_bound']:.2f}x here even if requests cost nothing "
               "but onnxruntime (in-process small runs vs one big run)")


@dataclass
class Settings:
    transport: str
    warmup_s: float
    window_s: float
    max_windows: int
    rounds: int
    device: str
    threads: int
    ceiling_callers: int
    perf_analyzer: bool = False


def perf_analyzer_levels(targets: dict[str, str], model: str, triples, levels: list[int], st: Settings,
                         work: Path) -> list[dict]:
    """perf_analyzer's figures per level, server and mode, in the report's units (candidates/s, ms)."""
    data = perf_analyzer.write_input_data(work / "perf_analyzer_input.json", *triples)
    per_request = triples[0].shape[0]
    rows = []
    for level in levels:
        row: dict = {"concurrency": level}
        for kind, where in targets.items():
            for streaming in (False, True):
                mode = "streaming" if streaming else "unary"
                try:
                    (got,) = perf_analyzer.run(where, model, data, [level], int(st.window_s * 1000),
                                               work / "perf_analyzer.csv", streaming=streaming,
                                               stability_percent=STABILITY[0] * 100, max_trials=st.max_windows)
                except RuntimeError as exc:  # e.g. no stable windows: recorded, the rest still measured
                    row.setdefault(kind, {})[mode] = {"error": str(exc)}
                    continue
                row.setdefault(kind, {})[mode] = {
                    "throughput": got["Inferences/Second"] * per_request, "requests_per_s": got["Inferences/Second"],
                    "p50_ms": got["p50 latency"] / 1000, "p90_ms": got["p90 latency"] / 1000,
                    "p99_ms": got["p99 latency"] / 1000, "server_queue_us": got["Server Queue"],
                    "server_compute_us": got["Server Compute Infer"]}
        rows.append(row)
    return rows


def run(target, model, onnx, levels, batch, k, small_batch, unbatched_target, server_args, token_file, quiet,
        settings: Settings) -> dict:
    import onnxruntime as ort

    from noiserater.core.scoring import RaterSession
    from noiserater.core.selection import SelectionPlan

    st = settings
    info = RaterSession(onnx, device="cpu").info
    metadata = (("authorization", f"Bearer {token_file.read_text().strip()}"),) if token_file else None
    request, (x0, t, candidates) = make_request(model, info.data_shape, info.num_timesteps, batch, k)
    small_request, small_arrays = make_request(model, info.data_shape, info.num_timesteps, small_batch, k, seed=1)
    per_request, per_small = batch * k, small_batch * k
    triples, small_triples = SelectionPlan(k).triples(x0, t, candidates), SelectionPlan(k).triples(*small_arrays)

    def say(text: str) -> None:
        if not quiet:
            typer.echo(text, err=True)

    def ceiling(arrays, candidates_per_run: int, callers: int, windows: int) -> Level:
        return measure_ceiling(onnx, st.device, st.threads, arrays, candidates_per_run, st.warmup_s, st.window_s,
                               windows, callers=callers)

    with ExitStack() as stack:
        started: dict[str, LocalServer] = {}
        if target is None:
            started["batched"] = start_local_server(stack, onnx, model, server_args)
            target = started["batched"].target
        else:
            wait_serving(target, None, timeout_s=30)
        if unbatched_target is None:
            started["unbatched"] = start_local_server(stack, onnx, model, [*server_args, "--max-batch", "0"])
            unbatched_target = started["unbatched"].target
        else:
            wait_serving(unbatched_target, None, timeout_s=30)
        targets = {"batched": target, "unbatched": unbatched_target}

        def measure(kind: str, req, clients: int, candidates_per_request: int, windows: int) -> dict:
            """One level against one server, with the CPU both sides spent per request when we can see it."""
            pid = started[kind].pid if kind in started else None
            server_cpu, client_cpu = process_cpu_s(pid) if pid else 0.0, time.process_time()
            level = asyncio.run(measure_server(targets[kind], req, clients, candidates_per_request, st.warmup_s,
                                               st.window_s, windows, metadata, st.transport))
            result = level.report()
            if level.requests:
                result["client_cpu_us_per_request"] = (time.process_time() - client_cpu) / level.requests * 1e6
                if pid:
                    result["server_cpu_us_per_request"] = (process_cpu_s(pid) - server_cpu) / level.requests * 1e6
            return result

        rows = []
        for level in levels:
            row = {"concurrency": level}
            for kind in ("batched", "unbatched"):
                say(f"{kind} server, {level} clients ...")
                row[kind] = measure(kind, request, level, per_request, st.max_windows)
            rows.append(row)
        say(f"paired rounds at 16 clients, small requests (B={small_batch}): batching on vs off ...")
        small_rounds = [{kind: measure(kind, small_request, 16, per_small, 1) for kind in ("batched", "unbatched")}
                        for _ in range(st.rounds)]
        best = max(rows, key=lambda r: r["batched"]["throughput"])
        say(f"paired rounds: server at {best['concurrency']} clients vs in-process onnxruntime ...")
        ceiling_rounds = []
        for _ in range(st.rounds):
            server = measure("batched", request, best["concurrency"], per_request, 1)
            one = ceiling(triples, per_request, 1, 1)
            parallel = ceiling(triples, per_request, st.ceiling_callers, 1)
            ceiling_rounds.append({"server": server, "ceiling_one_caller": one.report(),
                                   "ceiling_parallel": parallel.report()})
        pa_rows = None
        if st.perf_analyzer:
            say("perf_analyzer against both servers (KServe ModelInfer, unary and streaming) ...")
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nr-bench-pa-")))
            pa_rows = perf_analyzer_levels(targets, model, triples, levels, st, work)
    say("in-process onnxruntime: full-length ceiling figures and small runs ...")
    ceiling_one = ceiling(triples, per_request, 1, st.max_windows)
    ceiling_parallel = ceiling(triples, per_request, st.ceiling_callers, st.max_windows)
    small_runs = ceiling(small_triples, per_small, 1, st.max_windows)
    select_path = measure_ceiling(onnx, st.device, st.threads, triples, per_request, st.warmup_s, st.window_s,
                                  st.max_windows, select_args=(x0, t, candidates))

    def ratio(a: float, b: float) -> float:
        return a / b if b else float("inf")

    def median_of(items: list[dict], kind: str, key: str) -> float | None:
        values = [item[kind][key] for item in items if key in item[kind]]
        return float(np.median(values)) if values else None

    small_ratios = [ratio(r["batched"]["throughput"], r["unbatched"]["throughput"]) for r in small_rounds]
    ceiling_ratios = [ratio(r["server"]["throughput"], max(r["ceiling_one_caller"]["throughput"],
                                                          r["ceiling_parallel"]["throughput"]))
                      for r in ceiling_rounds]
    one_caller_ratios = [ratio(r["server"]["throughput"], r["ceiling_one_caller"]["throughput"])
                         for r in ceiling_rounds]
    best_ceiling = max(ceiling_one.throughput, ceiling_parallel.throughput)
    small = {"batch": small_batch, "k": k, "concurrency": 16, "rounds": small_rounds,
             "batched_throughput_median": median_of(small_rounds, "batched", "throughput"),
             "unbatched_throughput_median": median_of(small_rounds, "unbatched", "throughput"),
             "ratio_per_round": small_ratios,
             "in_process_small_runs": small_runs.report(),
             "server_cpu_us_per_request_median": {
                 kind: median_of(small_rounds, kind, "server_cpu_us_per_request") for kind in ("batched", "unbatched")},
             "client_cpu_us_per_request_median": {
                 kind: median_of(small_rounds, kind, "client_cpu_us_per_request") for kind in ("batched", "unbatched")},
             "onnxruntime_us_per_small_run": 1e6 / small_runs.requests_per_s if small_runs.requests_per_s else None,
             "onnxruntime_us_per_request_in_big_runs": per_small / ceiling_one.throughput * 1e6
             if ceiling_one.throughput else None}
    summary = {
        # Medians of per-round ratios: each round measures both sides back to back, so load from other
        # processes on the machine hits both sides of a ratio alike.
        "batched_vs_unbatched_at_16": float(np.median(small_ratios)),
        "best_vs_ceiling": float(np.median(ceiling_ratios)),
        "best_vs_ceiling_per_round": ceiling_ratios,
        "best_vs_ceiling_one_caller": float(np.median(one_caller_ratios)),
        # Per candidate, one big run against many small ones, both in-process on one caller: what batching
        # could gain if a request cost nothing but its onnxruntime run.
        "batching_gain_bound": ratio(ceiling_one.throughput, small_runs.throughput),
        "best_concurrency": best["concurrency"],
        "best_throughput_sweep": best["batched"]["throughput"],
        "ceiling_throughput_sweep": best_ceiling,
        "best_vs_ceiling_sweep": ratio(best["batched"]["throughput"], best_ceiling),
        "goals": {"batched_vs_unbatched_at_16": GOAL_BATCHED_VS_UNBATCHED,
                  "best_vs_ceiling": GOAL_BEST_VS_CEILING},
    }
    summary["goals_met"] = {name: summary[name] >= goal for name, goal in summary["goals"].items()}
    return {
        "model": {"name": model, "onnx": str(onnx), "data_shape": list(info.data_shape),
                  "num_timesteps": info.num_timesteps},
        "batch": batch, "k": k, "candidates_per_request": per_request, "levels": rows,
        "small_requests": small, "ceiling_one_caller": ceiling_one.report(),
        "ceiling_parallel": ceiling_parallel.report(), "ceiling_callers": st.ceiling_callers,
        "ceiling_rounds": ceiling_rounds, "in_process_select": select_path.report(),
        "perf_analyzer": pa_rows,
        "summary": summary,
        "targets": targets,
        "servers_started_by_bench": {kind: " ".join(srv.command) for kind, srv in started.items()},
        "method": {"warmup_s": st.warmup_s, "window_s": st.window_s, "max_windows": st.max_windows,
                   "rounds": st.rounds, "stability": STABILITY[0], "transport": st.transport,
                   "client": f"grpc.aio closed loop, <=4 channels, {st.transport} transport",
                   "ceiling": "in-process RaterSession.score, the better of 1 and ceiling_callers callers"},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "onnxruntime": ort.__version__, "ceiling_provider": RaterSession(onnx, device=st.device).provider,
                    "note": "timings are noisy; compare only figures from one run"},
    }


def register(bench_app: typer.Typer) -> None:
    bench_app.command("serve")(bench_serve)

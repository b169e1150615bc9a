"""`nrctl bench serve`: serving throughput and latency in the manner of Triton's perf_analyzer.

For each concurrency level C, C closed-loop clients (grpc.aio, one event loop) send the same pre-encoded
SelectNoise request (B samples x K candidates) back to back: a warm-up, then measurement windows of
--window-s until the last three agree within --stability (or --max-windows is reached). Throughput is
candidates scored per second (requests x B x K / s); latency percentiles are over the stable windows.

Measured in the same run, as references:
- the ceiling: in-process onnxruntime (`RaterSession.score`) on the same model file and the same
  B x K triples per run, no gRPC;
- the server with batching off: a second `rater-server serve --max-batch 0` that the bench starts on a
  free loopback port from the same ONNX file (or --unbatched-target to use one you run yourself).
Summary ratios: `batched_vs_unbatched_at_16` (16 clients, small requests of --small-batch samples,
batching on vs off; goal >= 3) and `best_vs_ceiling` (best server throughput over the ceiling; goal >= 0.7).
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
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import typer

from noiserater.cli.local_server import start_rater_server, wait_serving
from noiserater.cli.output import emit_json, fail, table

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


def start_local_server(stack: ExitStack, onnx: Path, model: str, server_args: list[str]) -> tuple[str, list[str]]:
    """A `rater-server serve` on a free loopback port over a temporary repository holding `onnx`."""
    repo = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nr-bench-")))
    (repo / model / "1").mkdir(parents=True)
    shutil.copyfile(onnx, repo / model / "1" / "model.onnx")
    return start_rater_server(stack, repo, server_args)


def make_request(model: str, data_shape: tuple[int, ...], num_timesteps: int, batch: int, k: int, seed: int = 0):
    from noiserater.proto import codec
    from noiserater.proto.v1 import rater_service_pb2 as pb

    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal((batch, *data_shape)).astype(np.float32)
    t = rng.integers(0, num_timesteps, batch).astype(np.int64)
    candidates = rng.standard_normal((batch, k, *data_shape)).astype(np.float32)
    request = pb.SelectNoiseRequest(model=pb.ModelRef(name=model), dataset="bench-serve", x0=codec.encode(x0),
                                    t=codec.encode(t), candidates=codec.encode(candidates), k=1)
    return request, (x0, t, candidates)


def _summarise(level: Level, latencies: list[float], windows: list[float], candidates: int) -> Level:
    level.windows = [round(w, 1) for w in windows]
    used = windows[-3:]
    level.requests_per_s = float(np.mean(used)) if used else 0.0
    level.throughput = level.requests_per_s * candidates
    level.stable = len(used) == 3 and (max(used) - min(used)) <= STABILITY[0] * float(np.mean(used))
    if latencies:
        p50, p90, p99 = np.percentile(np.asarray(latencies) * 1000.0, [50, 90, 99])
        level.p50_ms, level.p90_ms, level.p99_ms = float(p50), float(p90), float(p99)
    return level


STABILITY = [0.15]  # set from --stability


async def measure_server(target: str, request, concurrency: int, candidates: int, warmup_s: float,
                         window_s: float, max_windows: int, metadata=None) -> Level:
    import grpc

    from noiserater.proto.v1 import rater_service_pb2_grpc as pb_grpc

    options = [("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)]
    channels = [grpc.aio.insecure_channel(target, options=[*options, ("grpc.channel_id", i)])
                for i in range(min(4, concurrency))]
    stubs = [pb_grpc.RaterServiceStub(c) for c in channels]
    done: list[tuple[float, float]] = []  # (finish time, latency)
    level = Level(concurrency)
    stop = asyncio.Event()

    async def client(i: int) -> None:
        call = stubs[i % len(stubs)].SelectNoise
        while not stop.is_set():
            started = time.perf_counter()
            try:
                await call(request, timeout=60, metadata=metadata)
            except grpc.aio.AioRpcError as exc:
                level.errors += 1
                level.error_sample = level.error_sample or f"{exc.code().name}: {exc.details()}"
                if level.errors > 100:
                    stop.set()
                continue
            finished = time.perf_counter()
            done.append((finished, finished - started))

    tasks = [asyncio.create_task(client(i)) for i in range(concurrency)]
    try:
        await asyncio.sleep(warmup_s)
        windows: list[float] = []
        latencies_by_window: list[list[float]] = []
        for _ in range(max_windows):
            start_index, started = len(done), time.perf_counter()
            await asyncio.sleep(window_s)
            end_index, ended = len(done), time.perf_counter()
            window = done[start_index:end_index]
            windows.append(len(window) / (ended - started))
            latencies_by_window.append([lat for _, lat in window])
            last = windows[-3:]
            if len(last) == 3 and (max(last) - min(last)) <= STABILITY[0] * float(np.mean(last)):
                break
        level.requests = len(done)
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        for channel in channels:
            await channel.close()
    latencies = [lat for window in latencies_by_window[-3:] for lat in window]
    return _summarise(level, latencies, windows, candidates)


def measure_ceiling(onnx: Path, device: str, threads: int, triples, candidates: int, warmup_s: float,
                    window_s: float, max_windows: int, select_args=None) -> Level:
    """Back-to-back in-process runs on one thread: score() (or select() when select_args is given)."""
    from noiserater.proto.scoring import RaterSession

    session = RaterSession(onnx, device=device, intra_op_threads=threads)

    def once() -> None:
        if select_args is not None:
            session.select(*select_args, 1)
        else:
            session.score(*triples)

    level = Level(1)
    end = time.perf_counter() + warmup_s
    while time.perf_counter() < end:
        once()
    windows: list[float] = []
    latencies: list[list[float]] = []
    for _ in range(max_windows):
        count, lats, started = 0, [], time.perf_counter()
        while (now := time.perf_counter()) - started < window_s:
            once()
            lats.append(time.perf_counter() - now)
            count += 1
        windows.append(count / (time.perf_counter() - started))
        latencies.append(lats)
        level.requests += count
        last = windows[-3:]
        if len(last) == 3 and (max(last) - min(last)) <= STABILITY[0] * float(np.mean(last)):
            break
    return _summarise(level, [x for w in latencies[-3:] for x in w], windows, candidates)


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
    unbatched_target: str | None = typer.Option(None, help="HOST:PORT of a server run with --max-batch 0; "
                                                "default: the bench starts one."),
    server_args: str = typer.Option("--device auto", help="Extra flags for the servers the bench starts."),
    device: str = typer.Option("auto", help="Device of the in-process ceiling (auto|cpu|cuda)."),
    threads: int = typer.Option(0, help="onnxruntime intra-op threads of the ceiling (0: default)."),
    warmup_s: float = typer.Option(1.0, help="Warm-up per level (s)."),
    window_s: float = typer.Option(2.0, "--duration-s", "--window-s", help="Measurement window (s)."),
    max_windows: int = typer.Option(5, min=3, help="Windows per level at most (stops at 3 stable ones)."),
    stability: float = typer.Option(0.15, help="Max spread of the last 3 windows, relative to their mean."),
    rounds: int = typer.Option(5, min=1, help="Paired rounds (both sides back to back) behind each summary ratio."),
    token_file: Path | None = typer.Option(None, help="Bearer token file, when the server uses --auth-all."),
    out: Path | None = typer.Option(None, help="Write the report JSON here."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Throughput and latency per concurrency level, against in-process onnxruntime and batching off."""
    try:
        levels = _levels(concurrency)
        if not onnx.is_file():
            raise ValueError(f"--onnx: no such file {onnx}")
        report = run(target, model, onnx, levels, batch, k, small_batch, unbatched_target,
                     shlex.split(server_args), device, threads, warmup_s, window_s, max_windows, stability,
                     token_file, as_json, rounds)
    except (ValueError, RuntimeError, OSError) as exc:
        fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    report["command"] = "nrctl bench serve " + " ".join(shlex.quote(a) for a in sys.argv[3:] if a)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    if as_json:
        emit_json(report)
        return
    rows = []
    for row in report["levels"]:
        for kind in ("batched", "unbatched"):
            r = row[kind]
            rows.append([row["concurrency"], kind, round(r["throughput"]), round(r["p50_ms"], 2),
                         round(r["p90_ms"], 2), round(r["p99_ms"], 2), r["errors"], r["stable"]])
    c = report["ceiling"]
    rows.append([1, "in-process ceiling", round(c["throughput"]), round(c["p50_ms"], 2), round(c["p90_ms"], 2),
                 round(c["p99_ms"], 2), 0, c["stable"]])
    table(f"bench serve: {model}, B={batch} x K={k} candidates per request",
          ["clients", "server", "candidates/s", "p50 ms", "p90 ms", "p99 ms", "errors", "stable"], rows)
    s = report["summary"]
    for name in ("batched_vs_unbatched_at_16", "best_vs_ceiling"):
        verdict = "met" if s["goals_met"][name] else "MISSED"
        typer.echo(f"{name}: {s[name]:.2f} (goal >= {s['goals'][name]}; {verdict})")
    if out is not None:
        typer.echo(f"report written to {out}")


def run(target, model, onnx, levels, batch, k, small_batch, unbatched_target, server_args, device, threads,
        warmup_s, window_s, max_windows, stability, token_file, quiet, rounds=5) -> dict:
    import onnxruntime as ort

    from noiserater.proto.scoring import RaterSession, expand_candidates

    STABILITY[0] = stability
    info = RaterSession(onnx, device="cpu").info
    metadata = (("authorization", f"Bearer {token_file.read_text().strip()}"),) if token_file else None
    request, (x0, t, candidates) = make_request(model, info.data_shape, info.num_timesteps, batch, k)
    small_request, _ = make_request(model, info.data_shape, info.num_timesteps, small_batch, k, seed=1)
    per_request, per_small = batch * k, small_batch * k

    def say(text: str) -> None:
        if not quiet:
            typer.echo(text, err=True)

    with ExitStack() as stack:
        commands = {}
        if target is None:
            target, commands["batched"] = start_local_server(stack, onnx, model, server_args)
        else:
            wait_serving(target, None, timeout_s=30)
        if unbatched_target is None:
            unbatched_target, commands["unbatched"] = start_local_server(stack, onnx, model,
                                                                         [*server_args, "--max-batch", "0"])
        else:
            wait_serving(unbatched_target, None, timeout_s=30)
        rows = []
        for level in levels:
            row = {"concurrency": level}
            for kind, where in (("batched", target), ("unbatched", unbatched_target)):
                say(f"{kind} server, {level} clients ...")
                result = asyncio.run(measure_server(where, request, level, per_request, warmup_s, window_s,
                                                    max_windows, metadata))
                row[kind] = asdict(result)
            rows.append(row)
        say(f"paired rounds at 16 clients, small requests (B={small_batch}): batching on vs off ...")
        small_rounds = []
        for _ in range(rounds):
            on = asyncio.run(measure_server(target, small_request, 16, per_small, warmup_s, window_s, 1, metadata))
            off = asyncio.run(measure_server(unbatched_target, small_request, 16, per_small, warmup_s, window_s, 1,
                                             metadata))
            small_rounds.append({"batched": asdict(on), "unbatched": asdict(off)})
        best = max(rows, key=lambda r: r["batched"]["throughput"])
        say(f"paired rounds: server at {best['concurrency']} clients vs in-process onnxruntime ...")
        triples = expand_candidates(x0, t, candidates)
        ceiling_rounds = []
        for _ in range(rounds):
            server = asyncio.run(measure_server(target, request, best["concurrency"], per_request, warmup_s,
                                                window_s, 1, metadata))
            local = measure_ceiling(onnx, device, threads, triples, per_request, warmup_s, window_s, 1)
            ceiling_rounds.append({"server": asdict(server), "ceiling": asdict(local)})
    say("in-process onnxruntime ceiling (full sweep figures) ...")
    ceiling = measure_ceiling(onnx, device, threads, triples, per_request, warmup_s, window_s, max_windows)
    select_path = measure_ceiling(onnx, device, threads, triples, per_request, warmup_s, window_s, max_windows,
                                  select_args=(x0, t, candidates))

    def ratio(a: dict, b: dict) -> float:
        return a["throughput"] / b["throughput"] if b["throughput"] else float("inf")

    small_ratios = [ratio(r["batched"], r["unbatched"]) for r in small_rounds]
    ceiling_ratios = [ratio(r["server"], r["ceiling"]) for r in ceiling_rounds]
    small = {"batch": small_batch, "k": k, "concurrency": 16, "rounds": small_rounds,
             "batched_throughput_median": float(np.median([r["batched"]["throughput"] for r in small_rounds])),
             "unbatched_throughput_median": float(np.median([r["unbatched"]["throughput"] for r in small_rounds])),
             "ratio_per_round": small_ratios}
    summary = {
        # Medians of per-round ratios: each round measures both sides back to back, so load from other
        # processes on the machine hits both sides of a ratio alike.
        "batched_vs_unbatched_at_16": float(np.median(small_ratios)),
        "best_vs_ceiling": float(np.median(ceiling_ratios)),
        "best_vs_ceiling_per_round": ceiling_ratios,
        "best_concurrency": best["concurrency"],
        "best_throughput_sweep": best["batched"]["throughput"],
        "ceiling_throughput_sweep": ceiling.throughput,
        "best_vs_ceiling_sweep": ratio(best["batched"], asdict(ceiling)),
        "goals": {"batched_vs_unbatched_at_16": GOAL_BATCHED_VS_UNBATCHED,
                  "best_vs_ceiling": GOAL_BEST_VS_CEILING},
    }
    summary["goals_met"] = {name: summary[name] >= goal for name, goal in summary["goals"].items()}
    return {
        "model": {"name": model, "onnx": str(onnx), "data_shape": list(info.data_shape),
                  "num_timesteps": info.num_timesteps},
        "batch": batch, "k": k, "candidates_per_request": per_request, "levels": rows,
        "small_requests": small, "ceiling": asdict(ceiling), "ceiling_rounds": ceiling_rounds,
        "in_process_select": asdict(select_path),
        "summary": summary,
        "targets": {"batched": target, "unbatched": unbatched_target},
        "servers_started_by_bench": {kind: " ".join(cmd) for kind, cmd in commands.items()},
        "method": {"warmup_s": warmup_s, "window_s": window_s, "max_windows": max_windows, "rounds": rounds,
                   "stability": stability, "client": "grpc.aio closed loop, pre-encoded request, <=4 channels"},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "onnxruntime": ort.__version__, "ceiling_provider": RaterSession(onnx, device=device).provider,
                    "note": "timings are noisy; compare only figures from one run"},
    }


def register(bench_app: typer.Typer) -> None:
    bench_app.command("serve")(bench_serve)

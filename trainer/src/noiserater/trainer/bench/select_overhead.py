"""What a stage-2 training step pays for noise selection (`nrctl bench select`).

Per denoiser (the MLP on `digits`, the UNet on `digits-image`) the bench times the real stage-2 step
(`train_stage2`: minibatch, noise, forward, backward, gradient clipping, optimiser step; evaluation excluded)
in these modes (`modes` picks some; uniform always runs):

- `uniform`: plain Gaussian noise (`torch.randn`), what the others are compared with;
- `local`: argmax of K candidates scored in-process (`NoiseSelector.local`, onnxruntime with the same intra-op
  threads as torch);
- `remote`: the same selection asked of a rater-server that the bench starts on a free loopback port
  (`NoiseSelector.remote` over its default stream transport), one request per step, waited for;
- `remote_prefetch`: the same, with the next step's selection started during this step (stage 2's default
  for a remote selector, `Stage2Config.prefetch`);
- `local_prefetch`: in-process selection started a step early on a thread of its own (`prefetch="all"`).

Next to the wall-clock ms/step, each run records the CPU time per step of this process (all its threads) and
of the server, which say what a mode costs when no core is free.

Method: the same seed for every run (so every mode trains on the same minibatches and timesteps), one
warm-up run per mode, then `rounds` rounds in which every mode runs `steps` steps in turn (the order
rotating from round to round), so that load from other processes on the machine falls on all modes alike.
A mode's figure is the mean of its rounds' ms/step; the ratios in `summary` are ratios of those means. The
machine's load average (os.getloadavg) is recorded before and after. `summary[...]["cpu"]` holds the same
ratios of CPU time per step (this process's and the server's together, `cpu_ms_per_step`): what a mode
costs when no core is free. On a machine busier than its cores, wall time measures the scheduler's share
as much as the work (a mode whose work runs in a second process, the server, gets a second share), so read
the wall ratios next to the load average and the CPU ratios.

The rater is the one given per denoiser, or else an untrained rater of the default kind for the data (the
cost of scoring does not depend on the weights), exported to ONNX as `nrctl export` does.

    report = run_select_overhead(SelectSettings(rounds=3), progress=print)
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from noiserater.trainer.bench.cpu import process_cpu_s

MODES = ("uniform", "local", "local_prefetch", "remote", "remote_prefetch")
DENOISERS = {"mlp": "digits", "unet": "digits-image"}  # denoiser -> the built-in dataset it trains on
DEFAULT_STEPS = {"mlp": 300, "unet": 40}
# The goals this bench reports against: (denoiser or None for every denoiser, summary ratio, bound).
GOALS = ((None, "remote_prefetch_vs_local", 1.02), ("unet", "local_vs_uniform", 1.10))
SEED = 0
SUMMARY_RATIOS = {"local_vs_uniform": ("local", "uniform"), "remote_vs_local": ("remote", "local"),
                  "remote_prefetch_vs_local": ("remote_prefetch", "local"),
                  "remote_prefetch_vs_uniform": ("remote_prefetch", "uniform"),
                  "local_prefetch_vs_uniform": ("local_prefetch", "uniform")}
MIN_STEPS = 4  # a run is timed over its steps 1 .. N-2


@dataclass
class SelectSettings:
    denoisers: tuple[str, ...] = ("mlp", "unet")
    modes: tuple[str, ...] = MODES
    steps: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_STEPS))  # steps per run, per denoiser
    rounds: int = 3
    warmup_steps: int = 10
    batch: int = 128
    k: int = 8
    threads: int = 1  # torch intra-op threads, and the in-process rater's onnxruntime intra-op threads
    device: str = "cpu"  # where the denoiser trains
    raters: dict[str, Path] = field(default_factory=dict)  # denoiser -> ONNX file (default: an untrained rater)
    server_args: tuple[str, ...] = ("--device", "cpu", "--intra-op-threads", "1")

    def check(self) -> None:
        unknown = [d for d in self.denoisers if d not in DENOISERS]
        if unknown or not self.denoisers:
            raise ValueError(f"denoisers: {', '.join(unknown) or 'none given'} (choose from {', '.join(DENOISERS)})")
        if self.rounds < 1 or self.batch < 1 or self.k < 2 or self.threads < 1:
            raise ValueError("rounds, batch and threads must be >= 1, and K >= 2")
        unknown = [m for m in self.modes if m not in MODES]
        if unknown or not self.modes:
            raise ValueError(f"modes: {', '.join(unknown) or 'none given'} (choose from {', '.join(MODES)})")
        if "uniform" not in self.modes:
            self.modes = ("uniform", *self.modes)
        if self.warmup_steps < MIN_STEPS:
            raise ValueError(f"warmup_steps: at least {MIN_STEPS}")
        for denoiser in self.denoisers:
            if self.steps.get(denoiser, 0) < MIN_STEPS:
                raise ValueError(f"steps: {denoiser} needs at least {MIN_STEPS} steps per run")
            rater = self.raters.get(denoiser)
            if rater is not None and not Path(rater).is_file():
                raise ValueError(f"rater for {denoiser}: no such file {rater}")


@dataclass
class _Bench:
    """One denoiser's data, evaluation context, rater file and selectors."""

    denoiser: str
    data: Any
    context: Any
    config: Any
    onnx: Path
    local: Any = None
    remote: Any = None


def _export_untrained_rater(data_shape: tuple[int, ...], num_timesteps: int, dataset: str, path: Path) -> Path:
    import torch

    from noiserater.trainer.stage1.export import export_rater
    from noiserater.trainer.stage1.rater import build_rater, default_rater_kind

    state = torch.random.get_rng_state()
    torch.manual_seed(SEED)
    rater = build_rater(default_rater_kind(data_shape), data_shape, num_timesteps)
    torch.random.set_rng_state(state)
    export_rater(rater, path, dataset=dataset, schedule="linear", provenance={"untrained": True, "seed": SEED})
    return path


def _prepare(st: SelectSettings, denoiser: str, repository: Path) -> _Bench:
    """Data, config and the rater file (copied into the server's repository as model `<dataset>` version 1)."""
    import shutil

    from noiserater.core.scoring import RaterSession
    from noiserater.trainer.stage2.training import EvalContext, Stage2Config
    from noiserater.trainer.substrate.data import load_dataset

    dataset = DENOISERS[denoiser]
    data = load_dataset(dataset)
    target = repository / dataset / "1" / "model.onnx"
    target.parent.mkdir(parents=True, exist_ok=True)
    if denoiser in st.raters:
        shutil.copyfile(st.raters[denoiser], target)
    else:
        _export_untrained_rater(data.data_shape, Stage2Config.num_timesteps, dataset, target)
    info = RaterSession(target, device="cpu").info
    if tuple(info.data_shape) != tuple(data.data_shape):
        raise ValueError(f"rater for {denoiser}: data shape {list(info.data_shape)} is not {dataset}'s "
                         f"{list(data.data_shape)}")
    config = Stage2Config(steps=st.steps[denoiser], batch_size=st.batch, k=st.k, num_timesteps=info.num_timesteps,
                          schedule=info.schedule or "linear", denoiser=denoiser, eval_every=st.steps[denoiser],
                          eval_repeats=1, quality=False, device=st.device, rater_threads=st.threads)
    return _Bench(denoiser, data, EvalContext.build(data, config), config, target)


def _run(bench: _Bench, mode: str, steps: int, advance: Callable[[int], None] | None,
         server_pid: int | None) -> dict[str, float]:
    """One stage-2 run of `mode`, timed over its steps 1 .. steps-2 (the first step's warm-up and the final
    evaluation left out): wall ms/step, this process's CPU ms/step (all its threads), the server's CPU ms/step,
    and the selection's wall ms/step inside the loop."""
    from dataclasses import replace

    from noiserater.trainer.stage2.training import train_stage2

    selector = bench.local if mode.startswith("local") else bench.remote if mode.startswith("remote") else None
    config = replace(bench.config, steps=steps, eval_every=steps,
                     prefetch="all" if mode.endswith("_prefetch") else "off")
    marks: list[tuple[float, float, float]] = []

    def tick(n: int) -> None:
        if len(marks) in (0, steps - 2):  # after step 0, and after step steps-2
            server_s = process_cpu_s(server_pid) if server_pid else 0.0
            marks.append((time.perf_counter(), time.process_time(), server_s))
        else:
            marks.append(marks[-1])
        if advance is not None:
            advance(n)

    result = train_stage2(bench.data, "uniform" if selector is None else "rater-argmax", steps, SEED,
                          selector=selector, config=config, context=bench.context, progress=tick)
    (wall0, cpu0, server0), (wall1, cpu1, server1) = marks[0], marks[steps - 2]
    per_step = 1000 / max(1, steps - 2)
    return {"ms_per_step": (wall1 - wall0) * per_step, "cpu_ms_per_step": (cpu1 - cpu0) * per_step,
            "server_cpu_ms_per_step": (server1 - server0) * per_step,
            "selection_ms_per_step": result.metrics["selection_ms_per_step"]}


def _mode_entry(runs: list[dict[str, float]]) -> dict[str, Any]:
    """A mode's figures: per figure the mean over rounds, and the rounds' values (`rounds` for ms/step)."""
    entry: dict[str, Any] = {}
    for key in runs[0]:
        values = [r[key] for r in runs]
        entry[key] = sum(values) / len(values)
        entry["rounds" if key == "ms_per_step" else key.removesuffix("_ms_per_step") + "_rounds"] = values
    return entry


def _machine() -> dict[str, Any]:
    import onnxruntime
    import torch

    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
            "python": platform.python_version(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__}


def _portable(command: list[str], repository: Path) -> list[str]:
    """The server's command line as a user would type it: the script's name, no temporary path or port."""
    out = [Path(command[0]).name]
    for i, arg in enumerate(command[1:], start=1):
        previous = command[i - 1]
        out.append("REPOSITORY" if arg == str(repository) else "PORT" if previous == "--port" else arg)
    return out


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def summarise(denoisers: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The summary ratios per denoiser, and the goals with whether each is met."""
    summary: dict[str, Any] = {}
    for name, entry in denoisers.items():
        ms = {mode: row["ms_per_step"] for mode, row in entry["modes"].items()}
        cpu = {mode: row["cpu_ms_per_step"] + row["server_cpu_ms_per_step"] for mode, row in entry["modes"].items()}
        summary[name] = {key: _ratio(ms[a], ms[b]) for key, (a, b) in SUMMARY_RATIOS.items() if a in ms and b in ms}
        summary[name]["cpu"] = {key: _ratio(cpu[a], cpu[b]) for key, (a, b) in SUMMARY_RATIOS.items()
                                if a in cpu and b in cpu}
        summary[name]["ms_per_step"] = ms
        summary[name]["cpu_ms_per_step"] = cpu
    goals = {}
    for only, key, bound in GOALS:
        for name in summary:
            if only in (None, name) and key in summary[name]:
                value = summary[name][key]
                goals[f"{name}.{key}"] = {"at_most": bound, "value": value, "met": value <= bound}
    return summary, goals


def run_select_overhead(st: SelectSettings, progress: Callable[[str], None] | None = None,
                        advance: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Measure every mode for every denoiser (see the module doc); the report as a dict. `progress(text)`
    says what runs; `advance(n)` counts steps done (for a progress bar of `total_steps(st)`)."""
    import torch

    from noiserater.client.selector import NoiseSelector
    from noiserater.trainer.bench.local_server import start_rater_server

    st.check()
    say = progress or (lambda text: None)
    load_before = os.getloadavg()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(st.threads)
    started = time.perf_counter()
    modes = st.modes
    remote = any(m.startswith("remote") for m in modes)
    rows: dict[str, dict[str, list[dict[str, float]]]] = {d: {m: [] for m in modes} for d in st.denoisers}
    server = server_command = None
    try:
        with ExitStack() as stack:
            repository = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nr-select-bench-")))
            benches = {d: _prepare(st, d, repository) for d in st.denoisers}
            if remote:
                say(f"starting rater-server {' '.join(st.server_args)}")
                server = start_rater_server(stack, repository, st.server_args)
                server_command = _portable(server.command, repository)
            for bench in benches.values():
                dataset = DENOISERS[bench.denoiser]
                bench.local = stack.enter_context(NoiseSelector.local(
                    bench.onnx, num_candidates=st.k, seed=SEED, intra_op_threads=st.threads))
                if server is not None:
                    bench.remote = stack.enter_context(NoiseSelector.remote(
                        server.target, model=dataset, dataset=dataset, num_candidates=st.k, seed=SEED))
            server_pid = server.pid if server is not None else None
            for bench in benches.values():
                for mode in modes:
                    say(f"warm-up {bench.denoiser} {mode}")
                    _run(bench, mode, st.warmup_steps, advance, server_pid)
            for r in range(st.rounds):
                order = modes[r % len(modes):] + modes[:r % len(modes)]
                for bench in benches.values():
                    for mode in order:
                        say(f"round {r + 1}/{st.rounds} {bench.denoiser} {mode}")
                        rows[bench.denoiser][mode].append(
                            _run(bench, mode, st.steps[bench.denoiser], advance, server_pid))
            failures = {b.denoiser: {k: v for k, v in b.remote.counters.items()
                                     if k in ("fallback_local", "fallback_gaussian", "outages")}
                        for b in benches.values() if b.remote is not None}
    finally:
        torch.set_num_threads(threads_before)
    denoisers = {}
    for name, modes in rows.items():
        denoisers[name] = {
            "dataset": DENOISERS[name], "steps_per_run": st.steps[name], "remote_failures": failures.get(name, {}),
            "rater": str(st.raters[name]) if name in st.raters else "untrained (default kind, seed 0)",
            "modes": {mode: _mode_entry(runs) for mode, runs in modes.items()}}
    summary, goals = summarise(denoisers)
    settings = asdict(st)
    settings["raters"] = {k: str(v) for k, v in st.raters.items()}
    return {"settings": settings, "machine": {**_machine(), "loadavg_before": list(load_before),
                                              "loadavg_after": list(os.getloadavg())},
            "server_command": server_command,
            "wall_seconds": round(time.perf_counter() - started, 1),
            "denoisers": denoisers, "summary": summary, "goals": goals}


def total_steps(st: SelectSettings) -> int:
    """Training steps the bench runs in all (warm-up included)."""
    return sum(len(st.modes) * (st.warmup_steps + st.rounds * st.steps[d]) for d in st.denoisers)


def render_markdown(report: dict[str, Any]) -> str:
    """The report as a short Markdown page: the command, a table per denoiser, the goals."""
    st = report["settings"]
    lines = ["# Selection overhead per training step", "",
             f"Command: `{report.get('command', '')}`", "",
             f"Stage-2 steps, batch {st['batch']}, K = {st['k']}, {st['threads']} torch thread(s), "
             f"{st['rounds']} interleaved rounds; denoiser on {st['device']}. Load average (1, 5, 15 min) "
             f"before {fmt_load(report['machine']['loadavg_before'])}, after "
             f"{fmt_load(report['machine']['loadavg_after'])} on {report['machine']['cpu_count']} CPUs."
             + (f" Server: `{' '.join(report['server_command'])}`." if report["server_command"] else ""), ""]
    for name, entry in report["denoisers"].items():
        summary = report["summary"][name]
        lines += [f"## {name} ({entry['dataset']}, {entry['steps_per_run']} steps per run)", "",
                  "| mode | ms/step | per round | vs uniform | CPU ms/step | server CPU ms/step | selection ms/step |",
                  "|---|---|---|---|---|---|---|"]
        for mode in (m for m in MODES if m in entry["modes"]):
            row = entry["modes"][mode]
            rounds = ", ".join(f"{v:.2f}" for v in row["rounds"])
            vs = _ratio(row["ms_per_step"], entry["modes"]["uniform"]["ms_per_step"])
            lines.append(f"| {mode} | {row['ms_per_step']:.2f} | {rounds} | {vs:.3f}x | {row['cpu_ms_per_step']:.2f} | "
                         f"{row['server_cpu_ms_per_step']:.2f} | {row['selection_ms_per_step']:.2f} |")
        def words(ratios: dict[str, float]) -> str:
            return ", ".join(f"{key.replace('_vs_', ' vs ').replace('_', ' ')} {value:.3f}x"
                             for key, value in ratios.items())

        wall = {k: v for k, v in summary.items() if k in SUMMARY_RATIOS}
        lines += ["", f"Ratios of the means, wall time: {words(wall)}. CPU time (this process + the server): "
                      f"{words(summary['cpu'])}.", ""]
    lines += ["## Goals", ""]
    for key, goal in report["goals"].items():
        lines.append(f"- {key} at most {goal['at_most']}: {goal['value']:.3f} ({'met' if goal['met'] else 'not met'})")
    return "\n".join(lines) + "\n"


def fmt_load(load: list[float]) -> str:
    return "/".join(f"{v:.2f}" for v in load)

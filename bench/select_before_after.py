"""Selection's cost per training step with the client and core packages of two commits, in one run: `nrctl bench
select` (this tree's bench, trainer, server and CLI) alternates between the `before` packages and this tree's,
one round per run, the order flipping from pair to pair, so load from other processes falls on both alike.
Writes JSON with each side's ms/step per mode (mean over the pairs, and per pair), the summary ratios per side,
and the paired after/before ratio per mode. Then, alternating the same way, the CPU time one selection costs
outside training (`selection_cpu`: the calling thread's, the whole process's and the server's, per call of
local `select`, remote `select` and a prefetching step's `prefetch` + `select`), which a busy machine
disturbs far less than wall time. Not a test.

    mkdir -p /tmp/before && git archive BEFORE client core | tar -x -C /tmp/before
    flock /work/bench.lock .venv/bin/python bench/select_before_after.py --before /tmp/before --pairs 3 \
        --out docs/results/select-overhead-before-after.json

The `before` packages must have what this tree's stage 2 asks of a selector (`is_remote`, to prefetch).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIDES = ("before", "after")
RATIOS = (("local", "uniform"), ("remote", "local"), ("remote_prefetch", "local"), ("local_prefetch", "uniform"))


def pythonpath(client_core: Path) -> str:
    return os.pathsep.join([str(client_core / "core/src"), str(client_core / "client/src"),
                            *(str(ROOT / d / "src") for d in ("trainer", "server", "cli"))])


def where_imported(env: dict[str, str]) -> dict[str, str]:
    """The files the core and client packages load from under `env` (to check which side runs)."""
    code = ("import json, noiserater.core.codec as c, noiserater.client.selector as s; "
            "print(json.dumps({'core': c.__file__, 'client': s.__file__}))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


SELECTION_CPU = r"""
import json, shutil, sys, tempfile, time
from contextlib import ExitStack
from pathlib import Path
import torch
from noiserater.client.selector import NoiseSelector
from noiserater.trainer.bench.cpu import process_cpu_s
from noiserater.trainer.bench.local_server import start_rater_server
from noiserater.trainer.bench.select_overhead import _export_untrained_rater
torch.set_num_threads(1)
calls, out = int(sys.argv[1]), {}
with ExitStack() as stack:
    repo = Path(stack.enter_context(tempfile.TemporaryDirectory()))
    shapes = {"digits": (64,), "digits-image": (1, 8, 8)}
    for name, shape in shapes.items():
        (repo / name / "1").mkdir(parents=True)
        _export_untrained_rater(shape, 1000, name, repo / name / "1" / "model.onnx")
    server = start_rater_server(stack, repo, ["--device", "cpu", "--intra-op-threads", "1"])
    for name, shape in shapes.items():
        n = calls if name == "digits" else calls // 4
        local = stack.enter_context(NoiseSelector.local(repo / name / "1" / "model.onnx", seed=0, intra_op_threads=1))
        remote = stack.enter_context(NoiseSelector.remote(server.target, model=name, seed=0))
        gen = torch.Generator().manual_seed(0)
        xs = [(torch.rand((128, *shape), generator=gen) * 2 - 1, torch.randint(0, 1000, (128,), generator=gen))
              for _ in range(n + 1)]
        def prefetching():
            remote.prefetch(*xs[0])
            for i in range(n):
                remote.select(*xs[i])
                remote.prefetch(*xs[i + 1])
            remote.select(*xs[n])
        for what, run in (("local_select", lambda: [local.select(*x) for x in xs[:n]]),
                          ("remote_select", lambda: [remote.select(*x) for x in xs[:n]]),
                          ("remote_prefetch_step", prefetching)):
            run()
            thread, process, served = time.thread_time(), time.process_time(), process_cpu_s(server.pid)
            run()
            out[f"{name}.{what}"] = {"thread_ms": (time.thread_time() - thread) / n * 1000,
                                     "process_ms": (time.process_time() - process) / n * 1000,
                                     "server_ms": (process_cpu_s(server.pid) - served) / n * 1000}
print(json.dumps(out))
"""


def selection_cpu(envs: dict[str, dict[str, str]], pairs: int, calls: int) -> dict:
    """The CPU time per selection of each side (see the module doc), median over `pairs` alternated runs."""
    import statistics

    runs: dict[str, list[dict]] = {side: [] for side in SIDES}
    for pair in range(pairs):
        for side in SIDES if pair % 2 == 0 else SIDES[::-1]:
            print(f"selection CPU {pair + 1}/{pairs}: {side}", file=sys.stderr, flush=True)
            out = subprocess.run([sys.executable, "-c", SELECTION_CPU, str(calls)], env=envs[side], check=True,
                                 capture_output=True, text=True)
            runs[side].append(json.loads(out.stdout))
    report: dict = {"calls": calls, "pairs": pairs}
    for key in runs["after"][0]:
        entry = {}
        for side in SIDES:
            entry[side] = {m: statistics.median(r[key][m] for r in runs[side]) for m in runs[side][0][key]}
            entry[side + "_runs"] = [r[key] for r in runs[side]]
        entry["after_vs_before"] = {m: entry["after"][m] / entry["before"][m] if entry["before"][m] else None
                                    for m in entry["after"]}
        report[key] = entry
    return report


def ratios(per_mode: dict[str, float]) -> dict[str, float]:
    return {f"{a}_vs_{b}": per_mode[a] / per_mode[b] for a, b in RATIOS if a in per_mode and b in per_mode}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="a folder holding client/ and core/ of BEFORE")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--calls", type=int, default=300, help="selections per selection-CPU measurement")
    parser.add_argument("bench_args", nargs="*", help="more `nrctl bench select` flags (after --)")
    args = parser.parse_args()
    envs = {side: {**os.environ, "PYTHONPATH": pythonpath(tree)}
            for side, tree in (("before", args.before.resolve()), ("after", ROOT))}
    imported = {side: where_imported(env) for side, env in envs.items()}
    command = [sys.executable, "-m", "noiserater.cli.main", "bench", "select", "--rounds", "1", *args.bench_args]
    runs: dict[str, list[dict]] = {side: [] for side in SIDES}
    loads = [os.getloadavg()]
    with tempfile.TemporaryDirectory() as tmp:
        for pair in range(args.pairs):
            for side in SIDES if pair % 2 == 0 else SIDES[::-1]:
                out = Path(tmp) / f"{side}-{pair}.json"
                print(f"pair {pair + 1}/{args.pairs}: {side}", file=sys.stderr, flush=True)
                subprocess.run([*command, "--out", str(out)], env=envs[side], check=True, stdout=subprocess.DEVNULL)
                runs[side].append(json.loads(out.read_text()))
                loads.append(os.getloadavg())
    report: dict = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "bench_command": command[2:],
                    "imported_from": imported, "pairs": args.pairs, "loadavg_between_runs": loads, "denoisers": {}}
    for name in runs["after"][0]["denoisers"]:
        modes = list(runs["after"][0]["denoisers"][name]["modes"])
        entry: dict = {}
        for side in SIDES:
            rows = [r["denoisers"][name]["modes"] for r in runs[side]]
            per_pair = {m: [row[m]["ms_per_step"] for row in rows] for m in modes}
            means = {m: sum(v) / len(v) for m, v in per_pair.items()}
            # CPU per step of the training process and the server together
            cpu = {m: sum(row[m]["cpu_ms_per_step"] + row[m]["server_cpu_ms_per_step"] for row in rows) / len(rows)
                   for m in modes}
            entry[side] = {"ms_per_step": means, "per_pair": per_pair, "cpu_ms_per_step": cpu,
                           "ratios": ratios(means), "cpu_ratios": ratios(cpu)}
        entry["after_vs_before_per_mode"] = {m: entry["after"]["ms_per_step"][m] / entry["before"]["ms_per_step"][m]
                                             for m in modes}
        entry["after_vs_before_per_mode_cpu"] = {
            m: entry["after"]["cpu_ms_per_step"][m] / entry["before"]["cpu_ms_per_step"][m] for m in modes}
        report["denoisers"][name] = entry
    report["selection_cpu"] = selection_cpu(envs, args.pairs, args.calls)
    report["loadavg_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    for name, entry in report["denoisers"].items():
        for side in SIDES:
            for kind in ("ratios", "cpu_ratios"):
                print(f"{name} {side} {kind}: " + ", ".join(f"{k} {v:.3f}" for k, v in entry[side][kind].items()))
    for key, entry in report["selection_cpu"].items():
        if isinstance(entry, dict):
            print(f"{key}: " + ", ".join(f"{m} {entry['before'][m]:.3f} -> {entry['after'][m]:.3f} ms"
                                         for m in entry["after"]))


if __name__ == "__main__":
    main()

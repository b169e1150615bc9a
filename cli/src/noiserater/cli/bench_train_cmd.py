"""`nrctl bench train`: does training on rater-selected noise pay off, against uniform noise and the peers?"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import typer
from typer.core import TyperCommand

from noiserater.cli.options import Denoiser, Layout, Objective, value
from noiserater.cli.output import emit_json, fail, progress_bar, table

RUNS_LOG = "runs.jsonl"
DEFAULT_METHODS = "uniform,rater-argmax,rater-assign,immiscible,immiscible-knn,min-snr"
METHODS_HELP = ("Comma-separated names of registered noise sources{names}. uniform, the paired baseline, "
                "always runs.")
PLUGIN_HELP = ("Import a module (a dotted name or a .py file) that registers noise sources, so --methods can "
               "name them: in it, @register(\"my-noise\") from noiserater.client.sources on a factory "
               "f(generator, ...) whose result has sample(x0, t, step) -> eps and loss_weights(t) -> None or "
               "weights. Repeatable.")


class BenchTrainCommand(TyperCommand):
    """Fills the registry's names into --methods' help when help is shown: the registry imports torch, which
    the rest of nrctl should not wait for at start."""

    def format_help(self, ctx, formatter) -> None:
        import noiserater.trainer.stage2.sources  # noqa: F401  (registers the rater rules)
        from noiserater.client.sources import names

        for param in self.params:
            if param.name == "methods":
                param.help = METHODS_HELP.format(names=": " + ", ".join(names()))
        super().format_help(ctx, formatter)


def load_plugins(plugins: list[str]) -> list[str]:
    """--plugin's callback (eager, so the plugins' sources are registered before --help or --methods)."""
    if plugins:
        from noiserater.trainer.stage2.sources import Stage2Error, load_plugin

        for spec in plugins:
            try:
                load_plugin(spec)
            except Stage2Error as exc:
                raise typer.BadParameter(str(exc)) from None
    return plugins


def resolve_rater(rater: Path, out_dir: Path, dataset: str) -> Path:
    """An ONNX file as is; a trained rater (a run folder, its rater.pt or a model.safetensors folder) exported to
    OUT/rater.onnx, so the bench scores through the same onnxruntime path as serving."""
    if rater.suffix == ".onnx":
        if not rater.is_file():
            raise ValueError(f"rater file not found: {rater}")
        return rater
    from noiserater.trainer.stage1.export import export_rater
    from noiserater.trainer.stage1.rater import RaterLoadError, load_rater, rater_source

    try:
        source = rater_source(rater)
        model, info = load_rater(source)
    except RaterLoadError as exc:
        raise ValueError(f"--rater: {exc}") from None
    onnx_path = out_dir / "rater.onnx"
    export_rater(model, onnx_path, dataset=info.get("dataset") or dataset, schedule=info.get("schedule", ""),
                 objective=info.get("objective") or "eps", meta_objective=info.get("meta_objective", ""),
                 provenance={"checkpoint": str(source), **(info.get("provenance") or {})})
    return onnx_path


def parse_nfe(text: str) -> tuple[int, ...]:
    """--nfe: "1,2,4" -> (1, 2, 4); '' -> no sweep."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--nfe: expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise ValueError("--nfe: every number of function evaluations must be >= 1")
    return values


def cell(summary: dict, paired: dict | None, seeds: int) -> str:
    """mean ± std over seeds and the paired difference against uniform ± its standard error; with one seed
    there is no spread to show, so only the values."""
    text = f"{summary['mean']:.4g}" + (f" ± {summary['std']:.2g}" if seeds > 1 else "")
    if paired is not None:
        if seeds > 1:
            mark = " better" if paired["lower_beyond_2se"] else (" worse" if paired["higher_beyond_2se"] else "")
            text += f" (Δ {paired['mean']:+.3g} ± {paired['se']:.2g}{mark})"
        else:
            text += f" (Δ {paired['mean']:+.3g})"
    return text


def bench_train(
    dataset: str = typer.Option("digits", help="Built-in dataset name or a .npy/.npz file / image folder."),
    key: str = typer.Option(None, "--key", help="The array of an .npz file that holds several."),
    data_range: str = typer.Option("auto", "--data-range", help="How a user array is scaled to [-1, 1]: auto "
                                   "(uint8 from 0..255; floats as they are; other integers refused), LOW:HIGH "
                                   "(e.g. 0:255) or none."),
    layout: Layout = typer.Option(Layout.auto, "--layout", help="Layout of a user image array: auto reads "
                                  "(N, H, W, C) with C <= 4 as channel-last and transposes it."),
    methods: str = typer.Option(DEFAULT_METHODS, help=METHODS_HELP.format(names="")),
    plugin: list[str] = typer.Option([], "--plugin", help=PLUGIN_HELP, is_eager=True, callback=load_plugins),
    seeds: int = typer.Option(3, min=1, help="Number of seeds (0..N-1), paired across methods."),
    first_seed: int = typer.Option(0, "--first-seed", min=0, help="Seeds FIRST..FIRST+N-1 instead (new seeds for a "
                                   "replication)."),
    steps: int = typer.Option(3000, min=1, help="Training steps per run (the same for every method)."),
    rater: Path | None = typer.Option(None, help="Rater run folder (rater.pt) or exported MODEL.onnx."),
    out: Path = typer.Option(..., help="Output folder for report.md, report.json, details.json, curves.png, and "
                             "runs.jsonl (each run as it finishes)."),
    k: int = typer.Option(8, min=1, help="Candidates per sample for the rater rules, immiscible-knn and "
                         "model-aligned."),
    temperature: float = typer.Option(1.0, help="Softmax temperature of rater-sample."),
    kanneal_end: float = typer.Option(0.5, help="rater-kanneal: fraction of the run at which K reaches 1."),
    ot_reg: float = typer.Option(0.05, "--ot-reg", min=0.0, help="ot-sinkhorn: entropic regularisation relative "
                                 "to the mean squared distance (0: exact OT; larger: weaker coupling, towards "
                                 "independent noise)."),
    ot_subbatch: int = typer.Option(0, "--ot-subbatch", min=0, help="ot-subbatch: exact OT within sub-batches of "
                                    "this many samples (1: independent noise; 0: the whole batch, as ot)."),
    batch_size: int = typer.Option(128, min=1),
    lr: float = typer.Option(1e-3),
    denoiser: Denoiser = typer.Option(Denoiser.auto, help="The denoiser trained per method and seed (auto: "
                                      "unet for images, mlp otherwise)."),
    objective: Objective = typer.Option(Objective.eps, "--objective", help="eps: VP DDPM with eps-prediction; "
                                        "flow: the linear interpolant with velocity prediction."),
    nfe: str = typer.Option("1,2,4,8,16,32", "--nfe", help="The few-step sweep: numbers of function evaluations "
                            "of the deterministic sampler (frechet@N, swd@N, straightness@N); '' for none."),
    reference_nfe: int = typer.Option(100, "--reference-nfe", min=2, help="The sweep's high-NFE reference."),
    sampler: str = typer.Option("", "--sampler", help="The sweep's sampler: ddim (eps) or euler / heun (flow); "
                                "default the objective's deterministic one."),
    sweep_count: int = typer.Option(2000, "--sweep-count", min=2, help="Starting noises of the sweep (the same "
                                    "for every method and seed)."),
    sample_steps: int | None = typer.Option(None, help="Also measure frechet/swd of ancestral DDPM samples with "
                                            "this many steps against the training split (eps only)."),
    eval_every: int = typer.Option(0, "--eval-every", min=0, help="Steps between points of the curves (0: about "
                                   "20 points)."),
    no_quality: bool = typer.Option(False, "--no-quality", help="Skip sampling (no frechet / swd / sweep)."),
    threads: int = typer.Option(0, help="torch threads per training (0: torch's default)."),
    jobs: int = typer.Option(1, min=1, help="Trainings run at once in worker processes (results are identical)."),
    variance: Path | None = typer.Option(None, "--variance", help="A `nrctl bench variance` result (its --out "
                                         "folder or variance.json) for this dataset and objective: the report "
                                         "quotes its variance ceiling."),
    resume: bool = typer.Option(False, "--resume", help="Keep the runs OUT/runs.jsonl already holds (same "
                                "settings required; give the same --rater and --plugin, which runs do not record) "
                                "and train only the missing method x seed pairs."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON (progress stays on stderr)."),
) -> None:
    """Train a fresh denoiser per method and seed on the same budget; write an honest report."""
    import torch

    from noiserater.trainer.bench.train import (
        BASELINE,
        logged_runs,
        parse_methods,
        rater_schedule,
        require_rater,
        run_bench,
    )
    from noiserater.trainer.bench.train_report import ceiling_summary, variance_ceiling, write_report
    from noiserater.trainer.stage2.sources import Stage2Error, needs_rater
    from noiserater.trainer.stage2.training import Stage2Config
    from noiserater.trainer.substrate.data import load_dataset

    if threads:
        torch.set_num_threads(threads)
    try:
        ceiling = variance_ceiling(variance) if variance is not None else None
        method_list = parse_methods(methods)
        if BASELINE not in method_list:
            method_list = [BASELINE, *method_list]
        require_rater(method_list, rater)
        data = load_dataset(dataset, key=key, value_range=data_range, layout=value(layout))
        out.mkdir(parents=True, exist_ok=True)
        onnx_path = resolve_rater(rater, out, dataset) if any(needs_rater(m) for m in method_list) else None
        sweep = () if no_quality else parse_nfe(nfe)
        cfg = Stage2Config(steps=steps, batch_size=batch_size, lr=lr, k=k, temperature=temperature,
                           kanneal_end=kanneal_end, ot_reg=ot_reg, ot_subbatch=ot_subbatch,
                           denoiser=value(denoiser), sample_steps=sample_steps,
                           quality=not no_quality and sample_steps is not None, objective=value(objective),
                           nfe=sweep, reference_nfe=reference_nfe, sampler=sampler, sweep_count=sweep_count,
                           eval_every=eval_every)
        if onnx_path is not None:  # train on the diffusion process the rater was meta-learned on
            cfg.num_timesteps, schedule = rater_schedule(onnx_path)
            cfg.schedule = schedule or cfg.schedule
        if ceiling is not None:  # a mismatch is refused now, not after the runs
            ceiling_summary(ceiling, data.name, cfg.objective)
        command = "nrctl " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        total = len(method_list) * seeds * steps
        runs_log = out / RUNS_LOG
        finished = logged_runs(runs_log, cfg) if resume else {}
        if not resume:
            runs_log.write_text("")
        with progress_bar() as bar:
            task = bar.add_task("bench train", total=total, status="")

            def on_run(result) -> None:
                bar.update(task, status=f"{result.method} seed {result.seed}: val {result.metrics['val_loss']:.4f}")
                with runs_log.open("a") as log:  # every finished run at once, so an interrupted bench keeps them
                    log.write(json.dumps(result.to_dict()) + "\n")

            runs = run_bench(data, method_list, range(first_seed, first_seed + seeds), steps, rater_onnx=onnx_path,
                             config=cfg, progress=lambda n: bar.advance(task, n), on_run=on_run, jobs=jobs,
                             plugins=plugin, finished=finished)
        result = write_report(runs, out, command=command, variance=ceiling)
    except (Stage2Error, ValueError, FileNotFoundError, RuntimeError) as exc:
        fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    report, details = result["report"], result["details"]
    if as_json:
        emit_json({"out": str(out), "report": report, "paired_vs_uniform": details["paired_vs_uniform"],
                   "goal_met": details["goal_met"], "references": details["references"]})
        return
    metrics = [m for m in ("val_loss", "frechet@4", "frechet", "swd", "ms_per_step") if m in report[BASELINE]]
    rows = [[m, *(cell(report[m][name], details["paired_vs_uniform"].get(m, {}).get(name), seeds)
                  for name in metrics)] for m in method_list]
    spread = "mean ± std; Δ: paired vs uniform ± SE" if seeds > 1 else "one seed: no error bars; Δ: vs uniform"
    table(f"bench train: {data.name}, {steps} steps x {seeds} seed{'s' if seeds > 1 else ''} ({spread})",
          ["method", *metrics], rows)
    typer.echo(f"report: {out / 'report.md'}")


def register(bench_app: typer.Typer) -> None:
    bench_app.command("train", cls=BenchTrainCommand)(bench_train)

"""`nrctl bench train` end to end on a tiny budget, and the documented report.json structure."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from noiserater.trainer.bench.train import run_bench
from noiserater.trainer.bench.train_report import write_report
from noiserater.trainer.stage2.sources import Stage2Error
from noiserater.trainer.stage2.training import Stage2Config, train_stage2
from noiserater.trainer.substrate.data import load_dataset

METHODS = ("uniform", "rater-argmax", "rater-sample", "rater-assign", "rater-kanneal", "immiscible",
           "immiscible-knn", "min-snr")
TINY = dict(batch_size=16, num_timesteps=100, eval_every=2, eval_repeats=1, sample_steps=4,
            denoiser_kwargs={"hidden": 32, "depth": 1, "time_dim": 16})


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def check_report(report: dict, methods: list[str], seeds: int, sweep: tuple[str, ...] = ()) -> None:
    settings = ("primary", "objective", "reference_nfe") if sweep else ()
    assert list(report) == [*methods, *settings]
    for method in methods:
        for metric in ("val_loss", "test_loss", "frechet", "swd", "ms_per_step", "noise_sq_norm_per_dim",
                       "noise_cosine_with_x0", "steps_to_uniform_final", *sweep):
            entry = report[method][metric]
            assert set(entry) == {"mean", "std", "seeds"}
            assert len(entry["seeds"]) == seeds
        assert report[method]["val_loss"]["mean"] == pytest.approx(sum(report[method]["val_loss"]["seeds"]) / seeds)


def test_bench_all_methods_tiny(digits, rater_onnx, tmp_path):
    cfg = Stage2Config(**TINY)
    runs = run_bench(digits, list(METHODS), [0, 1], 4, rater_onnx=rater_onnx, config=cfg)
    assert runs.methods == list(METHODS) and [r.seed for r in runs.runs["rater-kanneal"]] == [0, 1]
    result = write_report(runs, tmp_path, command="test")
    report = json.loads((tmp_path / "report.json").read_text())
    check_report(report, list(METHODS), 2)
    assert (tmp_path / "curves.png").stat().st_size > 0
    md = (tmp_path / "report.md").read_text()
    assert "Paired differences against uniform" in md and "immiscible-knn" in md
    details = result["details"]
    assert set(details["paired_vs_uniform"]) == set(METHODS) - {"uniform"}
    assert 0.0 <= details["references"]["classifier_test_accuracy"] <= 1.0
    # uniform is Gaussian; immiscible keeps the multiset (same norm), but moves noise towards x0
    assert report["uniform"]["noise_cosine_with_x0"]["mean"] == pytest.approx(0.0, abs=0.05)
    assert report["immiscible"]["noise_cosine_with_x0"]["mean"] > report["uniform"]["noise_cosine_with_x0"]["mean"]


def test_methods_share_init_batches_and_timesteps(digits):
    cfg = Stage2Config(**{**TINY, "quality": False})
    a = train_stage2(digits, "uniform", 3, seed=5, config=cfg)
    b = train_stage2(digits, "uniform", 3, seed=5, config=cfg)
    c = train_stage2(digits, "min-snr", 3, seed=5, config=cfg)
    assert a.curve_val_loss == b.curve_val_loss  # deterministic per seed
    assert a.curve_val_loss[0] == c.curve_val_loss[0]  # same initial model
    assert a.curve_val_loss[-1] != c.curve_val_loss[-1]


def test_rater_methods_need_a_rater(digits):
    with pytest.raises(Stage2Error, match="rater"):
        run_bench(digits, ["uniform", "rater-argmax"], [0], 2, config=Stage2Config(**TINY))
    with pytest.raises(Stage2Error, match="unknown"):
        run_bench(digits, ["uniform", "best-noise"], [0], 2, config=Stage2Config(**TINY))


def test_cli_bench_train_from_a_run_folder(tmp_path):
    from noiserater.cli.main import app
    from noiserater.trainer.stage1.rater import build_rater, save_rater

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    torch.manual_seed(0)
    save_rater(run_dir / "rater.pt", build_rater("mlp", (64,), 100, hidden=16), "mlp", dataset="digits",
               schedule="linear", rater_kwargs={"hidden": 16})
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, ["bench", "train", "--dataset", "digits", "--methods",
                                      "uniform,rater-argmax,rater-assign,immiscible-knn", "--seeds", "2",
                                      "--steps", "3", "--rater", str(run_dir), "--out", str(out), "--k", "4",
                                      "--batch-size", "8", "--sample-steps", "3", "--nfe", "1,4",
                                      "--reference-nfe", "6", "--sweep-count", "32", "--json"])
    assert result.exit_code == 0, result.output
    assert "bench train" in result.stderr  # the progress bar, on stderr also under --json
    payload = json.loads(result.stdout)
    assert set(payload["report"]) == {"uniform", "rater-argmax", "rater-assign", "immiscible-knn", "primary",
                                      "objective", "reference_nfe"}
    assert (out / "rater.onnx").is_file() and (out / "report.md").is_file() and (out / "quality_vs_nfe.png").is_file()
    report = json.loads((out / "report.json").read_text())
    sweep = ("frechet@1", "frechet@4", "frechet@6", "swd@4", "straightness@1", "straightness@4", "memorisation")
    check_report(report, ["uniform", "rater-argmax", "rater-assign", "immiscible-knn"], 2, sweep)
    assert (report["primary"], report["objective"], report["reference_nfe"]) == ("frechet@4", "eps", 6)
    details = json.loads((out / "details.json").read_text())
    assert details["sweep"]["holm_family_size"] == 3 * len([m for m in report["uniform"]
                                                            if m in ("val_loss", "test_loss")
                                                            or ("@" in m and m.split("@")[0] in
                                                                ("frechet", "swd", "straightness"))])
    assert set(details["sweep"]["goal"]) == {"rater-argmax", "rater-assign"}
    assert "## Sample quality against NFE" in (out / "report.md").read_text()


def test_cli_bench_train_errors_are_one_line(tmp_path):
    from noiserater.cli.main import app

    result = CliRunner().invoke(app, ["bench", "train", "--methods", "uniform,rater-argmax", "--steps", "2",
                                      "--out", str(tmp_path / "x")])
    assert result.exit_code == 1
    assert "needs --rater" in result.output
    result = CliRunner().invoke(app, ["bench", "train", "--methods", "nope", "--steps", "2",
                                      "--out", str(tmp_path / "y")])
    assert result.exit_code == 1 and "unknown" in result.output


def test_cli_one_seed_without_quality_reads_honestly(tmp_path, rater_onnx):
    """With one seed there are no error bars (no '± 0', no '± nan'), and with --no-quality the goal, which needs
    frechet, is 'not measured' rather than 'not met'."""
    from noiserater.cli.main import app
    from noiserater.cli.options import Denoiser

    out = tmp_path / "bench"
    result = CliRunner().invoke(app, ["bench", "train", "--methods", "uniform,rater-argmax,immiscible-knn", "--seeds",
                                      "1", "--steps", "2", "--rater", str(rater_onnx), "--out", str(out), "--k", "2",
                                      "--batch-size", "8", "--no-quality", "--denoiser", Denoiser.mlp.value])
    assert result.exit_code == 0, result.output
    assert "one seed" in result.stdout and "(Δ " in result.stdout
    assert "nan" not in result.stdout and "± 0 " not in result.stdout
    md = (out / "report.md").read_text()
    assert "- rater-argmax: not measured (missing: a standard error (needs at least 2 seeds); frechet (sampling " \
           "was skipped: --no-quality))" in md
    assert "± —" not in md and "## Values (one seed: no error bars)" in md
    details = json.loads((out / "details.json").read_text())
    assert details["goal_met"] == {"rater-argmax": None}


def test_holm_and_paired_tests():
    from noiserater.trainer.bench.sweep_report import holm, paired_test

    assert holm([0.01, 0.04, 0.03, 0.2]) == pytest.approx([0.04, 0.09, 0.09, 0.2])
    assert holm([0.5, float("nan")])[0] == 0.5
    test = paired_test([1.0, 2.0, 3.0, 4.0, 5.0], [1.5, 2.4, 3.6, 4.4, 5.5])
    assert test["mean"] == pytest.approx(-0.48) and 0 < test["p"] < 0.001


def test_flow_objective_bench_with_an_ot_comparison(digits, tmp_path):
    """The flow objective through the harness: the sweep runs on the Euler sampler from the same starting
    noises for every method (uniform and min-snr share init and batches, so their 0-step primary values agree)."""
    cfg = Stage2Config(**{**TINY, "quality": False, "objective": "flow", "nfe": (1, 2), "reference_nfe": 4,
                          "sweep_count": 128})
    runs = run_bench(digits, ["uniform", "min-snr"], [0, 1], 4, config=cfg)
    assert runs.runs["uniform"][0].curve_primary[0] == runs.runs["min-snr"][0].curve_primary[0]
    write_report(runs, tmp_path)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["objective"] == "flow" and "frechet@2" in report["uniform"] and "frechet" not in report["uniform"]
    with pytest.raises(Stage2Error, match="does not apply to the flow objective"):
        run_bench(digits, ["uniform"], [0], 2, config=Stage2Config(**{**TINY, "objective": "flow", "nfe": (1,),
                                                                       "sampler": "ddim"}))


def test_a_rater_for_another_objective_is_refused(digits, rater_onnx):
    with pytest.raises(Stage2Error, match=r"trained for the eps objective, the run uses flow \(--objective eps\)"):
        run_bench(digits, ["uniform", "rater-argmax"], [0], 2, rater_onnx=rater_onnx,
                  config=Stage2Config(**{**TINY, "objective": "flow", "quality": False}))


def test_cli_resume_keeps_logged_runs_and_refuses_other_settings(tmp_path):
    """--resume trains only the method x seed pairs OUT/runs.jsonl lacks, and the report is the one a single
    invocation writes; a logged run with other settings is refused in one line."""
    from noiserater.cli.main import app

    def bench(out, methods, *extra):
        return CliRunner().invoke(app, ["bench", "train", "--methods", methods, "--seeds", "2", "--steps", "2",
                                        "--out", str(out), "--batch-size", "8", "--no-quality", "--denoiser", "mlp",
                                        "--threads", "1", *extra])

    whole, part = tmp_path / "whole", tmp_path / "part"
    assert bench(whole, "uniform,immiscible").exit_code == 0
    assert bench(part, "uniform").exit_code == 0
    logged = (part / "runs.jsonl").read_text().splitlines()
    assert len(logged) == 2
    (part / "runs.jsonl").write_text(logged[0] + "\n")  # as if stopped after uniform seed 0
    resumed = bench(part, "uniform,immiscible", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert len((part / "runs.jsonl").read_text().splitlines()) == 4  # 3 trained now, 1 kept
    timing = ("ms_per_step", "selection_ms_per_step")
    report_whole = json.loads((whole / "report.json").read_text())
    report_part = json.loads((part / "report.json").read_text())
    for method in ("uniform", "immiscible"):
        for metric, entry in report_whole[method].items():
            if metric not in timing:
                assert report_part[method][metric]["seeds"] == entry["seeds"], (method, metric)
    refused = bench(part, "uniform", "--resume", "--lr", "0.01")
    assert refused.exit_code != 0 and "ran with other settings (lr)" in refused.output
    assert len(refused.output.strip().splitlines()) == 1


def test_cli_report_quotes_the_variance_ceiling_of_its_dataset_and_objective(tmp_path):
    from noiserater.cli.main import app

    measured = CliRunner().invoke(app, ["bench", "variance", "--dataset", "digits", "--n-t", "4", "--n-x0", "2",
                                        "--n-eps", "2", "--buckets", "2", "--k", "2", "--steps", "3",
                                        "--out", str(tmp_path / "variance")])
    assert measured.exit_code == 0, measured.output
    ratio = json.loads((tmp_path / "variance" / "variance.json").read_text())["gradient"]["is_noise"]["ratio"]

    def bench(out, *extra):
        return CliRunner().invoke(app, ["bench", "train", "--methods", "uniform", "--seeds", "1", "--steps", "2",
                                        "--out", str(out), "--batch-size", "8", "--no-quality", "--denoiser", "mlp",
                                        "--threads", "1", "--variance", str(tmp_path / "variance"), *extra])

    result = bench(tmp_path / "bench")
    assert result.exit_code == 0, result.output
    details = json.loads((tmp_path / "bench" / "details.json").read_text())
    assert details["variance_ceiling"]["ceiling_ratio"] == ratio
    assert f"could lower it at most **{ratio:.3f}x**" in (tmp_path / "bench" / "report.md").read_text()
    refused = bench(tmp_path / "flow", "--objective", "flow")
    assert refused.exit_code != 0
    assert "--variance: measured on digits with the eps objective, the bench is digits with flow" in refused.output
    assert not (tmp_path / "flow" / "runs.jsonl").exists()  # refused before any training

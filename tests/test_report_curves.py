"""sip report's evaluation figure: each student's validation top-1 drawn against the epoch, one point per evaluated
epoch (not one point per run), from the metrics.jsonl that sip train / distill write."""

from __future__ import annotations

import json

from sip.report.collect import evaluation_curves, find_metrics, read_metric_runs
from sip.report.figures import plot_evaluation
from sip.report.page import write_report

from conftest import tiny_train_recipe


def test_the_figure_has_one_point_per_evaluated_epoch_of_each_student(tmp_path):
    from sip.train.run import run_training

    runs = tmp_path / "runs"
    run_training(tiny_train_recipe("optim.epochs=3", "run.eval_every=1"), runs / "every-epoch")
    run_training(tiny_train_recipe("optim.epochs=3", "run.eval_every=2"), runs / "every-2nd")  # epochs 2 and 3
    evaluated = {name: [json.loads(line)["epoch"] for line in (runs / name / "metrics.jsonl").read_text().splitlines()
                        if "val_top1" in json.loads(line)] for name in ("every-epoch", "every-2nd")}
    assert evaluated == {"every-epoch": [1, 2, 3], "every-2nd": [2, 3]}
    key, curves = evaluation_curves(read_metric_runs(find_metrics(runs), runs))
    assert key == "val_top1"
    drawn = plot_evaluation(key, curves, tmp_path / "evaluation.png")
    assert {name: [x for x, _ in points] for name, points in drawn.items()} == \
        {name: [float(e) for e in epochs] for name, epochs in evaluated.items()}
    lines = {n: [json.loads(raw) for raw in (runs / n / "metrics.jsonl").read_text().splitlines()] for n in evaluated}
    assert all(y == next(r["val_top1"] for r in lines[n] if r["epoch"] == x) for n, pts in drawn.items() for x, y in pts)
    # the page shows it
    page = write_report(runs).read_text()
    assert "evaluation.png" in page and (runs / "report" / "evaluation.png").is_file()


def test_a_run_evaluated_once_is_named_and_a_rewritten_epoch_counts_once(tmp_path):
    run = tmp_path / "run"
    for name, rows in {"once": [{"epoch": 1, "train_loss": 2.0}, {"epoch": 2, "train_loss": 1.0, "val_top1": 60.0}],
                       "resumed": [{"epoch": 1, "val_top1": 50.0}, {"epoch": 2, "val_top1": 55.0},
                                   {"epoch": 2, "val_top1": 57.0}, {"epoch": 3, "val_top1": 61.0}]}.items():
        (run / name).mkdir(parents=True)
        (run / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    key, curves = evaluation_curves(read_metric_runs(find_metrics(run), run))
    assert curves == {"once": [(2.0, 60.0)], "resumed": [(1.0, 50.0), (2.0, 57.0), (3.0, 61.0)]}
    page = write_report(run).read_text()
    assert "Evaluated once (no curve): once" in page and "run.eval_every: 1" in page

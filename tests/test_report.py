"""Tables from run folders: mean(std) over seeds beside the paper, CSV, curves, `dcmkd report`,
and `dcmkd reproduce` end to end at the smoke scale on every row of every bundled table."""
from __future__ import annotations

import csv
import io
import json
import statistics

import pytest

from dcmkd.cli import main
from dcmkd.engine.config import dump
from dcmkd.recipes import list_experiments, load_experiment, plan, reproduce
from dcmkd.report import collect, markdown, report_runs, to_csv


def fake_run(run, top1: list[float], top5: list[float] | None = None, epochs: int = 3,
             seconds: float | None = None) -> None:
    """A finished run folder for ``run`` (a PlannedRun) with the given last-epoch errors (and
    training time, when given)."""
    d = run.run_dir
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.yaml").write_text(dump(run.config))
    top5 = top5 or [t / 3 for t in top1]
    history = [{"epoch": e + 1, **{f"test/net{n}/C1/top1": t + 10 * (epochs - 1 - e)
                                   for n, t in enumerate(top1)},
                **{f"train/net{n}/ce": 2.0 - 0.5 * e + n for n in range(len(top1))}}
               for e in range(epochs)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    timed = {} if seconds is None else {"seconds": seconds}
    (d / "summary.json").write_text(json.dumps({"test_top1": top1, "test_top5": top5, **timed}))


def test_mean_std_and_paper_difference(tmp_path):
    exp = load_experiment("dcm-table1")
    runs = plan(exp, rows=["ResNet-164 ×2"], seeds=3, out=tmp_path)
    values = {"Ind": [[22.0], [23.0], [24.5]], "DML": [[20.0, 21.0], [21.0, 21.5], [22.0, 20.5]],
              "DCM": [[19.0, 19.5], [19.2, 19.1], [19.4, 19.6]]}
    for r in runs:
        fake_run(r, values[r.cell.column][r.seed])
    stats = {(s.column, s.network): s for s in collect(exp, runs)}
    ind2 = stats[("Ind", "Net2")]                      # an ind run serves both networks
    assert ind2.top1 == [22.0, 23.0, 24.5] and ind2.model == "resnet164"
    dml1 = stats[("DML", "Net1")]
    assert dml1.mean == pytest.approx(21.0)
    assert dml1.std == pytest.approx(statistics.stdev([20.0, 21.0, 22.0]))   # ddof = 1: 1.0
    assert dml1.diff == pytest.approx(21.0 - 20.69)
    md = markdown(exp, list(stats.values()), scale="full", seeds=3)
    assert "| ResNet-164 ×2 | resnet164 + resnet164 |" in md
    assert "21.00(1.00) · 20.69(0.25) · +0.31" in md
    rows = list(csv.DictReader(io.StringIO(to_csv(exp, list(stats.values())))))
    dcm2 = next(r for r in rows if r["column"] == "DCM" and r["network"] == "Net2")
    assert float(dcm2["mean_top1"]) == pytest.approx(statistics.fmean([19.5, 19.1, 19.6]))
    assert dcm2["values_top1"] == "19.5000 19.1000 19.6000" and dcm2["paper_top1"] == "19.5900"


def test_incomplete_cells_say_so(tmp_path):
    exp = load_experiment("dcm-table1")
    runs = plan(exp, rows=["ResNet-164 ×2"], seeds=2, out=tmp_path)
    fake_run(next(r for r in runs if r.cell.column == "DML"), [20.0, 20.0])
    md = markdown(exp, collect(exp, runs))
    assert "20.00 [1/2 runs] · 20.69(0.25)" in md
    assert "— · 22.56(0.20)" in md                     # no Ind run finished


def test_training_time_per_cell_counts_each_run_once(tmp_path):
    exp = load_experiment("dcm-table1")
    runs = plan(exp, rows=["ResNet-164 ×2"], seeds=2, out=tmp_path)
    minutes = {"Ind": [10, 20], "DML": [30, 60], "DCM": [45, None]}   # DCM seed 1 untimed
    for r in runs:
        fake_run(r, [20.0, 21.0], seconds=None if minutes[r.cell.column][r.seed] is None
                 else 60 * minutes[r.cell.column][r.seed])
    stats = collect(exp, runs)
    md = markdown(exp, stats)
    assert "ResNet-164 ×2: Ind 15.0, DML 45.0, DCM 45.0." in md   # Ind serves both networks
    rows = list(csv.DictReader(io.StringIO(to_csv(exp, stats))))
    assert {r["mean_train_minutes"] for r in rows if r["column"] == "DML"} == {"45.0000"}
    assert "Training time" not in markdown(exp, collect(exp, plan(exp, seeds=1, out=tmp_path / "x")))


def test_a_finished_run_of_another_config_is_refused_not_reported(tmp_path):
    from dcmkd.run_folder import RunConflict
    exp = load_experiment("dcm-table1")
    for r in plan(exp, rows=["ResNet-164 ×2"], seeds=1, out=tmp_path):
        fake_run(r, [20.0, 21.0])
    for table_only in (True, False):     # training would start nothing: every run is finished
        with pytest.raises(RunConflict, match=r"another config \(optim.lr: 0.1 → 0.05\)"):
            reproduce(exp, rows=["ResNet-164 ×2"], seeds=1, out=tmp_path, table_only=table_only,
                      overrides=["optim.lr=0.05"], log=lambda s: None)
    paths = reproduce(exp, rows=["ResNet-164 ×2"], seeds=1, out=tmp_path, log=lambda s: None,
                      overrides=["quiet=true", "device=cpu"])      # resumable keys may differ
    assert "20.00" in paths["table_md"].read_text()


def test_table_only_writes_the_finished_runs_and_trains_nothing(tmp_path, capsys):
    exp = load_experiment("dcm-table1")
    runs = plan(exp, rows=["ResNet-164 ×2"], seeds=2, out=tmp_path)
    with pytest.raises(ValueError, match="no run of dcm-table1 .* is finished"):
        reproduce(exp, rows=["ResNet-164 ×2"], seeds=2, out=tmp_path, table_only=True)
    dml = [r for r in runs if r.cell.column == "DML"]
    fake_run(dml[0], [20.0, 21.0])
    dml[1].run_dir.mkdir(parents=True)                  # seed 1 still training: no summary yet
    (dml[1].run_dir / "metrics.jsonl").write_text('{"epoch": 1, "test/net0/C1/top1": 90.0}\n')
    paths = reproduce(exp, rows=["ResNet-164 ×2"], seeds=2, out=tmp_path, table_only=True)
    md = paths["table_md"].read_text()
    assert "20.00 [1/2 runs] · 20.69(0.25)" in md and "21.00 [1/2 runs]" in md
    assert "— · 22.56(0.20)" in md                      # Ind: nothing finished, nothing trained
    assert "2 seed(s) planned, some cells not yet complete" in md
    assert not any(r.run_dir.exists() for r in runs if r.cell.column != "DML")
    kd = load_experiment("dcm-kd")
    kd_runs = plan(kd, seeds=1, out=tmp_path / "kd")
    fake_run(next(r for r in kd_runs if r.cell.hidden), [5.0])   # only the teacher finished
    with pytest.raises(ValueError, match="no run of dcm-kd"):
        reproduce(kd, seeds=1, out=tmp_path / "kd", table_only=True)
    with pytest.raises(SystemExit) as refused:                 # one or the other
        main(["reproduce", "dcm-table1", "--table-only", "--dry-run"])
    assert refused.value.code == 2
    assert "not allowed with" in capsys.readouterr().err


def test_the_table_of_some_columns_shows_the_other_columns_finished_runs(tmp_path):
    """``--columns`` chooses what is trained; the table keeps every column's finished runs (a
    column trained earlier does not vanish from it), but never another config's."""
    exp = load_experiment("dcm-table1")
    runs = plan(exp, rows=["ResNet-164 ×2"], seeds=1, out=tmp_path)
    by_column = {r.cell.column: r for r in runs}
    fake_run(by_column["DML"], [20.0, 21.0])
    fake_run(by_column["Ind"], [23.0])
    logs: list[str] = []
    paths = reproduce(exp, rows=["ResNet-164 ×2"], columns=["Ind"], seeds=1, out=tmp_path,
                      log=logs.append)                       # Ind finished: nothing trained
    md = paths["table_md"].read_text()
    assert "23.00" in md and "20.00" in md and "21.00" in md
    other = plan(exp, rows=["ResNet-164 ×2"], seeds=1, out=tmp_path, overrides=["optim.lr=0.05"])
    fake_run(next(r for r in other if r.cell.column == "Ind"), [23.0])
    for r in other:                         # DML and DCM hold this lr's config, Ind another
        if r.cell.column == "DML":
            (r.run_dir / "config.yaml").write_text(dump(r.config))
    paths = reproduce(exp, rows=["ResNet-164 ×2"], columns=["Ind"], seeds=1, out=tmp_path,
                      overrides=["optim.lr=0.05"], log=logs.append)
    md = paths["table_md"].read_text()
    assert "20.00" in md                                     # DML rewritten to lr 0.05: shown
    assert not any(line.startswith("not in the table:") for line in logs)
    (by_column["DML"].run_dir / "config.yaml").write_text(dump(by_column["DML"].config))
    paths = reproduce(exp, rows=["ResNet-164 ×2"], columns=["Ind"], seeds=1, out=tmp_path,
                      overrides=["optim.lr=0.05"], log=logs.append)
    assert "20.00" not in paths["table_md"].read_text()      # DML of lr 0.1 is not shown
    assert any(line.startswith("not in the table:") and "optim.lr" in line for line in logs)


def test_finished_runs_are_checked_against_their_data_once_per_dataset(tmp_path, monkeypatch):
    """The data's identity is read once for runs that differ only in keys that do not change
    it (label noise, batch size); a damaged file in a column not chosen leaves that run out of
    the table instead of stopping the reproduction."""
    from dcmkd.engine import trainer
    exp = load_experiment("dcm-table7")
    runs = plan(exp, rows=["0.2", "0.5"], seeds=1, out=tmp_path)
    for r in runs:
        fake_run(r, [20.0, 21.0])
        (r.run_dir / "data.json").write_text('{"dataset": "cifar100", "digest": "x"}')
    calls = []
    monkeypatch.setattr(trainer, "dataset_identity",
                        lambda d: calls.append(d) or {"dataset": "cifar100", "digest": "x"})
    reproduce(exp, rows=["0.2", "0.5"], seeds=1, out=tmp_path, table_only=True,
              log=lambda s: None)
    assert len(calls) == 1
    dml = next(r for r in runs if r.cell.column == "DML" and r.cell.row == "0.2")
    (dml.run_dir / "summary.json").write_text("{")
    logs: list[str] = []
    paths = reproduce(exp, rows=["0.2"], columns=["DCM"], seeds=1, out=tmp_path,
                      table_only=True, log=logs.append)
    assert any(line.startswith("not in the table:") and "summary.json" in line for line in logs)
    assert "20.00" in paths["table_md"].read_text()                  # DCM is there


def test_no_seeds_is_an_error_not_an_empty_table(tmp_path, capsys):
    exp = load_experiment("dcm-table1")
    for seeds in (0, -2):
        with pytest.raises(ValueError, match="--seeds must be at least 1"):
            reproduce(exp, seeds=seeds, out=tmp_path, table_only=True)
    assert main(["reproduce", "dcm-table1", "--seeds", "0", "--out", str(tmp_path)]) != 0
    assert "--seeds" in capsys.readouterr().err
    assert not any(tmp_path.rglob("table.md"))


def test_report_groups_arbitrary_runs_by_config(tmp_path):
    exp = load_experiment("dcm-table7")
    runs = plan(exp, rows=["0.2", "0.5"], seeds=2, out=tmp_path)
    runs = [r for r in runs if r.cell.column in ("DML", "DCM")]
    for r in runs:
        fake_run(r, [10.0 + r.seed, 11.0 + r.seed])
    paths = report_runs([r.run_dir for r in runs], tmp_path / "report")
    md = paths["table_md"].read_text()
    assert "data.label_noise=0.2" in md and "data.label_noise=0.5" in md
    assert md.count("10.50(0.71)") == 4               # 2 rows × (dml, dcm), Net1 over 2 seeds
    assert (tmp_path / "report" / "table.csv").is_file()
    assert any(k.startswith("curves/") and v.is_file() for k, v in paths.items())


def test_report_curves_carry_each_runs_training_loss(tmp_path):
    """Issue 28 item 19: the report's curves have a training-loss row from the runs' metrics."""
    exp = load_experiment("dcm-table1")
    runs = plan(exp, rows=["ResNet-164 ×2"], seeds=2, out=tmp_path)
    for r in runs:
        fake_run(r, [20.0, 21.0])
    stats = {(s.column, s.network): s for s in collect(exp, runs)}
    net2 = stats[("DCM", exp.networks[1])]
    assert net2.losses == [[(1, 3.0), (2, 2.5), (3, 2.0)]] * 2   # train/net1/ce per epoch


def test_report_puts_a_network_trained_alone_in_the_row_of_its_pair(tmp_path):
    exp = load_experiment("quick-cifar10")
    runs = [r for r in plan(exp, rows=["ResNet-20 ×2"], seeds=1, out=tmp_path)
            if r.cell.column in ("Ind", "DML")]
    assert sorted(len(r.config["nets"]) for r in runs) == [1, 2]
    for r in runs:
        fake_run(r, [40.0] if r.cell.column == "Ind" else [30.0, 31.0])
    md = report_runs([r.run_dir for r in runs], tmp_path / "report")["table_md"].read_text()
    assert "| resnet20 + resnet20 | resnet20 + resnet20 | 40.00 | 40.00 | 30.00 | 31.00 |" in md
    assert md.count("\n| resnet20") == 1               # one row, not a row per network count
    assert "Source: 2 run folders given to `dcmkd report`. 1 seed(s)." in md
    assert "Scale" not in md


def test_report_shows_a_lone_network_once_and_refuses_a_seed_given_twice(tmp_path):
    exp = load_experiment("quick-cifar10")
    pair = [r for r in plan(exp, rows=["ResNet-56 + ResNet-20"], seeds=1, out=tmp_path)
            if r.cell.column == "DML"]
    alone = [r for r in plan(exp, rows=["ResNet-20 ×2"], seeds=1, out=tmp_path / "b")
             if r.cell.column == "Ind"]
    for r in pair + alone:
        fake_run(r, [30.0, 31.0][:len(r.config["nets"])])
    runs = [r.run_dir for r in pair + alone]
    paths = report_runs(runs, tmp_path / "report")
    md = paths["table_md"].read_text()
    lone = next(line for line in md.splitlines() if line.startswith("| resnet20 "))
    assert lone.endswith(") | resnet20 |  |  | 30.00 |  |")   # ind Net2: none made up
    assert "ind,Net2" not in paths["table_csv"].read_text()
    with pytest.raises(ValueError, match="are the same run .seed 0 of one config."):
        report_runs([*runs, runs[0]], tmp_path / "report2")


@pytest.mark.parametrize("name", list_experiments())
def test_every_row_runs_end_to_end_at_smoke_scale(name, tmp_path):
    exp = load_experiment(name)
    logs: list[str] = []
    paths = reproduce(exp, scale="smoke", standins=True, out=tmp_path, log=logs.append)
    md = paths["table_md"].read_text()
    for row in exp.rows:
        assert f"| {row} |" in md
    assert "—" not in md.split("|---|")[-1].split("\n\n")[0]     # every cell has a result
    again: list[str] = []
    reproduce(exp, scale="smoke", standins=True, out=tmp_path, log=again.append)
    assert any(line.endswith(", 0 to train") for line in again)   # finished runs are reused


def test_cli_reproduce_and_report(tmp_path, capsys):
    assert main(["reproduce", "--list"]) == 0
    assert "dcm-table5" in capsys.readouterr().out
    assert main(["reproduce", "dcm-tabel5"]) == 2
    assert "did you mean" in capsys.readouterr().err
    out = tmp_path / "r"
    assert main(["reproduce", "dcm-table5", "--scale", "smoke", "--rows", "DML,DCM",
                 "--out", str(out), "loss.gamma=0.5"]) == 0
    printed = capsys.readouterr().out
    assert "| DCM |" in printed and "| baseline |" not in printed
    dcm_run = out / "dcm-table5" / "smoke" / "dcm" / "error" / "s0"
    assert "gamma: 0.5" in (dcm_run / "config.yaml").read_text()
    assert main(["report", str(dcm_run), str(out / "dcm-table5" / "smoke" / "dml" / "error" / "s0"),
                 "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "table.md").read_text()
    assert "| dcm Net1 | dcm Net2 | dml Net1 | dml Net2 |" in md.replace("|  | networks run ", "")


def test_parallel_jobs_train_teachers_first_and_equal_the_sequential_runs(tmp_path):
    exp = load_experiment("dcm-kd")
    logs: list[str] = []
    paths = reproduce(exp, scale="smoke", standins=True, out=tmp_path / "par", jobs=2,
                      log=logs.append)
    def line(prefix: str) -> int:
        return next(i for i, text in enumerate(logs) if text.startswith(prefix))

    assert sum(text.startswith("start ") for text in logs) == 5
    assert sum(text.startswith("done ") for text in logs) == 5
    assert line("done  WRN-28-10 → ResNet-110/Teacher seed 0") < \
        line("start WRN-28-10 → ResNet-110/KD seed 0")
    # a run in a worker is the run a sequential reproduction makes (same seed, same numbers)
    reproduce(exp, scale="smoke", standins=True, out=tmp_path / "seq", log=lambda s: None)
    run = "dcm-kd/smoke/wrn-28-10_to_resnet-110/kd/s0/summary.json"
    par, seq = (json.loads((tmp_path / d / run).read_text()) for d in ("par", "seq"))
    assert par["test_top1"] == seq["test_top1"]
    assert "—" not in paths["table_md"].read_text().split("|---|")[-1].split("\n\n")[0]


def test_parallel_failure_stops_new_runs_and_names_the_run(tmp_path):
    from dcmkd.recipes.runner import RunsFailed

    exp = load_experiment("dcm-table5")
    with pytest.raises(RunsFailed, match=r"run\(s\) failed, \d+ not started: .*dml.*"
                                         r"FileNotFoundError"):
        reproduce(exp, scale="smoke", standins=True, out=tmp_path, jobs=2,
                  overrides=["data.name=folder", f"data.root={tmp_path / 'missing'}"],
                  log=lambda s: None)
    assert not list(tmp_path.rglob("summary.json"))

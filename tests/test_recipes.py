"""The papers' experiments as data: loading, paper numbers, config layering, scales, teachers."""
from __future__ import annotations

import pytest

from dcmkd.recipes import (Experiment, PaperValue, cell_config, list_experiments,
                           load_experiment, plan, shorten)
from dcmkd.engine.config import resolve
from dcmkd.registry import UnknownNameError

#: SPEC.md §5 (DCM paper Table 1), copied by hand: pair → (Ind, DML, DCM) × (Net1, Net2)
SPEC_TABLE1 = {
    "ResNet-164 ×2": ((22.56, 22.56), (20.69, 20.72), (19.57, 19.59)),
    "WRN-28-10 ×2": ((18.72, 18.72), (17.89, 17.95), (16.61, 16.65)),
    "DenseNet-40-12 ×2": ((24.91, 24.91), (23.18, 23.15), (22.35, 22.41)),
    "WRN-28-10 + ResNet-110": ((18.72, 26.55), (17.99, 24.42), (17.82, 22.99)),
    "WRN-28-10 + WRN-28-4": ((18.72, 21.39), (17.80, 20.21), (16.84, 18.76)),
    "WRN-28-10 + MobileNet": ((18.72, 26.30), (17.24, 23.91), (16.83, 21.43)),
    "WRN-28-10(+) ×2": ((18.64, 18.64), (17.62, 17.61), (16.57, 16.59)),
}


def test_every_bundled_experiment_loads():
    names = list_experiments()
    assert {"dcm-table1", "dcm-table2", "dcm-table3", "dcm-table4", "dcm-table5", "dcm-table6",
            "dcm-table7", "dcm-kd", "quick-cifar10"} <= set(names)
    for name in names:
        exp = load_experiment(name)
        assert exp.name == name and exp.rows and exp.cells


def test_table1_numbers_are_spec_section5():
    exp = load_experiment("dcm-table1")
    assert exp.rows == tuple(SPEC_TABLE1)
    for row, values in SPEC_TABLE1.items():
        for column, expected in zip(("Ind", "DML", "DCM"), values):
            cell = exp.cell(f"{row}/{column}")
            assert tuple(p.top1 for p in cell.paper) == expected, (row, column)


@pytest.mark.parametrize("name,row,column,expected", [
    ("dcm-table2", "ResNet-50 + ResNet-18", "DCM", ((24.92, 7.42), (27.93, 9.19))),
    ("dcm-table3", "C1+C2C3C4", "Error", ((16.59, None), (16.73, None))),
    ("dcm-table5", "DCM-2", "Error", ((22.43, None), (22.51, None))),
    ("dcm-table7", "0.8", "DCM", ((31.26, None),)),
])
def test_other_tables_hold_the_papers_numbers(name, row, column, expected):
    cell = load_experiment(name).cell(f"{row}/{column}")
    assert tuple((p.top1, p.top5) for p in cell.paper) == expected


@pytest.mark.parametrize("text,expected", [
    ("22.56(0.20)", PaperValue(22.56, 0.20)),
    ("31.08/11.17", PaperValue(31.08, None, 11.17)),
    ("acc:69.1", PaperValue(30.9)),
    ("acc:69.1/89.0", PaperValue(30.9, None, 11.0)),
    ("-", PaperValue()),
    (26.66, PaperValue(26.66)),
])
def test_paper_value_notation(text, expected):
    assert PaperValue.parse(text) == expected


def test_bad_paper_value_and_bad_keys_are_named():
    with pytest.raises(ValueError, match="22.56"):
        PaperValue.parse("about 22")
    base = {"name": "x", "title": "t", "columns": ["A"], "rows": [
        {"name": "r", "cells": {"A": {"config": {"method": "ind"}}}}]}
    Experiment.from_dict(base)
    with pytest.raises(UnknownNameError, match="colums"):
        Experiment.from_dict({**base, "colums": ["A"]})
    with pytest.raises(UnknownNameError, match="'B'"):
        Experiment.from_dict({**base, "rows": [{"name": "r", "cells": {"B": {}}}]})
    with pytest.raises(UnknownNameError, match="teacher"):
        Experiment.from_dict({**base, "rows": [{"name": "r", "cells": {
            "A": {"config": {"teacher_weights": "@r/Nope"}}}}]})
    with pytest.raises(UnknownNameError, match="dcm-table1"):
        load_experiment("dcm-tabel1")
    for paper in ("10.0", 10.0):   # one value per network, in a list (not a string's letters)
        with pytest.raises(ValueError, match="paper: expected a list of one value per network"):
            Experiment.from_dict({**base, "rows": [{"name": "r", "cells": {
                "A": {"paper": paper}}}]})
    assert Experiment.from_dict({**base, "rows": [{"name": "r", "cells": {
        "A": {"paper": ["10.0(0.5)"]}}}]}).cells[0].paper[0] == PaperValue(10.0, 0.5)


def test_shorten_keeps_the_schedule_shape():
    resnet = shorten(resolve("cifar_resnet"), 20)
    assert resnet["epochs"] == 20 and resnet["schedule"]["step_size"] == 6
    wrn = shorten(resolve("cifar_wrn"), 20)
    assert wrn["schedule"]["milestones"] == [6, 12, 16]
    dense = shorten(resolve("cifar_densenet"), 30)
    assert dense["schedule"]["milestones"] == [0.5, 0.75]        # fractions stay
    assert shorten(resolve("cifar_resnet"), 15)["schedule"]["step_size"] == 5  # 4.5 rounds up


def test_cell_config_layers_recipe_row_cell_scale_and_user():
    t1 = load_experiment("dcm-table1")
    plus = cell_config(t1, t1.cell("WRN-28-10(+) ×2/DCM"), seed=3)
    assert plus["recipe"] == "cifar_wrn" and plus["model_options"] == {"dropout": 0.3}
    assert plus["method"] == "dcm" and plus["seed"] == 3 and plus["data"]["name"] == "cifar100"
    mixed = cell_config(t1, t1.cell("WRN-28-10 + ResNet-110/Ind"), seed=0)
    assert mixed["recipe"] == "cifar_wrn" and mixed["data"]["batch_size"] == 128
    dense = cell_config(t1, t1.cell("DenseNet-40-12 ×2/DML"), seed=0)
    assert dense["optim"]["nesterov"] and dense["epochs"] == 300
    quick = cell_config(t1, t1.cell("DenseNet-40-12 ×2/DML"), 0, "quick", ["optim.lr=0.05"])
    assert quick["epochs"] == 30 and quick["optim"]["lr"] == 0.05
    t7 = load_experiment("dcm-table7")
    noisy = cell_config(t7, t7.cell("0.5/DCM"), 0)
    assert noisy["data"] == {**noisy["data"], "name": "cifar10", "label_noise": 0.5}
    t3 = load_experiment("dcm-table3")
    assert cell_config(t3, t3.cell("C1+C4/Error"), 0)["classifiers"] == "C1+C4"
    user = cell_config(t1, t1.cell("ResNet-164 ×2/DCM"), 0, "quick", ["epochs=4"])
    assert user["epochs"] == 4 and user["schedule"]["step_size"] == 1


def test_quick_protocol_of_the_published_result():
    """The small-budget protocol (issue 13): 1,000 images, 120 epochs, batch 32, the
    distillation weights ramped over 30 epochs except in the paper-loss column, and nothing of
    it at the full scale."""
    exp = load_experiment("quick-cifar10")
    cfg = cell_config(exp, exp.cell("ResNet-20 ×2/DCM"), 0, "quick")
    assert cfg["epochs"] == 120 and cfg["schedule"]["name"] == "multistep"
    assert cfg["schedule"]["milestones"] == [0.5, 0.75] and cfg["eval_every"] == 10
    assert cfg["schedule"]["warmup_epochs"] == 1 and cfg["data"]["train_subset"] == 1000
    assert cfg["data"]["batch_size"] == 32 and cfg["optim"]["weight_decay"] == 1e-4
    assert cfg["loss"]["rampup"] == 30 and cfg["data"]["name"] == "folder"
    assert resolve("demo", ["method=dcm"])["loss"]["rampup"] == 3   # the same 25% in the demo
    paper = cell_config(exp, exp.cell("ResNet-20 ×2/DCM paper loss"), 0, "quick")
    assert paper["loss"]["rampup"] == 0 and {k: v for k, v in paper.items() if k != "loss"} == \
        {k: v for k, v in cfg.items() if k != "loss"}
    for row in ("ResNet-20 ×2", "ResNet-20 ×2 (20% noisy labels)"):   # Table 6's DS: one net
        ds = exp.cell(f"{row}/DS")
        assert cell_config(exp, ds, 0, "quick")["nets"] == ["resnet20"] and ds.net == (0, 0)
    noisy = cell_config(exp, exp.cell("ResNet-20 ×2 (20% noisy labels)/DCM"), 0, "quick")
    assert noisy["data"]["label_noise"] == 0.2
    pair = cell_config(exp, exp.cell("ResNet-56 + ResNet-20/DCM"), 0, "quick")
    assert pair["optim"]["weight_decay"] == 5e-4 and pair["data"]["batch_size"] == 32
    assert pair["schedule"]["gamma"] == cfg["schedule"]["gamma"] == 0.1   # ÷10 in every row
    assert cell_config(exp, exp.cell("ResNet-56 + ResNet-20/DS"), 0, "quick")["nets"] == \
        ["resnet56", "resnet20"]
    for cell in exp.cells:   # the paper's settings at the full scale
        full = cell_config(exp, cell, 0, "full")
        assert full["loss"]["rampup"] == 0 and full["epochs"] in (200,)


def test_teacher_runs_first_and_its_export_is_passed(tmp_path):
    exp = load_experiment("dcm-kd")
    runs = plan(exp, seeds=2, out=tmp_path, rows=None)
    keys = [(r.cell.column, r.seed) for r in runs]
    assert keys.index(("Teacher", 0)) < keys.index(("KD", 0))
    assert keys.count(("Teacher", 0)) == 1 and len(runs) == 10
    kd = next(r for r in runs if r.cell.column == "KD" and r.seed == 1)
    teacher = next(r for r in runs if r.cell.column == "Teacher" and r.seed == 1)
    assert kd.config["teacher_weights"] == str(teacher.run_dir / "net0_wrn28_10.pt")
    assert kd.run_dir == tmp_path / "dcm-kd" / "full" / "wrn-28-10_to_resnet-110" / "kd" / "s1"


def test_row_selection_and_unknown_row():
    exp = load_experiment("dcm-table1")
    assert len(plan(exp, rows=["WRN-28-10 ×2"], seeds=2)) == 6
    with pytest.raises(UnknownNameError, match="WRN-28-10 ×2"):
        plan(exp, rows=["WRN-28-10 x2"])


def test_column_selection_keeps_seed_major_order_and_teachers():
    quick = load_experiment("quick-cifar10")
    runs = plan(quick, rows=["ResNet-20 ×2"], columns=["Ind", "DCM"], seeds=2)
    assert [(r.cell.column, r.seed) for r in runs] == [("Ind", 0), ("DCM", 0), ("Ind", 1),
                                                       ("DCM", 1)]
    kd = plan(load_experiment("dcm-kd"), columns=["KD"], seeds=1)
    assert [r.cell.column for r in kd] == ["Teacher", "KD"]   # the hidden teacher comes along
    with pytest.raises(UnknownNameError, match="DCM"):
        plan(quick, columns=["dcm"])


# -- a killed reproduction leaves nothing running ---------------------------------------------
# Each parent script below starts something, writes READY (a pid, or nothing) once it runs, and
# waits; the test kills the parent outright (SIGKILL) and waits for what it started to end.
LONG_RUN = ("['method=ind', 'nets=resnet20', 'data.name=synthetic', 'data.image_size=8', "
            "'data.train_subset=32', 'data.batch_size=16', 'epochs=100000', 'quiet=true', "
            "'device=cpu', 'eval_every=100000']")
WRITE_READY = ("def ready(text=''):\n"
               "    open(sys.argv[1] + '.tmp', 'w').write(text)\n"
               "    os.replace(sys.argv[1] + '.tmp', sys.argv[1])\n")


def _kill_parent_when_ready(tmp_path, parent: str, *args: str, seconds: float = 300) -> str:
    """Run ``parent`` (a script; argv[1] is the READY file), SIGKILL it once READY exists;
    returns READY's text. Fails if the parent ends first or READY takes over ``seconds``."""
    import subprocess
    import sys
    import time
    ready, log = tmp_path / "ready", tmp_path / "parent.err"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", parent, str(ready), *args], stderr=err)
    deadline = time.monotonic() + seconds
    try:
        while not ready.exists():
            assert proc.poll() is None, f"the parent ended first: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"not ready after {seconds} s"
            time.sleep(0.1)
    finally:
        proc.kill()
        proc.wait()
    return ready.read_text()


def _ends_within(seconds: float, running) -> bool:
    """Whether ``running()`` turns false within ``seconds``."""
    import time
    deadline = time.monotonic() + seconds
    while running() and time.monotonic() < deadline:
        time.sleep(0.1)
    return not running()


def test_a_worker_ends_when_its_parent_is_killed(tmp_path):
    """A reproduction killed by SIGKILL must not leave its workers training (and holding the
    locks of their run folders)."""
    child = ("import sys, time\n"
             "from dcmkd.recipes.runner import exit_with_parent\n"
             "exit_with_parent(int(sys.argv[1]), 0.05)\n"   # the pid the parent passed
             "time.sleep(60)\n")
    parent = ("import os, subprocess, sys, time\n" + WRITE_READY +
              f"p = subprocess.Popen([sys.executable, '-c', {child!r}, str(os.getpid())])\n"
              "ready(str(p.pid))\n"
              "time.sleep(60)\n")
    pid = int(_kill_parent_when_ready(tmp_path, parent))
    assert _ends_within(20, lambda: _alive(pid))


def test_a_worker_killed_parent_mid_run_leaves_no_process_and_an_unlocked_resumable_run(tmp_path):
    """The same through the real pool worker, mid-run: the worker unwinds the run (its folder
    unlocked, no temporary file left, its checkpoint loadable) and exits instead of waiting
    for another run forever (the pool's worker loop catches the SIGTERM's SystemExit)."""
    run = tmp_path / "run"
    parent = ("import multiprocessing as mp, os, sys, time\n" + WRITE_READY +
              "from concurrent.futures import ProcessPoolExecutor\n"
              "from dcmkd.engine.config import resolve\n"
              "from dcmkd.recipes import runner\n"
              f"cfg = resolve(None, {LONG_RUN})\n"
              "ctx = mp.get_context('spawn')\n"
              "queue = ctx.Queue()\n"
              "queue.put(None)\n"
              "pool = ProcessPoolExecutor(1, mp_context=ctx, initializer=runner._init_worker,\n"
              "                           initargs=(queue, 1, 1, os.getpid()))\n"
              "future = pool.submit(runner._train_in_worker, cfg, sys.argv[2])\n"
              "while not os.path.exists(os.path.join(sys.argv[2], 'checkpoint.pt')):\n"
              "    if future.done():\n"
              "        future.result()\n"                  # a failed start fails the test
              "    time.sleep(0.1)\n"
              "ready(str(*pool._processes))\n"
              "time.sleep(600)\n")
    worker = int(_kill_parent_when_ready(tmp_path, parent, str(run)))
    assert _ends_within(60, lambda: _alive(worker))
    from dcmkd.run_folder import RunFolder
    from dcmkd.weights import TMP_SUFFIX, load_file
    folder = RunFolder(run)
    with folder.lock():                       # RunLocked if the worker still held it
        assert folder.has_checkpoint and not folder.finished
    assert load_file(run / "checkpoint.pt")["epoch"] >= 1
    assert not [f for f in run.iterdir() if f.name.endswith(TMP_SUFFIX)]


def test_sigint_to_a_parallel_reproduction_alone_stops_its_workers_runs(tmp_path):
    """``kill -INT`` of the reproduction's process (not its group) used to wait for the
    workers to finish their whole runs; they now stop as after a SIGTERM, resumable."""
    import os
    import signal
    import subprocess
    import sys
    import time
    run = tmp_path / "run"
    script = ("import sys\n"
              "from pathlib import Path\n"
              "from dcmkd.engine.config import resolve\n"
              "from dcmkd.experiment import Cell\n"
              "from dcmkd.recipes.runner import PlannedRun, run_parallel\n"
              f"cfg = resolve(None, {LONG_RUN})\n"
              "cell = Cell('r', 'c', {}, (), (0,))\n"
              "run_parallel([PlannedRun(cell, 0, Path(sys.argv[1]), cfg)], 1,\n"
              "             log=lambda s: None)\n")
    # a shell's background job (CI run with `&`) ignores SIGINT and its children inherit that:
    # give the parent the default SIGINT, as a terminal's foreground job has
    with open(tmp_path / "parent.err", "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", script, str(run)], stderr=err,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert _ends_within(300, lambda: not (run / "checkpoint.pt").exists()
                            and proc.poll() is None)
        assert proc.poll() is None, (tmp_path / "parent.err").read_text()[-2000:]
        os.kill(proc.pid, signal.SIGINT)
        started = time.monotonic()
        proc.wait(timeout=60)
        assert time.monotonic() - started < 60
    finally:
        proc.kill()
    from dcmkd.run_folder import RunFolder
    folder = RunFolder(run)
    assert _ends_within(30, lambda: _locked(folder))
    assert folder.has_checkpoint and not folder.finished


def _locked(folder) -> bool:
    from dcmkd.run_folder import RunLocked
    try:
        with folder.lock():
            return False
    except RunLocked:
        return True


def test_a_torchrun_ends_when_the_reproduction_that_started_it_is_killed(tmp_path):
    """``reproduce --nproc-per-run 2`` with one job trains under torchrun from the main
    process; killing that process must end torchrun and its ranks too."""
    run = tmp_path / "run"
    parent = ("import os, sys, time\n" + WRITE_READY +
              "import threading\n"
              "from pathlib import Path\n"
              "from dcmkd.engine.config import resolve\n"
              "from dcmkd.recipes.runner import train_run\n"
              f"cfg = resolve(None, {LONG_RUN})\n"
              "def signal_ready():\n"
              "    while not os.path.exists(os.path.join(sys.argv[2], 'checkpoint.pt')):\n"
              "        time.sleep(0.1)\n"
              "    ready()\n"
              "threading.Thread(target=signal_ready, daemon=True).start()\n"
              "train_run(cfg, Path(sys.argv[2]), nproc=2)\n")
    _kill_parent_when_ready(tmp_path, parent, str(run))

    def training() -> bool:                   # torchrun and both ranks name the run folder
        import os
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if str(run).encode() in f.read() and _alive(int(pid)):
                        return True
            except OSError:
                pass
        return False

    assert _ends_within(60, training)


def _alive(pid: int) -> bool:
    """Running (not a zombie waiting to be reaped by whoever adopted it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_parallel_runs_start_seed_by_seed_the_costliest_first():
    from dcmkd.recipes.runner import launch_order

    runs = plan(load_experiment("quick-cifar10"), rows=["ResNet-20 ×2"],
                columns=["Ind", "DML", "DCM"], seeds=2)
    assert [(r.cell.column, r.seed) for r in launch_order(runs)] == [
        ("DCM", 0), ("DML", 0), ("Ind", 0), ("DCM", 1), ("DML", 1), ("Ind", 1)]


def test_the_quick_protocol_of_quick_cifar10_trains_end_to_end_on_an_image_folder(tmp_path):
    """The ``quick`` scale itself (``smoke`` derives from ``full``), shortened to 2 epochs on a
    10-class folder: the class-balanced subset, the warm-up (lr 0.1 × 1e-3 at its start), the
    ÷10 at 50%, evaluation every 10 epochs and at the last."""
    import json

    import torch
    from test_data_folder import make_folder

    from dcmkd.engine.build import load_run
    from dcmkd.recipes import reproduce
    make_folder(tmp_path / "data", classes=tuple("abcdefghij"), n=2, size=8)
    exp = load_experiment("quick-cifar10")
    paths = reproduce(exp, rows=["ResNet-20 ×2"], columns=["DCM"], seeds=1, scale="quick",
                      out=tmp_path / "r", log=lambda s: None,
                      overrides=[f"data.root={tmp_path / 'data'}", "epochs=2", "device=cpu",
                                 "data.train_subset=10", "data.batch_size=5", "loss.rampup=1"])
    assert paths["table_md"].is_file()
    run = next((tmp_path / "r").rglob("summary.json")).parent
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
               if '"train/' in line]
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[0]["lr"] == pytest.approx(1e-4) and history[1]["lr"] == pytest.approx(0.01)
    assert [round(h["images_per_s"] * h["seconds"]) for h in history] == [10, 10]
    assert "test/net0/C1/top1" in history[1] and "test/net0/C1/top1" not in history[0]
    built = load_run(run, device="cpu")
    assert built.settings.eval_every == 10                 # the last epoch is evaluated anyway
    assert torch.bincount(built.data.train.labels).tolist() == [1] * 10   # 1 image per class

"""The SSKD paper's tables as experiments: they load, every cell resolves to a valid run config,
the loss weights are SPEC.md §4's, teachers are planned first and passed on. (Every row is run
end to end at the smoke scale by tests/test_report.py, which covers every bundled table.)"""
from __future__ import annotations

import pytest

from dcmkd.recipes import cell_config, load_experiment, plan

TABLES = [f"sskd-table{i}" for i in range(1, 7)]


@pytest.mark.parametrize("name", TABLES)
def test_every_cell_resolves_at_every_scale(name):
    exp = load_experiment(name)
    for cell in exp.cells:
        for scale in ("full", "quick", "smoke"):
            cfg = cell_config(exp, cell, 0, scale, standins=True)
            assert cfg["method"] in ("ind", "kd", "fitnets", "at", "nst", "sskd",
                                     "fixed_backbone"), cell.key
            if cfg["method"] not in ("ind",):
                assert cfg["teacher_weights"], cell.key
        if not cell.hidden:
            assert all(p.top1 is not None for p in cell.paper), cell.key


@pytest.mark.parametrize("name,weights", [
    ("sskd-table5", {"KD": 10, "FitNets": 100, "AT": 50, "NST": 1000}),
    ("sskd-table6", {"KD": 15, "FitNets": 10, "AT": 10, "NST": 100}),
])
def test_baseline_loss_weights_are_the_papers(name, weights):
    exp = load_experiment(name)
    row = exp.rows[0]
    for column, lam in weights.items():
        cfg = cell_config(exp, exp.cell(f"{row}/{column}"), 0)
        assert cfg["loss"]["beta"] == lam
        assert cfg["loss"]["temperature"] == (4 if column == "KD" else 1)
        assert cfg["loss"]["t2_scaling"] == (column == "KD")          # λ·T²·KL (Hinton)
        assert cfg["feature"]["reduction"] == "sum" and cfg["feature"]["hint"] == "auto"
    sskd = cell_config(exp, exp.cell(f"{row}/SSKD"), 0)
    assert sskd["sskd"]["schedule"] == ("plateau" if name == "sskd-table5" else "epochs")
    if name == "sskd-table6":
        assert sskd["epochs"] == 60 and sskd["sskd"]["milestones"] == [0.3, 0.6, 0.9]
    assert exp.cell(f"{row}/SSKD").paper[0].top1 == pytest.approx(
        {"sskd-table5": 29.23, "sskd-table6": 28.64}[name])


def test_stage_ablations_cover_one_to_eight_stages():
    t3 = load_experiment("sskd-table3")
    stages = [cell_config(t3, c, 0)["sskd"]["stages"] for c in t3.cells
              if c.config.get("method", "sskd") == "sskd" and "sskd" in c.config]
    assert stages == list(range(1, 9))
    t2 = load_experiment("sskd-table2")
    multi = {(cell_config(t2, c, 0)["sskd"]["stages"], cell_config(t2, c, 0)["sskd"]["multi_loss"])
             for c in t2.cells if c.column in ("Multi-loss", "SSKD") and "sskd" in c.config}
    assert multi == {(k, m) for k in range(1, 5) for m in (False, True)}


def test_teachers_are_trained_first_and_the_kd_student_is_re_headed(tmp_path):
    exp = load_experiment("sskd-table1")
    runs = plan(exp, scale="smoke", standins=True, out=tmp_path)
    order = [r.cell.key for r in runs]
    kd = "KD (ResNet-34 → ResNet-18)/End-to-end"
    fixed = "KD (ResNet-34 → ResNet-18)/Fixed backbone"
    assert order.index("Teacher (ResNet-34)/End-to-end") < order.index(kd) < order.index(fixed)
    cfg = runs[order.index(fixed)].config
    assert cfg["teacher_net"] == 1 and cfg["method"] == "fixed_backbone"
    assert str(runs[order.index(kd)].run_dir) in cfg["teacher_weights"]
    t4 = plan(load_experiment("sskd-table4"), out=tmp_path)
    teachers = {r.cell.row: r.config["nets"][0] for r in t4 if r.cell.column == "SSKD"}
    assert teachers == {"VGG-16": "vgg16_bn", "ResNet-56": "resnet56",
                        "ResNet-110": "resnet110", "DenseNet-121": "densenet121_cifar"}

"""SSKD Tables 7–9 (face recognition, COCO detection with FPN and RetinaNet) as experiments:
their paper numbers are SPEC.md's, their quick scale is the published quick protocols'
(benchmarks/face_quick.py, benchmarks/detection_quick.py), their full scale the paper's; the
smoke scale trains on synthetic data of the task written by the library, and the tables show the
task's metrics beside the paper's. (tests/test_report.py runs every row of every bundled table at
the smoke scale; here, every row of Table 7 and three of Table 9.)"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from dcmkd.experiment import PaperMetrics
from dcmkd.recipes import cell_config, load_experiment, plan, reproduce
from dcmkd.report import report_runs

pytest.importorskip("torchvision")
pytest.importorskip("pycocotools")

# SPEC.md "SSKD beyond classification", transcribed by hand (TAR@1e-2, TAR@1e-3, Rank-1, Rank-5;
# AP, AP50, AP75, APS, APM, APL)
SPEC = {
    "sskd-table7": {
        "Student": "76.9±4.3/55.2±5.7/84.6±2.1/92.4±1.5",
        "Teacher": "83.7±2.8/59.3±3.6/90.1±1.2/95.8±0.7",
        "KD": "77.2±4.3/55.4±5.9/85.3±1.9/93.0±1.3",
        "SSKD": "80.5±3.0/56.9±4.3/86.8±1.3/93.5±1.1"},
    "sskd-table8": {
        "ResNet-18": "33.6/55.1/35.6/18.9/36.0/44.1", "ResNet-50": "37.7/57.6/40.5/19.8/41.1/49.7",
        "ResNet-101": "39.5/61.1/42.9/23.2/43.7/50.6",
        "ResNet-152": "41.6/63.1/45.3/25.5/46.0/53.9",
        "R18 mimic R101": "36.4/57.6/39.2/19.3/40.1/49.2",
        "R18 mimic R152": "36.7/57.8/39.7/19.5/40.2/50.1",
        "R50 mimic R101": "39.8/61.0/43.2/23.3/44.2/50.7",
        "R50 mimic R152": "40.5/61.8/44.0/23.3/44.9/52.8"},
    "sskd-table9": {
        "ResNet-18": "32.4/50.8/34.1/16.6/34.8/44.6", "ResNet-50": "35.9/55.3/38.2/18.4/39.5/47.8",
        "ResNet-101": "37.6/57.1/40.2/19.8/41.3/50.5",
        "ResNet-152": "39.9/59.7/42.8/22.2/43.9/52.9",
        "R18 mimic R101": "35.5/53.7/37.4/17.3/38.2/49.4",
        "R18 mimic R152": "35.6/54.2/37.5/17.9/38.8/50.1",
        "R50 mimic R101": "37.2/56.9/40.0/19.5/41.2/50.2",
        "R50 mimic R152": "38.7/58.0/41.6/20.3/41.8/51.6"},
}


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", list(SPEC))
def test_the_tables_hold_specs_numbers_and_no_other(name):
    exp = load_experiment(name)
    papers = {c.row: c.paper[0] for c in exp.cells}
    for row, text in SPEC[name].items():
        assert papers[row] == PaperMetrics.parse(text, len(exp.metrics)), row
    # the only rows without the paper's numbers are the detection quick protocol's own
    assert {r for r, p in papers.items() if not p.reported} == \
        (set() if name == "sskd-table7" else {"ResNet-34", "R18 mimic R34"})


def test_paper_metric_notation_and_bad_values():
    p = PaperMetrics.parse("76.9±4.3/55.2 ± 5.7/84.6(2.1)/-", 4)
    assert p.values == (76.9, 55.2, 84.6, None) and p.stds == (4.3, 5.7, 2.1, None)
    assert not PaperMetrics.parse("-", 3).reported
    with pytest.raises(ValueError, match="expected 6 values separated by '/'"):
        PaperMetrics.parse("33.6/55.1", 6)
    with pytest.raises(ValueError, match="'55,1' is not a number with an optional std"):
        PaperMetrics.parse("33.6/55,1", 2)


def test_a_task_table_names_a_metric_its_task_does_not_record(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\ntitle: t\ncolumns: [R]\nmetrics: [AP, mAP]\n"
                   "base: {data: {name: coco}}\n"
                   "rows: [{name: a, cells: {R: {config: {method: ind, nets: [resnet18]}}}}]\n")
    with pytest.raises(ValueError, match="metric 'mAP' is not one of the detection task's "
                                         r"\(AP, AP50, AP75, APS, APM, APL\)"):
        load_experiment(bad)
    bad.write_text(bad.read_text().replace("coco", "cifar10"))
    with pytest.raises(ValueError, match="metrics are for a table of one face or detection "
                                         "task; its cells are of the task.s. classification"):
        load_experiment(bad)
    bad.write_text("name: bad\ntitle: t\ncolumns: [R]\nbase: {data: {name: coco}}\nrows:\n"
                   "- {name: T, cells: {R: {config: {method: ind, nets: [resnet50]}, "
                   "skip: [quick]}}}\n"
                   "- {name: S, cells: {R: {config: {method: sskd, nets: [resnet50, resnet18], "
                   "teacher_weights: '@T/R'}}}}\n")
    with pytest.raises(ValueError, match="S/R distils from T/R, which is not run at the quick "
                                         "scale"):
        plan(load_experiment(bad), scale="quick")


def test_quick_is_the_face_quick_protocol():
    """benchmarks/face_quick.py: 32 px, batch 64, 12 epochs, cosine lr 0.05 with a 1-epoch
    warm-up, SGD 0.9 / wd 5e-4; teacher ResNet-34; KD T = 4; SSKD 4 stages × 3 epochs at lr
    0.01, ×0.1 at 0.67 of each, no head."""
    exp = load_experiment("sskd-table7")
    cfg = {c.row: cell_config(exp, c, 0, "quick", ["data.root=FACES"]) for c in exp.cells}
    for row, c in cfg.items():
        assert (c["data"]["name"], c["data"]["root"], c["data"]["image_size"],
                c["data"]["batch_size"], c["epochs"]) == ("faces", "FACES", 32, 64, 12), row
        assert (c["optim"]["lr"], c["optim"]["momentum"], c["optim"]["weight_decay"]) == \
            (0.05, 0.9, 5e-4)
        assert (c["schedule"]["name"], c["schedule"]["warmup_epochs"], c["eval_every"]) == \
            ("cosine", 1, 12)
    assert cfg["Teacher"]["nets"] == ["resnet34"] and cfg["Student"]["nets"] == ["resnet18"]
    assert cfg["KD"]["nets"] == ["resnet34", "resnet18"] and cfg["KD"]["loss"]["temperature"] == 4
    sskd = cfg["SSKD"]["sskd"]
    assert (sskd["schedule"], sskd["stage_epochs"], sskd["milestones"], sskd["lr"],
            sskd["head_epochs"], sskd["stages"]) == ("epochs", 3, [0.67], 0.01, 0, 4)
    runs = plan(exp, scale="quick", overrides=["data.root=FACES"], out="OUT")
    assert runs[2].config["teacher_weights"] == str(Path("OUT/sskd-table7/quick/teacher/result/s0"))


@pytest.mark.parametrize("name,kind,lr", [("sskd-table8", "fasterrcnn", 0.02),
                                          ("sskd-table9", "retinanet", 0.01)])
def test_quick_is_the_detection_quick_protocol_and_full_the_papers(name, kind, lr):
    exp = load_experiment(name)
    quick = plan(exp, scale="quick", overrides=["data.root=CANVASES"])
    assert [(r.cell.row, r.config["nets"]) for r in quick] == [
        ("ResNet-18", ["resnet18"]), ("ResNet-34", ["resnet34"]),
        ("R18 mimic R34", ["resnet34", "resnet18"])]   # as published (the benchmark's table)
    for r in quick:
        c = r.config
        assert (c["task"]["detector"], c["task"]["min_size"], c["task"]["max_size"],
                c["task"]["train_split"], c["task"]["test_split"]) == \
            (kind, 128, 128, "train", "val")
        # the benchmark's detector settings: every stage trains; Faster R-CNN's RoIs reduced
        assert c["task"]["detector_options"] == (
            {"trainable_layers": 5, "box_batch_size_per_image": 128,
             "rpn_post_nms_top_n_test": 300} if kind == "fasterrcnn" else {"trainable_layers": 5})
        assert (c["epochs"], c["data"]["batch_size"], c["optim"]["lr"],
                c["optim"]["weight_decay"], c["optim"]["clip_grad_norm"]) == \
            (4, 4, 0.02, 1e-4, 10.0)
        assert (c["schedule"]["milestones"], c["schedule"]["warmup_epochs"]) == \
            ([0.666667, 0.888889], 0.5)
    sskd = quick[2].config["sskd"]
    assert (sskd["schedule"], sskd["stage_epochs"], sskd["lr"], sskd["head_epochs"]) == \
        ("epochs", 1, 0.01, 4)
    full = plan(exp, scale="full", overrides=["data.root=COCO"], out="OUT")
    assert [r.cell.row for r in full] == list(SPEC[name])
    for r in full:
        c = r.config
        assert (c["epochs"], c["data"]["batch_size"], c["optim"]["lr"], c["task"]["min_size"],
                c["task"]["max_size"], c["task"]["test_split"]) == (24, 16, lr, 800, 1333,
                                                                    "val2017")
        assert c["method"] in ("ind", "sskd")   # KD does not apply to detection
        assert c["task"]["detector_options"] == {}   # torchvision's defaults
    mimic = {r.cell.row: r.config for r in full}["R50 mimic R152"]
    assert mimic["nets"] == ["resnet152", "resnet50"] and mimic["teacher_weights"] == \
        str(Path(f"OUT/{name}/full/resnet-152/result/s0"))


def _csv(path: Path) -> dict[tuple[str, str], dict[str, str]]:
    return {(r["row"], r["metric"]): r for r in csv.DictReader(path.open())}


def test_table7_smoke_every_row_then_report(tmp_path, one_thread):
    exp = load_experiment("sskd-table7")
    logs: list[str] = []
    paths = reproduce(exp, scale="smoke", standins=True, out=tmp_path, log=logs.append)
    md = paths["table_md"].read_text()
    assert "| | networks run | TAR@FAR=0.01 | TAR@FAR=0.001 | Rank-1 | Rank-5 |" in \
        md.replace("|  |", "| |")
    table = _csv(paths["table_csv"])
    base = tmp_path / "sskd-table7" / "smoke"
    assert (base / "_data" / "SPLIT_SUGGESTED.csv").is_file()   # the synthetic faces
    for row, folder, net in (("Student", "student", 0), ("Teacher", "teacher", 0),
                             ("KD", "kd", 1), ("SSKD", "sskd", 1)):
        summary = json.loads((base / folder / "result" / "s0" / "summary.json").read_text())
        figures = summary["test_face"][net]
        line = next(line for line in md.splitlines() if line.startswith(f"| {row} |"))
        paper = SPEC["sskd-table7"][row].split("/")
        for k, metric in enumerate(("tar@far=0.01", "tar@far=0.001", "rank1", "rank5")):
            assert float(table[(row, metric)]["mean"]) == pytest.approx(figures[metric], abs=1e-4)
            assert f"{figures[metric]:.2f} · {paper[k]}" in line
    cfg = (base / "sskd" / "result" / "s0" / "config.yaml").read_text()
    assert "head_epochs: 0" in cfg and str(base / "teacher" / "result" / "s0") in cfg
    again: list[str] = []
    reproduce(exp, scale="smoke", standins=True, out=tmp_path, log=again.append)
    assert any(line.endswith(", 0 to train") for line in again)
    # `dcmkd report` of the same run folders: the face task's metrics as columns, a column
    # group per method
    report = report_runs([base / r / "result" / "s0" for r in ("student", "kd")],
                         tmp_path / "report")
    text = report["table_md"].read_text()
    assert "| ind TAR@FAR=0.01 | ind TAR@FAR=0.001 | ind Rank-1 | ind Rank-5 | kd TAR@FAR=0.01" \
        in text
    rows = list(csv.DictReader(report["table_csv"].open()))
    assert {r["metric"] for r in rows} == {"tar@far=0.01", "tar@far=0.001", "rank1", "rank5"}
    got = {(r["column"], r["metric"]): float(r["mean"]) for r in rows}
    assert got[("ind", "rank1")] == pytest.approx(float(table[("Student", "rank1")]["mean"]))
    assert got[("kd", "rank5")] == pytest.approx(float(table[("KD", "rank5")]["mean"]))


def test_table9_smoke_rows_show_coco_metrics_beside_the_paper(tmp_path, one_thread):
    exp = load_experiment("sskd-table9")
    paths = reproduce(exp, rows=["ResNet-18", "R18 mimic R101"], scale="smoke", standins=True,
                      out=tmp_path, log=lambda s: None)
    md = paths["table_md"].read_text()
    assert "| | networks run | AP | AP50 | AP75 | APS | APM | APL |" in md.replace("|  |", "| |")
    base = tmp_path / "sskd-table9" / "smoke"
    table = _csv(paths["table_csv"])
    for row, folder, net in (("ResNet-18", "resnet-18", 0), ("ResNet-101", "resnet-101", 0),
                             ("R18 mimic R101", "r18_mimic_r101", 1)):
        run = base / folder / "result" / "s0"
        summary = json.loads((run / "summary.json").read_text())
        assert summary["task"] == "detection"
        assert (run / f"detections_net{net}.json").is_file()
        for metric, paper in zip(("AP", "AP50", "AP75", "APS", "APM", "APL"),
                                 SPEC["sskd-table9"][row].split("/")):
            assert float(table[(row, metric)]["mean"]) == \
                pytest.approx(summary["test_coco"][net][metric], abs=1e-4)
            assert table[(row, metric)]["paper"] == f"{float(paper):.4f}"
    # every COCO size range has ground truth in the synthetic val images: no metric is missing
    assert "—" not in md.split("|---|")[-1].split("\n\n")[0]


def test_report_refuses_runs_of_different_tasks_in_one_line(tmp_path, one_thread):
    from dcmkd.engine.config import resolve
    from dcmkd.engine.trainer import Trainer

    exp = load_experiment("sskd-table7")
    paths = reproduce(exp, rows=["Student"], scale="smoke", standins=True, out=tmp_path,
                      log=lambda s: None)
    face = tmp_path / "sskd-table7" / "smoke" / "student" / "result" / "s0"
    assert paths["table_md"].is_file()
    digits = tmp_path / "digits"
    cfg = resolve(None, ["method=ind", "nets=[resnet20]", "epochs=1", "data.train_subset=16",
                         "data.image_size=8", "data.batch_size=8", "device=cpu", "quiet=true"])
    Trainer(cfg, digits).fit()
    with pytest.raises(ValueError, match=r"^the runs are of different tasks: face \(.*\), "
                                         r"classification \(.*\); report the runs of one task"):
        report_runs([face, digits], tmp_path / "report")


def test_synthetic_task_folders_are_deterministic_and_complete(tmp_path):
    from dcmkd.data.detection import CocoDetection
    from dcmkd.data.faces import read_split_csv
    from dcmkd.data.synthetic_tasks import write_coco_folder, write_identity_folder

    faces = write_identity_folder(tmp_path / "f")
    sides = read_split_csv(faces / "SPLIT_SUGGESTED.csv")
    assert (len(sides["train"]), len(sides["test"])) == (4, 10)
    first = (faces / "id000" / "0.png").read_bytes()
    write_identity_folder(tmp_path / "g")
    assert (tmp_path / "g" / "id000" / "0.png").read_bytes() == first
    coco = write_coco_folder(tmp_path / "c")
    val = json.loads((coco / "annotations" / "instances_val2017.json").read_text())
    areas = [a["area"] for a in val["annotations"]]
    assert min(areas) < 32 ** 2 and max(areas) > 96 ** 2 and \
        any(32 ** 2 <= a <= 96 ** 2 for a in areas)   # COCO's small, medium and large
    assert len(CocoDetection(coco, "train2017")) == 4
    stamp = (coco / "annotations" / "instances_val2017.json").stat().st_mtime_ns
    write_coco_folder(coco)   # complete: left as it is
    assert (coco / "annotations" / "instances_val2017.json").stat().st_mtime_ns == stamp


def test_a_library_teacher_row_is_found_under_its_file_safe_name(tmp_path):
    """A user recipe whose teacher row is a torchvision model: the student's teacher_weights
    name the file its run exports (``net0_tv-resnet18.pt``, no colon)."""
    exp = tmp_path / "lib.yaml"
    exp.write_text("name: lib\ntitle: t\ncolumns: [R]\nbase: {data: {name: cifar10}}\nrows:\n"
                   "- {name: T, cells: {R: {config: {method: ind, nets: ['tv:resnet18']}}}}\n"
                   "- {name: S, cells: {R: {config: {method: kd, nets: ['tv:resnet18', "
                   "resnet20], teacher_weights: '@T/R'}, net: 1}}}\n")
    runs = plan(load_experiment(exp), scale="full", out=str(tmp_path / "out"))
    student = next(r for r in runs if r.cell.row == "S")
    teacher = next(r for r in runs if r.cell.row == "T")
    assert student.config["teacher_weights"] == str(teacher.run_dir / "net0_tv-resnet18.pt")

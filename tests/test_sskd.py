"""SSKD: stage partitions, frozen stages (parameters and BN statistics), per-stage loss, adapters
absent from the export, the plateau schedule's exact length, the task-head phase, multi-loss and
end-to-end variants, teachers from files and run folders, exact resume through the trainer."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from dcmkd.engine.config import DEFAULTS, resolve
from dcmkd.engine.trainer import Trainer
from dcmkd.methods import create_method
from dcmkd.methods.builders import FEATURE_OPTIONS, SSKD_OPTIONS
from dcmkd.methods.optimization import PlateauSchedule, Schedule, SGDSettings
from dcmkd.methods.sskd import SSKD, FixedBackbone
from dcmkd.methods.stages import partition_stages
from dcmkd.models import create_model
from dcmkd.registry import UnknownNameError
from dcmkd.weights import atomic_save, load_file

torch.set_num_threads(2)
SIZE, CLASSES = 8, 5


def batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, SIZE, SIZE, generator=g), torch.randint(0, CLASSES, (n,), generator=g)


def stepper(opt):
    def step(loss, terms=None):
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def sskd(nets=("resnet20", "resnet20"), seed=0, **options) -> SSKD:
    torch.manual_seed(seed)
    opts = {"schedule": "epochs", "stage_epochs": 1, "head_epochs": 1, **options}
    with pytest.warns(UserWarning, match="untrained"):
        method = create_method("sskd", list(nets), CLASSES, sskd=opts)
    # the run's SGD and schedule (the task head follows it): a 0.1 cosine
    method.configure_optimization(SGDSettings(), Schedule("cosine", lr=0.1, epochs=1))
    return method


def train_steps(method, steps=2, lr=0.05, x=None):
    method.train()
    opt = method.optimizer
    for g in opt.param_groups:
        g["lr"] = lr
    x, y = batch() if x is None else (x, batch()[1])
    return [method.training_step(x, y, stepper(opt)) for _ in range(steps)]


def advance(method, phases=1):
    """End ``phases`` one-epoch phases (stage_epochs = head_epochs = 1)."""
    for _ in range(phases):
        method.end_epoch(method._start + method._done_epochs)


# -- partitions ------------------------------------------------------------------------------
def test_default_partition_is_four_stages_at_the_down_sampling_points():
    r20 = partition_stages(create_model("resnet20", CLASSES))
    assert r20.names == ["conv1", "conv2_x", "conv3_x", "conv4_x"]
    assert [s.stride for s in r20.segments] == [1, 1, 2, 4]
    assert r20.channels == [16, 16, 32, 64]
    r18 = partition_stages(create_model("resnet18", CLASSES))
    assert r18.names == ["conv1+conv2_x", "conv3_x", "conv4_x", "conv5_x"]  # 56, 28, 14, 7 px
    assert [s.stride for s in r18.segments] == [4, 8, 16, 32]
    assert partition_stages(create_model("vgg16_bn", CLASSES)).names == \
        ["conv1+conv2", "conv3", "conv4", "conv5"]


def test_finer_partitions_halve_the_earliest_stages_and_coarser_merge_them():
    m = create_model("resnet20", CLASSES)
    assert partition_stages(m, 5).names == ["conv1[0:1]", "conv1[1:2]", "conv2_x", "conv3_x",
                                            "conv4_x"]
    assert partition_stages(m, 6).names[2:4] == ["conv2_x[0:2]", "conv2_x[2:3]"]
    assert partition_stages(m, 8).names == [
        "conv1[0:1]", "conv1[1:2]", "conv2_x[0:2]", "conv2_x[2:3]", "conv3_x[0:2]",
        "conv3_x[2:3]", "conv4_x[0:2]", "conv4_x[2:3]"]
    assert partition_stages(create_model("resnet56", CLASSES), 6).names[2:4] == \
        ["conv2_x[0:5]", "conv2_x[5:9]"]
    assert partition_stages(m, 1).names == ["conv1+conv2_x+conv3_x+conv4_x"]
    assert partition_stages(m, 2).names == ["conv1+conv2_x+conv3_x", "conv4_x"]
    assert partition_stages(create_model("resnet18", CLASSES), 5).names[:2] == \
        ["conv1", "conv2_x"]
    with pytest.raises(ValueError, match="1..8"):
        partition_stages(m, 9)
    with pytest.raises(ValueError, match="single layer"):
        partition_stages(create_model("densenet40_12", CLASSES), 5)
    with pytest.raises(TypeError, match="zoo Backbone"):
        partition_stages(torch.nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match="ending with the last unit"):
        partition_stages(m, ["conv2_x", "conv3_x"])
    assert partition_stages(m, ["conv2_x", "conv4_x"]).names == ["conv1+conv2_x",
                                                                 "conv3_x+conv4_x"]


@pytest.mark.parametrize("name,k", [("resnet20", 8), ("resnet20", 3), ("resnet18", 8),
                                    ("vgg16_bn", 6)])
def test_stages_compose_to_the_backbone(name, k):
    m = create_model(name, CLASSES).eval()
    part = partition_stages(m, k)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        feats = part.run(x)
        assert torch.equal(feats[-1], m.forward_features(x))
        assert torch.equal(part.run(feats[0], start=1)[-1], feats[-1])
    assert [f.shape[1] for f in feats] == part.channels


# -- phase 1: one stage at a time ------------------------------------------------------------
@pytest.mark.parametrize("stage", [0, 1, 3])
def test_only_the_current_stage_and_its_adapter_change(stage):
    method = sskd(("wrn16_2", "resnet20"))
    advance(method, stage)
    assert method.phase.name == f"stage{stage + 1}"
    student, teacher = method.student.backbone, method.networks[0]
    t0 = copy.deepcopy(teacher.state_dict())
    s0 = copy.deepcopy(student.state_dict())
    a0 = copy.deepcopy(method.adapters.state_dict())
    train_steps(method)
    current = {f"{p}." for p in method.s_part.segments[stage].paths}
    moved_params = moved_stats = 0
    for k, v in student.state_dict().items():
        changed = not torch.equal(v, s0[k])
        if any(k.startswith(p) for p in current):
            moved_params += changed and "running" not in k
            moved_stats += changed and "running_mean" in k
        else:
            assert not changed, f"{k} of a frozen part changed"  # weights and BN statistics
    assert moved_params > 0 and moved_stats > 0
    assert all(torch.equal(v, t0[k]) for k, v in teacher.state_dict().items())
    for k, v in method.adapters.state_dict().items():
        assert torch.equal(v, a0[k]) == (not k.startswith(f"{stage}.")), k
    trainable = {id(p) for p in method.parameters() if p.requires_grad}
    assert {id(p) for g in method.optimizer.param_groups for p in g["params"]} == trainable
    assert trainable == {id(p) for p in [*method.s_part.parameters(stage),
                                         *method.adapters[stage].parameters()]}


def test_per_stage_feature_distance_decreases():
    method = sskd(("resnet20", "resnet20"))
    x = batch(8, seed=1)[0]
    for stage in range(4):
        outs = train_steps(method, steps=6, lr=0.1, x=x)
        first, last = (o.total().item() for o in (outs[0], outs[-1]))
        assert set(outs[0].losses) == {f"net1/stage{stage + 1}"}
        assert last < 0.85 * first, (stage, first, last)
        advance(method)
    assert method.phase.kind == "head"


def test_adapters_only_where_channels_differ_and_absent_from_the_export():
    method = sskd(("wrn16_2", "resnet20"))   # teacher 16/32/64/128, student 16/16/32/64
    assert [type(a.proj).__name__ for a in method.adapters] == \
        ["Identity", "Conv2d", "Conv2d", "Conv2d"]
    assert sum(p.numel() for p in method.adapters.parameters()) > 0
    teacher, student = method.export()
    assert set(student.state_dict()) == set(create_model("resnet20", CLASSES).state_dict())
    assert set(teacher.state_dict()) == set(create_model("wrn16_2", CLASSES).state_dict())
    always = sskd(("resnet20", "resnet20"), adapter="always")
    assert all(type(a.proj).__name__ == "Conv2d" for a in always.adapters)


def test_spatial_sizes_are_matched_by_resizing_the_student_map():
    method = sskd(("vgg16_bn", "resnet20"))   # stage 1: teacher at stride 2, student at 1
    x = batch(4)[0]
    with torch.no_grad():
        t = method.t_part.run(x, stop=1)[-1]
        s = method.s_part.run(x, stop=1)[-1]
        assert t.shape[-1] * 2 == s.shape[-1]          # the student's map is twice as large
        assert method.adapters[0](s, t.shape[-2:]).shape == t.shape
    out = train_steps(method, steps=1)[0]
    assert torch.isfinite(out.total())


# -- the plateau schedule ----------------------------------------------------------------------
def test_plateau_schedule_reaches_min_lr_after_the_documented_number_of_epochs():
    for patience in (0, 2):
        s, epochs = PlateauSchedule(patience=patience), 0
        while not s.done:
            s.step(1.0)       # never decreasing after the first epoch
            epochs += 1
        assert epochs == 1 + 66 * (patience + 1)
        assert s.decays == 66 and 9.5e-6 < s.lr <= 1e-5
    s = PlateauSchedule()
    for v in (5.0, 4.0, 4.5, 3.0, 3.0):
        s.step(v)
    assert s.best == 3.0 and s.decays == 2 and math.isclose(s.lr, 0.01 * 0.9 ** 2)
    s = PlateauSchedule(threshold=0.1)
    s.step(1.0), s.step(0.95)   # not 10% lower: no improvement
    assert s.decays == 1 and s.best == 1.0


def test_sskd_moves_to_the_next_stage_when_the_lr_reaches_1e_5():
    method = sskd(schedule="plateau", stage_epochs=1000)
    lrs, epochs = [], 0
    while method.phase.name == "stage1":
        method._dist_sum, method._dist_count = 2.0, 1   # a distance that never decreases
        lrs.append(method.lr_at(epochs))
        record = method.end_epoch(epochs)
        epochs += 1
    assert epochs == 67 and record["sskd/phase_end"] == "min_lr"
    assert lrs[0] == 0.01 and math.isclose(lrs[-1], 0.01 * 0.9 ** 65) and lrs[-1] > 1e-5
    assert method.phase.name == "stage2" and method.lr_at(epochs) == 0.01
    capped = sskd(schedule="plateau", stage_epochs=3)
    with pytest.warns(UserWarning, match="cap of 3 epochs with lr 0.01 still above min_lr"):
        for e in range(3):
            capped._dist_sum, capped._dist_count = 3.0 - e, 1      # still improving
            record = capped.end_epoch(e)
    assert capped.phase.name == "stage2" and record["sskd/phase_end"] == "epoch_cap"


def test_epoch_schedule_of_imagenet():
    method = sskd(schedule="epochs", stage_epochs=60)
    assert [round(method.lr_at(e), 8) for e in (0, 17.9, 18, 36, 54, 59.99)] == \
        [0.01, 0.01, 0.001, 0.0001, 1e-05, 1e-05]
    for e in range(60):
        method.end_epoch(e)
    assert method.phase.name == "stage2" and method.lr_at(60.5) == 0.01
    assert method.planned_epochs == 4 * 60 + 1


# -- phase 2 and the variants ----------------------------------------------------------------
def test_task_head_phase_reinitialises_and_trains_only_the_head():
    method = sskd()
    train_steps(method, steps=1)
    student = method.student.backbone
    with torch.no_grad():                                # a head that is not the zoo's init
        student.head.fc.weight.fill_(0.5)
        student.head.fc.bias.fill_(0.5)
    advance(method, 4)
    assert method.phase.kind == "head"
    fc = student.head.fc
    assert fc.weight.std().item() == pytest.approx(0.01, rel=0.2)   # zoo init N(0, 0.01)
    assert torch.all(fc.bias == 0)
    s0 = copy.deepcopy(student.state_dict())
    outs = train_steps(method, steps=2)
    assert set(outs[0].losses) == {"net1/ce"}
    assert [len(z) for z in outs[0].logits] == [0, 1]
    for k, v in student.state_dict().items():
        assert torch.equal(v, s0[k]) == (not k.startswith("head.")), k
    assert method.lr_at(4.5) == pytest.approx(0.1 * 0.5)   # the run's cosine, half-way
    advance(method)
    assert method.finished


def test_end_to_end_head_mode_fine_tunes_the_whole_student():
    method = sskd(head="end_to_end")
    advance(method, 4)
    s0 = copy.deepcopy(method.student.state_dict())
    train_steps(method, steps=1)
    changed = [k for k, v in method.student.state_dict().items() if not torch.equal(v, s0[k])]
    assert any(k.startswith("backbone.stages.conv2_x") for k in changed)
    assert any(k.startswith("backbone.head") for k in changed)


def test_multi_loss_trains_every_stage_at_once():
    method = sskd(multi_loss=True)
    assert [p.name for p in method.phases] == ["stages", "head"]
    s0 = copy.deepcopy(method.student.state_dict())
    out = train_steps(method, steps=1)[0]
    assert set(out.losses) == {f"net1/stage{i}" for i in range(1, 5)}
    changed = {k.split(".")[2] for k, v in method.student.state_dict().items()
               if not torch.equal(v, s0[k]) and k.startswith("backbone.stages")}
    assert changed == {"conv2_x", "conv3_x", "conv4_x"}
    assert not torch.equal(method.student.state_dict()["backbone.stem.0.weight"],
                           s0["backbone.stem.0.weight"])
    assert torch.equal(method.student.state_dict()["backbone.head.fc.weight"],
                       s0["backbone.head.fc.weight"])


def test_single_stage_sskd_is_multi_loss_training():
    a, b = sskd(stages=1), sskd(stages=1, multi_loss=True)
    x, y = batch()
    la, lb = a(x, y).losses, b(x, y).losses
    assert list(la) == list(lb) == ["net1/stage1"] and torch.equal(la["net1/stage1"],
                                                                   lb["net1/stage1"])


# -- teachers, config, the trainer -----------------------------------------------------------
def test_teacher_from_a_weights_file_or_a_run_folder(tmp_path):
    torch.manual_seed(7)
    t, s = create_model("resnet32", CLASSES), create_model("resnet20", CLASSES)
    run = tmp_path / "run"
    atomic_save(t.state_dict(), run / "net0_resnet32.pt")
    atomic_save(s.state_dict(), run / "net1_resnet20.pt")
    (run / "summary.json").write_text(json.dumps(
        {"exported": ["net0_resnet32.pt", "net1_resnet20.pt"]}))

    def teacher(nets, **kw):
        m = create_method("sskd", nets, CLASSES, **kw)
        return m.networks[0].backbone.state_dict()

    ref = t.state_dict()
    for spec in (run, run / "net0_resnet32.pt", str(run)):
        got = teacher(["resnet32", "resnet20"], teacher_weights=spec)
        assert all(torch.equal(got[k], ref[k]) for k in ref)
    got = teacher(["resnet20", "resnet20"], teacher_weights=run / "net0_resnet32.pt",
                  teacher_net=1)                                # the run's student as teacher
    assert all(torch.equal(got[k], s.state_dict()[k]) for k in got)
    with pytest.raises(ValueError, match="no network 2"):
        teacher(["resnet20", "resnet20"], teacher_weights=run, teacher_net=2)
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="not finished"):
        teacher(["resnet32", "resnet20"], teacher_weights=tmp_path / "unfinished")
    with pytest.raises(ValueError, match="wrong architecture|lacks"):
        teacher(["resnet56", "resnet20"], teacher_weights=run)
    kd = create_method("kd", ["resnet32", "resnet20"], CLASSES, teacher_weights=run)
    assert torch.equal(kd.networks[0].backbone.stem[0].weight, t.stem[0].weight)


def test_fixed_backbone_retrains_only_a_reinitialised_head(tmp_path):
    torch.manual_seed(3)
    trained = create_model("resnet20", CLASSES)
    atomic_save(trained.state_dict(), tmp_path / "net.pt")
    method = create_method("fixed_backbone", ["resnet20"], CLASSES,
                           teacher_weights=tmp_path / "net.pt")
    assert isinstance(method, FixedBackbone)
    b = method.networks[0].backbone
    assert torch.equal(b.stem[0].weight, trained.stem[0].weight)
    assert not torch.equal(b.head.fc.weight, trained.head.fc.weight)
    s0 = copy.deepcopy(b.state_dict())
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1,
                          momentum=0.9)
    method.train()
    for _ in range(2):
        method.training_step(*batch(), stepper(opt))
    for k, v in b.state_dict().items():
        assert torch.equal(v, s0[k]) == (not k.startswith("head.")), k
    with pytest.raises(ValueError, match="needs teacher_weights"):
        create_method("fixed_backbone", ["resnet20"], CLASSES)


def test_config_sections_and_bad_options():
    assert DEFAULTS["sskd"] == SSKD_OPTIONS and DEFAULTS["feature"] == FEATURE_OPTIONS
    cfg = resolve(None, ["method=sskd", "nets=resnet56,resnet20", "sskd.stages=6",
                         "sskd.multi_loss=true"])
    assert cfg["sskd"]["stages"] == 6 and cfg["sskd"]["multi_loss"] is True
    with pytest.raises(UnknownNameError, match="did you mean sskd.stages"):
        resolve(None, ["sskd.stagez=3"])
    with pytest.raises(UnknownNameError, match="sskd.head 'together'.*separate"):
        create_method("sskd", ["resnet20", "resnet20"], CLASSES, sskd={"head": "together"})
    with pytest.raises(ValueError, match="loss.temperature does not apply"):
        create_method("sskd", ["resnet20", "resnet20"], CLASSES, temperature=4.0)
    with pytest.raises(UnknownNameError, match="did you mean sskd"):
        create_method("ssdk", ["resnet20", "resnet20"], CLASSES)
    with pytest.raises(ValueError, match="needs 2 networks"):
        create_method("sskd", ["resnet20"], CLASSES)


TINY = ["data.name=synthetic", "data.image_size=8", "data.train_subset=16",
        "data.batch_size=8", "data.test_batch_size=16", "quiet=true", "deterministic=true",
        "device=cpu", "epochs=1", "sskd.stages=2", "schedule.name=constant", "optim.lr=0.05"]


class Interrupt(Exception):
    pass


def test_interrupted_sskd_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    """Killed in stage 2 (epoch 2, batch 2 of 2, checkpoints every step); the rerun resumes the
    phase, its optimiser and its distance accumulator, and ends with identical weights."""
    torch.manual_seed(5)   # a config run needs a teacher's weights (here an untrained one)
    atomic_save(create_model("resnet20", 10).state_dict(), tmp_path / "teacher.pt")

    def cfg(name):
        return resolve(None, ["method=sskd", "nets=resnet20,resnet20", *TINY,
                              f"teacher_weights={tmp_path / 'teacher.pt'}",
                              "checkpoint_every_steps=1", f"out={tmp_path / name}"])

    with pytest.warns(UserWarning):
        ref = Trainer(cfg("ref")).fit()
    original = SSKD.begin_step

    def dying(self, epoch):
        if epoch == 1.5:   # epoch 2, batch 2 of 2
            raise Interrupt
        return original(self, epoch)

    monkeypatch.setattr(SSKD, "begin_step", dying)
    with pytest.raises(Interrupt), pytest.warns(UserWarning):
        Trainer(cfg("cut")).fit()
    assert (load_file(tmp_path / "cut" / "checkpoint.pt")["epoch"],
            load_file(tmp_path / "cut" / "checkpoint.pt")["batch"]) == (1, 1)
    monkeypatch.setattr(SSKD, "begin_step", original)
    with pytest.warns(UserWarning):
        resumed = Trainer(cfg("cut")).fit()
    assert resumed["test_top1"] == ref["test_top1"] and resumed["epochs"] == 3
    for n, m in enumerate(("resnet20", "resnet20")):
        a = load_file(tmp_path / "ref" / f"net{n}_{m}.pt")
        b = load_file(tmp_path / "cut" / f"net{n}_{m}.pt")
        assert all(torch.equal(a[k], b[k]) for k in a), n
    lines = [[json.loads(x) for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()]
             for r in ("ref", "cut")]
    assert [r["sskd/phase"] for r in lines[0]] == ["stage1", "stage2", "head"]
    assert [r.get("sskd/distance") for r in lines[0]] == [r.get("sskd/distance")
                                                          for r in lines[1]]
    assert "test/net1/C1/top1" not in lines[0][1] and "test/net1/C1/top1" in lines[0][2]

"""Stage plans (issue 27): the StagePlan protocol that SSKD, FitNets, AT and NST use, satisfied
by the zoo partition, the ResNet-FPN detector plan and a user's own classifier described by its
module names (``wrap_model(model, stages=..., head=...)``, :class:`ModulePlan`): the plan runs the
model's own forward exactly, a forward with a functional op between the listed modules is refused
in one line, and a user's teacher/student pair trains SSKD (stages, then the head with the
backbone frozen, parameters and BN buffers), FitNets, AT and fixed_backbone through the one loop,
exporting the user's plain module."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dcmkd
from dcmkd.heads.wrap import wrap_model
from dcmkd.methods import create_method
from dcmkd.methods.optimization import Schedule, SGDSettings
from dcmkd.methods.stages import ClassifierStagePlan, ModulePlan, StagePlan, partition_stages
from dcmkd.models import create_model
from dcmkd.registry import UnknownNameError
from dcmkd.weights import atomic_save

SIZE, CLASSES = 8, 5
STAGES = [["conv1", "bn1", "relu"], ["conv2", "bn2", "relu"], ["block"]]
HEAD = ["pool", "flatten", "fc"]
OPTIONS = {"stages": STAGES, "head": HEAD, "sample_input": (2, 3, SIZE, SIZE)}
ONE_EPOCH = {"schedule": "epochs", "stage_epochs": 1, "head_epochs": 1}


pytestmark = pytest.mark.usefixtures("module_one_thread")   # tiny tensors: one thread


class UserCNN(nn.Module):
    """Not a zoo model: one in-place ReLU shared by two stages, torch.flatten in the forward."""

    def __init__(self, width: int = 8, classes: int = CLASSES):
        super().__init__()
        w = width
        self.conv1 = nn.Conv2d(3, w, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(w, 2 * w, 3, 2, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * w)
        self.block = nn.Sequential(nn.Conv2d(2 * w, 4 * w, 3, 2, 1, bias=False),
                                   nn.BatchNorm2d(4 * w), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(self.pool(self.block(x)), 1))


class FunctionalCNN(UserCNN):
    """Its first stage ends with F.relu, which no module of the plan runs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(self.pool(self.block(x)), 1))


def data(n: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, SIZE, SIZE, generator=g), torch.arange(n) % CLASSES


def pair(name: str, tmp_path, **options):
    """``name`` on a UserCNN(16) teacher (weights from a file) and a UserCNN(8) student."""
    torch.manual_seed(0)
    teacher, student = UserCNN(16), UserCNN(8)
    atomic_save(teacher.state_dict(), tmp_path / "teacher.pt")
    method = create_method(name, [teacher, student], CLASSES, model_options=OPTIONS,
                           teacher_weights=str(tmp_path / "teacher.pt"), **options)
    method.configure_optimization(SGDSettings(), Schedule("constant", lr=0.05, epochs=1))
    return method


def steps(method, n: int = 2, lr: float = 0.05) -> list:
    method.train()
    for group in method.optimizer.param_groups:   # the loop's begin_step would set it
        group["lr"] = lr
    x, y = data(8)

    def step(loss, terms=None):
        method.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        method.optimizer.step()
    return [method.training_step(x, y, step) for _ in range(n)]


def changed(before: dict, module: nn.Module) -> set[str]:
    return {k for k, v in module.state_dict().items() if not torch.equal(v, before[k])}


# -- the plan ----------------------------------------------------------------------------------
def test_plan_runs_the_models_own_forward():
    model = UserCNN(8)
    plan = ModulePlan(model, STAGES, HEAD, sample_input=(2, 3, SIZE, SIZE))
    assert isinstance(plan, ClassifierStagePlan)
    assert plan.names == ["conv1+bn1+relu", "conv2+bn2+relu", "block"]
    assert (plan.channels, plan.strides) == ([8, 16, 32], [1, 2, 4])
    assert plan.modules(1) == [model.conv2, model.bn2, model.relu]
    assert plan.head_modules() == [model.pool, model.fc]
    x = data(4)[0]
    seen = {}
    hook = model.block.register_forward_pre_hook(lambda m, a: seen.update(x=a[0].clone()))
    with torch.no_grad():
        for mode in (False, True):   # eval: running statistics; train: batch statistics
            model.train(mode)
            logits = model(x)
            assert torch.equal(plan.forward_head(plan.forward_features(x)), logits)
    hook.remove()
    with torch.no_grad():
        assert torch.equal(plan.run(x)[1], seen["x"])   # stage 2's output is block's input
        assert torch.equal(plan.run(plan.run(x, stop=1)[0], start=1)[-1], plan.run(x)[-1])


def test_zoo_and_detector_plans_satisfy_the_protocol():
    zoo = partition_stages(create_model("resnet20", CLASSES))
    assert isinstance(zoo, ClassifierStagePlan) and zoo.map_stages == [0, 1, 2, 3]
    pytest.importorskip("torchvision")
    from dcmkd.models.detection import ResNetFPNPlan, build_detector

    plan = ResNetFPNPlan(build_detector("retinanet", "resnet18", 3, min_size=64, max_size=64))
    assert isinstance(plan, StagePlan) and not isinstance(plan, ClassifierStagePlan)


@pytest.mark.filterwarnings("ignore:'sskd' without teacher_weights")
def test_a_functional_op_between_listed_modules_is_refused_in_one_line():
    stages = [["conv1", "bn1"], ["conv2", "bn2", "relu"], ["block"]]
    with pytest.raises(ValueError, match=r"^FunctionalCNN's forward differs from its stage plan "
                       r"at stage 2 \('conv2\+bn2\+relu'\): 'conv2' does not receive the output "
                       r"of 'bn1', so the forward has a functional operation") as e:
        create_method("sskd", [FunctionalCNN(16), FunctionalCNN(8)], CLASSES,
                      model_options={**OPTIONS, "stages": stages})
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="at the head: 'fc' does not receive the output of "
                       "'pool'"):   # torch.flatten not listed
        ModulePlan(UserCNN(), STAGES, ["pool", "fc"], sample_input=(2, 3, SIZE, SIZE))
    with pytest.raises(ValueError, match="after the head: its logits are not the output of "
                       "'flatten'"):   # the plan stops before fc
        ModulePlan(UserCNN(), STAGES, ["pool", "flatten"], sample_input=(2, 3, SIZE, SIZE))
    flat = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 36, CLASSES))
    with pytest.raises(ValueError, match=r"stage 1 of Sequential ends with a \(2, 144\) tensor, "
                       r"not a feature map \[B, C, H, W\]: pooling and flatten go in head="):
        ModulePlan(flat, [["0", "1"]], ["2"], sample_input=(2, 3, SIZE, SIZE))


def test_bad_descriptions_are_refused_in_one_line():
    model = UserCNN()
    with pytest.raises(UnknownNameError, match="module of UserCNN in stages= 'bn3' "
                       r"\(did you mean bn2, bn1\?\)"):
        wrap_model(model, stages=[["conv1", "bn3"]], head=HEAD)
    with pytest.raises(ValueError, match="give stages= and head= together"):
        wrap_model(model, stages=STAGES)
    with pytest.raises(ValueError, match="stage 2 of UserCNN names no module"):
        wrap_model(model, stages=[["conv1"], []], head=HEAD)
    with pytest.raises(ValueError, match="'bn1' of UserCNN is listed 2 times"):
        ModulePlan(model, [["conv1", "bn1", "bn1"], ["conv2"]], HEAD)
    with pytest.raises(ValueError, match="'block.0' of UserCNN is inside 'block'"):
        ModulePlan(model, [*STAGES, ["block.0"]], HEAD)


@pytest.mark.filterwarnings("ignore:'sskd' without teacher_weights")
def test_an_undescribed_user_network_is_told_how_to_describe_its_stages(tmp_path):
    with pytest.raises(TypeError, match=r"^UserCNN is not a zoo Backbone .* wrap_model\(model, "
                       r"stages=\[\['conv1', .*head=\['avgpool', 'flatten', 'fc'\]\), or the "
                       "same stages= and head= in create_method's model_options$"):
        create_method("sskd", [UserCNN(16), UserCNN(8)], CLASSES)
    with pytest.raises(ValueError, match=r"UserCNN has the 3 stages given to wrap_model\(stages="
                       r"\.\.\.\); stages=2 cannot cut them"):
        pair("sskd", tmp_path, sskd={**ONE_EPOCH, "stages": 2})


# -- training ----------------------------------------------------------------------------------
def test_sskd_trains_a_user_pair_stage_by_stage_then_the_head_through_fit(tmp_path):
    """create_method + dcmkd.fit on a DataLoader: 3 stages then the head, the teacher as
    loaded, the export the user's own module with its own state_dict keys."""
    torch.manual_seed(0)
    teacher, student = UserCNN(16), UserCNN(8)
    atomic_save(teacher.state_dict(), tmp_path / "teacher.pt")
    t0 = copy.deepcopy(teacher.state_dict())
    method = create_method("sskd", [teacher, student], CLASSES, model_options=OPTIONS,
                           teacher_weights=str(tmp_path / "teacher.pt"), sskd=ONE_EPOCH)
    assert method.s_part.channels == [8, 16, 32] and method.t_part.channels == [16, 32, 64]
    x, y = data(32)
    train = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)
    settings = dcmkd.TrainSettings(schedule=dcmkd.Schedule("constant", lr=0.05, epochs=1),
                                   device="cpu", quiet=True)
    summary = dcmkd.fit(method, train, tmp_path / "run", settings, test=train)
    lines = dcmkd.RunFolder(tmp_path / "run").read_metrics()
    phases = [line["sskd/phase"] for line in lines if "sskd/phase" in line]
    assert phases == ["stage1", "stage2", "stage3", "head"]
    assert all(line["sskd/distance"] > 0 for line in lines if "sskd/distance" in line)
    assert all(torch.equal(v, t0[k]) for k, v in teacher.state_dict().items())
    assert summary["exported"][1] == "net1_usercnn.pt"
    plain = UserCNN(8)
    saved = torch.load(tmp_path / "run" / "net1_usercnn.pt", weights_only=True)
    assert list(saved) == list(plain.state_dict())   # the user's keys, no adapter
    plain.load_state_dict(saved)
    with torch.no_grad():
        assert torch.equal(plain.eval()(x), student.eval()(x))


def test_head_phase_trains_the_head_alone_backbone_parameters_and_buffers_unchanged(tmp_path):
    method = pair("sskd", tmp_path, sskd=ONE_EPOCH)
    student = method.student.backbone
    s0 = copy.deepcopy(student.state_dict())
    steps(method)                                       # stage 1: conv1 and bn1 only
    assert changed(s0, student) == {"conv1.weight", "bn1.weight", "bn1.bias",
                                    "bn1.running_mean", "bn1.running_var",
                                    "bn1.num_batches_tracked"}
    with torch.no_grad():
        student.fc.weight.fill_(0.5)
    for _ in range(3):
        method.end_epoch(method._start + method._done_epochs)
    assert method.phase.kind == "head"
    assert not torch.any(student.fc.weight == 0.5)     # re-initialised (reset_parameters)
    s1 = copy.deepcopy(student.state_dict())
    outs = steps(method)
    assert set(outs[0].losses) == {"net1/ce"}
    assert changed(s1, student) == {"fc.weight", "fc.bias"}


@pytest.mark.parametrize("name", ["fitnets", "at"])
def test_feature_methods_train_a_user_pair(name, tmp_path):
    method = pair(name, tmp_path, beta=10.0)
    teacher, student = (n.backbone for n in method.networks)
    t0, s0 = copy.deepcopy(teacher.state_dict()), copy.deepcopy(student.state_dict())
    outs = steps(method)
    assert set(outs[0].losses) == {"net1/ce", f"net1/{name}"}
    assert outs[0].losses[f"net1/{name}"].item() > 0
    assert method.compared == ([1] if name == "fitnets" else [0, 1, 2])   # the 2nd stage
    assert not changed(t0, teacher)
    assert {"conv1.weight", "block.0.weight", "fc.weight"} <= changed(s0, student)
    assert list(method.export()[1].state_dict()) == list(UserCNN(8).state_dict())


def test_fixed_backbone_reheads_a_user_network(tmp_path):
    atomic_save(UserCNN(8).state_dict(), tmp_path / "trained.pt")
    method = create_method("fixed_backbone", [UserCNN(8)], CLASSES, model_options=OPTIONS,
                           teacher_weights=str(tmp_path / "trained.pt"))
    method.configure_optimization(SGDSettings(), Schedule("constant", lr=0.05, epochs=1))
    net = method.networks[0].backbone
    s0 = copy.deepcopy(net.state_dict())
    steps(method)
    assert changed(s0, net) == {"fc.weight", "fc.bias"}

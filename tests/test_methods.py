"""Methods as training systems: gradient isolation, reference SGD step, DML = DCM without
auxiliary classifiers, KD = DML with a frozen peer, BN statistics once per step, N networks."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from dcmkd.methods import METHODS, create_method
from dcmkd.models import create_model
from dcmkd.registry import UnknownNameError
from dcmkd.weights import atomic_save

torch.set_num_threads(2)
SIZE, CLASSES = 8, 5


def batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, SIZE, SIZE, generator=g), torch.randint(0, CLASSES, (n,), generator=g)


def sgd(method, lr=0.1):
    params = [p for p in method.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)


def stepper(opt):
    def step(loss, terms=None):
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def make(name, nets=("resnet20", "resnet20"), seed=0, **kw):
    torch.manual_seed(seed)
    return create_method(name, list(nets), CLASSES, **kw)


@pytest.mark.parametrize("name", [m for m in METHODS.names() if not METHODS.get(m).stage])
def test_every_method_builds_and_steps(name):
    method = make(name)
    x, y = batch()
    out = method.training_step(x, y, stepper(sgd(method)))
    assert all(torch.isfinite(v) for v in out.losses.values())
    aux = METHODS.get(name).aux
    assert [len(z) for z in out.logits] == ([1, 1] if name == "kd" else [3, 3] if aux else [1, 1])
    assert len(method.export()) == 2


def test_term_names_per_method():
    x, y = batch()
    assert set(make("dcm")(x, y).losses) == {f"net{n}/{t}" for n in (0, 1)
                                             for t in ("ce", "ds", "dcm1", "dcm2")}
    assert set(make("dml")(x, y).losses) == {"net0/ce", "net0/dml", "net1/ce", "net1/dml"}
    assert set(make("dml_ds")(x, y).losses) == {f"net{n}/{t}" for n in (0, 1)
                                                for t in ("ce", "ds", "dml")}
    assert set(make("kd")(x, y).losses) == {"net1/ce", "net1/kd"}
    assert set(make("ind")(x, y).losses) == {"net0/ce", "net1/ce"}
    assert set(make("dcm2")(x, y).losses) == {f"net{n}/{t}" for n in (0, 1)
                                              for t in ("ce", "ds", "dcm2")}


def test_gradient_isolation_each_network_gets_only_its_own_loss():
    """DCM Algorithm 1 step 4: ∂(Σ L)/∂W_n == ∂L_n/∂W_n."""
    method = make("dcm")
    x, y = batch()
    out = method(x, y)
    out.total().backward()
    for n in range(2):
        ref = copy.deepcopy(make("dcm"))
        ref_out = ref(x, y)
        own = sum(v for k, v in ref_out.losses.items() if k.startswith(f"net{n}/"))
        own.backward()
        for (name, p), (_, q) in zip(method.networks[n].named_parameters(),
                                     ref.networks[n].named_parameters()):
            assert torch.allclose(p.grad, q.grad, atol=1e-6), name
        other = ref.networks[1 - n]
        assert all(p.grad is None for p in other.parameters())


def reference_dcm_losses(nets, x, y):
    """DCM Eq. 6–9 written out with loops: per network, CE of every classifier plus KL from every
    classifier of the peer (detached) into every own classifier."""
    outs = [net(x) for net in nets]
    losses = []
    for n in range(2):
        peer = outs[1 - n]
        loss = sum(F.cross_entropy(z, y) for z in outs[n])
        for q in outs[n]:
            for p in peer:
                loss = loss + F.kl_div(F.log_softmax(q, 1), F.softmax(p.detach(), 1),
                                       reduction="batchmean")
        losses.append(loss)
    return losses


def test_one_sgd_step_equals_independent_reference_step():
    method = make("dcm")
    nets = [copy.deepcopy(net) for net in method.networks]
    opts = [torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
            for net in nets]
    x, y = batch()
    method.training_step(x, y, stepper(sgd(method)))
    for opt in opts:
        opt.zero_grad()
    for loss in reference_dcm_losses(nets, x, y):
        loss.backward()
    for opt in opts:
        opt.step()
    for a, b in zip(method.networks, nets):
        for (name, p), q in zip(a.named_parameters(), b.parameters()):
            assert torch.allclose(p, q, atol=1e-6), name
        for (name, p), q in zip(a.named_buffers(), b.buffers()):
            assert torch.allclose(p.float(), q.float(), atol=1e-6), name


def test_dcm_without_auxiliary_classifiers_equals_dml():
    x, y = batch()
    dcm = make("dcm", classifiers="C1")(x, y).losses
    dml = make("dml")(x, y).losses
    assert {k.replace("dcm1", "dml"): v for k, v in dcm.items()}.keys() == dml.keys()
    for k, v in dcm.items():
        assert torch.equal(v, dml[k.replace("dcm1", "dml")])


def test_dml_with_a_frozen_peer_equals_kd():
    from dcmkd.methods.mutual import MutualMethod

    kd = make("kd")
    dml = make("dml")
    frozen = MutualMethod(list(dml.networks), "final", frozen=(0,))
    x, y = batch()
    a, b = kd(x, y).losses, frozen(x, y).losses
    assert torch.equal(a["net1/kd"], b["net1/dcm1"]) and torch.equal(a["net1/ce"], b["net1/ce"])
    # and KD is Eq. 1: CE + KL(teacher → student) with the teacher in eval mode
    with torch.no_grad():
        t = kd.networks[0](x)[0]
    s = kd.networks[1](x)[0]
    ref = F.kl_div(F.log_softmax(s, 1), F.softmax(t, 1), reduction="batchmean")
    assert torch.allclose(a["net1/kd"], ref, atol=1e-6)


def test_kd_teacher_is_frozen_and_loaded_from_weights(tmp_path):
    torch.manual_seed(3)
    teacher = create_model("resnet20", CLASSES)
    atomic_save(teacher.state_dict(), tmp_path / "teacher.pt")
    kd = make("kd", teacher_weights=tmp_path / "teacher.pt")
    for p, q in zip(kd.networks[0].backbone.parameters(), teacher.parameters()):
        assert torch.equal(p, q)
    before = copy.deepcopy(kd.networks[0].state_dict())
    opt = sgd(kd)
    kd.train()
    for _ in range(2):
        kd.training_step(*batch(), stepper(opt))
    after = kd.networks[0].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN statistics
    assert not kd.networks[0].training and kd.networks[1].training
    with pytest.raises(ValueError, match="wrong architecture|lacks"):
        make("kd", nets=("resnet32", "resnet20"), teacher_weights=tmp_path / "teacher.pt")


@pytest.mark.parametrize("update", ["simultaneous", "alternating"])
def test_batchnorm_statistics_move_exactly_once_per_step(update):
    method = make("dml", update=update)
    fresh = copy.deepcopy(method)
    x, y = batch()
    method.training_step(x, y, stepper(sgd(method)))
    with torch.no_grad():
        for net in fresh.networks:
            net(x)  # one training-mode forward of the initial weights
    for a, b in zip(method.networks, fresh.networks):
        for (name, buf), ref in zip(a.named_buffers(), b.buffers()):
            assert torch.allclose(buf.float(), ref.float(), atol=1e-6), name


def test_alternating_dml_uses_the_peers_updated_prediction():
    method = make("dml", update="alternating")
    nets = [copy.deepcopy(n) for n in method.networks]
    opts = [torch.optim.SGD(n.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
            for n in nets]
    x, y = batch()
    method.training_step(x, y, stepper(sgd(method)))
    # reference: DML paper, update net0, recompute its prediction, then update net1
    z0, z1 = nets[0](x)[0], nets[1](x)[0]
    l0 = F.cross_entropy(z0, y) + F.kl_div(F.log_softmax(z0, 1), F.softmax(z1.detach(), 1),
                                           reduction="batchmean")
    opts[0].zero_grad()
    l0.backward()
    opts[0].step()
    state = copy.deepcopy(nets[0].state_dict())
    with torch.no_grad():
        z0_new = nets[0](x)[0]
    nets[0].load_state_dict(state)  # the recomputation must not move BN statistics
    l1 = F.cross_entropy(z1, y) + F.kl_div(F.log_softmax(z1, 1), F.softmax(z0_new, 1),
                                           reduction="batchmean")
    opts[1].zero_grad()
    l1.backward()
    opts[1].step()
    for a, b in zip(method.networks, nets):
        for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.allclose(p.float(), q.float(), atol=1e-6), name


def supervised_loss(method, x, y):
    """Cross-entropy of every classifier of every network (the distillation terms start near
    zero, the outputs being near-uniform at initialisation, and grow as the networks learn)."""
    with torch.no_grad():
        out = method(x, y).losses
    return sum(v.item() for k, v in out.items() if k.endswith(("/ce", "/ds")))


def train_steps(method, steps=10, lr=0.02):
    opt = sgd(method, lr)
    x, y = batch(16, seed=5)
    first = supervised_loss(method, x, y)
    for _ in range(steps):
        method.training_step(x, y, stepper(opt))
    return first, supervised_loss(method, x, y)


def test_heterogeneous_pair_trains_together():
    method = make("dcm", nets=("wrn16_2", "resnet20"))
    assert [n.backbone.model_name for n in method.networks] == ["wrn16_2", "resnet20"]
    first, last = train_steps(method)
    assert last < 0.8 * first


def test_three_networks_train_together():
    method = make("dcm", nets=("resnet20", "resnet20", "wrn16_2"))
    x, y = batch()
    losses = method(x, y).losses
    assert {k.split("/")[0] for k in losses} == {"net0", "net1", "net2"}
    assert method.links.count() == {"same": 18, "cross": 36}
    first, last = train_steps(method, steps=20)   # 9 classifiers, each pulled by 6 peers
    assert last < 0.8 * first


def test_bad_method_options_name_the_valid_choices():
    with pytest.raises(UnknownNameError, match="did you mean dcm"):
        make("dcn")
    with pytest.raises(UnknownNameError, match="temperature"):
        make("dcm", temprature=2.0)
    with pytest.raises(ValueError, match="at least 2"):
        make("dml", nets=("resnet20",))
    with pytest.raises(ValueError, match="takes 2 networks"):   # KD: a teacher and ONE student
        make("kd", nets=("resnet20",) * 3)
    with pytest.raises(ValueError, match="model_options go with a model name"):
        create_method("ind", [create_model("resnet20", 10)], 10, model_options={"dropout": 0.3})
    with pytest.raises(UnknownNameError, match="alternating"):
        make("dml", update="interleaved")


def test_a_run_checkpoint_gives_its_network_0_as_teacher_weights(tmp_path):
    """``teacher_weights=RUN/checkpoint.pt``: the method state dict's ``networks.0`` backbone."""
    import torch

    from dcmkd.methods import create_method
    from dcmkd.models import create_model
    from dcmkd.weights import load_backbone_weights
    torch.manual_seed(0)
    trained = create_method("dml", ["resnet20", "resnet20"], 10)
    torch.save({"epoch": 1, "method": trained.state_dict()}, tmp_path / "checkpoint.pt")
    model = load_backbone_weights(create_model("resnet20", num_classes=10),
                                  tmp_path / "checkpoint.pt")
    want = trained.networks[0].backbone.state_dict()
    other = trained.networks[1].backbone.state_dict()
    got = model.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert not all(torch.equal(got[k], other[k]) for k in other)   # network 0, not 1

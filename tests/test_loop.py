"""The one training loop (dcmkd.engine.loop.fit): no host reads inside the step, your own
networks and a plain DataLoader with exact resume, resumable keys, autocast and channels_last
acting where they should, eval_every, compile."""
from __future__ import annotations

import contextlib
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dcmkd
from dcmkd.engine import loop as loop_mod
from dcmkd.engine.config import resolve
from dcmkd.engine.trainer import Trainer
from dcmkd.methods.mutual import MutualMethod
from dcmkd.run_folder import RunConflict, RunFolder
from dcmkd.weights import load_file

TINY = ["data.name=synthetic", "data.image_size=8", "data.train_subset=48",
        "data.batch_size=16", "data.test_batch_size=32", "epochs=2", "quiet=true",
        "deterministic=true", "device=cpu", "schedule.name=cosine", "optim.lr=0.05"]


def small_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def wrapped_pair(seed: int = 0):
    torch.manual_seed(seed)
    return dcmkd.create_method("dcm", [dcmkd.wrap_model(small_cnn(), sample_input=(2, 3, 8, 8))
                                       for _ in range(2)])


def loaders(n: int = 32, batch: int = 8):
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)
    return (DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True),
            DataLoader(TensorDataset(x, y), batch_size=16))


class Interrupt(Exception):
    pass


@contextlib.contextmanager
def interrupted_in_epoch_2(monkeypatch):
    """The training inside stops (:class:`Interrupt`) as a mutual method's second epoch starts;
    the method is whole again after the block."""
    original = MutualMethod.begin_step

    def dying(self, epoch):
        if epoch >= 1:
            raise Interrupt
        return original(self, epoch)

    monkeypatch.setattr(MutualMethod, "begin_step", dying)
    with pytest.raises(Interrupt):
        yield
    monkeypatch.setattr(MutualMethod, "begin_step", original)


# -- host reads ------------------------------------------------------------------------------
def test_a_dcm_step_reads_no_tensor_value_on_the_host(tmp_path, monkeypatch):
    """12 steps of dcm with log_every=4: the only host reads are one batched read per log
    interval and the end-of-epoch read (each a single tolist call)."""
    cfg = resolve(None, ["method=dcm", "nets=resnet20,resnet20", *TINY, "epochs=1",
                         "data.train_subset=48", "data.batch_size=4", "log_every=4",
                         f"out={tmp_path / 'run'}"])
    reads: list[str] = []
    counting = {"on": False}

    def counted(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *a, **k):
            if counting["on"]:
                reads.append(name)
            return original(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, wrapper)

    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "__index__"):
        counted(name)
    train_epoch = loop_mod.train_epoch

    def counting_epoch(*args, **kwargs):
        counting["on"] = True
        try:
            return train_epoch(*args, **kwargs)
        finally:
            counting["on"] = False

    monkeypatch.setattr(loop_mod, "train_epoch", counting_epoch)
    Trainer(cfg).fit()
    steps, every = 12, 4
    assert reads == ["tolist"] * (steps // every + 1)


# -- your own networks and data -----------------------------------------------------------------
def test_fit_trains_wrapped_networks_from_a_dataloader_and_resumes_exactly(tmp_path,
                                                                           monkeypatch):
    train, test = loaders()
    settings = dcmkd.TrainSettings(schedule=dcmkd.Schedule("cosine", lr=0.05, epochs=2),
                                   device="cpu", quiet=True, deterministic=True,
                                   checkpoint_every_steps=1)
    ref = dcmkd.fit(wrapped_pair(), train, tmp_path / "ref", settings, test=test)
    original = MutualMethod.begin_step

    def dying(self, epoch):
        if epoch == 1.5:   # epoch 2, batch 3 of 4
            raise Interrupt
        return original(self, epoch)

    monkeypatch.setattr(MutualMethod, "begin_step", dying)
    with pytest.raises(Interrupt):
        dcmkd.fit(wrapped_pair(), train, tmp_path / "cut", settings, test=test)
    ckpt = load_file(tmp_path / "cut" / "checkpoint.pt")
    assert (ckpt["epoch"], ckpt["batch"]) == (1, 2)
    monkeypatch.setattr(MutualMethod, "begin_step", original)
    resumed = dcmkd.fit(wrapped_pair(), train, tmp_path / "cut", settings, test=test)
    assert resumed["test_top1"] == ref["test_top1"]
    for name in ref["exported"]:
        a, b = load_file(tmp_path / "ref" / name), load_file(tmp_path / "cut" / name)
        assert set(a) == set(small_cnn().state_dict())          # the user's own keys
        assert all(torch.equal(a[k], b[k]) for k in a), name
    # the resumed epoch's training metrics cover the whole epoch, as uninterrupted
    m_ref, m_cut = (RunFolder(tmp_path / r).read_metrics() for r in ("ref", "cut"))
    for k in m_ref[1]:
        if k.startswith("train/"):
            assert m_cut[1][k] == m_ref[1][k], k


def test_a_generator_or_a_lengthless_iterable_is_refused(tmp_path):
    batches = [(torch.randn(4, 3, 8, 8), torch.zeros(4, dtype=torch.long))]
    with pytest.raises(TypeError, match="read only once"):
        dcmkd.fit(wrapped_pair(), iter(batches), tmp_path / "g", dcmkd.TrainSettings())
    with pytest.raises(TypeError, match="no len"):
        dcmkd.fit(wrapped_pair(), _NoLen(batches), tmp_path / "n", dcmkd.TrainSettings())


class _NoLen:
    def __init__(self, items):
        self.items = items

    def __iter__(self):
        return iter(self.items)


def test_a_list_of_batches_trains_and_another_method_is_refused_in_its_folder(tmp_path):
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g))
               for _ in range(3)]
    settings = dcmkd.TrainSettings(schedule=dcmkd.Schedule("constant", lr=0.05, epochs=1),
                                   device="cpu", quiet=True)
    summary = dcmkd.fit(wrapped_pair(), batches, tmp_path / "run", settings)
    assert summary["epochs"] == 1 and "test_top1" not in summary      # no test set given
    other = dcmkd.create_method("dml", [dcmkd.wrap_model(small_cnn(), sample_input=(2, 3, 8, 8))
                                        for _ in range(2)])
    with pytest.raises(RunConflict, match=r"method.name: .dcm. → .dml."):
        dcmkd.fit(other, batches, tmp_path / "run", settings)


def test_the_methods_advice_on_an_epoch_is_warned_once(tmp_path, monkeypatch):
    seen = []

    def advice(self, epoch, record):
        seen.append((epoch, sorted(k for k in record if k.endswith("/acc"))))
        return "every classifier is at chance" if epoch == 1 else None

    monkeypatch.setattr(MutualMethod, "advice", advice)
    batches, _ = loaders()
    settings = dcmkd.TrainSettings(schedule=dcmkd.Schedule("constant", lr=0.05, epochs=3),
                                   device="cpu", quiet=True)
    with pytest.warns(UserWarning, match="every classifier is at chance") as caught:
        dcmkd.fit(wrapped_pair(), batches, tmp_path / "run", settings)
    assert len(caught) == 1 and [e for e, _ in seen] == [0, 1, 2]
    assert seen[1][1] == [f"train/net{n}/C{c}/acc" for n in (0, 1) for c in (1, 2, 3)]


def test_a_settings_warning_is_given_once_per_run(tmp_path):
    """The loop resolves channels_last=auto without rebuilding the settings, whose checks would
    warn again (issue 28 item 15: every schedule warning came twice)."""
    cfg = resolve(None, ["method=ind", "nets=resnet20", *TINY, "epochs=1", "schedule.name=step",
                         "schedule.step_size=30", f"out={tmp_path / 'r'}"])
    with pytest.warns(UserWarning) as caught:
        Trainer(cfg).fit()
    never = [w for w in caught if "the rate never drops" in str(w.message)]
    assert len(never) == 1, [str(w.message) for w in caught]


# -- which keys may change on resume -------------------------------------------------------------
@pytest.mark.parametrize("change", ["data.workers=1", "data.test_batch_size=16", "quiet=false",
                                    "tensorboard=true", "device=auto"])
def test_resume_accepts_a_change_of_a_key_that_does_not_define_the_run(tmp_path, monkeypatch,
                                                                       change):
    cfg = resolve(None, ["method=dml", "nets=resnet20,resnet20", *TINY, f"out={tmp_path / 'r'}"])
    with interrupted_in_epoch_2(monkeypatch):
        Trainer(cfg).fit()
    resumed = resolve(None, ["method=dml", "nets=resnet20,resnet20", *TINY, change,
                             f"out={tmp_path / 'r'}"])
    assert Trainer(resumed).fit()["epochs"] == 2
    with pytest.raises(RunConflict, match=r"method: 'dml' → 'dcm'"):
        Trainer(resolve(None, ["method=dcm", "nets=resnet20,resnet20", *TINY,
                               f"out={tmp_path / 'r'}"])).fit()


# -- evaluation, precision, layout, compile ----------------------------------------------------
def test_eval_every_evaluates_every_nth_epoch_and_the_last(tmp_path):
    cfg = resolve(None, ["method=ind", "nets=resnet20", *TINY, "epochs=5", "eval_every=2",
                         f"out={tmp_path / 'r'}"])
    Trainer(cfg).fit()
    lines = RunFolder(tmp_path / "r").read_metrics()
    assert [r["epoch"] for r in lines if "test/net0/C1/top1" in r] == [2, 4, 5]


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_autocast_covers_forward_and_loss_not_backward_and_channels_last_acts(precision, dtype,
                                                                              tmp_path):
    """Under precision=bf16/fp16 every convolution runs in that dtype on a channels_last input;
    the backward runs outside autocast; the first-epoch loss stays within 5% of fp32."""
    seen: dict[str, set] = {"dtype": set(), "layout": set(), "backward_autocast": set()}

    def run(prec: str, name: str) -> float:
        cfg = resolve(None, ["method=dcm", "nets=resnet20,resnet20", *TINY, "epochs=1",
                             f"precision={prec}", "channels_last=true", "deterministic=false",
                             f"out={tmp_path / name}"])
        built = dcmkd.engine.build(cfg)
        def forward_hook(mod, args, out):
            seen["dtype"].add(out.dtype)
            seen["layout"].add(args[0].is_contiguous(memory_format=torch.channels_last))

        def grad_hook(grad):
            seen["backward_autocast"].add(torch.is_autocast_enabled("cpu"))

        hooks = []
        for m in built.method.modules():
            if isinstance(m, nn.Conv2d):
                hooks.append(m.register_forward_hook(forward_hook))
                hooks.append(m.weight.register_hook(grad_hook))
        dcmkd.fit(built.method, built.data, tmp_path / name, built.settings, config=cfg)
        for h in hooks:
            h.remove()
        return RunFolder(tmp_path / name).read_metrics()[0]["train/net0/ce"]

    low = run(precision, "low")
    assert seen["dtype"] == {dtype} and seen["layout"] == {True}
    assert seen["backward_autocast"] == {False}
    for k in seen:
        seen[k].clear()
    full = run("fp32", "fp32")
    assert seen["dtype"] == {torch.float32}
    assert abs(low - full) <= 0.05 * full


def test_compile_gives_the_eager_losses(tmp_path):
    """compile=true on a tiny dcm pair: every loss term of the first two epochs within 1e-4
    (relative) of eager, and no fallback to eager was needed."""
    train, test = loaders()
    logs: list[str] = []

    def run(compiled: bool, name: str) -> list[dict]:
        settings = dcmkd.TrainSettings(schedule=dcmkd.Schedule("constant", lr=0.05, epochs=2),
                                       device="cpu", compile=compiled)
        dcmkd.fit(wrapped_pair(), train, tmp_path / name, settings, test=test, log=logs.append)
        return RunFolder(tmp_path / name).read_metrics()

    eager, compiled = run(False, "eager"), run(True, "compiled")
    assert not [line for line in logs if "torch.compile failed" in line]
    for a, b in zip(eager, compiled):
        for k in a:
            if k.startswith("train/") and not k.endswith("/acc"):
                assert math.isclose(a[k], b[k], rel_tol=1e-4, abs_tol=1e-6), k


def test_a_failing_compile_falls_back_to_eager_with_one_line(tmp_path, monkeypatch):
    def broken(fn, *a, **k):
        def call(*args, **kwargs):
            raise RuntimeError("inductor: no C++ compiler\nmore lines")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    train, test = loaders()
    logs: list[str] = []
    settings = dcmkd.TrainSettings(schedule=dcmkd.Schedule("constant", lr=0.05, epochs=1),
                                   device="cpu", compile=True)
    summary = dcmkd.fit(wrapped_pair(), train, tmp_path / "r", settings, test=test,
                        log=logs.append)
    failed = [line for line in logs if "torch.compile failed" in line]
    assert len(failed) == 2 and "no C++ compiler" in failed[0] and "\n" not in failed[0]
    assert summary["epochs"] == 1


@pytest.mark.parametrize("clip", [None, 0.5, 100.0])
def test_clip_grad_norm_bounds_the_total_gradient_norm_of_a_step(clip):
    """``optim.clip_grad_norm`` acts: with plain SGD (lr 1) a step moves the weights by the
    gradient, so the step's norm is the gradient's, 5 (3-4-0 and 0-0-0), or ``clip`` when that
    is smaller."""
    from types import SimpleNamespace
    from dcmkd.engine.device import Precision
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(1))
    method = SimpleNamespace(optimizer=torch.optim.SGD([a, b], lr=1.0))
    step = loop_mod.Step(method, Precision("fp32", torch.device("cpu")), clip)
    step((torch.tensor([3.0, 4.0]) * a).sum() + 0.0 * b.sum())
    moved = torch.cat([a.detach(), b.detach()]).norm().item()
    assert moved == pytest.approx(min(5.0, clip or math.inf), rel=1e-6)


def test_fp16_on_the_cpu_warns_that_it_is_slow():
    from dcmkd.engine.device import Precision
    with pytest.warns(UserWarning, match="precision=fp16 on the CPU has no fast kernels"):
        Precision("fp16", torch.device("cpu"))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Precision("bf16", torch.device("cpu"))
        Precision("fp32", torch.device("cpu"))

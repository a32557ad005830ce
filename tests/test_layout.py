"""The layout decision (dcmkd.engine.layout): its table is the measurement's, and ``auto``
resolves per device type and family."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from dcmkd.engine import layout
from dcmkd.engine.layout import CHANNELS_LAST_FASTER, family_of, resolve_channels_last
from dcmkd.models.registry import list_models

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
FAMILIES = {"cifar_resnet", "cifar_wrn", "cifar_densenet", "imagenet_mobilenetv2",
            "imagenet_resnet"}


def _results(device_type: str) -> dict:
    return json.loads((RESULTS / f"bench_layout_{device_type}.json").read_text())


def _summary_from_rows(data: dict) -> tuple[dict, dict]:
    """Per network: the default layout only if one of its methods ran measurably slower in
    channels_last (a ratio within 1 ± tie is a tie); per family: its first network's."""
    nets: dict[str, str] = {}
    for r in data["rows"]:
        slower = r["default_ms"] / r["channels_last_ms"] < 1 - data["tie_band"]
        before = nets.get(r["model"])
        nets[r["model"]] = "default" if slower or before == "default" else "channels_last"
    fams: dict[str, str] = {}
    for r in data["rows"]:
        fams.setdefault(r["family"], nets[r["model"]])
    return nets, fams


def test_cpu_table_is_the_measurement():
    data = _results("cpu")
    assert data["device_type"] == "cpu" and data["threads"] == 1
    assert set(data["methods"]) == {"ind", "dcm"}
    nets, fams = _summary_from_rows(data)
    # the file's summary follows from its rows
    assert {n: v["faster"] for n, v in data["networks"].items()} == nets
    assert {f: v["faster"] for f, v in data["families"].items()} == fams
    assert set(fams) == FAMILIES
    # the decision table is the file's: per family, and per network that differs from it
    assert CHANNELS_LAST_FASTER["cpu"] == {f: v == "channels_last" for f, v in fams.items()}
    family_of_net = {r["model"]: r["family"] for r in data["rows"]}
    assert layout.NETWORK_EXCEPTIONS["cpu"] == {
        n: v == "channels_last" for n, v in nets.items() if v != fams[family_of_net[n]]}
    for net, faster in nets.items():   # so auto picks what was measured for each network
        assert resolve_channels_last("auto", [net], torch.device("cpu")) \
            is (faster == "channels_last"), net


def test_cuda_table_is_the_measurement_or_the_recommendation():
    path = RESULTS / "bench_layout_cuda.json"
    if path.exists():
        families = _results("cuda")["families"]
        assert {f: v["faster"] == "channels_last" for f, v in families.items()} \
            == CHANNELS_LAST_FASTER["cuda"]
    else:  # unmeasured: channels_last for every (convolutional) zoo family
        assert CHANNELS_LAST_FASTER["cuda"] == {f: True for f in FAMILIES}
        assert layout.NETWORK_EXCEPTIONS["cuda"] == {}


def test_every_zoo_network_has_a_family_in_both_tables():
    for name in list_models():
        assert family_of(name) in CHANNELS_LAST_FASTER["cpu"], name
        assert family_of(name) in CHANNELS_LAST_FASTER["cuda"], name


def test_family_of():
    assert family_of("resnet110") == "cifar_resnet"
    assert family_of("wrn28_10") == "cifar_wrn"
    assert family_of("densenet40_12") == "cifar_densenet"
    assert family_of("mobilenetv2") == "imagenet_mobilenetv2"
    assert family_of("resnet50") == "imagenet_resnet"
    for unknown in ("tv:resnet18", "timm:resnet18", "my_model", "", None):
        assert family_of(unknown) is None


def test_auto_on_cpu(monkeypatch):
    cpu = torch.device("cpu")
    # the measured figures (bench_layout_cpu.md): ResNet-20 1.17x / 1.06x (ind / dcm), WRN-16-2
    # 1.12x, DenseNet-40-12 1.35x / 1.29x, ResNet-18 dcm 0.85x, VGG-16-BN dcm 0.75x
    assert resolve_channels_last("auto", ["resnet20", "resnet110"], cpu) is True
    assert resolve_channels_last("auto", ["wrn16_2", "densenet40_12"], cpu) is True
    assert resolve_channels_last("auto", ["resnet18"], cpu) is False
    assert resolve_channels_last("auto", ["vgg16_bn"], cpu) is False    # an exception
    assert resolve_channels_last("auto", ["resnet56", "vgg16_bn"], cpu) is False
    assert resolve_channels_last("auto", ["mobilenet"], "cpu") is True
    # every network must be faster in channels_last: one slower family keeps the default
    table = {**CHANNELS_LAST_FASTER, "cpu": {**CHANNELS_LAST_FASTER["cpu"],
                                             "cifar_wrn": True, "cifar_densenet": False}}
    monkeypatch.setattr(layout, "CHANNELS_LAST_FASTER", table)
    assert resolve_channels_last("auto", ["wrn16_2", "wrn40_2"], cpu) is True
    assert resolve_channels_last("auto", ["wrn16_2", "densenet40_12"], cpu) is False


def test_auto_on_cuda_and_other_devices():
    cuda = torch.device("cuda")   # constructing a device needs no GPU
    assert resolve_channels_last("auto", ["resnet110", "resnet110"], cuda) is True
    assert resolve_channels_last("auto", ["wrn28_10", "resnet56"], torch.device("cuda:1")) is True
    assert resolve_channels_last("auto", ["resnet110"], torch.device("meta")) is False
    assert resolve_channels_last("auto", ["resnet110"], torch.device("mps")) is False
    assert resolve_channels_last("auto", ["vgg16_bn", "resnet18"], cuda) is True


def test_auto_keeps_the_default_for_networks_outside_the_zoo():
    cuda = torch.device("cuda")
    assert resolve_channels_last("auto", ["tv:resnet18"], cuda) is False
    assert resolve_channels_last("auto", ["resnet20", "timm:resnet18"], cuda) is False
    assert resolve_channels_last("auto", ["my_model"], cuda) is False
    assert resolve_channels_last("auto", [], cuda) is False


@pytest.mark.parametrize("value", [True, False])
@pytest.mark.parametrize("device", ["cpu", "cuda", "meta"])
def test_explicit_values_pass_through(value, device):
    for nets in (["resnet20"], ["tv:resnet18"], []):
        assert resolve_channels_last(value, nets, torch.device(device)) is value


@pytest.mark.parametrize("value", ["yes", "Auto", "true", 1, 0, None])
def test_bad_value_is_one_line(value):
    with pytest.raises(ValueError) as err:
        resolve_channels_last(value, ["resnet20"], torch.device("cpu"))
    message = str(err.value)
    assert "\n" not in message
    assert message == f"channels_last: expected true, false or 'auto', got {value!r}"


def test_benchmark_mode_writes_the_table(tmp_path, one_thread):
    """``bench_step.py --layouts-per-family`` on one tiny network: the file the table is read
    from has its rows and its per-family winner (one round of batch 2: the figures are not
    meant to be read)."""
    spec = importlib.util.spec_from_file_location("bench_step", ROOT / "benchmarks/bench_step.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_step"] = bench
    spec.loader.exec_module(bench)
    out = tmp_path / "layout"
    result = bench.main(["--layouts-per-family", "--device", "cpu", "--archs", "resnet20",
                         "--batch", "2", "--rounds", "1", "--warmup", "0", "--name", str(out)])
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["families"] == result["families"]
    (row,) = data["rows"]
    assert (row["model"], row["family"], row["method"], row["size"], row["batch"]) \
        == ("resnet20", "cifar_resnet", "ind", 32, 2)
    assert row["speed_ratio"] == pytest.approx(row["default_ms"] / row["channels_last_ms"])
    assert data["families"]["cifar_resnet"]["faster"] == data["networks"]["resnet20"]["faster"] \
        == ("default" if row["speed_ratio"] < 0.97 else "channels_last")
    assert row["verdict"] == ("tie" if abs(row["speed_ratio"] - 1) <= 0.03 else
                              "channels_last" if row["speed_ratio"] > 1 else "default")
    assert bench.verdict(1.031) == "channels_last" and bench.verdict(0.969) == "default"
    assert bench.verdict(1.02) == bench.verdict(0.98) == "tie"
    rows = [{"family": "f", "model": "a", "speed_ratio": 1.4},
            {"family": "f", "model": "a", "speed_ratio": 0.98},   # a tie: still channels_last
            {"family": "f", "model": "b", "speed_ratio": 1.2},
            {"family": "f", "model": "b", "speed_ratio": 0.9},    # b's second method: slower
            {"family": "g", "model": "c", "speed_ratio": 0.95}]
    networks, families = bench.layout_summary(rows)
    assert {n: v["faster"] for n, v in networks.items()} \
        == {"a": "channels_last", "b": "default", "c": "default"}
    assert families["f"] == {"faster": "channels_last", "representative": "a",
                             "speed_ratio_min": 0.98, "speed_ratio_max": 1.4,
                             "models": ["a", "b"], "exceptions": {"b": "default"}}
    assert families["g"]["faster"] == "default" and families["g"]["exceptions"] == {}

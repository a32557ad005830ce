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


def test_cpu_table_is_the_measurement():
    data = _results("cpu")
    assert data["device_type"] == "cpu" and data["threads"] == 1
    measured = {r["family"] for r in data["rows"]}
    assert measured == FAMILIES == set(data["families"])
    for fam, summary in data["families"].items():
        # the summary follows from the rows: the default layout only if some network of the
        # family ran measurably slower in channels_last (a ratio within 1 ± tie is a tie)
        ratios = [r["default_ms"] / r["channels_last_ms"] for r in data["rows"]
                  if r["family"] == fam]
        slower = min(ratios) < 1 - data["tie_band"]
        assert summary["faster"] == ("default" if slower else "channels_last")
        assert CHANNELS_LAST_FASTER["cpu"][fam] is (summary["faster"] == "channels_last"), fam
    assert set(CHANNELS_LAST_FASTER["cpu"]) == FAMILIES


def test_cuda_table_is_the_measurement_or_the_recommendation():
    path = RESULTS / "bench_layout_cuda.json"
    if path.exists():
        families = _results("cuda")["families"]
        assert {f: v["faster"] == "channels_last" for f, v in families.items()} \
            == CHANNELS_LAST_FASTER["cuda"]
    else:  # unmeasured: channels_last for every (convolutional) zoo family
        assert CHANNELS_LAST_FASTER["cuda"] == {f: True for f in FAMILIES}


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


def test_auto_on_cpu_follows_the_table(monkeypatch):
    cpu = torch.device("cpu")
    for fam, nets in (("cifar_resnet", ["resnet20"]), ("cifar_wrn", ["wrn16_2", "wrn16_2"]),
                      ("imagenet_resnet", ["resnet18"])):
        assert resolve_channels_last("auto", nets, cpu) is CHANNELS_LAST_FASTER["cpu"][fam]
    # every network must be faster in channels_last: one slower family keeps the default
    table = {**CHANNELS_LAST_FASTER, "cpu": {**CHANNELS_LAST_FASTER["cpu"],
                                             "cifar_wrn": True, "cifar_densenet": False}}
    monkeypatch.setattr(layout, "CHANNELS_LAST_FASTER", table)
    assert resolve_channels_last("auto", ["wrn16_2", "wrn40_2"], cpu) is True
    assert resolve_channels_last("auto", ["wrn16_2", "densenet40_12"], cpu) is False
    assert resolve_channels_last("auto", ["densenet40_12"], "cpu") is False


def test_auto_on_cuda_and_other_devices():
    cuda = torch.device("cuda")   # constructing a device needs no GPU
    assert resolve_channels_last("auto", ["resnet110", "resnet110"], cuda) is True
    assert resolve_channels_last("auto", ["wrn28_10", "resnet56"], torch.device("cuda:1")) is True
    assert resolve_channels_last("auto", ["resnet110"], torch.device("meta")) is False
    assert resolve_channels_last("auto", ["resnet110"], torch.device("mps")) is False


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
    assert data["families"]["cifar_resnet"]["faster"] \
        == ("default" if row["speed_ratio"] < 0.97 else "channels_last")
    assert row["verdict"] == ("tie" if abs(row["speed_ratio"] - 1) <= 0.03 else
                              "channels_last" if row["speed_ratio"] > 1 else "default")
    assert bench.verdict(1.031) == "channels_last" and bench.verdict(0.969) == "default"
    assert bench.verdict(1.02) == bench.verdict(0.98) == "tie"
    rows = [{"family": "f", "model": "a", "speed_ratio": 1.4},
            {"family": "f", "model": "b", "speed_ratio": 0.98},
            {"family": "g", "model": "c", "speed_ratio": 1.5},
            {"family": "g", "model": "d", "speed_ratio": 0.9}]
    winners = bench.family_winners(rows)
    assert winners["f"] == {"faster": "channels_last", "speed_ratio_min": 0.98,
                            "speed_ratio_max": 1.4, "models": ["a", "b"]}
    assert winners["g"]["faster"] == "default"
    assert "| resnet20 | cifar_resnet | ind | 32 px |" in out.with_suffix(".md").read_text()

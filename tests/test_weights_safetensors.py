"""teacher_weights=x.safetensors: :func:`dcmkd.weights.load_file` reads safetensors files."""
from __future__ import annotations

import sys

import pytest
import torch

from dcmkd.models import create_model
from dcmkd.weights import load_file

safetensors_torch = pytest.importorskip("safetensors.torch")


def test_a_zoo_teacher_loads_from_a_safetensors_file(tmp_path):
    from dcmkd.methods import create_method

    torch.manual_seed(1)
    teacher = create_model("resnet20", num_classes=10)
    path = tmp_path / "teacher.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in teacher.state_dict().items()},
                                str(path))
    state = load_file(path)
    assert set(state) == set(teacher.state_dict())
    first = next(iter(teacher.state_dict()))
    assert torch.equal(state[first], teacher.state_dict()[first])
    method = create_method("kd", ["resnet20", "resnet20"], 10, teacher_weights=str(path))
    loaded = method.networks[0].backbone.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in teacher.state_dict().items())


def test_a_safetensors_file_is_told_by_its_content_without_the_suffix(tmp_path):
    path = tmp_path / "weights.bin"
    safetensors_torch.save_file({"w": torch.arange(6.0).reshape(2, 3)}, str(path))
    assert load_file(path)["w"].tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]


def test_without_the_package_one_line_names_it(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    safetensors_torch.save_file({"w": torch.zeros(2)}, str(path))
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)   # import fails
    with pytest.raises(ValueError, match=r"w\.safetensors is a safetensors file: reading it "
                                         r"needs the safetensors package \(pip install "
                                         r"safetensors\)$"):
        load_file(path)


def test_a_damaged_safetensors_file_is_named(tmp_path):
    path = tmp_path / "cut.safetensors"
    safetensors_torch.save_file({"w": torch.zeros(64)}, str(path))
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(ValueError, match=r"cut\.safetensors is not a readable safetensors file"):
        load_file(path)

"""The run config's schema is the dataclass fields' metadata (dcmkd.options): every key has a
type, a default, a doc and a run-defining flag; checks, resumable keys, CLI flags and
``dcmkd config`` all come from it."""
from __future__ import annotations

import json
from dataclasses import fields

import pytest

import dcmkd
from dcmkd.cli import build_parser, flag_keys, main
from dcmkd.engine.config import DEFAULTS, RunConfig, resolve
from dcmkd.methods.mutual import LossOptions
from dcmkd.options import ConfigError, Spec, resumable_keys, schema_keys
from dcmkd.registry import UnknownNameError
from dcmkd.run_folder import defining

KEYS = schema_keys()


def test_every_key_has_a_type_default_doc_and_role():
    assert len(KEYS) == 107   # issue 27: task.ijba*, embedding, detector_options, sskd.mimic/pyramid_reduce/psi
    for key in KEYS:
        assert isinstance(key.spec, Spec), key.name
        assert key.type_text, key.name
        assert len(key.spec.doc) > 10, f"{key.name}: no doc"
        assert isinstance(key.spec.run, bool), key.name
    flat = {k.name for k in KEYS}
    nested = {f"{s}.{k}" for s, v in DEFAULTS.items() if isinstance(v, dict) and v
              for k in v} | {k for k, v in DEFAULTS.items() if not (isinstance(v, dict) and v)}
    assert flat == nested


def test_the_resumable_keys_are_the_ones_declared_so():
    assert resumable_keys() == {
        "out", "quiet", "tensorboard", "trackers", "device", "channels_last", "log_every",
        "eval_every",
        "checkpoint_every_steps", "compile", "divergence_factor", "parallel", "dist_timeout",
        "data.workers", "data.test_batch_size", "data.root", "data.cache_dir", "data.download"}
    cfg = resolve("demo")
    assert "log_every" not in defining(cfg) and "loss.temperature" in defining(cfg)


def test_keys_added_later_leave_an_earlier_runs_identity_alone():
    """A run folder written before ``added=True`` keys existed (its config lacks them) is the
    same run as today's config at their defaults: same hash, no difference; a non-default
    value is another run."""
    import copy

    from dcmkd.options import added_defaults
    from dcmkd.run_folder import config_hash, differences

    added = added_defaults()
    assert {"task.ijba": None, "task.ijba_images": None, "task.ijba_splits": 10}.items() <= \
        added.items()
    cfg = resolve("demo", [{"data": {"name": "faces", "root": "/data/casia"}}])
    before = copy.deepcopy(cfg)
    for key in added:
        section, name = key.rsplit(".", 1)
        before.get(section, {}).pop(name, None)
    assert config_hash(before) == config_hash(cfg) and differences(before, cfg) == []
    other = copy.deepcopy(cfg)
    other["task"]["ijba"] = "/data/IJB-A"
    assert config_hash(other) != config_hash(cfg)
    assert differences(before, other) == ["task.ijba: '<unset>' → True"]
    # a location key defines the run by being set, not by its spelling: IJB-A moved elsewhere
    # is the same run (the data's identity is its data.json)
    moved = copy.deepcopy(other)
    moved["task"]["ijba"] = "/mnt/elsewhere/IJB-A"
    assert config_hash(moved) == config_hash(other) and differences(other, moved) == []


def test_the_cli_flags_come_from_the_metadata_and_exist():
    flags = flag_keys()
    assert flags == {"device": "device", "precision": "precision", "seed": "seed",
                     "method": "method", "nets": "nets", "data.name": "dataset",
                     "data.root": "data_dir", "epochs": "epochs", "out": "out"}
    train = build_parser().parse_args(["train", "--data-dir", "d", "-d", "cifar10"])
    assert (train.data_dir, train.dataset) == ("d", "cifar10")


@pytest.mark.parametrize("key", [k for k in KEYS if k.spec.low is not None],
                         ids=lambda k: k.name)
def test_every_lower_bound_is_enforced_by_resolve(key):
    below = key.spec.low if key.spec.above else key.spec.low - 1
    if isinstance(key.default, float) or float in key.spec.types:
        below = key.spec.low if key.spec.above else key.spec.low - 0.5
    override = f"{key.name}={below}"
    with pytest.raises(ConfigError, match=key.name.replace(".", r"\.")):
        resolve({"data": {"name": "faces"}} if key.name.startswith("task.") else "demo",
                [override])


@pytest.mark.parametrize("key", [k for k in KEYS if k.spec.choices], ids=lambda k: k.name)
def test_every_choice_key_refuses_an_unknown_name(key):
    base = {"data": {"name": "coco"}} if key.name.startswith("task.") else "demo"
    error = ConfigError if key.spec.low is not None else UnknownNameError   # number or word
    with pytest.raises(error, match=key.name.replace(".", r"\.")):
        resolve(base, [f"{key.name}=nonsense_value"])


def test_a_dataclass_built_in_python_is_held_to_the_same_rules():
    with pytest.raises(ConfigError, match=r"loss\.temperature: expected a value > 0, got 0"):
        LossOptions(temperature=0)
    with pytest.raises(ConfigError, match=r"log_every: expected a value ≥ 1"):
        dcmkd.TrainSettings(log_every=0)


def test_wrong_types_name_the_key():
    with pytest.raises(ConfigError, match=r"optim\.nesterov: expected true or false, got 'yes'"):
        resolve("demo", ["optim.nesterov='yes'"])
    with pytest.raises(ConfigError, match=r"sskd\.milestones: expected numbers ≥ 0 in increasing"):
        resolve("demo", ["sskd.milestones=[0.6,0.3]"])


def test_dcmkd_config_prints_every_key_from_the_metadata(capsys):
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    printed = [line.split(" = ")[0] for line in out.splitlines() if not line.startswith(" ")]
    assert printed == [k.name for k in KEYS]
    for k in KEYS:
        assert f"    {k.spec.doc}" in out
    assert main(["config", "loss.temperature", "--json"]) == 0
    row, = json.loads(capsys.readouterr().out)
    assert row == {"key": "loss.temperature", "type": "a number", "default": 1.0,
                   "range": "> 0", "defines_run": True, "flag": None, "applies": ["logit"],
                   "doc": "temperature T of the softened outputs (DCM Eq. 3)"}
    assert main(["config", "los"]) == 2
    assert "did you mean loss" in capsys.readouterr().err


def test_the_config_default_of_a_section_can_differ_from_the_python_default():
    # loss.rampup: the config ramps (auto), the Python API keeps the paper's constant weights
    assert DEFAULTS["loss"]["rampup"] == "auto" and LossOptions().rampup == 0.0
    assert [f.name for f in fields(RunConfig)][:3] == ["device", "precision", "channels_last"]

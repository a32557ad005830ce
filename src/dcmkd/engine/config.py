"""Run configuration: a nested dict with a fixed schema, defaults, recipes and dotted overrides.

A wrong key anywhere (file or override) raises :class:`~dcmkd.registry.UnknownNameError` naming
the key and the closest valid ones. :func:`dcmkd.engine.build.build` turns a resolved config
into the method, the data and the settings.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import dcmkd.yamlio as yamlio
from dcmkd.data.build import DataConfig
from dcmkd.engine.settings import LoopOptions
from dcmkd.heads import AUX_KINDS
from dcmkd.methods import METHODS, LossOptions
from dcmkd.methods.builders import FeatureOptions, SSKDOptions
from dcmkd.methods.optimization import OptimConfig, ScheduleOptions
from dcmkd.options import ConfigError, Key, check_value, defaults, is_section, option, \
    register_schema, section, spec_of
from dcmkd.registry import UnknownNameError
from dcmkd.tasks.build import TASK_DATASETS, TaskConfig, resolve_task_section, task_name

INITS = ("zoo", "official")

def _nets_rule(value: Any) -> str | None:
    if not value or not all(isinstance(n, str) and n for n in value):
        return "expected one or more model names (e.g. resnet20,resnet20)"
    return None


def _model_options_rule(value: Any) -> str | None:
    if isinstance(value, list) and not all(isinstance(o, dict) for o in value):
        return "expected a mapping, or a list of one mapping per network"
    return None


@register_schema
@dataclass(frozen=True)
class RunConfig(LoopOptions):
    """The run config: every key, its type, range, default and doc (``dcmkd describe`` prints
    them). Each section is the dataclass of the code that uses it: the method's loss options
    (:class:`LossOptions`), the data (:class:`DataConfig`), the optimiser and schedule
    (:class:`OptimConfig`, :class:`ScheduleOptions`), SSKD's and FitNets/AT/NST's options, the
    face and detection tasks' (:class:`TaskConfig`); the loop's keys (:class:`LoopOptions`) are
    the top-level ones it inherits."""

    method: str = option("dcm", "the training method (dcmkd.methods.METHODS)", flag="method",
                         choices=tuple(METHODS.names()))
    nets: list = option(doc="the networks: zoo names, tv:/timm: names", factory=lambda: [
        "resnet20", "resnet20"], types=(list,), rule=_nets_rule, flag="nets")
    num_classes: int | None = option(None, "classes of the heads (null: the dataset's)",
                                     types=(int, None), low=2)
    classifiers: str | list | None = option(None, "auxiliary classifiers, e.g. C2,C3 (null: "
                                            "the paper's for the backbone)",
                                            types=(str, list, None))
    aux_kind: str = option("default", "auxiliary classifier design: default, apfc or narrow "
                           "(DCM Table 4)", choices=AUX_KINDS)
    model_options: dict | list = option(doc="backbone options, e.g. {dropout: 0.3}, or one "
                                        "mapping per network", factory=dict,
                                        types=(dict, list), rule=_model_options_rule)
    init: str = option("zoo", "initialisation: zoo (He fan-out, unit BN) or official (the DCM "
                       "code's)", choices=INITS)
    protocol: str = option("paper", "paper, or official: the official DCM code's details "
                           "(PROTOCOLS), each also a key of its own", choices=("paper",
                                                                               "official"))
    teacher_weights: str | None = option(None, "kd, sskd, fitnets…: the first network's "
                                         "weights (a file or a run folder)", types=(str, None))
    teacher_net: int | None = option(None, "which network of that run folder (null: 0)",
                                     types=(int, None), low=0)
    loss: LossOptions = section(LossOptions, "logit-distillation options", overrides={
        # beyond the paper: the distillation weights ramped up over 25% of the run
        # (AUTO_RAMPUP) so that a short first run does not collapse; the paper's constant
        # weights are loss.rampup=0, which every reproduced paper table pins
        # (recipes.runner.PAPER_LOSS)
        "rampup": "auto"})
    data: DataConfig = section(DataConfig, "what to load")
    optim: OptimConfig = section(OptimConfig, "the optimiser")
    epochs: int = option(200, "length of the run in epochs", low=1, flag="epochs")
    schedule: ScheduleOptions = section(ScheduleOptions, "the learning-rate schedule")
    sskd: SSKDOptions = section(SSKDOptions, "SSKD's stages and task-head phase",
                                applies=("sskd",))
    task: TaskConfig = section(TaskConfig, "face and detection task options",
                               applies=tuple(TASK_DATASETS))
    feature: FeatureOptions = section(FeatureOptions, "FitNets / AT / NST options",
                                      applies=("fitnets", "at", "nst"))
    out: str | None = option(None, "run folder (null: runs/<method>-<nets>-<data>-s<seed>-"
                             "<hash>)", types=(str, None), run=False, flag="out")


#: every key a run config may hold, with its default
DEFAULTS: dict[str, Any] = defaults(RunConfig)
#: keys a resolved config leaves out at their default (:func:`_val_split`, :func:`_task_section`)
OPTIONAL_KEYS = ("data.val_split", "task")


def validate(cfg: dict[str, Any]) -> dict[str, Any]:
    """Check every key's type, range and rule against the schema (:class:`RunConfig`'s field
    metadata); returns ``cfg``."""
    def check(tree: Any, values: dict, prefix: str) -> None:
        for f in fields(tree):
            full = f"{prefix}{f.name}"
            if full in OPTIONAL_KEYS and f.name not in values:
                continue
            value = values.get(f.name)
            if is_section(f):
                sub = getattr(tree, f.name)
                if not isinstance(value, dict):
                    raise ConfigError(f"{full}: expected a mapping of keys "
                                      f"({', '.join(x.name for x in fields(sub))}), "
                                      f"got {value!r}")
                check(sub, value, f"{full}.")
            else:
                check_value(Key(full, getattr(tree, f.name), spec_of(f)), value)
    check(RunConfig(), cfg, "")
    return cfg


#: the papers' optimisers and schedules (DCM supplementary §1, SPEC.md §3)
RECIPES: dict[str, dict[str, Any]] = {
    "cifar_resnet": {  # ResNet-110/164, MobileNet (and the other CIFAR ResNets)
        "data": {"batch_size": 64}, "epochs": 200,
        "optim": {"lr": 0.1, "momentum": 0.9, "nesterov": False, "weight_decay": 1e-4},
        "schedule": {"name": "step", "step_size": 60, "gamma": 0.1}},
    "cifar_densenet": {  # DenseNet-40-12: Nesterov, ÷10 at 50% and 75% of 300 epochs
        "data": {"batch_size": 64}, "epochs": 300,
        "optim": {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4},
        "schedule": {"name": "multistep", "milestones": [0.5, 0.75], "gamma": 0.1}},
    "cifar_wrn": {  # WRN-28-10/28-4, and any pair of two different backbones
        "data": {"batch_size": 128}, "epochs": 200,
        "optim": {"lr": 0.1, "momentum": 0.9, "nesterov": False, "weight_decay": 5e-4},
        "schedule": {"name": "multistep", "milestones": [60, 120, 160], "gamma": 0.2}},
    "imagenet_resnet": {
        "data": {"batch_size": 256}, "epochs": 100,
        "optim": {"lr": 0.1, "momentum": 0.9, "nesterov": False, "weight_decay": 1e-4},
        "schedule": {"name": "step", "step_size": 30, "gamma": 0.1}},
    "imagenet_mobilenetv2": {
        "data": {"batch_size": 256}, "epochs": 150,
        "optim": {"lr": 0.05, "momentum": 0.9, "nesterov": False, "weight_decay": 4e-5},
        "schedule": {"name": "cosine"}},
    "demo": {  # the README's quick start: the bundled digits, a few minutes on 2 CPU cores.
        # Beyond the paper, the library's recommended setting for short schedules: a 2-epoch
        # rate warm-up, and the distillation weights ramped up over the first 25% of training
        # (loss.rampup = 3 of 12 epochs, sigmoid); on so short a schedule DCM's 18 KL terms
        # otherwise pull every classifier towards the uniform consensus in epoch 1.
        "data": {"name": "digits", "batch_size": 64, "image_size": 16}, "epochs": 12,
        "loss": {"rampup": 3},
        "optim": {"lr": 0.05, "momentum": 0.9, "nesterov": False, "weight_decay": 5e-4},
        "schedule": {"name": "cosine", "warmup_epochs": 2}},
}


#: ``protocol=official``: the official DCM code's details (sundw2014/DCM, wrn/main.py), where
#: they differ from the paper's text; every one is a key of its own that a config may override
PROTOCOLS: dict[str, dict[str, Any]] = {
    "paper": {},
    "official": {
        "data": {"pad_mode": "reflect",      # T.Pad(4, padding_mode='reflect')
                 "normalize": "official"},   # CIFAR-10's statistics for CIFAR-100 too
        "init": "official",                  # He fan-in convs and linear, BN weight ~ U(0, 1)
        "schedule": {"one_based": True,      # `epoch in epoch_step` with 1-based epochs
                     "reset_momentum": True},  # a fresh optimiser at every drop
    },
}


def recipe_for(nets: list[str]) -> str:
    """The paper's recipe for a set of backbones: identical backbones use their own; two
    different backbones use the WRN-28-10 recipe for both (DCM supplementary §1)."""
    if len(set(nets)) > 1:
        return "imagenet_resnet" if all(_family(n) == "imagenet_resnet" for n in nets) \
            else "cifar_wrn"
    return _family(nets[0])


def _family(net: str) -> str:
    if net.startswith("wrn"):
        return "cifar_wrn"
    if net.startswith("densenet"):
        return "cifar_densenet"
    if net == "mobilenetv2":
        return "imagenet_mobilenetv2"
    if net in ("resnet18", "resnet34", "resnet50"):
        return "imagenet_resnet"
    return "cifar_resnet"


def merge(base: dict, update: dict, path: str = "") -> dict:
    """``base`` updated with ``update``; every key of ``update`` must exist in ``base``
    (free-form dicts such as ``model_options`` excepted)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        full = f"{path}{key}"
        if key not in out:
            raise UnknownNameError("config key", full, [f"{path}{k}" for k in out])
        if isinstance(out[key], dict) and out[key] and isinstance(value, dict):
            out[key] = merge(out[key], value, f"{full}.")
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> dict:
    """``"optim.lr=0.05"`` → ``{"optim": {"lr": 0.05}}`` (the value is parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, value = text.split("=", 1)
    parsed: Any = yamlio.loads(value, f"override '{text}'") if value != "" else None
    for part in reversed(key.strip().split(".")):
        parsed = {part: parsed}
    return parsed


def load_yaml(path: str | Path) -> dict:
    """A config file's mapping; an empty file is an error (it would train the default run), and
    a missing one that looks like a recipe name suggests the closest recipes."""
    path = Path(path)
    if not path.is_file():
        if path.suffix not in (".yaml", ".yml") and len(path.parts) == 1:
            raise UnknownNameError("recipe (or config file)", str(path), RECIPES)
        raise FileNotFoundError(f"no config file at {path}")
    data = yamlio.load(path)
    if data is None:
        raise ConfigError(f"{path} is empty: a config file holds a mapping of keys (e.g. "
                          "method: dcm)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file holds a mapping of keys, not "
                          f"{type(data).__name__}")
    return data


def resolve(base: str | dict | None = None, overrides: list[str] | list[dict] = ()) -> dict:
    """A complete config from a recipe name, a YAML path or a dict, then overrides.

    Without an explicit recipe, the paper's recipe for the chosen backbones is applied first
    (``recipe`` key in the file or dict, or ``recipe_for(nets)``)."""
    if isinstance(base, str) and base in RECIPES:
        user: dict = {"recipe": base}
    elif isinstance(base, (str, Path)):
        user = load_yaml(base)
    else:
        user = dict(base or {})
    over: dict = {}
    for o in overrides:
        over = _deep_update(over, parse_override(o) if isinstance(o, str) else o)
    recipe = over.pop("recipe", None) or user.pop("recipe", None)
    user = _deep_update(user, over)
    nets = user.get("nets", DEFAULTS["nets"])
    if isinstance(nets, str):
        user["nets"] = nets = [n.strip() for n in nets.split(",") if n.strip()]
    if not isinstance(nets, list) or not nets or not all(isinstance(n, str) for n in nets):
        raise ConfigError(f"nets: expected one or more model names (e.g. resnet20,resnet20), "
                          f"got {nets!r}")
    if recipe is None:
        recipe = recipe_for(list(nets))
    if recipe not in RECIPES:
        raise UnknownNameError("recipe", recipe, RECIPES)
    protocol = user.get("protocol", DEFAULTS["protocol"])
    if protocol not in PROTOCOLS:
        raise UnknownNameError("protocol", str(protocol), PROTOCOLS)
    cfg = merge(merge(merge(DEFAULTS, RECIPES[recipe]), PROTOCOLS[protocol]), user)
    cfg["recipe"] = recipe
    return _task_section(_val_split(validate(cfg)))


def _val_split(cfg: dict[str, Any]) -> dict[str, Any]:
    """``data.val_split`` stays in a config only when it holds out a validation split (> 0):
    a config without one, as every paper table's, is the config it was before the key existed
    (its identity and hash unchanged). The face and detection tasks have no validation split
    in this version."""
    if not cfg["data"]["val_split"]:
        del cfg["data"]["val_split"]
    elif task_name(cfg) != "classification":
        raise ConfigError(f"data.val_split is for classification data; data.name="
                          f"{cfg['data']['name']} (the {task_name(cfg)} task) has no validation "
                          "split in this version (leave data.val_split at 0)")
    return cfg


def _task_section(cfg: dict[str, Any]) -> dict[str, Any]:
    """The ``task`` section stays only in a config of the face or detection task (the task
    follows ``data.name``): a classification run's config has none, as before the section
    existed, so its identity is unchanged; a task option given to it is an error. A detection
    config gets its dataset's splits where they are left null (:func:`resolve_task_section`)."""
    if task_name(cfg) != "classification":
        cfg["task"] = resolve_task_section(cfg)
        return cfg
    changed = [k for k, v in cfg["task"].items() if v != DEFAULTS["task"][k]]
    if changed:
        raise ConfigError(f"task.{changed[0]} is an option of the face and detection tasks "
                          f"(data.name {' or '.join(TASK_DATASETS)}), not of "
                          f"data.name={cfg['data']['name']}")
    del cfg["task"]
    return cfg


def _deep_update(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = _deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) \
            else copy.deepcopy(v)
    return out


def dump(cfg: dict) -> str:
    return yamlio.dumps(cfg)

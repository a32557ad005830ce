"""Run configuration: a nested dict with a fixed schema, defaults, recipes and dotted overrides.

A wrong key anywhere (file or override) raises :class:`~dcmkd.registry.UnknownNameError` naming
the key and the closest valid ones. :func:`dcmkd.engine.build.build` turns a resolved config
into the method, the data and the settings.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import dcmkd.yamlio as yamlio
from dcmkd.data.build import DataConfig
from dcmkd.engine.settings import TrainSettings
from dcmkd.methods import FEATURE_OPTIONS, SSKD_OPTIONS, LossOptions, Schedule, SGDSettings
from dcmkd.registry import UnknownNameError
from dcmkd.tasks.build import TASK_DATASETS, TaskConfig, task_name

def _defaults() -> dict[str, Any]:
    """Every key a run config may hold, with its default, taken from the one owner of each
    group: the method options (:class:`LossOptions`, ``SSKD_OPTIONS``, ``FEATURE_OPTIONS``), the
    data options (:class:`DataConfig`), the optimiser and schedule (:class:`SGDSettings`,
    :class:`Schedule`) and the loop's settings (:class:`TrainSettings`)."""
    schedule, settings = asdict(Schedule()), TrainSettings()
    loop = {f.name: getattr(settings, f.name) for f in fields(TrainSettings)
            if f.name not in ("optim", "schedule", "clip_grad_norm")}
    return {
        "method": "dcm",
        "nets": ["resnet20", "resnet20"],
        "num_classes": None,            # default: the dataset's
        "classifiers": None,            # auxiliary classifiers, e.g. "C2,C3" (paper default)
        "aux_kind": "default",          # default | apfc | narrow
        "model_options": {},            # e.g. {dropout: 0.3}
        "init": "zoo",                  # zoo (He fan-out, unit BN) | official (the DCM code's)
        "protocol": "paper",            # paper | official: the official code's details
                                        # (PROTOCOLS), each also a key of its own
        "teacher_weights": None,        # kd, sskd, fitnets…: first network (file or run folder)
        "teacher_net": None,            # which network of that run folder (default 0)
        # beyond the paper: the distillation weights ramped up over 25% of the run (AUTO_RAMPUP),
        # so a short first run does not collapse; the paper's constant weights are
        # loss.rampup=0, which every reproduced paper table pins (recipes.runner.PAPER_LOSS)
        "loss": {**asdict(LossOptions()), "rampup": "auto"},
        "data": asdict(DataConfig()),
        "optim": {"name": "sgd", "lr": schedule.pop("lr"), **asdict(SGDSettings()),
                  "clip_grad_norm": settings.clip_grad_norm},
        "epochs": schedule.pop("epochs"),
        "schedule": {**schedule, "milestones": list(schedule["milestones"])},
        "sskd": dict(SSKD_OPTIONS),     # stage-wise feature methods (dcmkd.methods.builders)
        "task": asdict(TaskConfig()),   # face / detection options (dcmkd.tasks.build)
        "feature": dict(FEATURE_OPTIONS),
        **loop,
        "trackers": [],                 # tensorboard | wandb | mlflow (dcmkd.engine.trackers)
        "out": None,                    # run folder; default runs/<method>-<nets>-<data>-s<seed>-<hash>
    }


#: every key a run config may hold, with its default
DEFAULTS: dict[str, Any] = _defaults()

#: the accepted types of the keys whose default is None or that take several kinds of value;
#: every other key takes the type of its default (an int where a float is expected)
TYPES: dict[str, tuple] = {
    "num_classes": (int, None), "classifiers": (str, list, None),
    "teacher_weights": (str, None), "teacher_net": (int, None), "model_options": (dict, list),
    "nets": (list,), "out": (str, None), "loss.rampup": (float, str), "recipe": (str,),
    "data.root": (str, None), "data.train_subset": (int, None), "data.image_size": (int, None),
    "data.val_split": (float,),
    "data.test_batch_size": (int, None),
    "data.cache_dir": (str, None), "optim.clip_grad_norm": (float, None),
    "schedule.milestones": (list,), "schedule.warmup_epochs": (float,),
    "sskd.stages": (int, list), "sskd.weight_decay": (float, None), "sskd.milestones": (list,),
    "sskd.stage_epochs": (int, float, None), "sskd.head_epochs": (int, float, None),
    "feature.stages": (int, list), "feature.hint": (str, int),
    "task.s": (float, None), "task.m": (float, None), "task.split": (str, None),
    "task.backbone_weights": (str, None), "trackers": (list, str),
}
#: (smallest, largest) accepted value of numeric keys; None: unbounded
RANGES: dict[str, tuple[float | None, float | None]] = {
    "epochs": (1, None), "num_classes": (2, None), "teacher_net": (0, None),
    "data.batch_size": (1, None), "data.test_batch_size": (1, None), "data.workers": (0, None),
    "data.train_subset": (1, None), "data.image_size": (8, None), "data.label_noise": (0, 0.95),
    "data.val_split": (0, 0.5),
    "optim.lr": (0, None), "optim.momentum": (0, 1), "optim.weight_decay": (0, None),
    "optim.clip_grad_norm": (0, None), "schedule.gamma": (0, None), "schedule.step_size": (1, None),
    "schedule.warmup_epochs": (0, None), "log_every": (1, None), "eval_every": (1, None),
    "checkpoint_every_steps": (0, None), "loss.temperature": (0, None), "loss.rampup": (0, None),
    "loss.label_smoothing": (0, 1), "loss.alpha": (0, None), "loss.beta": (0, None),
    "loss.gamma": (0, None), "task.min_size": (16, None), "task.max_size": (16, None),
}
#: list keys of epochs (or fractions of the epochs) at which the rate drops: numbers in
#: non-decreasing order (two drops at one epoch are two drops: a schedule shortened to a few
#: epochs can round two milestones to the same epoch)
MILESTONE_KEYS = ("schedule.milestones", "sskd.milestones")
#: keys a resolved config leaves out at their default (:func:`_val_split`, :func:`_task_section`)
OPTIONAL_KEYS = ("data.val_split", "task")
_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
               list: "a list", dict: "a mapping", None: "null"}


class ConfigError(ValueError):
    """A config value of the wrong type or out of range: the message names the key."""


def validate(cfg: dict[str, Any]) -> dict[str, Any]:
    """Check every key's type and range against the schema; returns ``cfg``."""
    def check(defaults: dict, values: dict, prefix: str) -> None:
        for key, default in defaults.items():
            full, value = f"{prefix}{key}", values.get(key)
            if full in OPTIONAL_KEYS and key not in values:
                continue
            accepted = TYPES.get(full, (type(default),))
            if isinstance(default, dict) and default and full != "model_options":
                if not isinstance(value, dict):
                    raise ConfigError(f"{full}: expected a mapping of keys "
                                      f"({', '.join(default)}), got {value!r}")
                check(default, value, f"{full}.")
                continue
            if not _is_a(value, accepted):
                names = " or ".join(_TYPE_NAMES.get(t, getattr(t, "__name__", str(t)))
                                    for t in accepted)
                raise ConfigError(f"{full}: expected {names}, got {value!r}")
            low, high = RANGES.get(full, (None, None))
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if (low is not None and value < low) or (high is not None and value > high) or \
                        (full in ("optim.lr", "loss.temperature") and value <= 0):
                    bound = (f"> {low}" if full in ("optim.lr", "loss.temperature") else
                             f"≥ {low}" if high is None else f"in [{low}, {high}]")
                    raise ConfigError(f"{full}: expected a value {bound}, got {value!r}")
    check(DEFAULTS, cfg, "")
    for key in MILESTONE_KEYS:
        section, name = key.split(".")
        values = cfg[section][name]
        if not all(_is_a(v, (float,)) and v >= 0 for v in values) or \
                any(b < a for a, b in zip(values, values[1:])):
            raise ConfigError(f"{key}: expected numbers ≥ 0 in increasing order (epochs, or "
                              f"fractions of the epochs), got {values!r}")
    if isinstance(cfg["loss"]["rampup"], str) and cfg["loss"]["rampup"] != "auto":
        raise ConfigError(f"loss.rampup: expected a number of epochs ≥ 0 or auto, got "
                          f"{cfg['loss']['rampup']!r}")
    options = cfg["model_options"]
    if isinstance(options, list) and not all(isinstance(o, dict) for o in options):
        raise ConfigError(f"model_options: expected a mapping, or a list of one mapping per "
                          f"network, got {options!r}")
    if cfg["init"] not in INITS:
        raise UnknownNameError("init", str(cfg["init"]), INITS)
    if not cfg["nets"] or not all(isinstance(n, str) and n for n in cfg["nets"]):
        raise ConfigError(f"nets: expected one or more model names (e.g. resnet20,resnet20), "
                          f"got {cfg['nets']!r}")
    return cfg


def _is_a(value: Any, accepted: tuple) -> bool:
    for t in accepted:
        if t is None and value is None:
            return True
        if t is bool and isinstance(value, bool):
            return True
        if t in (int, float) and isinstance(value, bool):
            continue   # true/false is not a number here
        if t is float and isinstance(value, (int, float)):
            return True
        if t not in (None, bool) and isinstance(value, t):
            return True
    return False

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
INITS = ("zoo", "official")


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
    existed, so its identity is unchanged; a task option given to it is an error."""
    if task_name(cfg) != "classification":
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

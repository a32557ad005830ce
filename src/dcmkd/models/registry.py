"""The model registry: ``create_model`` / ``list_models``.

Besides the zoo's names, ``create_model`` builds the networks of torchvision and timm named
``tv:<name>`` / ``timm:<name>`` (:mod:`dcmkd.models.ecosystem`, imported only then).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

from dcmkd.models.base import Backbone
from dcmkd.registry import Registry, UnknownNameError


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable[..., Backbone]
    dataset: str          # "cifar" (32×32) or "imagenet" (224×224)
    num_classes: int      # default head size
    summary: str


MODELS: Registry[ModelEntry] = Registry("model")


def register_model(name: str, dataset: str, num_classes: int, summary: str):
    """Decorator: register ``builder(num_classes=..., **options) -> Backbone`` under ``name``."""

    def deco(builder: Callable[..., Backbone]) -> Callable[..., Backbone]:
        MODELS.register(name)(ModelEntry(name, builder, dataset, num_classes, summary))
        return builder

    return deco


def model_options(name: str) -> dict[str, object]:
    """The options ``create_model(name, ...)`` accepts, with their defaults (a library
    network's ``tv:``/``timm:`` options are its constructor's: none listed here)."""
    if _is_library(name):
        return {}
    sig = inspect.signature(MODELS.get(name).builder)
    return {k: p.default for k, p in sig.parameters.items() if k != "num_classes"}


def create_model(name: str, num_classes: int | None = None, **options) -> Backbone:
    """Build a registered model. ``num_classes`` defaults to the model's dataset (100 / 1000).
    ``tv:<name>`` / ``timm:<name>``: a torchvision / timm network as a zoo backbone
    (:func:`dcmkd.models.ecosystem.create_library_model`; ``num_classes`` default 1000)."""
    if _is_library(name):
        from dcmkd.models.ecosystem import create_library_model
        return create_library_model(name, num_classes, **options)
    entry = MODELS.get(name)
    valid = model_options(name)
    for key, value in options.items():
        if not valid:
            raise ValueError(f"model '{name}' takes no options (got '{key}')")
        if key not in valid:
            raise UnknownNameError(f"option of model '{name}'", key, valid)
        expected = _kind(valid[key])
        if expected and not _is_kind(value, valid[key]):
            raise ValueError(f"option '{key}' of model '{name}': expected {expected}, "
                             f"got {value!r}")
    model = entry.builder(num_classes=num_classes or entry.num_classes, **options)
    model.model_name = name
    return model


def _is_library(name: str) -> bool:
    return isinstance(name, str) and name.partition(":")[0] in ("tv", "timm") and ":" in name


def _kind(default: object) -> str | None:
    """What a model option takes, from its default (None: not checked)."""
    if isinstance(default, bool):
        return "true or false"
    if isinstance(default, (int, float)):
        return "a number"
    if isinstance(default, str):
        return "a string"
    return None


def _is_kind(value: object, default: object) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))


def list_models(dataset: str | None = None) -> list[str]:
    return [n for n in MODELS.names() if dataset is None or MODELS.get(n).dataset == dataset]

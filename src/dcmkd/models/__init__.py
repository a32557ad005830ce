"""The model zoo. Every model is a :class:`~dcmkd.models.base.Backbone` declaring its stages.

Importing this package registers every family (one file per family). ``tv:<name>`` and
``timm:<name>`` build torchvision / timm networks as backbones (:mod:`dcmkd.models.ecosystem`;
the libraries are imported only then).
"""
from dcmkd.models import densenet, mobilenet, resnet_cifar, resnet_imagenet, vgg, wrn  # noqa: F401
from dcmkd.models.base import Backbone, ClassifierHead, StageInfo, StageSpec, count_parameters
from dcmkd.models.ecosystem import LibraryBackbone, load_library_weights, unwrap
from dcmkd.models.registry import MODELS, create_model, list_models, model_options

__all__ = ["Backbone", "ClassifierHead", "StageInfo", "StageSpec", "MODELS", "create_model",
           "list_models", "model_options", "count_parameters", "LibraryBackbone",
           "load_library_weights", "unwrap"]

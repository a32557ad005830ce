"""The engine: the training loop (:func:`fit`), its settings, the config and its builder, the
trainer of a config, device helpers and plots."""
from dcmkd.engine.build import Built, build, load_run
from dcmkd.engine.config import DEFAULTS, RECIPES, recipe_for, resolve
from dcmkd.engine.loop import TrainingDiverged, evaluate, fit
from dcmkd.engine.settings import TrainSettings
from dcmkd.engine.trainer import Trainer, train

__all__ = ["DEFAULTS", "RECIPES", "recipe_for", "resolve", "Trainer", "TrainingDiverged", "train",
           "fit", "evaluate", "TrainSettings", "Built", "build", "load_run"]

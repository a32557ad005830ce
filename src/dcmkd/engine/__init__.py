"""The engine: config and recipes, schedules, the trainer, metrics and plots."""
from dcmkd.engine.config import DEFAULTS, RECIPES, recipe_for, resolve
from dcmkd.engine.trainer import Trainer, TrainingDiverged, train

__all__ = ["DEFAULTS", "RECIPES", "recipe_for", "resolve", "Trainer", "TrainingDiverged", "train"]

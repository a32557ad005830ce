"""dcmkd: Dense Cross-layer Mutual-distillation, Stage-by-Stage KD and their baselines."""
from dcmkd.version import __version__

from dcmkd.heads import (MultiExitNetwork, WrappedNetwork, build_multi_exit,  # noqa: E402
                         wrap_model)
from dcmkd.losses import dcm_loss, dml_loss  # noqa: E402
from dcmkd.models import create_model, list_models  # noqa: E402
from dcmkd.methods import Schedule, SGDSettings, create_method  # noqa: E402
from dcmkd.run_folder import RunFolder  # noqa: E402
from dcmkd.engine import Trainer, TrainSettings, fit  # noqa: E402
from dcmkd.engine.build import load_run  # noqa: E402

__all__ = ["__version__", "create_model", "list_models", "build_multi_exit", "MultiExitNetwork",
           "wrap_model", "WrappedNetwork", "dcm_loss", "dml_loss", "create_method", "fit",
           "Trainer", "TrainSettings", "Schedule", "SGDSettings", "RunFolder", "load_run"]

"""The trainer: runs any method (it knows only the :class:`~dcmkd.methods.Method` interface).

A run is a folder::

    config.yaml        the resolved config
    environment.json   package, torch and git versions, device: what is needed to rerun it
    metrics.jsonl      one line per epoch: lr, every named loss term, train/test accuracy of
                       every classifier, seconds, images/s
    checkpoint.pt      the latest checkpoint (atomic write; weights_only loading)
    noisy_labels.pt    the corrupted indices and labels, when label noise is on
    net{n}_{model}.pt  the final networks, exported without auxiliary classifiers
    summary.json       written last: a finished run is not redone
    test_error.png     test error per epoch for each network (DCM Fig. 2 style)

Running the same config on the same folder resumes an interrupted run; data order and
augmentation are pure functions of (seed, epoch, batch), and the RNG states are checkpointed,
so the resumed result equals the uninterrupted one (in deterministic mode).

A method that owns its optimisation (:class:`~dcmkd.methods.control.PhasedMethod`, e.g. SSKD's
stage-by-stage phases) supplies the optimiser, the per-step learning rate (given the run's own
schedule as a function) and the run's length; it is told when an epoch ends, and its control
state travels in its ``state_dict``. Every other method gets one SGD optimiser over its trainable
parameters with the run's schedule, for ``epochs`` epochs.
"""
from __future__ import annotations

import json
import platform
import subprocess
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch

from dcmkd.engine.config import dump, resolve
from dcmkd.engine.metrics import topk_errors
from dcmkd.engine.schedule import lr_at
from dcmkd.methods import Method, PhasedMethod, create_method
from dcmkd.weights import atomic_save, load_file


#: config keys that may change between an interrupted run and its resumption
VOLATILE_KEYS = ("out", "quiet", "tensorboard", "device", "workers")


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite; the last good checkpoint is kept."""


def pick_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_run_dir(cfg: dict) -> Path:
    nets = "+".join(cfg["nets"])
    return Path("runs") / f"{cfg['method']}-{nets}-{cfg['data']['name']}-s{cfg['seed']}"


def environment(device: torch.device) -> dict:
    from dcmkd import __version__

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"dcmkd": __version__, "git_commit": commit, "torch": torch.__version__,
            "python": platform.python_version(), "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
            platform.processor() or platform.machine()}


class Trainer:
    """``Trainer(cfg).fit()`` trains, evaluates, checkpoints and exports one run."""

    def __init__(self, cfg: dict, run_dir: str | Path | None = None,
                 log: Callable[[str], None] = print):
        self.cfg = cfg
        self.run_dir = Path(run_dir or cfg["out"] or default_run_dir(cfg))
        self.log = (lambda s: None) if cfg["quiet"] else log
        self.device = pick_device(cfg["device"])

    # -- building -------------------------------------------------------------------------
    def build(self) -> None:
        from dcmkd.data import DataConfig, build_data

        cfg = self.cfg
        torch.manual_seed(cfg["seed"])
        if cfg["deterministic"]:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.data = build_data(DataConfig(**cfg["data"]), self.device, cfg["seed"])
        num_classes = cfg["num_classes"] or self.data.num_classes
        torch.manual_seed(cfg["seed"])
        self.method: Method = create_method(
            cfg["method"], cfg["nets"], num_classes, classifiers=cfg["classifiers"],
            kind=cfg["aux_kind"], model_options=cfg["model_options"] or None,
            teacher_weights=cfg["teacher_weights"], teacher_net=cfg["teacher_net"],
            run_config=cfg,
            **{k: v for k, v in cfg["loss"].items()
               if not (cfg["method"] == "kd" and k == "update")}).to(self.device)
        if cfg["channels_last"]:
            self.method.to(memory_format=torch.channels_last)
        o = cfg["optim"]
        if o["name"] != "sgd":
            from dcmkd.registry import UnknownNameError
            raise UnknownNameError("optimizer", o["name"], ["sgd"])
        self.phased = isinstance(self.method, PhasedMethod)
        self._sgd: torch.optim.Optimizer | None = None
        if not self.phased:
            params = [p for p in self.method.parameters() if p.requires_grad]
            self._sgd = torch.optim.SGD(params, lr=o["lr"], momentum=o["momentum"],
                                        nesterov=o["nesterov"], weight_decay=o["weight_decay"])
        precision = cfg["precision"]
        from dcmkd.registry import check_choice
        check_choice("precision", precision, ("fp32", "bf16", "fp16"))
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.scaler = torch.amp.GradScaler(self.device.type,
                                           enabled=precision == "fp16")

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The trainer's SGD, or the current optimiser of a method that owns its optimisation."""
        return self.method.optimizer if self.phased else self._sgd

    def lr(self, epoch: float) -> float:
        """The rate of the step at fractional ``epoch``."""
        if self.phased:
            return self.method.lr_at(epoch, self._run_schedule)
        return lr_at(self.cfg, epoch)

    def _run_schedule(self, epoch: float, epochs: int) -> float:
        """The run's schedule at ``epoch`` of an ``epochs``-long phase (for phased methods)."""
        return lr_at({**self.cfg, "epochs": epochs}, epoch)

    def finished(self, epoch: int) -> bool:
        return self.method.finished if self.phased else epoch >= self.cfg["epochs"]

    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # -- checkpoints ------------------------------------------------------------------------
    def state(self, epoch: int, batch: int, history: list[dict]) -> dict[str, Any]:
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {"epoch": epoch, "batch": batch, "method": self.method.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "rng": rng, "history": json.dumps(history)}

    def save_checkpoint(self, epoch: int, batch: int, history: list[dict]) -> None:
        atomic_save(self.state(epoch, batch, history), self.run_dir / "checkpoint.pt")

    def load_checkpoint(self) -> tuple[int, int, list[dict]]:
        ckpt = load_file(self.run_dir / "checkpoint.pt")
        self.method.load_state_dict(ckpt["method"])  # a phased method restores its phase first
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng"]["cpu"])
        if "cuda" in ckpt["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], self.device)
        return int(ckpt["epoch"]), int(ckpt["batch"]), json.loads(ckpt["history"])

    # -- the loop ---------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train (or resume) to the end; returns the summary. A finished run is not redone."""
        summary_path = self.run_dir / "summary.json"
        if summary_path.exists():
            self.log(f"{self.run_dir}: finished run, not redone")
            return json.loads(summary_path.read_text())
        self.run_dir.mkdir(parents=True, exist_ok=True)
        config_path = self.run_dir / "config.yaml"
        if config_path.exists() and (self.run_dir / "checkpoint.pt").exists():
            saved = resolve(config_path)
            if {k: v for k, v in saved.items() if k not in VOLATILE_KEYS} != \
                    {k: v for k, v in self.cfg.items() if k not in VOLATILE_KEYS}:
                raise ValueError(f"{self.run_dir} holds a run with a different config; "
                                 "choose another --out or delete the folder")
        self.build()
        config_path.write_text(dump(self.cfg))
        (self.run_dir / "environment.json").write_text(
            json.dumps(environment(self.device), indent=2))
        if self.data.noisy_indices is not None:
            atomic_save({"indices": self.data.noisy_indices.cpu()},
                        self.run_dir / "noisy_labels.pt")
        epoch, start_batch, history = 0, 0, []
        if (self.run_dir / "checkpoint.pt").exists():
            epoch, start_batch, history = self.load_checkpoint()
            self.log(f"resuming {self.run_dir} at epoch {epoch + 1}, batch {start_batch}")
        writer = self._tensorboard()
        while not self.finished(epoch):
            record = self.train_epoch(epoch, start_batch, history)
            start_batch = 0
            every = max(1, int(self.cfg["eval_every"]))
            last = not self.phased and epoch + 1 >= self.cfg["epochs"]
            if (not self.phased or self.method.evaluate_epoch(epoch)) and \
                    ((epoch + 1) % every == 0 or last):
                record.update(self.evaluate())
            if self.phased:
                record.update(self.method.end_epoch(epoch))
            history.append(record)
            with open(self.run_dir / "metrics.jsonl", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in history)
            self.save_checkpoint(epoch + 1, 0, history)
            self.log(self._epoch_line(record))
            if writer is not None:
                for k, v in record.items():
                    if isinstance(v, (int, float)):
                        writer.add_scalar(k, v, epoch + 1)
            epoch += 1
        return self.finish(history)

    def train_epoch(self, epoch: int, start_batch: int, history: list[dict]) -> dict:
        method, loader = self.method, self.data.train
        method.train()
        steps = len(loader)
        sums: dict[str, float] = {}
        correct: list[list[float]] | None = None
        seen, t0 = 0, time.perf_counter()
        bar = self._progress(steps, start_batch, epoch)
        every = self.cfg["checkpoint_every_steps"]

        clip = self.cfg["optim"]["clip_grad_norm"]
        progress = getattr(method, "set_progress", None)

        def step(loss: torch.Tensor) -> None:
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if clip:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(
                    [p for g in self.optimizer.param_groups for p in g["params"]], clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()

        for i, (x, y) in enumerate(loader.epoch(epoch, start_batch), start=start_batch):
            lr = self.lr(epoch + i / steps)
            for g in self.optimizer.param_groups:
                g["lr"] = lr
            if progress is not None:
                progress(epoch + i / steps)
            if self.cfg["channels_last"]:
                x = x.contiguous(memory_format=torch.channels_last)
            with self.autocast():
                out = method.training_step(x, y, self._checked(step, epoch, i))
            for k, v in out.losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) * len(y)
            with torch.no_grad():
                acc = [[(z.argmax(1) == y).sum().item() for z in net] for net in out.logits]
            correct = acc if correct is None else [[a + b for a, b in zip(r, s)]
                                                   for r, s in zip(correct, acc)]
            seen += len(y)
            if bar is not None:
                bar.update(1)
                first = next((net[0] for net in acc if net), None)
                bar.set_postfix(loss=f"{out.total().item():.3f}",
                                acc="-" if first is None else f"{first / len(y):.3f}",
                                img_s=f"{seen / (time.perf_counter() - t0):.0f}")
            if every and (i + 1) % every == 0 and i + 1 < steps:
                self.save_checkpoint(epoch, i + 1, history)
        if bar is not None:
            bar.close()
        seconds = time.perf_counter() - t0
        record: dict[str, Any] = {"epoch": epoch + 1, "lr": self.lr(epoch),
                                  "seconds": seconds, "images_per_s": seen / max(seconds, 1e-9)}
        record.update({f"train/{k}": v / max(seen, 1) for k, v in sums.items()})
        for n, net in enumerate(correct or []):  # a method may leave a network's logits out
            for name, count in zip(self.method.networks[n].classifier_names, net):
                record[f"train/net{n}/{name}/acc"] = count / max(seen, 1)
        return record

    def _checked(self, step: Callable[[torch.Tensor], None], epoch: int,
                 batch: int) -> Callable[..., None]:
        """``step`` that refuses a non-finite loss, naming the step and the bad terms."""
        def checked(loss: torch.Tensor, terms: dict[str, torch.Tensor] | None = None) -> None:
            if not torch.isfinite(loss):
                bad = [k for k, v in (terms or {}).items() if not torch.isfinite(v)]
                raise TrainingDiverged(
                    f"non-finite loss at epoch {epoch + 1}, batch {batch}"
                    f"{' in ' + ', '.join(bad) if bad else ''}; the last good checkpoint "
                    f"{self.run_dir / 'checkpoint.pt'} is kept")
            step(loss)
        return checked

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Top-1 and top-5 test error (%) of every classifier of every network."""
        self.method.eval()
        totals: dict[str, float] = {}
        count = 0
        for x, y in self.data.test.epoch(0):
            if self.cfg["channels_last"]:
                x = x.contiguous(memory_format=torch.channels_last)
            with self.autocast():
                logits = self.method.predict(x)
            for n, net in enumerate(logits):
                for c, name in enumerate(self.method.networks[n].classifier_names):
                    top1, top5 = topk_errors(net[c].float(), y)
                    totals[f"test/net{n}/{name}/top1"] = totals.get(
                        f"test/net{n}/{name}/top1", 0.0) + top1
                    totals[f"test/net{n}/{name}/top5"] = totals.get(
                        f"test/net{n}/{name}/top5", 0.0) + top5
            count += len(y)
        return {k: 100.0 * v / count for k, v in totals.items()}

    def finish(self, history: list[dict]) -> dict:
        names = [f"net{n}_{m}.pt" for n, m in enumerate(self.cfg["nets"])]
        for net, name in zip(self.method.export(), names):
            atomic_save(net.state_dict(), self.run_dir / name)
        if "test/net0/C1/top1" not in history[-1]:  # a phased method skipped the evaluation
            history[-1].update(self.evaluate())
            with open(self.run_dir / "metrics.jsonl", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in history)
        last = history[-1]
        evaluated = [r for r in history if "test/net0/C1/top1" in r]
        summary = {
            "method": self.cfg["method"], "nets": self.cfg["nets"],
            "epochs": len(history), "seed": self.cfg["seed"],
            "test_top1": [last[f"test/net{n}/C1/top1"] for n in range(len(self.cfg["nets"]))],
            "test_top5": [last[f"test/net{n}/C1/top5"] for n in range(len(self.cfg["nets"]))],
            "best_top1": [min(r[f"test/net{n}/C1/top1"] for r in evaluated)
                          for n in range(len(self.cfg["nets"]))],
            "exported": names,
            "seconds": sum(r["seconds"] for r in history),
        }
        try:
            from dcmkd.engine.plots import plot_test_error
            plot_test_error(evaluated, self.cfg["nets"], self.run_dir / "test_error.png")
        except ImportError:
            self.log("matplotlib is not installed: no test_error.png")
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    # -- logging ----------------------------------------------------------------------------
    def _epoch_line(self, r: dict) -> str:
        total = self.method.planned_epochs if self.phased else self.cfg["epochs"]
        head = f"epoch {r['epoch']}/{total or '?'} lr {r['lr']:.4g} "
        tail = f"({r['seconds']:.1f}s, {r['images_per_s']:.0f} img/s)"
        if "test/net0/C1/top1" not in r:  # not evaluated: the method's training losses
            losses = " ".join(f"{k[6:]} {v:.4g}" for k, v in r.items()
                              if k.startswith("train/") and not k.endswith("/acc"))
            return head + f"{losses} {tail}"
        errs = " ".join(f"net{n} {r[f'test/net{n}/C1/top1']:.2f}%"
                        for n in range(len(self.cfg["nets"])))
        return head + f"test top-1 error {errs} {tail}"

    def _progress(self, steps: int, start: int, epoch: int):
        if self.cfg["quiet"]:
            return None
        try:
            from tqdm import tqdm
        except ImportError:
            return None
        return tqdm(total=steps, initial=start, desc=f"epoch {epoch + 1}", leave=False,
                    dynamic_ncols=True)

    def _tensorboard(self):
        if not self.cfg["tensorboard"]:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError("tensorboard=true needs the tensorboard package "
                              "(pip install tensorboard)") from e
        return SummaryWriter(str(self.run_dir / "tensorboard"))


def train(cfg: dict, run_dir: str | Path | None = None, **kw: Any) -> dict:
    return Trainer(cfg, run_dir, **kw).fit()


__all__ = ["Trainer", "TrainingDiverged", "train", "pick_device", "default_run_dir"]

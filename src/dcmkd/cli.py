"""The dcmkd command line: models, describe, train, eval, export, reproduce, report, tsne, demo.

Every sub-command turns its arguments into library calls; errors a user can cause (an unknown
model, kind or classifier, a bad option) exit with status 2 and a one-line message that lists the
valid choices.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

from dcmkd.version import __version__
from dcmkd.engine import distributed
from dcmkd.engine.build import (Built, build, build_method, evaluate_built, load_run,
                                unfinished_state)
from dcmkd.engine.config import _deep_update, parse_override, resolve
from dcmkd.engine.loop import TrainingDiverged
from dcmkd.engine.trainer import Trainer
from dcmkd.heads.describe import describe_model, model_rows
from dcmkd.methods.teacher import load_pretrained
from dcmkd.recipes import list_experiments, load_experiment, reproduce
from dcmkd.recipes.runner import RunsFailed
from dcmkd.options import schema_keys
from dcmkd.registry import UnknownNameError
from dcmkd.report import report_runs
from dcmkd.report.tsne import tsne_plot
from dcmkd.run_folder import RunFolder, RunLocked, model_name, parse_network_file
from dcmkd.tasks import task_named
from dcmkd.warn import show_one_line
from dcmkd.weights import atomic_save, load_file


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def _giga(n: int) -> str:
    return f"{n / 1e9:.3f}G" if n >= 1e8 else f"{n / 1e6:.1f}M"


def cmd_models(args: argparse.Namespace) -> int:
    rows = model_rows(args.num_classes)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'model':18s} {'data':8s} {'input':>5s} {'classes':>7s} {'params':>8s} {'MACs':>8s}"
          "  description")
    for r in rows:
        print(f"{r['name']:18s} {r['dataset']:8s} {r['input_size']:5d} {r['num_classes']:7d} "
              f"{_millions(r['params']):>8s} {_giga(r['macs']):>8s}  {r['summary']}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    """Print the config keys (all, or those under ``args.prefix``) from their metadata."""
    chosen = [k for k in schema_keys()
              if not args.prefix or any(k.name == p or k.name.startswith(f"{p}.")
                                        for p in args.prefix)]
    if not chosen:
        names = sorted({k.name.split(".")[0] for k in schema_keys()} |
                       {k.name for k in schema_keys()})
        raise UnknownNameError("config key or section", args.prefix[0], names)
    rows = [{"key": k.name, "type": k.type_text, "default": k.default, "range": k.range_text,
             "defines_run": k.spec.run, "flag": f"--{k.spec.flag}" if k.spec.flag else None,
             "applies": list(k.spec.applies), "doc": k.spec.doc} for k in chosen]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        default = json.dumps(r["default"])
        extra = [r["range"]] if r["range"] else []
        extra += [] if r["defines_run"] else ["resumable"]
        extra += [r["flag"]] if r["flag"] else []
        applies = ["logit methods" if a == "logit" else a for a in r["applies"]]
        extra += [f"for {', '.join(applies)}"] if applies else []
        print(f"{r['key']} = {default}  ({r['type']}{'; ' if extra else ''}{'; '.join(extra)})")
        print(f"    {r['doc']}")
    return 0


def cmd_describe(args: argparse.Namespace) -> int:
    d = describe_model(args.model, kind=args.aux, classifiers=args.classifiers,
                       num_classes=args.num_classes)
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    print(f"{d['name']}: {d['num_classes']} classes, {d['input_size']}×{d['input_size']} input, "
          f"block {d['block_type']}")
    print(f"  backbone {_millions(d['params_backbone'])} params, {_giga(d['macs_backbone'])} MACs;"
          f" with auxiliary classifiers ({d['kind']}) {_millions(d['params_total'])} params, "
          f"{_giga(d['macs_total'])} MACs")
    print("  stages:")
    for s in d["stages"]:
        blocks = f", {s['blocks']} blocks" if "blocks" in s else " (stem)"
        print(f"    {s['name']:12s} {s['channels']:5d} channels, stride {s['stride']}{blocks}")
    print("  classifiers (output order):")
    for c in d["classifiers"]:
        if c["name"] == "C1":
            built = "the backbone's own head"
        elif not c["blocks"]:
            built = "apfc: avg-pool 4×4 + linear"
        else:
            parts = []
            for b in c["blocks"]:
                widths = sorted(set(b["widths"]))
                w = "/".join(map(str, b["widths"])) if len(widths) > 1 else str(widths[0])
                t = f" t={b['expansion']}" if "expansion" in b else ""
                parts.append(f"{b['count']}×{b['type']}({w}{t}, s{b['stride']})")
            built = " → ".join(parts)
            if c.get("head_width"):
                built += f" → 1×1 conv {c['head_width']}"
        print(f"    {c['name']}  taps {c['tap']:10s} {built}; {_millions(c['params'])} params, "
              f"{c['downsamplings']} down-samplings")
    return 0


def flag_keys() -> dict[str, str]:
    """Config key → the attribute of the CLI flag that sets it (the keys' ``flag`` metadata,
    :mod:`dcmkd.options`): the one translation of flags, for every command."""
    return {k.name: k.spec.flag.replace("-", "_") for k in schema_keys() if k.spec.flag}


def key_doc(name: str) -> str:
    """The docstring of config key ``name`` (a flag's help is its key's doc: one owner)."""
    return next(k.spec.doc for k in schema_keys() if k.name == name)


def flag_overrides(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The config overrides of the flags a command was given (``--data-dir d`` →
    ``{"data": {"root": "d"}}``)."""
    out: list[dict[str, Any]] = []
    for key, attr in flag_keys().items():
        value = getattr(args, attr, None)
        if value is not None:
            for part in reversed(key.split(".")):
                value = {part: value}
            out.append(value)
    if getattr(args, "quiet", False):
        out.append({"quiet": True})
    return out


def _train_config(args: argparse.Namespace) -> dict:
    config, extra = args.config, list(args.overrides)
    if config is not None and "=" in config:  # `dcmkd train optim.lr=0.05` has no config
        config, extra = None, [config, *extra]
    return resolve(config, [*flag_overrides(args), *extra])


#: datasets that come with the library (no files to point at)
BUNDLED_DATASETS = ("digits", "synthetic")


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _train_config(args)
    if args.data_dir and cfg["data"]["name"] in BUNDLED_DATASETS:
        raise ValueError(f"--data-dir {args.data_dir}: the dataset '{cfg['data']['name']}' is "
                         "bundled and reads no folder; name the dataset of that folder with "
                         "-d (cifar10, cifar100, folder, imagenet)")
    trainer = Trainer(cfg)
    summary = trainer.fit()
    if int(os.environ.get("RANK", "0")) == 0:   # under torchrun, rank 0 speaks
        text = task_named(summary.get("task")).result_text(summary)
        print(f"{trainer.run_dir}: {summary['method']} {text}")
    return 0


def _model_of_file(name: str) -> str | None:
    """The model an exported file's name says (``net{n}_{model}.pt``): a library model's
    file-safe spelling (``tv-resnet18``, :func:`dcmkd.run_folder.file_safe`) read back as its
    name (``tv:resnet18``); None for another name."""
    from dcmkd.models.ecosystem import is_library_name

    parsed = parse_network_file(name)
    if parsed is None:
        return None
    head, _, rest = parsed[1].partition("-")
    return f"{head}:{rest}" if rest and is_library_name(f"{head}:{rest}") else parsed[1]


def _weights_file(path: Path, args: argparse.Namespace) -> Built:
    """One network loaded from an exported weights file, for evaluation. The model comes from
    ``--model`` or the file's name (``net{n}_{model}.pt``); the data from the run folder holding
    the file (its config), then the flags."""
    model = args.model or _model_of_file(path.name)
    if model is None:
        raise ValueError(f"cannot tell the model of {path.name}: pass --model NAME")
    saved = RunFolder(path.parent).read_config() or {}
    base = {"data": saved["data"], "num_classes": saved.get("num_classes")} \
        if "data" in saved else {}
    if base and "task" in saved:   # a face or detection run: its head, embedding, test set …
        base["task"] = saved["task"]
    if not base and not args.dataset and not any(o.startswith("data.name=")
                                                  for o in args.overrides):
        raise ValueError(f"{path} is not in a run folder that says its data: pass -d/--dataset "
                         "(and --data-dir) to name the data to evaluate it on")
    cfg = resolve(base, [{"method": "ind", "nets": [model], "quiet": False},
                         *flag_overrides(args), *args.overrides])
    _check_data_dir(args, cfg["data"]["name"])
    built = build(cfg)
    load_pretrained(built.method.networks[0].backbone, path)
    return built


def _data_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """What ``eval``/``tsne`` of a run folder are told to use instead of the run's own: the
    data of ``-d``/``--data-dir`` (and ``key=value`` overrides), the device. Evaluating a run on
    other data is what a user asks for with them ("how does my model do on this data"); the
    run's ``data.json`` tells when it is not the data the run trained on (a warning)."""
    out: dict[str, Any] = {}
    for o in [*flag_overrides(args), *getattr(args, "overrides", [])]:
        out = _deep_update(out, parse_override(o) if isinstance(o, str) else o)
    data = out.get("data") or {}
    if getattr(args, "dataset", None) and "root" not in data and \
            args.dataset in BUNDLED_DATASETS:
        data["root"] = None      # -d digits on a run of a folder: no root to carry over
    if data:
        out["data"] = data
    return out


def _check_data_dir(args: argparse.Namespace, dataset: str) -> None:
    """Refuse a ``--data-dir`` that names no folder that can be read, or one given with a
    bundled dataset (which reads no folder): evaluating anything else than the data named
    would print a number for other data with exit status 0."""
    if not args.data_dir:
        return
    folder = Path(args.data_dir).expanduser()
    if not folder.exists():
        raise FileNotFoundError(f"--data-dir {args.data_dir} does not exist")
    if not folder.is_dir():
        raise NotADirectoryError(f"--data-dir {args.data_dir} is a file, not a folder")
    if not os.access(folder, os.R_OK | os.X_OK):
        raise ValueError(f"--data-dir {args.data_dir} cannot be read (permission denied)")
    if dataset in BUNDLED_DATASETS:
        raise ValueError(f"--data-dir {args.data_dir}: the dataset '{dataset}' is bundled and "
                         "reads no folder; name the dataset of that folder with -d (cifar10, "
                         "cifar100, folder, imagenet)")


def cmd_eval(args: argparse.Namespace) -> int:
    path = Path(args.run)
    if not path.exists():
        raise FileNotFoundError(f"no run folder or weights file at {path}")
    if args.pairs is not None:
        return _eval_pairs(path, args)
    if args.center_crop is not None:
        raise ValueError("--center-crop applies to the images of --pairs only")
    if path.is_dir():
        run = RunFolder(path).require_run("evaluate")
        told = _data_overrides(args)
        _check_data_dir(args, (told.get("data") or {}).get("name")
                        or (run.read_config() or {}).get("data", {}).get("name"))
        built = load_run(path, **{"quiet": False, **told})
    else:
        built = _weights_file(path, args)
    result = evaluate_built(built)
    parsed = parse_network_file(path.name) if path.is_file() else None
    if parsed:   # one network evaluated alone: name it as its run does
        result = {k.replace("/net0/", f"/net{parsed[0]}/", 1): v for k, v in result.items()}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for k, v in result.items():
            print(f"{k:28s} {v:6.2f}%")
    return 0


#: the output of ``dcmkd eval RUN --pairs FILE``: ``pairs_<stem of FILE>.json`` in the run folder
PAIRS_RESULT = "pairs_{}.json"


def _face_config(saved: dict[str, Any] | None, where: Path,
                 args: argparse.Namespace) -> dict[str, Any]:
    """The resolved config of a face run (``saved``; None: an exported file outside a run
    folder, read as a face network with the defaults) with eval's ``--device`` and key=value
    overrides; a run of another task is refused."""
    from dcmkd.tasks.build import task_name

    base = saved if saved and "nets" in saved else {"data": {"name": "faces"}}
    cfg = resolve(base, [{"quiet": True},
                         *([{"device": args.device}] if args.device else []), *args.overrides])
    if task_name(cfg) != "face":
        raise ValueError(f"{where} is a {task_name(cfg)} run (data.name={cfg['data']['name']}): "
                         "--pairs scores the embeddings of a face run (data.name=faces)")
    return cfg


def _pairs_networks(path: Path, args: argparse.Namespace
                    ) -> tuple[dict[str, Any], list[tuple[int, str, Path]], RunFolder | None]:
    """The config and the ``(network index, model, exported file)`` of each network that
    ``--pairs`` scores: every exported network of a finished face run folder, or one exported
    file (its model from ``--model`` or ``net<N>_<model>.pt``; its run folder's config when it
    lies in one). Returns the run folder (None for a file), where the result is written."""
    if path.is_dir():
        run = RunFolder(path).require_run("evaluate")
        cfg = _face_config(run.read_config(), path, args)
        if not run.finished:
            state = unfinished_state(run.load_checkpoint(), cfg) if run.has_checkpoint \
                else "not started"
            raise ValueError(f"{run} is not finished ({state}): --pairs scores the networks a "
                             f"run exports when it finishes; dcmkd export {run} --unfinished "
                             f"exports its latest weights, then give {run}/net<N>_<model>.pt")
        exported = (run.read_summary() or {}).get("exported") or []
        files = [run.network_path(n) for n in range(len(exported))]
        return cfg, [(n, _model_of_file(f.name) or cfg["nets"][n], f)
                     for n, f in enumerate(files)], run
    parsed = parse_network_file(path.name)
    model = args.model or _model_of_file(path.name)
    if model is None:
        raise ValueError(f"cannot tell the model of {path.name}: pass --model NAME")
    cfg = _face_config(RunFolder(path.parent).read_config(), path.parent, args)
    return cfg, [(parsed[0] if parsed else 0, model, path)], None


def _face_network(path: Path, model: str, cfg: dict[str, Any]) -> Any:
    """The face network of an exported file: ``model`` with the run's face head
    (:func:`dcmkd.tasks.build.face_method`, as the run built it), its identity count read from
    the file's classifier (``head.fc.*``: no training data is read) and its embedding layer's
    width from the file's ``head.embedding.*`` (none without), then the file's weights."""
    from dcmkd.tasks.build import TaskConfig, face_method

    state = load_file(path)
    sizes = {int(v.shape[0]) for k, v in (state.items() if isinstance(state, dict) else ())
             if k.startswith("head.fc.") and k.endswith("weight") and getattr(v, "ndim", 0) == 2}
    if len(sizes) != 1:
        raise ValueError(f"{path} holds no face network (no head.fc.*weight identity classifier "
                         "of a face head): --pairs scores the networks of a face run")
    task = TaskConfig(**cfg["task"])
    layer = state.get("head.embedding.1.weight")   # BN, Linear, BN: the Linear's [D, C]
    embedding = int(layer.shape[0]) if getattr(layer, "ndim", 0) == 2 else None
    network = face_method("ind", [model], sizes.pop(), head=task.head, s=task.s,
                          m=task.m, embedding=embedding).networks[0]
    try:
        load_pretrained(network.backbone, path)
    except ValueError as e:
        raise ValueError(f"{path} is not a {model} face network with a {task.head} head "
                         f"({one_line(e).removeprefix(f'{path} ')}); a face network trained "
                         "with another head needs task.head=softmax|cosface|arcface") from None
    return network


def _embed_all(network: Any, images: Any, batch: int, device: Any, what: str,
               quiet: bool) -> Any:
    """Every image's output feature (:func:`dcmkd.tasks.face.embed`) in float32 on the CPU:
    uint8 images normalised as in training (``FACE_MEAN``/``FACE_STD``), in eval mode, fp32."""
    import torch

    from dcmkd.data.augment import normalize
    from dcmkd.progress import track
    from dcmkd.tasks.build import FACE_MEAN, FACE_STD
    from dcmkd.tasks.face import embed

    network.to(device).eval()
    out = []
    with torch.no_grad():
        for x in track(images.split(batch), total=len(images), what=what, unit="img",
                       quiet=quiet, size=len):
            out.append(embed(network, normalize(x.to(device), FACE_MEAN, FACE_STD)).float().cpu())
    return torch.cat(out)


def _eval_pairs(path: Path, args: argparse.Namespace) -> int:
    """``dcmkd eval RUN_OR_FILE --pairs PAIRS --data-dir LFW``: LFW's 10-fold verification
    (:func:`dcmkd.metrics.pairs.evaluate_pairs`) of every network; a table (or ``--json``) on
    standard output and, for a run folder, ``pairs_<stem>.json`` written atomically into it.
    Every check (the run, the pairs file, every image) comes before anything is written."""
    from dcmkd.data.faces import pair_images, read_pairs_file
    from dcmkd.engine.device import pick_device
    from dcmkd.metrics.pairs import evaluate_pairs, pair_scores
    from dcmkd.weights import atomic_write_text

    if args.dataset:
        raise ValueError(f"-d/--dataset {args.dataset} does not apply with --pairs: the pairs "
                         "file names the images, --data-dir is their LFW folder")
    if not args.data_dir:
        raise ValueError("--pairs needs --data-dir: the LFW image folder "
                         "(<name>/<name>_<index:04d>.jpg)")
    cfg, files, run = _pairs_networks(path, args)
    networks = [(n, model, file, _face_network(file, model, cfg)) for n, model, file in files]
    pairs = read_pairs_file(args.pairs)
    _check_data_dir(args, "faces")
    size = cfg["data"]["image_size"] or 64   # the size the face task trains at (build_task)
    crop = 1.0 if args.center_crop is None else args.center_crop
    loaded = pair_images(args.data_dir, pairs, size, crop, quiet=args.quiet)
    same = [p.same for p in pairs]
    folds = [p.fold for p in pairs]
    device = pick_device(cfg["device"])
    results = []
    for n, model, file, network in networks:
        features = _embed_all(network, loaded.images, cfg["data"]["test_batch_size"] or 64,
                              device, f"embedding net{n}", args.quiet)
        scores = pair_scores(features.numpy(), loaded.index)
        results.append({"network": n, "model": model, "file": file.name,
                        **evaluate_pairs(scores, same, folds)})
    report = {"pairs_file": str(Path(args.pairs).resolve()),
              "data_dir": str(Path(args.data_dir).resolve()), "pairs": len(pairs),
              "images": len(loaded.paths), "image_size": size, "center_crop": crop,
              "protocol": "LFW 10-fold: each fold's accuracy at the cosine threshold best on "
                          "the other folds (one fold: on itself, optimistic); std over folds "
                          "ddof=1, se = std/sqrt(folds); TAR@FAR and AUC from the ROC of all "
                          "pairs; percent, thresholds in cosine similarity",
              "networks": results}
    text = json.dumps(report, indent=2)
    if run is not None:
        atomic_write_text(run.file(PAIRS_RESULT.format(Path(args.pairs).stem)), text)
    if args.json:
        print(text)
    else:
        _print_pairs_table(report)
    return 0


def _print_pairs_table(report: dict[str, Any]) -> None:
    """``dcmkd eval --pairs``'s table: one row per network."""
    first = report["networks"][0]
    folds = first["folds"]
    spread = "threshold chosen on the same pairs: optimistic" if first["optimistic"] else \
        f"mean ± std over {folds} folds, ddof=1"
    print(f"{Path(report['pairs_file']).name}: {report['pairs']} pairs, {report['images']} "
          f"images at {report['image_size']}×{report['image_size']} (centre crop "
          f"{report['center_crop']:g}); accuracy %: {spread}")
    tars = [k for k in first if k.startswith("tar@far=")]
    print(f"{'network':24s} {'accuracy':>16s} " + " ".join(f"{k.upper():>14s}" for k in tars)
          + f" {'AUC':>6s}")
    for r in report["networks"]:
        acc = f"{r['accuracy']:.2f}" + ("" if r["accuracy_std"] is None
                                         else f" ± {r['accuracy_std']:.2f}")
        cells = " ".join(f"{'n/a' if r[k] is None else f'{r[k]:.2f}':>14s}" for k in tars)
        print(f"{'net' + str(r['network']) + ' ' + r['model']:24s} {acc:>16s} {cells} "
              f"{r['auc']:6.2f}")


def _method_of(run: RunFolder) -> Any:
    """A run's method with its checkpoint's weights, built without its data (export reads
    none): the class count is the config's ``num_classes``, else the one ``data.json``
    records; a run without ``data.json`` (older than it) is loaded with its data."""
    cfg = resolve(run.read_config(), [{"quiet": True}])
    classes = cfg["num_classes"] or (run.read_data() or {}).get("classes")
    if not isinstance(classes, int):
        return load_run(run).method
    method = build_method(cfg, classes)
    if not run.has_checkpoint:
        raise ValueError(f"{run} holds no {RunFolder.CHECKPOINT}, so no weights to export")
    run.expect_weights(method.state_dict())   # another network's weights: named in one line
    method.load_state_dict(run.load_checkpoint()["method"])
    return method


def cmd_export(args: argparse.Namespace) -> int:
    if args.to and Path(args.to).exists() and not Path(args.to).is_dir():
        raise NotADirectoryError(f"--to {args.to} is a file: give a folder")
    run = RunFolder(args.run).require_run(rebuild=None)
    if run.built_from_objects:   # a dcmkd.fit run: its finish exported them already
        if not run.finished:
            raise ValueError(run.not_rebuildable("export"))
        summary = run.read_summary() or {}
        sources = [run.own_file(name) for name in summary.get("exported") or []]
        if args.to is None:
            for path in sources:
                print(path)
            return 0
        for path in sources:
            target = Path(args.to) / path.name
            atomic_save(load_file(path), target)
            print(target)
        return 0
    if not run.finished and not args.unfinished:
        state = unfinished_state(run.load_checkpoint(), run.read_config() or {}) \
            if run.has_checkpoint else "not started"
        raise ValueError(f"{run} is not finished ({state}): rerun its training to finish it, "
                         "or pass --unfinished to export its weights as they are")
    method = _method_of(run)
    models = [model_name(net) for net in method.networks]
    for path in run.export_networks(method.export(), models, to=args.to):
        print(path)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    configs = {method: resolve("demo", [f"method={method}", f"nets={args.nets}",
                                         f"epochs={args.epochs}", f"seed={args.seed}",
                                         f"out={args.out}/{method}"])
               for method in ("ind", "dml", "dcm")}
    if len(configs["dml"]["nets"]) < 2:   # found before any run trains
        raise ValueError(f"--nets {args.nets}: the demo's dml and dcm train networks together; "
                         "give two or more (e.g. resnet20,resnet20)")
    rows = []
    for method, cfg in configs.items():
        print(f"== {method}: {', '.join(cfg['nets'])} on the bundled digits, "
              f"{cfg['epochs']} epochs")
        rows.append((method, Trainer(cfg).fit()))
    print(f"\n{'method':8s} " + " ".join(f"{'net' + str(i) + ' error %':>14s}"
                                        for i in range(len(rows[0][1]['nets']))) + "   seconds")
    for method, summary in rows:
        print(f"{method:8s} " + " ".join(f"{e:14.2f}" for e in summary["test_top1"])
              + f"   {summary['seconds']:7.1f}")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    if args.list or args.experiment is None:
        for name in list_experiments():
            exp = load_experiment(name)
            print(f"{name:14s} {len(exp.rows):2d} rows, {len(exp.cells):2d} runs/seed  {exp.title}")
        return 0
    exp = load_experiment(args.experiment)
    overrides: list = [*flag_overrides(args), *args.overrides, {"quiet": not args.progress}]
    rows = [r for spec in args.rows or [] for r in spec.split(",") if r] or None
    columns = [c for spec in args.columns or [] for c in spec.split(",") if c] or None
    paths = reproduce(exp, rows=rows, columns=columns, seeds=args.seeds, scale=args.scale, out=args.root,
                      overrides=overrides, standins=args.standins, dry_run=args.dry_run,
                      table_only=args.table_only,
                      jobs=args.jobs, devices=[d for d in (args.devices or "").split(",") if d],
                      nproc_per_run=args.nproc_per_run)
    if paths:
        print(paths["table_md"].read_text())
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    paths = report_runs(args.runs, args.out)
    print(paths["table_md"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_tsne(args: argparse.Namespace) -> int:
    path = tsne_plot(args.run, stage=args.stage, net=args.net, classes=args.classes,
                     samples=args.samples, out=args.out, seed=args.seed, pool=args.pool,
                     device=args.device, data_root=args.data_dir)
    print(path)
    return 0


def positive_int(text: str) -> int:
    """An argparse type: an integer ≥ 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 1, got {value}")
    return value


class Parser(argparse.ArgumentParser):
    """argparse's parser, whose usage errors are one line (argparse prints the usage block
    first): the error and where the help is, exit status 2."""

    def error(self, message: str) -> Any:   # type: ignore[override]
        if "required: command" in message:
            message = ("a command is required: " + ", ".join(COMMANDS) + " (dcmkd --help says "
                       "what each does)")
        else:
            message += f" (see {self.prog} --help)"
        self.exit(2, f"dcmkd: error: {message}\n")


#: the sub-commands, in the order of ``dcmkd --help``
COMMANDS = ("models", "describe", "config", "train", "eval", "export", "reproduce", "report", "tsne",
            "demo")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="dcmkd", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"dcmkd {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("models", help="list every model with parameters and forward MACs")
    m.add_argument("--num-classes", type=positive_int, default=None,
                   help="head size (default: 100 for CIFAR models, 1000 for ImageNet models)")
    m.add_argument("--json", action="store_true", help="machine-readable output")
    m.set_defaults(func=cmd_models)

    d = sub.add_parser("describe", help="stages and auxiliary classifiers of a model")
    d.add_argument("model")
    d.add_argument("--aux", default="default", metavar="KIND",
                   help="auxiliary classifier kind: default, apfc or narrow")
    d.add_argument("--classifiers", default=None,
                   help="auxiliary classifiers, e.g. C2,C3 (default) or C1+C2C3C4")
    d.add_argument("--num-classes", type=positive_int, default=None)
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_describe)

    c = sub.add_parser("config", help="every config key: type, default, range, doc",
                       description="Every key of a run config, from the schema's own metadata "
                       "(dcmkd.options): type, default, accepted range or choices, whether it "
                       "defines the run (a change makes another run) or may change on resume, "
                       "the CLI flag that sets it, and what it does.")
    c.add_argument("prefix", nargs="*", help="only these keys or sections, e.g. loss sskd.lr")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c.set_defaults(func=cmd_config)

    t = sub.add_parser("train", help="train a method from a recipe name or a YAML file",
                       description="Train any method. CONFIG is a recipe name "
                       "(cifar_resnet, cifar_densenet, cifar_wrn, imagenet_resnet, "
                       "imagenet_mobilenetv2, demo) or a YAML file; without one the paper's "
                       "recipe for the chosen nets is used. Trailing key=value pairs override "
                       "any config key, e.g. optim.lr=0.05 data.label_noise=0.2.")
    t.add_argument("config", nargs="?", default=None,
                   help="recipe name or YAML file (optional)")
    t.add_argument("overrides", nargs="*", help="dotted overrides key=value")
    t.add_argument("-m", "--method", help="ind, ds, kd, dml, dml_ds, dcm, dcm1, dcm2, sskd, "
                   "fitnets, at, nst, fixed_backbone")
    t.add_argument("-n", "--nets", help="comma-separated model names, e.g. resnet110,resnet110")
    t.add_argument("-d", "--dataset", help=key_doc("data.name"))
    t.add_argument("--data-dir", help="dataset folder")
    t.add_argument("-e", "--epochs", type=int, help="epochs (default: the recipe's)")
    t.add_argument("-s", "--seed", type=int, help="seed of the init and the data order "
                   "(default 0)")
    t.add_argument("-o", "--out", help="run folder (default runs/<method>-<nets>-<data>-s<seed>-"
                   "<hash of the settings>)")
    t.add_argument("--device", help="auto, cpu, cuda, cuda:N, mps")
    t.add_argument("--precision", help="fp32, bf16, fp16")
    t.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate every classifier of a run folder, or an exported "
                       "network", description="Top-1/top-5 test error of every classifier of a "
                       "run folder's networks, or of one exported weights file (net0_resnet20.pt; "
                       "its run folder's data, else -d/--data-dir and key=value overrides). With "
                       "--pairs: LFW face verification of a face run's networks (or one exported "
                       "face network) on a pairs file.")
    e.add_argument("run", help="a run folder or an exported weights file")
    e.add_argument("overrides", nargs="*", help="dotted overrides for a weights file, "
                   "e.g. data.test_batch_size=256")
    e.add_argument("--model", help="the weights file's model (default: from net<N>_<model>.pt)")
    e.add_argument("-d", "--dataset", help="evaluate on this dataset (default: the run's)")
    e.add_argument("--data-dir", help="evaluate on the data in this folder (default: the "
                   "run's data.root); a warning says when it is not the data the run trained on")
    e.add_argument("--device", help="auto, cpu, cuda, cuda:N, mps")
    e.add_argument("-q", "--quiet", action="store_true",
                   help="no progress (else a bar on a terminal, a line every 30 s elsewhere)")
    e.add_argument("--json", action="store_true",
                   help="print the errors as one JSON object (classifier key → error %%); "
                   "with --pairs, the pairs result")
    e.add_argument("--pairs", metavar="PAIRS_FILE",
                   help="face verification on an LFW-style pairs file (pairs.txt: 10 folds) "
                   "instead: the images come from --data-dir (LFW layout <name>/<name>_"
                   "<index:04d>.jpg), resized to the run's data.image_size; each fold's "
                   "accuracy at the cosine threshold chosen on the other folds, mean ± std "
                   "(ddof=1), TAR at FAR 1%% and 0.1%% and ROC AUC over all pairs; a run folder "
                   "gets pairs_<file stem>.json")
    e.add_argument("--center-crop", type=float, metavar="FRACTION",
                   help="with --pairs: keep the central FRACTION of each image (per side) "
                   "before resizing (default 1: the whole 250×250 LFW image, face centred, no "
                   "alignment); give a network trained on tight crops crops like them")
    e.set_defaults(func=cmd_eval)

    x = sub.add_parser("export", help="write a run's networks without auxiliary classifiers",
                       description="Write each network of a finished run as net<N>_<model>.pt: "
                       "the plain backbone's state_dict, auxiliary classifiers dropped (what a "
                       "finished run already exported; --to copies them elsewhere).")
    x.add_argument("run", help="a finished run folder")
    x.add_argument("--to", help="folder (default: the run folder)")
    x.add_argument("--unfinished", action="store_true",
                   help="export an interrupted run's latest weights (refused without it)")
    x.set_defaults(func=cmd_export)

    r = sub.add_parser("reproduce", help="run a paper table (missing runs only) and write it",
                       description="Train the runs of a paper table that are missing (finished "
                       "runs are reused, interrupted ones resume), then write table.md, table.csv "
                       "and test-error curves: mean(std) over seeds beside the paper's numbers. "
                       "Without EXPERIMENT, list the experiments. Trailing key=value pairs "
                       "override every run's config.")
    r.add_argument("experiment", nargs="?", help="e.g. dcm-table1, or a YAML file of that schema")
    r.add_argument("overrides", nargs="*", help="dotted overrides key=value for every run")
    r.add_argument("--list", action="store_true", help="list the bundled experiments")
    r.add_argument("--rows", action="append", help="row names, comma-separated (default: all)")
    r.add_argument("--columns", action="append",
                   help="column names, comma-separated (default: all); the table shows the "
                        "other columns' finished runs")
    r.add_argument("--seeds", type=int, help="seeds 0..N-1 (default: the paper's run count; "
                   "1 for smoke)")
    r.add_argument("--scale", default="full", choices=("full", "quick", "smoke"),
                   help="full: the paper's protocol; quick: the reduced one; smoke: 2 steps")
    r.add_argument("--standins", action="store_true",
                   help="smoke only: swap backbones over ~5M parameters for small ones")
    r.add_argument("--out", dest="root", default="runs/reproduce",
                   help="root folder of the runs and tables")
    r.add_argument("--data-dir", help="dataset folder for every run")
    r.add_argument("--device", help="auto, cpu, cuda, cuda:N, mps")
    r.add_argument("--progress", action="store_true", help="progress bars and epoch lines")
    r.add_argument("-j", "--jobs", type=positive_int, default=None,
                   help="runs trained at once in worker processes (CPU cores are split "
                   "between them); default: one per --devices entry, else 1")
    r.add_argument("--devices", help="comma-separated devices for the workers, e.g. "
                   "cuda:0,cuda:1 (worker i takes device i mod N)")
    r.add_argument("--nproc-per-run", type=int, default=1,
                   help="train each run under torchrun with N processes on this node "
                   "(data-parallel; with --devices, N devices per run)")
    what = r.add_mutually_exclusive_group()
    what.add_argument("--dry-run", action="store_true", help="list the runs, train nothing")
    what.add_argument("--table-only", action="store_true",
                      help="train nothing; write the table of the runs finished so far")
    r.set_defaults(func=cmd_reproduce)

    rep = sub.add_parser("report", help="the results table and curves of any run folders",
                         description="table.md, table.csv and test-error curves of any run "
                         "folders: the seeds of one config form a cell (mean(std)), the method "
                         "is the column, and each row is labelled with its backbones and the "
                         "config values that tell it from the other rows.")
    rep.add_argument("runs", nargs="+", help="run folders (seeds of a config are grouped)")
    rep.add_argument("--out", default="runs/report", help="folder for table.md/csv and curves")
    rep.set_defaults(func=cmd_report)

    ts = sub.add_parser("tsne", help="t-SNE of a stage's features of a finished run (SSKD Fig. 4)",
                        description="A PNG of the t-SNE embedding of one stage's features of a "
                        "finished run's exported network, for the test images of a few random "
                        "classes (SSKD paper, Fig. 4).")
    ts.add_argument("run", help="a finished run folder")
    ts.add_argument("--stage", default=None, help="stage1..stageK of the SSKD partition (default "
                    "the last) or a unit name such as conv3_x")
    ts.add_argument("--net", type=int, default=None, help="exported network (default: the last)")
    ts.add_argument("--classes", type=int, default=None,
                    help="random test classes (default 10, or all of fewer)")
    ts.add_argument("--samples", type=positive_int, default=50,
                    help="test images per class (default 50)")
    ts.add_argument("--out", default=None, help="PNG file (default RUN/tsne_<stage>.png)")
    ts.add_argument("--seed", type=int, default=0, help="class choice and t-SNE seed")
    ts.add_argument("--pool", action="store_true", help="average over positions, not flatten")
    ts.add_argument("--device", default="cpu")
    ts.add_argument("--data-dir", help="the run's data at another place (default: its data.root)")
    ts.set_defaults(func=cmd_tsne)

    demo = sub.add_parser("demo", help="ind vs DML vs DCM on the bundled digits (CPU minutes)",
                          description="Train ind, dml and dcm with the demo recipe on the "
                          "bundled digits (no download) and print their test errors; finished "
                          "runs are reused.")
    demo.add_argument("--nets", default="resnet20,resnet20",
                      help="two or more comma-separated models (default resnet20,resnet20)")
    demo.add_argument("--epochs", type=int, default=12, help="epochs per run (default 12)")
    demo.add_argument("--seed", type=int, default=0, help="seed of every run (default 0)")
    demo.add_argument("--out", default="runs/demo", help="folder of the three runs")
    demo.set_defaults(func=cmd_demo)
    return p


def one_line(error: BaseException) -> str:
    """An error's message on one line (a DataLoader worker's error carries the worker's
    traceback in its message: its last line is the error itself)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if any(line.startswith("Original Traceback") for line in lines):
        lines = lines[-1:]
    return " ".join(lines) or type(error).__name__


class Terminated(KeyboardInterrupt):
    """SIGTERM (a batch scheduler's pre-emption or time limit, ``kill``, torchrun stopping its
    ranks): unwinds the command like Ctrl-C, so a run stops the same clean way."""


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """Raise :class:`Terminated` on SIGTERM while the command runs, where SIGTERM still has its
    default action (an ignored one or an embedding program's handler is left alone)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def interrupt(*_: Any) -> None:
        raise Terminated
    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``dcmkd`` command. Exit status: 0 done, 2 bad input (one line naming the key, file or
    value), 3 training stopped (a diverged run, failed reproduction runs, a folder in use),
    1 a system error (disk full, permissions), 130 interrupted (Ctrl-C), 143 terminated
    (SIGTERM)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # `dcmkd train -q optim.lr=0.1`: overrides may follow flags
        if args.command not in ("train", "reproduce", "eval") or \
                not all("=" in e and not e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    shown, warnings.showwarning = warnings.showwarning, show_one_line
    try:
        with _sigterm_interrupts():
            return args.func(args)
    except (TrainingDiverged, RunsFailed, RunLocked) as e:
        print(f"dcmkd: error: {one_line(e)}", file=sys.stderr)
        return 3
    except (UnknownNameError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
            IsADirectoryError, ImportError) as e:
        print(f"dcmkd: error: {one_line(e)}", file=sys.stderr)
        return 2
    except BrokenPipeError:   # `dcmkd models | head`: the reader left; say nothing, as cat does
        with contextlib.suppress(OSError, ValueError):   # no more writes to the closed pipe
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:
        where = f" writing {e.filename}" if e.filename else ""
        what = "no space left on device" if e.errno == errno.ENOSPC else \
            (e.strerror or one_line(e)).lower()
        print(f"dcmkd: error: {what}{where} (files written before are intact)", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        what, status = ("terminated (SIGTERM)", 128 + signal.SIGTERM) \
            if isinstance(e, Terminated) else ("interrupted", 128 + signal.SIGINT)
        print(f"\ndcmkd: {what}; every file of the run is intact: rerun the same command to "
              "resume from its last checkpoint", file=sys.stderr)
        return status
    finally:
        warnings.showwarning = shown
        distributed.shutdown()   # under torchrun: leave the process group before exiting


if __name__ == "__main__":
    sys.exit(main())

"""t-SNE of a stage's features for a few classes (sskd-paper.md Fig. 4): ``dcmkd tsne RUN_DIR``.

The paper visualises "the hidden features of the 3rd stage and 4th stage" of students trained by
SSKD and by multi-loss training, for "10 classes [chosen at random] out of the 100 classes in
CIFAR-100", with t-SNE (van der Maaten & Hinton 2008). Here: a finished run's exported network
(default: the last one, the student of a two-network run) is loaded, the test images of
``classes`` randomly chosen classes (``samples`` per class, the first ones in test-set order) go
through it in evaluation mode, the output of one stage is flattened to a vector per image, and
scikit-learn's ``TSNE`` (2-D, PCA initialisation, ``perplexity`` capped at (n − 1)/3) embeds
them. **Readings** (the paper gives no details): flattened maps rather than pooled ones
(``pool=True`` averages over positions instead); the stage is one of the SSKD partition
(:mod:`dcmkd.methods.stages`, ``stage1`` … ``stageK`` with K the run's ``sskd.stages``, else 4) or
a unit name of the backbone (``conv3_x``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dcmkd.data import DataConfig, build_data
from dcmkd.engine.build import warn_if_other_data
from dcmkd.methods.stages import partition_stages
from dcmkd.models import create_model
from dcmkd.run_folder import RunFolder
from dcmkd.weights import load_backbone_weights, load_file

#: classes drawn when none is asked for (the paper's 10; fewer if the data has fewer)
DEFAULT_CLASSES = 10

__all__ = ["stage_features", "tsne_plot"]


def _load_run(run_dir: Path, net: int | None):
    run = RunFolder(run_dir).require_run("draw the t-SNE of")
    summary = run.read_summary()
    if summary is None:
        raise ValueError(f"the run in {run_dir} is not finished (no {run.SUMMARY})")
    cfg = run.read_config() or {}
    exported = summary.get("exported") or []
    index = len(exported) - 1 if net is None else net
    path = run.network_path(index)
    state = load_file(path)
    heads = [v for k, v in state.items() if k.endswith("fc.weight")]
    options = cfg.get("model_options") or {}
    if isinstance(options, list):
        options = options[index]
    model = create_model(cfg["nets"][index], heads[-1].shape[0] if heads else None, **options)
    load_backbone_weights(model, path)
    return cfg, model.eval(), index


def _extractor(model, cfg: dict[str, Any], stage: str | None):
    """(name, function image batch → stage output) for a stage name (see the module note)."""
    stages = (cfg.get("sskd") or {}).get("stages", 4) if cfg.get("method") == "sskd" else 4
    part = partition_stages(model, stages)
    if stage is None:
        stage = f"stage{len(part)}"
    text = str(stage)
    index = text[5:] if text.startswith("stage") else text
    if index.isdigit():
        i = int(index) - 1
        if not 0 <= i < len(part):
            raise ValueError(f"stage {text}: the partition has stages 1..{len(part)} "
                             f"({', '.join(part.names)})")
        return f"stage{i + 1} ({part.names[i]})", lambda x: part.run(x, stop=i + 1)[-1]
    model.stage(text)   # a unit name; a clear error lists the valid ones
    return text, lambda x: model.forward_intermediates(x, [text])[1][text]


@torch.no_grad()
def stage_features(run_dir: str | Path, *, stage: str | None = None, net: int | None = None,
                   classes: int | None = None, samples: int = 50, seed: int = 0,
                   pool: bool = False, device: str = "cpu",
                   data_root: str | Path | None = None) -> dict[str, Any]:
    """Features of one stage for ``samples`` test images of each of ``classes`` random classes
    (default :data:`DEFAULT_CLASSES`, or every class of data with fewer).

    Returns ``{"features": (n, d) float tensor, "labels": (n,), "classes": class indices,
    "class_names": names, "stage": description, "model": name, "net": index}``.
    ``data_root``: the run's data at another place (a warning says when it is other data).
    """
    run_dir = Path(run_dir)
    cfg, model, index = _load_run(run_dir, net)
    model.to(device)
    name, extract = _extractor(model, cfg, stage)
    data_cfg = {k: v for k, v in cfg["data"].items() if k in DataConfig.__dataclass_fields__}
    if data_root is not None:
        data_cfg["root"] = str(data_root)
    data = build_data(DataConfig(**data_cfg), device, int(cfg.get("seed", 0)))
    warn_if_other_data(RunFolder(run_dir), data)
    num = data.num_classes
    g = torch.Generator().manual_seed(seed)
    if classes is None:
        classes = min(DEFAULT_CLASSES, num)
    elif not 1 <= classes <= num:
        raise ValueError(f"--classes {classes}: the run's data has {num} classes (expected 1 "
                         f"to {num})")
    chosen = sorted(torch.randperm(num, generator=g)[:classes].tolist())
    wanted = {c: samples for c in chosen}
    feats, labels = [], []
    for x, y in data.test.epoch(0):
        idx = []   # as many as still wanted per class, in test-set order
        for i, c in enumerate(y.tolist()):
            if wanted.get(c, 0) > 0:
                wanted[c] -= 1
                idx.append(i)
        if idx:
            f = extract(x[idx].to(device))
            f = f.mean((2, 3)) if pool else f.flatten(1)
            feats.append(f.float().cpu())
            labels.append(y[idx].cpu())
        if all(v == 0 for v in wanted.values()):
            break
    if not feats:
        raise ValueError(f"no test images of classes {chosen}")
    names = getattr(data, "classes", None) or [str(c) for c in range(num)]
    return {"features": torch.cat(feats), "labels": torch.cat(labels), "classes": chosen,
            "class_names": [names[c] if c < len(names) else str(c) for c in chosen],
            "stage": name, "model": cfg["nets"][index], "net": index}


def tsne_plot(run_dir: str | Path, *, stage: str | None = None, net: int | None = None,
              classes: int | None = None, samples: int = 50, out: str | Path | None = None,
              seed: int = 0, perplexity: float = 30.0, pool: bool = False,
              device: str = "cpu", data_root: str | Path | None = None) -> Path:
    """Write the t-SNE scatter of :func:`stage_features` as a PNG; returns its path (default
    ``RUN_DIR/tsne_<stage>.png``)."""
    try:
        from sklearn.manifold import TSNE
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("dcmkd tsne needs scikit-learn (pip install scikit-learn)") from e
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = stage_features(run_dir, stage=stage, net=net, classes=classes, samples=samples,
                       seed=seed, pool=pool, device=device, data_root=data_root)
    x, y = d["features"].numpy(), d["labels"].numpy()
    if len(x) < 3:
        raise ValueError(f"t-SNE needs at least 3 images, got {len(x)}")
    emb = TSNE(n_components=2, perplexity=min(perplexity, (len(x) - 1) / 3), init="pca",
               random_state=seed).fit_transform(x)
    fig, ax = plt.subplots(figsize=(6, 6))
    cmap = plt.get_cmap("tab10" if len(d["classes"]) <= 10 else "tab20")
    for j, (c, cname) in enumerate(zip(d["classes"], d["class_names"])):
        m = y == c
        ax.scatter(emb[m, 0], emb[m, 1], s=8, color=cmap(j % cmap.N), label=cname)
    ax.set_title(f"{Path(run_dir).name}: net{d['net']} {d['model']}, {d['stage']}")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=7, markerscale=2, loc="best")
    fig.tight_layout()
    short = d["stage"].split(" ")[0]
    path = Path(out) if out is not None else Path(run_dir) / f"tsne_{short}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

"""Why does DCM start badly on small budgets? Per-step diagnostics of the first epochs.

For each method (default ``ds``, ``dml``, ``dcm``) on the same data, weights init and batches, it
logs every step: each loss term, the gradient norm of each network's backbone and of each
auxiliary branch *from the cross-entropy terms* and *from the distillation terms* (two extra
backward passes, ``torch.autograd.grad``), the entropy of every classifier's prediction
(normalised by ln C), the agreement between classifiers (fraction of the batch where two
classifiers predict the same class), the norm of each network's pooled features, and the training
accuracy. Writes ``benchmarks/results/diagnose_dcm.json`` and ``diagnose_dcm.png``.

    python benchmarks/diagnose_dcm.py --data-dir data --images 4000 --epochs 3
    python benchmarks/diagnose_dcm.py --methods "" --variant "dcm ramp=loss.rampup=7.5" --epochs 1 \
        --baseline benchmarks/results/diagnose_dcm.json:dcm --out benchmarks/results/diagnose_dcm_ramp
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR  # noqa: E402

from dcmkd.data import DataConfig, build_data  # noqa: E402
from dcmkd.engine.build import build_method  # noqa: E402
from dcmkd.engine.config import resolve  # noqa: E402
from dcmkd.engine.settings import TrainSettings  # noqa: E402

KL_TERMS = ("dcm1", "dcm2", "dml", "kd")
CE_TERMS = ("ce", "ds")


def grad_norms(method, losses: dict[str, torch.Tensor], names: tuple[str, ...]) -> dict:
    """Norm of the gradient of the sum of ``names`` terms, per network part."""
    parts = {}
    for n, net in enumerate(method.networks):
        parts[f"net{n}/backbone"] = [p for p in net.backbone.parameters() if p.requires_grad]
        for b, branch in net.branches.items():
            parts[f"net{n}/{b}"] = [p for p in branch.parameters() if p.requires_grad]
    chosen = [v for k, v in losses.items() if k.split("/")[-1] in names]
    if not chosen:
        return {k: 0.0 for k in parts}
    flat = [p for ps in parts.values() for p in ps]
    grads = torch.autograd.grad(sum(chosen), flat, retain_graph=True, allow_unused=True)
    out, i = {}, 0
    for k, ps in parts.items():
        g = [x for x in grads[i:i + len(ps)] if x is not None]
        out[k] = math.sqrt(sum(float(x.pow(2).sum()) for x in g)) if g else 0.0
        i += len(ps)
    return out


def run(cfg: dict, data, epochs: int, log_every: int) -> list[dict]:
    method = build_method(cfg, data.num_classes)
    settings = TrainSettings.from_config(cfg)
    method.configure_optimization(settings.optim, settings.schedule)
    params = [p for p in method.parameters() if p.requires_grad]
    opt = method.optimizer
    feats: dict[int, torch.Tensor] = {}
    for n, net in enumerate(method.networks):
        net.backbone.head.register_forward_pre_hook(
            lambda m, args, n=n: feats.__setitem__(n, args[0].detach()))
    steps = len(data.train)
    rows = []
    for epoch in range(epochs):
        method.train()
        for i, (x, y) in enumerate(data.train.epoch(epoch)):
            e = epoch + i / steps
            lr = method.begin_step(e)    # the rate, and the ramp-up of the distillation weights
            out = method(x, y)
            record: dict = {"epoch": e, "step": epoch * steps + i, "lr": lr}
            if (epoch * steps + i) % log_every == 0:
                record.update({f"grad_ce/{k}": v for k, v in
                               grad_norms(method, out.losses, CE_TERMS).items()})
                record.update({f"grad_kl/{k}": v for k, v in
                               grad_norms(method, out.losses, KL_TERMS).items()})
            opt.zero_grad(set_to_none=True)
            total = out.total()
            total.backward()
            record["grad_total"] = math.sqrt(sum(float(p.grad.pow(2).sum())
                                                 for p in params if p.grad is not None))
            opt.step()
            record["loss"] = float(total.detach())
            record.update({k: float(v.detach()) for k, v in out.losses.items()})
            with torch.no_grad():
                classes = out.logits[0][0].shape[1]
                preds = []
                for n, net in enumerate(out.logits):
                    for c, z in enumerate(net):
                        p = z.float().softmax(1)
                        h = -(p * p.clamp_min(1e-12).log()).sum(1).mean() / math.log(classes)
                        record[f"entropy/net{n}/C{c + 1}"] = float(h)
                        record[f"acc/net{n}/C{c + 1}"] = float((z.argmax(1) == y).float().mean())
                        preds.append(z.argmax(1))
                    record[f"feat_norm/net{n}"] = float(feats[n].flatten(1).norm(dim=1).mean())
                agree = [float((a == b).float().mean()) for i, a in enumerate(preds)
                         for b in preds[i + 1:]]
                record["agreement"] = sum(agree) / len(agree) if agree else 1.0
                record["pred_classes"] = int(torch.stack(preds).unique().numel())
            rows.append(record)
        print(f"{cfg['method']} epoch {epoch + 1}: loss {rows[-1]['loss']:.3f} "
              f"acc {sum(r['acc/net0/C1'] for r in rows[-steps:]) / steps:.3f} "
              f"entropy {sum(r['entropy/net0/C1'] for r in rows[-steps:]) / steps:.3f}",
              flush=True)
    return rows


def plot(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("loss", "training loss (sum of terms)", True),
              ("entropy/net0/C1", "entropy of net0 C1 / ln C", False),
              ("acc/net0/C1", "train accuracy net0 C1 (batch)", False),
              ("grad_total", "gradient norm (all parameters)", True),
              ("feat_norm/net0", "pooled feature norm, net0", True),
              ("agreement", "agreement between classifiers", False)]
    fig, axes = plt.subplots(2, 3, figsize=(15, 7))
    for ax, (key, title, log) in zip(axes.flat, panels):
        for name, rows in results.items():
            xs = [r["epoch"] for r in rows if key in r]
            ys = [r[key] for r in rows if key in r]
            ax.plot(xs, ys, label=name, linewidth=0.8)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes.flat[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--dataset", default="folder")
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--nets", default="resnet20,resnet20")
    ap.add_argument("--methods", default="ds,dml,dcm")
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME=key=value[,key=value]: a DCM run with these overrides")
    ap.add_argument("--log-every", type=int, default=1, help="gradient split every N steps")
    ap.add_argument("--out", default=str(RESULTS_DIR / "diagnose_dcm"))
    ap.add_argument("--baseline", action="append", default=[],
                    help="PATH.json:LABEL: a method of an earlier run to draw alongside (the "
                         "same data and settings), e.g. results/diagnose_dcm.json:dcm")
    ap.add_argument("overrides", nargs="*", default=[
        "optim.lr=0.1", "data.batch_size=64", "schedule.name=multistep",
        "schedule.milestones=[0.5,0.75]", "schedule.warmup_epochs=1", "optim.weight_decay=0.0005"])
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    base = [f"nets={args.nets}", f"data.name={args.dataset}", f"data.root={args.data_dir}",
            f"data.train_subset={args.images}", "epochs=30", *args.overrides]
    runs = [(m, m, []) for m in args.methods.split(",") if m]
    for v in args.variant:
        name, _, rest = v.partition("=")
        runs.append((name, "dcm", rest.split(",")))
    results = {}
    for spec in args.baseline:
        path, _, label = spec.rpartition(":")
        results[f"{label} (earlier run)"] = json.loads(Path(path).read_text())["results"][label]
    t0 = time.perf_counter()
    data = None
    for label, method, extra in runs:
        cfg = resolve(None, [*base, f"method={method}", *extra])
        if data is None:
            data = build_data(DataConfig(**cfg["data"]), "cpu", cfg["seed"])
        results[label] = run(cfg, data, args.epochs, args.log_every)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(
        {"command": " ".join(sys.argv), "seconds": time.perf_counter() - t0,
         "results": results}))
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()

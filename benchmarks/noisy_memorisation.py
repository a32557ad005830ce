"""Do the networks of a noisy-label run fit the wrong labels? (DCM §4.4: DCM as a regulariser.)

For each finished run folder trained with ``data.label_noise`` it loads the final weights, runs
every network's own classifier (C1) over the training images *without augmentation*, and splits
the training set into the samples whose label was kept and those whose label was corrupted
(``noisy_labels.pt`` in the run folder, the indices the run trained with). For the corrupted
ones it counts how often the network predicts the wrong label it was trained on (memorised)
and how often the true one (corrected). Writes ``benchmarks/results/<name>.json`` and ``.md``.

    python benchmarks/noisy_memorisation.py RUN [RUN ...] --name noisy_memorisation
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR  # noqa: E402

from dcmkd.data import build_data  # noqa: E402
from dcmkd.data.loader import DeviceLoader  # noqa: E402
from dcmkd.engine.build import load_run  # noqa: E402
from dcmkd.run_folder import RunFolder  # noqa: E402
from dcmkd.weights import load_file  # noqa: E402


@torch.no_grad()
def predictions(method, images: torch.Tensor, mean, std, batch: int = 500) -> list[torch.Tensor]:
    """Each network's C1 prediction for every image, in order."""
    method.eval()
    loader = DeviceLoader(images, torch.zeros(len(images), dtype=torch.int64), batch, train=False,
                          mean=mean, std=std)
    out: list[list[torch.Tensor]] = []
    for x, _ in loader.epoch(0):
        for n, net in enumerate(method.predict(x)):
            if len(out) <= n:
                out.append([])
            out[n].append(net[0].argmax(1))            # net[0]: the network's own classifier
    return [torch.cat(p) for p in out]


def analyse(run_dir: Path) -> dict:
    folder = RunFolder(run_dir)
    if not folder.finished:
        raise SystemExit(f"{run_dir}: not a finished run")
    built = load_run(folder, device="cpu")
    cfg = folder.read_config()
    if not cfg["data"].get("label_noise"):
        raise SystemExit(f"{run_dir}: trained without data.label_noise")
    train = built.data.train
    noisy_labels = train.labels
    clean = build_data({**cfg["data"], "label_noise": 0.0}, "cpu", seed=cfg["seed"]).train
    if not torch.equal(clean.images, train.images):
        raise SystemExit(f"{run_dir}: the clean rebuild selected other training images")
    true_labels = clean.labels
    saved = load_file(folder.file(folder.NOISY_LABELS))["indices"]
    corrupted = torch.zeros(len(true_labels), dtype=torch.bool)
    corrupted[saved] = True
    if not torch.equal(corrupted, noisy_labels != true_labels):
        raise SystemExit(f"{run_dir}: noisy_labels.pt does not match the rebuilt labels")
    out = {"run": str(run_dir), "method": cfg["method"], "nets": cfg["nets"], "seed": cfg["seed"],
           "images": len(true_labels), "corrupted": int(corrupted.sum()), "networks": []}
    for pred in predictions(built.method, train.images, built.data.mean, built.data.std):
        kept = ~corrupted
        out["networks"].append({
            "acc_kept_labels": float((pred[kept] == true_labels[kept]).float().mean()),
            "memorised": float((pred[corrupted] == noisy_labels[corrupted]).float().mean()),
            "corrected": float((pred[corrupted] == true_labels[corrupted]).float().mean()),
            "acc_on_noisy_labels": float((pred == noisy_labels).float().mean()),
        })
    return out


def markdown(results: list[dict]) -> str:
    lines = ["| run | network | accuracy, kept labels | corrupted: predicts its wrong label "
             "(memorised) | corrupted: predicts the true label | accuracy on the trained labels |",
             "|---|---|---|---|---|---|"]
    for r in results:
        for n, s in enumerate(r["networks"]):
            lines.append(f"| {r['method']} {'+'.join(r['nets'])} seed {r['seed']} | net{n} | "
                         f"{s['acc_kept_labels']:.3f} | {s['memorised']:.3f} | "
                         f"{s['corrected']:.3f} | {s['acc_on_noisy_labels']:.3f} |")
    first = results[0]
    return (f"Training images without augmentation: {first['images']}, of which "
            f"{first['corrupted']} carry a corrupted label.\n\n" + "\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="finished run folders with label noise")
    p.add_argument("--name", default="noisy_memorisation", help="results file name")
    args = p.parse_args()
    results = [analyse(r) for r in args.runs]
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"{args.name}.json").write_text(json.dumps(results, indent=2))
    md = markdown(results)
    (RESULTS_DIR / f"{args.name}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()

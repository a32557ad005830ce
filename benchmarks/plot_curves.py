"""Test error (and training accuracy) per epoch of several runs on one figure.

Each argument is ``LABEL=PATH``, PATH a run folder or its ``metrics.jsonl``; a network's error
is that of its own final classifier (``C1``), averaged over the networks of the run.

    python benchmarks/plot_curves.py --out benchmarks/results/dcm-remedies/curves.png \\
        Ind=benchmarks/results/dcm-remedies/ind.metrics.jsonl \\
        DCM=benchmarks/results/dcm-remedies/dcm.metrics.jsonl
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def curves(path: Path) -> tuple[list[int], list[float], list[int], list[float]]:
    """(epochs, mean test top-1 error of the C1 classifiers, epochs, mean train accuracy)."""
    if path.is_dir():
        path = path / "metrics.jsonl"
    test_ep, test, train_ep, train = [], [], [], []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        errs = [v for k, v in record.items() if k.startswith("test/") and k.endswith("/C1/top1")]
        accs = [v for k, v in record.items() if k.startswith("train/") and k.endswith("/C1/acc")]
        if errs:
            test_ep.append(record["epoch"])
            test.append(sum(errs) / len(errs))
        if accs:
            train_ep.append(record["epoch"])
            train.append(100 * sum(accs) / len(accs))
    return test_ep, test, train_ep, train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="LABEL=PATH (a run folder or metrics.jsonl)")
    p.add_argument("--out", required=True, help="image file to write")
    p.add_argument("--title", default="")
    args = p.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_test, ax_train) = plt.subplots(1, 2, figsize=(11, 4))
    for spec in args.runs:
        label, _, path = spec.partition("=")
        if not path:
            raise SystemExit(f"plot_curves: expected LABEL=PATH, got {spec!r}")
        test_ep, test, train_ep, train = curves(Path(path))
        ax_test.plot(test_ep, test, marker="o", markersize=3, label=label)
        ax_train.plot(train_ep, train, label=label)
    ax_test.set(xlabel="epoch", ylabel="test top-1 error %", title="test error (C1)")
    ax_train.set(xlabel="epoch", ylabel="train accuracy %", title="training accuracy (C1)")
    for ax in (ax_test, ax_train):
        ax.grid(alpha=0.3)
        ax.legend()
    if args.title:
        fig.suptitle(args.title)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

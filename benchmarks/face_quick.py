"""A small, real analogue of SSKD Table 7 (face recognition), runnable on 2 CPU cores.

Student ResNet-18 and a deeper teacher (``--teacher``, default ResNet-34; the paper's is
ResNet-50, which diverged here from scratch at 32 px) are trained on
the training identities of an identity folder (e.g. the CelebA crops of ``../shared/data/
faces.tar``: 225 training identities, 4,583 images; 74 unseen test identities, 1,443 images) at
a small input size, then compared open-set on the unseen identities: verification TAR at
FAR = 1% and 0.1% over every test pair, identification Rank-1 / Rank-5 (one gallery image per
identity). Rows, as the paper's: Student, Teacher, KD (T = 4, the teacher of the same seed),
SSKD (the 4 stages only, the teacher of the same seed; the output feature is the pooled last
stage, so no head is tuned). Mean(std) over the seeds beside the paper's figures (IJB-A, a far
harder set: compare orderings, not values).

    python benchmarks/face_quick.py --root FACES --out runs/face-quick --seeds 0 1 \
        [--size 32 --epochs 12 --stage-epochs 3 --teacher-epochs 36 --results NAME]

``--teacher-epochs`` trains the teacher longer than the student (a **choice** of the protocol,
not the paper's: its teacher is simply a stronger network; at 32 px and 12 epochs a ResNet-34
ends *below* the ResNet-18 student, so nothing better than the student can be transferred).
Its runs get their own folders (``teacher_t36_s0``, ``kd_t36_s0``, ``sskd_t36_s0``) and
``--results`` names the results folder, so one protocol never overwrites another's table.

Runs are ordinary run folders (a rerun resumes or returns them); the table goes to
``benchmarks/results/face-quick/`` (table.md, results.json) with the command and wall times.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR  # noqa: E402

from dcmkd.engine.loop import fit  # noqa: E402
from dcmkd.engine.settings import TrainSettings  # noqa: E402
from dcmkd.methods.optimization import Schedule, SGDSettings  # noqa: E402
from dcmkd.tasks.build import face_data, face_method  # noqa: E402
from dcmkd.tasks.face import FACE_METRICS  # noqa: E402

#: SSKD Table 7 (IJB-A), mean ± std over its 10 splits
PAPER = {"Student": (76.9, 55.2, 84.6, 92.4), "Teacher": (83.7, 59.3, 90.1, 95.8),
         "KD": (77.2, 55.4, 85.3, 93.0), "SSKD": (80.5, 56.9, 86.8, 93.5)}
ROWS = ("Student", "Teacher", "KD", "SSKD")
STUDENT = "resnet18"


def settings(epochs: int, seed: int, lr: float) -> TrainSettings:
    return TrainSettings(optim=SGDSettings(0.9, False, 5e-4),
                         schedule=Schedule("cosine", lr=lr, epochs=epochs, warmup_epochs=1.0),
                         device="cpu",
                         seed=seed, eval_every=epochs)


def run_seed(args: argparse.Namespace, seed: int) -> dict[str, dict]:
    data = face_data(args.root, size=args.size, batch_size=64, seed=seed,
                     max_identities=args.max_identities)
    k, out = data.num_classes, Path(args.out)
    base = settings(args.epochs, seed, args.lr)
    results: dict[str, dict] = {}

    def train(row: str, method, folder: str, st: TrainSettings = base) -> None:
        summary = fit(method, data, out / folder, st)   # a finished run is returned as is
        n = len(summary["test_face"]) - 1          # the student (or the only network)
        results[row] = {**summary["test_face"][n], "seconds": summary["seconds"],
                        "run": str(out / folder)}

    teacher_net = args.teacher
    longer = "" if args.teacher_epochs == args.epochs else f"_t{args.teacher_epochs}"
    torch.manual_seed(seed)
    train("Teacher", face_method("ind", [teacher_net], k), f"teacher{longer}_s{seed}",
          settings(args.teacher_epochs, seed, args.lr))
    torch.manual_seed(seed)
    train("Student", face_method("ind", [STUDENT], k), f"student_s{seed}")
    teacher = out / f"teacher{longer}_s{seed}"
    torch.manual_seed(seed)
    train("KD", face_method("kd", [teacher_net, STUDENT], k, teacher_weights=teacher,
                            temperature=4.0), f"kd{longer}_s{seed}")
    torch.manual_seed(seed)
    sskd = face_method("sskd", [teacher_net, STUDENT], k, teacher_weights=teacher,
                       sskd={"schedule": "epochs", "stage_epochs": args.stage_epochs,
                             "milestones": [0.67], "lr": args.stage_lr})
    train("SSKD", sskd, f"sskd{longer}_s{seed}", settings(args.stage_epochs * 4, seed, args.lr))
    return results


def table(per_seed: dict[int, dict[str, dict]], args: argparse.Namespace) -> str:
    head = ["method", "TAR@FAR=1%", "TAR@FAR=0.1%", "Rank-1", "Rank-5", "paper (IJB-A)",
            "train min"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in ROWS:
        cells = [row]
        for metric in FACE_METRICS:
            values = [r[row][metric] for r in per_seed.values()
                      if r.get(row, {}).get(metric) is not None]
            if not values:
                cells.append("n/a")
                continue
            mean = statistics.fmean(values)
            std = statistics.stdev(values) if len(values) > 1 else None
            cells.append(f"{mean:.1f}" + (f" ({std:.1f})" if std is not None else ""))
        cells.append(" / ".join(f"{v:.1f}" for v in PAPER[row]))
        minutes = [r[row]["seconds"] / 60 for r in per_seed.values() if row in r]
        cells.append(f"{statistics.fmean(minutes):.0f}" if minutes else "")
        lines.append("| " + " | ".join(cells) + " |")
    seeds = ", ".join(str(s) for s in per_seed)
    return "\n".join([
        f"Face quick protocol (SSKD Table 7 analogue): {STUDENT} student, {args.teacher} teacher, "
        f"{args.size}×{args.size} input, {args.epochs} epochs"
        + (f" (the teacher {args.teacher_epochs})" if args.teacher_epochs != args.epochs else "")
        + f" (SSKD: 4 stages × "
        f"{args.stage_epochs}), open-set on unseen identities; mean (std) over seeds {seeds}.",
        "", *lines, "",
        "Command: `python benchmarks/face_quick.py " + " ".join(sys.argv[1:]) + "`"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", required=True, help="identity folder (one folder per identity)")
    p.add_argument("--out", default="runs/face-quick", help="where the run folders go")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--teacher", default="resnet34",
                   help="the teacher backbone (the paper's resnet50 diverged from scratch at "
                        "32 px here: training CE above ln K after 2 epochs at lr 0.05)")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--teacher-epochs", type=int, default=None,
                   help="the teacher's epochs (default: --epochs, as the student's)")
    p.add_argument("--results", default="face-quick",
                   help="the folder under benchmarks/results/ that gets the table")
    p.add_argument("--stage-epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--stage-lr", type=float, default=0.01)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-identities", type=int, default=None,
                   help="keep the first N identities of each side (a check of the script)")
    args = p.parse_args()
    if args.teacher_epochs is None:
        args.teacher_epochs = args.epochs
    torch.set_num_threads(args.threads)
    per_seed = {s: run_seed(args, s) for s in args.seeds}
    dest = RESULTS_DIR / args.results
    dest.mkdir(parents=True, exist_ok=True)
    text = table(per_seed, args)
    (dest / "table.md").write_text(text + "\n")
    (dest / "results.json").write_text(json.dumps(
        {"args": vars(args), "per_seed": per_seed}, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()

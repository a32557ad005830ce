"""A small, real analogue of SSKD Tables 8 and 9 (COCO detection, FPN and RetinaNet) on 2 CPU cores.

Data: canvases of real CIFAR-10 objects (:func:`dcmkd.data.canvas.make_canvas_dataset`): the
JPEGs of ``--source/train`` pasted on ``--canvas``² canvases (1–4 objects each, at sizes drawn in
all three COCO size ranges, exact boxes, a blurred real-image background) make the training set,
those of ``--source/test`` the validation set, so no object image is in both; COCO layout, scored
by the reference COCOeval (pycocotools). The canvases are drawn once (seed 0) and shared by every
run and seed; the training seeds vary the initialisation and the batch order.

Rows, per detector kind (``fasterrcnn``: Faster R-CNN + FPN, Table 8; ``retinanet``, Table 9):

- **Student**: the ResNet-18 + FPN detector alone (``--epochs`` epochs);
- **Teacher**: a deeper backbone alone (``--teacher``, default ResNet-50; same schedule);
- **SSKD**: the teacher of the same seed into a ResNet-18 student: 5 backbone stages
  (``conv1+layer1``, ``layer2``, ``layer3``, ``layer4``, ``fpn``; ``--stage-epochs`` each,
  SGD lr 0.01 as the paper, ×0.1 at 2/3 of each stage), then the task head (RPN + RoI heads, or
  RetinaNet's subnets) on the labels with the backbone frozen (``--head-epochs``, the Student's
  schedule over them).

Faster R-CNN's RoI sampling and test proposals are reduced to fit a CPU (``--roi-batch``,
``--test-proposals``; a **choice**): 128 sampled RoIs per image in training instead of the FPN
paper's 512 (torchvision's default), and 300 proposals per image at test instead of 1,000 (the
Faster R-CNN paper's test setting). A canvas holds 1–4 objects, so the sampler's 25 % positive
share of 512 is never filled and the extra negatives cost more than they teach; with the
defaults the RoI head (its 12,544→1,024 layer and RoIAlign's backward) took about three
quarters of a ResNet-18 student's step at 128 px, batch 4, in one profiled step here
(``benchmarks/bench_sskd_detection.py --size 128 --batch 4``), and 128 RoIs cut the step from
7.3 s to 2.7 s on the loaded machine. The backbones, FPN, RPN and heads are torchvision's own.

By default everything trains from scratch (no ImageNet weights can be had here), with trainable BatchNorm
(:func:`dcmkd.models.detection.build_detector`'s default without weights), batch ``--batch``,
SGD momentum 0.9, weight decay 1e-4, gradient-norm clipping at 10 (a from-scratch detector's
early spikes), a linear warm-up over the first half epoch, then ×0.1 at 2/3 and 8/9 of the run
(Detectron's 2× schedule's drop points, scaled to the run).

    python benchmarks/detection_quick.py --source /tmp/shared_data/cifar10 \
        --out runs/detection-quick --seeds 0 1 [--kinds fasterrcnn --n-train 500 --epochs 4]
    python benchmarks/detection_quick.py --source /tmp/shared_data/cifar10 --check

Cost (measured at 128 px, batch 4, 1 thread, on a 2-core machine loaded by other jobs, where
a process got about two thirds of a core (user/real time of the ``--check`` runs), so an idle
core should need about two thirds of these): seconds per training image per epoch, Faster
R-CNN student 0.68, teacher 0.73, all 5 SSKD stages 0.47, SSKD head 0.25, and 0.30 per
validation image per evaluated network; RetinaNet 0.29, 0.42, 0.40, 0.18 and 0.08. So one
seed of both kinds takes about
``N·(2.55·E + 0.87·S) + 1.5·V`` seconds (``N`` = ``--n-train``, ``E`` = ``--epochs`` =
``--head-epochs``, ``S`` = ``--stage-epochs``, ``V`` = ``--n-val``); Faster R-CNN alone
``N·(1.66·E + 0.47·S) + 1.2·V``, RetinaNet alone ``N·(0.89·E + 0.40·S) + 0.32·V``.

``--pretrain-epochs E`` (a **choice**, the analogue of the paper's ImageNet backbones): each
backbone (``tv:resnet18`` and ``tv:<teacher>``, torchvision's own ResNets) is first trained as a
CIFAR-10 classifier by ``dcmkd train`` (``--pretrain-images`` of the 32×32 training images,
E epochs, SGD lr 0.1 cosine after a one-epoch linear warm-up (without it ResNet-34 and -50
blew up in the first epoch here: 82 % test error after 3 epochs), batch 128; once, shared by
every seed as ImageNet weights are), and
its exported weights start the detectors' backbones (``backbone_weights``), with
FrozenBatchNorm2d holding the pretraining statistics (Detectron's practice) and every stage
trainable (``trainable_layers=5``, so the Student, the Teacher and SSKD's stage 1 all train
conv1 and layer1). The source's test images, the validation canvases' objects, are never seen
in pretraining. From scratch, a RetinaNet teacher (R50, 600 canvases, 4 epochs) reached only
0.13 AP (0.35 AP50) in 23 minutes here: nothing to compare.

Runs are ordinary run folders under ``--out`` (a rerun resumes an interrupted one and returns a
finished one); the table goes to ``benchmarks/results/detection-quick/`` (table.md,
results.json) with the command and wall times. ``--check`` runs the whole protocol on a handful
of canvases for one epoch in a temporary folder and writes its table there (never over the
published one).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR  # noqa: E402

from dcmkd.data.canvas import make_canvas_dataset  # noqa: E402
from dcmkd.engine.loop import fit  # noqa: E402
from dcmkd.engine.settings import TrainSettings  # noqa: E402
from dcmkd.methods.optimization import Schedule, SGDSettings  # noqa: E402
from dcmkd.run_folder import RunFolder  # noqa: E402
from dcmkd.tasks.build import detection_data, detection_method  # noqa: E402
from dcmkd.tasks.detection import COCO_METRICS  # noqa: E402

STUDENT = "resnet18"
ROWS = ("Student", "Teacher", "SSKD")
KINDS = ("fasterrcnn", "retinanet")
#: SSKD Table 8 (FPN) and Table 9 (RetinaNet), COCO minival: AP, AP50, AP75, APS, APM, APL.
#: The paper's teacher of the R18 student is ResNet-101 (here a ResNet-50 by default).
PAPER = {
    "fasterrcnn": {"Student": ("R18", (33.6, 55.1, 35.6, 18.9, 36.0, 44.1)),
                   "Teacher": ("R50", (37.7, 57.6, 40.5, 19.8, 41.1, 49.7)),
                   "SSKD": ("R18 mimic R101", (36.4, 57.6, 39.2, 19.3, 40.1, 49.2))},
    "retinanet": {"Student": ("R18", (32.4, 50.8, 34.1, 16.6, 34.8, 44.6)),
                  "Teacher": ("R50", (35.9, 55.3, 38.2, 18.4, 39.5, 47.8)),
                  "SSKD": ("R18 mimic R101", (35.5, 53.7, 37.4, 17.3, 38.2, 49.4))},
}
TITLES = {"fasterrcnn": "Faster R-CNN + FPN (SSKD Table 8)",
          "retinanet": "RetinaNet (SSKD Table 9)"}

LIMITS = """\
**What this protocol can show.** Whether, on real photographs of objects (CIFAR-10's test
images never seen in training), trained and scored exactly as COCO detectors are (torchvision's
Faster R-CNN + FPN and RetinaNet, the reference COCOeval, AP over IoU 0.5:0.95 and per COCO size
range), a ResNet-18 student trained by SSKD's stage-by-stage mimicking of a deeper teacher, then
its task head on labels, detects better than the same student trained alone: the ordering of
the paper's Student / SSKD rows, and the teacher's margin over the student.

**What it cannot show.** COCO performance: the objects are 32×32 CIFAR images pasted as
rectangles on blurred real-image backgrounds, so there is none of COCO's context, clutter,
occlusion, object shapes or class imbalance; large objects are upscaled and blurry; 10 classes,
not 80. The data are small (hundreds to a few thousand canvases, not 118k images) and the
schedules short, so absolute AP values say nothing about the paper's; only orderings and gaps
between rows of one table are comparable. The paper's detectors start from ImageNet backbones
(Detectron's practice); here they start from scratch, or (``--pretrain-epochs``) from CIFAR-10
classifiers of 32×32 images, a far smaller prior: the teacher is weaker than the paper's, and
its margin over the student (not guaranteed here) bounds what SSKD can transfer. The teacher
is shallower than the paper's (the paper's R18 student mimics a ResNet-101; each table names its
teacher). With few seeds, differences within about two standard deviations are not evidence.
"""


def schedule(epochs: int, lr: float) -> Schedule:
    """Detectron's 2× shape scaled to ``epochs``: warm-up, ×0.1 at 2/3 and 8/9 of the run."""
    return Schedule("multistep", lr=lr, epochs=epochs, milestones=(2 / 3, 8 / 9), gamma=0.1,
                    warmup_epochs=min(0.5, epochs / 2))


def settings(epochs: int, seed: int, lr: float) -> TrainSettings:
    return TrainSettings(optim=SGDSettings(0.9, False, 1e-4), schedule=schedule(epochs, lr),
                         clip_grad_norm=10.0, device="cpu", seed=seed, eval_every=max(1, epochs),
                         log_every=20)


def make_data(args: argparse.Namespace) -> dict[str, Any]:
    folder = Path(args.out) / f"canvases_{args.canvas}px_{args.n_train}_{args.n_val}"
    return make_canvas_dataset(args.source, folder, n_train=args.n_train, n_val=args.n_val,
                               canvas=args.canvas, seed=0)


def pretrain_folder(args: argparse.Namespace, backbone: str) -> Path:
    return Path(args.out) / (f"pretrain_tv-{backbone}_{args.pretrain_images}x"
                             f"{args.pretrain_epochs}_warm1")


def pretrain(args: argparse.Namespace) -> dict[str, str | None]:
    """Per backbone, the exported weights of its CIFAR-10 classifier (module note), or None
    without ``--pretrain-epochs``. The backbones train concurrently, each a ``dcmkd train`` of
    ``--threads`` thread(s); a finished one is returned by its rerun."""
    backbones = (STUDENT, args.teacher)
    if not args.pretrain_epochs:
        return dict.fromkeys(backbones)
    jobs = {}
    for b in backbones:
        argv = [sys.executable, "-m", "dcmkd", "train", "-m", "ind", "-n", f"tv:{b}",
                "-d", "folder", "--data-dir", str(args.source),
                "--epochs", str(args.pretrain_epochs), "-o", str(pretrain_folder(args, b)),
                "device=cpu", f"data.train_subset={args.pretrain_images}", "data.batch_size=128",
                "schedule.name=cosine", "schedule.warmup_epochs=1", "optim.lr=0.1", "seed=0",
                "eval_every=1000"]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        jobs[b] = subprocess.Popen(argv, env=env)
    failed = [b for b, job in jobs.items() if job.wait() != 0]
    if failed:
        raise SystemExit(f"pretraining {', '.join(failed)} failed (see above)")
    weights = {}
    for b in backbones:
        summary = json.loads((pretrain_folder(args, b) / "summary.json").read_text())
        print(f"pretrained tv:{b}: CIFAR-10 test error {summary['test_top1'][0]:.2f}%",
              flush=True)
        weights[b] = str(RunFolder(pretrain_folder(args, b)).network_path(0))
    return weights


def detector_options(args: argparse.Namespace, kind: str) -> tuple[dict[str, Any], str]:
    """The detectors' options (torchvision's keywords) and a folder-name tag for the
    non-default ones."""
    opts: dict[str, Any] = {"min_size": args.canvas, "max_size": args.canvas}
    tag = ""
    if args.pretrain_epochs:   # the pretraining's BN statistics, every stage trained
        opts.update(norm="frozen_bn", trainable_layers=5)
        tag = f"_pre{args.pretrain_images}x{args.pretrain_epochs}"
    if kind != "fasterrcnn":
        return opts, tag
    opts.update(box_batch_size_per_image=args.roi_batch,
                rpn_post_nms_top_n_test=args.test_proposals)
    return opts, f"_roi{args.roi_batch}p{args.test_proposals}{tag}"


def run_kind(args: argparse.Namespace, kind: str, seed: int, canvases: dict,
             weights: dict[str, str | None]) -> dict[str, dict]:
    data = detection_data(canvases["out"], train_split="train", test_split="val",
                          batch_size=args.batch, test_batch_size=8, seed=seed)
    opts, tag = detector_options(args, kind)
    k, out = data.num_classes, Path(args.out)
    results: dict[str, dict] = {}

    def train(row: str, method: Any, folder: str, st: TrainSettings) -> None:
        t0 = time.time()
        summary = fit(method, data, out / folder, st)
        coco = summary["test_coco"][-1]   # the student (or the only network)
        results[row] = {**coco, "seconds": summary.get("seconds"), "wall_s": time.time() - t0,
                        "folder": folder}
        print(f"{kind} seed {seed} {row}: AP {coco['AP']:.2f} AP50 {coco['AP50']:.2f} "
              f"({(time.time() - t0) / 60:.1f} min)", flush=True)

    base = settings(args.epochs, seed, args.lr)
    teacher = f"{kind}{tag}_teacher_{args.teacher}_s{seed}"
    torch.manual_seed(seed)
    train("Teacher", detection_method("ind", kind, [args.teacher], k, detector_options=opts,
                                      backbone_weights=[weights[args.teacher]]),
          teacher, base)
    torch.manual_seed(seed)
    train("Student", detection_method("ind", kind, [STUDENT], k, detector_options=opts,
                                      backbone_weights=[weights[STUDENT]]),
          f"{kind}{tag}_student_{STUDENT}_s{seed}", base)
    torch.manual_seed(seed)
    sskd = detection_method("sskd", kind, [args.teacher, STUDENT], k, detector_options=opts,
                            backbone_weights=[None, weights[STUDENT]],
                            teacher_weights=out / teacher,
                            sskd={"schedule": "epochs", "stage_epochs": args.stage_epochs,
                                  "milestones": [2 / 3], "lr": 0.01,
                                  "head_epochs": args.head_epochs})
    # the head phase follows the run's schedule over head_epochs (SSKD.lr_at)
    train("SSKD", sskd, f"{kind}{tag}_sskd_{args.teacher}_to_{STUDENT}_s{seed}",
          settings(args.head_epochs, seed, args.lr))
    return results


def _cell(values: list[float]) -> str:
    if not values:
        return "n/a"
    mean = statistics.fmean(values)
    return f"{mean:.1f}" + (f" ({statistics.stdev(values):.1f})" if len(values) > 1 else "")


def pretrained_errors(args: argparse.Namespace) -> str:
    errors = []
    for b in (STUDENT, args.teacher):
        summary = json.loads((pretrain_folder(args, b) / "summary.json").read_text())
        errors.append(f"{b} {summary['test_top1'][0]:.1f}%")
    return ", ".join(errors)


def setup(args: argparse.Namespace, canvases: dict, kind: str) -> str:
    """The paragraph describing one kind's protocol (its canvases, pretraining, schedule)."""
    seeds = ", ".join(str(x) for x in args.seeds)
    tr, va = canvases["train"], canvases["val"]
    start = "from scratch" if not args.pretrain_epochs else (
        f"backbones pretrained as CIFAR-10 classifiers ({args.pretrain_images} images × "
        f"{args.pretrain_epochs} epochs; test error {pretrained_errors(args)}), frozen BN")
    rois = (f"; {args.roi_batch} RoIs/image in training and {args.test_proposals} test "
            "proposals" if kind == "fasterrcnn" else "")
    return (f"{args.canvas}×{args.canvas} canvases: {tr['images']} train ({tr['objects']} "
            f"objects: {tr['small']} small, {tr['medium']} medium, {tr['large']} large), "
            f"{va['images']} val ({va['objects']} objects: {va['small']} / {va['medium']} / "
            f"{va['large']}), 10 classes; {start}; batch {args.batch}, lr {args.lr}{rois}; "
            f"Student and Teacher {args.epochs} epochs, SSKD 5 stages × {args.stage_epochs} "
            f"epochs then the head {args.head_epochs} epochs. Student {STUDENT}, teacher "
            f"**{args.teacher}**. COCO metrics in percent, mean (std) over seeds {seeds}. CPU, "
            f"{args.threads} thread(s); the machine may have been shared with other jobs, so "
            "wall times are upper bounds.")


def kind_table(kind: str, runs: dict, teacher: str) -> list[str]:
    """One detector kind's rows: mean (std) over seeds beside the paper's row."""
    head = ["method", *COCO_METRICS, "paper row", "paper AP / AP50 / AP75 / APS / APM / APL",
            "min/run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in ROWS:
        name = f"{row} ({STUDENT if row != 'Teacher' else teacher}" + (
            f" ← {teacher})" if row == "SSKD" else ")")
        cells = [name]
        for m in COCO_METRICS:
            cells.append(_cell([r[row][m] for r in runs.values()
                                if r.get(row, {}).get(m) is not None and r[row][m] >= 0]))
        label, paper = PAPER[kind][row]
        cells += [label, " / ".join(f"{v:.1f}" for v in paper)]
        minutes = [(r[row]["seconds"] if r[row].get("seconds") is not None
                    else r[row]["wall_s"]) / 60 for r in runs.values() if row in r]
        cells.append(f"{statistics.fmean(minutes):.1f}" if minutes else "")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def table(published: dict[str, dict]) -> str:
    """The whole table file from the published record: one section per detector kind, each
    with the protocol and the command that produced it (kinds may come from separate runs)."""
    parts = ["# Detection quick protocol (SSKD Tables 8–9 analogue on canvases of real "
             "CIFAR-10 objects)", "",
             "Paper figures are COCO minival: compare orderings, not values.", ""]
    for kind in KINDS:
        if kind not in published:
            continue
        record = published[kind]
        parts += [f"## {TITLES[kind]}", "", record["setup"], "",
                  *kind_table(kind, record["per_run"], record["args"]["teacher"]), "",
                  f"Command: `{record['command']}`", ""]
    parts += ["A metric COCOeval cannot compute (no ground truth in that size range) is "
              "left out of the mean (n/a when no seed has it). Minutes per run: the run's own "
              "training and evaluation time (its summary's `seconds`, kept across resumes).", "",
              LIMITS]
    return "\n".join(parts)


def publish(dest: Path, records: dict[str, dict]) -> str:
    """Merge ``records`` (kind -> record) into ``dest``'s results.json, keeping the kinds this
    invocation did not run, and rewrite table.md from the whole; returns the table."""
    path = dest / "results.json"
    published = json.loads(path.read_text())["kinds"] if path.exists() else {}
    published.update(records)
    dest.mkdir(parents=True, exist_ok=True)
    text = table(published)
    (dest / "table.md").write_text(text)
    path.write_text(json.dumps({"kinds": published}, indent=2, default=str) + "\n")
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", required=True,
                   help="CIFAR-10 image folder with train/ and test/ class folders")
    p.add_argument("--out", default="runs/detection-quick",
                   help="where the canvases and run folders go")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--teacher", default="resnet50")
    p.add_argument("--canvas", type=int, default=128)
    p.add_argument("--n-train", type=int, default=500)
    p.add_argument("--n-val", type=int, default=100)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--stage-epochs", type=int, default=1)
    p.add_argument("--head-epochs", type=int, default=None,
                   help="the SSKD head phase (default: --epochs, the Student's label budget)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--roi-batch", type=int, default=128,
                   help="Faster R-CNN: RoIs sampled per training image (FPN paper: 512)")
    p.add_argument("--test-proposals", type=int, default=300,
                   help="Faster R-CNN: RPN proposals per image at test (FPN: 1000)")
    p.add_argument("--pretrain-epochs", type=int, default=0,
                   help="pretrain each backbone as a CIFAR-10 classifier first (0: from scratch)")
    p.add_argument("--pretrain-images", type=int, default=20000,
                   help="training images of the pretraining")
    p.add_argument("--results", default="detection-quick",
                   help="the folder under benchmarks/results/ that gets the table (another "
                        "protocol, e.g. a longer schedule, gets its own)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--check", action="store_true",
                   help="the whole protocol on a handful of canvases, 1 epoch, in a temp folder")
    args = p.parse_args()
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    if args.check:
        args.out = tempfile.mkdtemp(prefix="detection-quick-check-")
        args.n_train, args.n_val, args.epochs, args.stage_epochs = 8, 4, 1, 1
        args.head_epochs, args.batch, args.seeds = 1, 2, [0]
        args.pretrain_images = 256 if args.pretrain_epochs else args.pretrain_images
        args.pretrain_epochs = min(args.pretrain_epochs, 1)
    if args.head_epochs is None:
        args.head_epochs = args.epochs
    torch.set_num_threads(args.threads)
    t0 = time.time()
    canvases = make_data(args)
    print(f"canvases: {canvases['out']} ({'reused' if canvases['reused'] else 'written'}, "
          f"{time.time() - t0:.0f} s)", flush=True)
    weights = pretrain(args)
    records = {}
    for kind in args.kinds:
        k0 = time.time()
        per_run = {s: run_kind(args, kind, s, canvases, weights) for s in args.seeds}
        records[kind] = {"args": {**vars(args), "kinds": [kind]}, "command": command,
                         "setup": setup(args, canvases, kind), "canvases": canvases,
                         "torch": torch.__version__, "wall_s": time.time() - k0,
                         "per_run": per_run}
    dest = Path(args.out) if args.check else RESULTS_DIR / args.results
    text = publish(dest, records)
    print(text)
    print(f"wrote {dest / 'table.md'} ({(time.time() - t0) / 60:.1f} min)")


if __name__ == "__main__":
    main()

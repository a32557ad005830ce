"""Speed of SSKD on a detector (issue 27, "Speed"): one SSKD step against the student's own step.

For each detector kind (``fasterrcnn``: Faster R-CNN + FPN, ``retinanet``) with a ResNet-18 + FPN
student and a ResNet-50 (optionally ResNet-101) + FPN teacher, at ``--size`` pixels
(``min_size = max_size``), batch ``--batch``, on the CPU with ``--threads`` threads, it times
(images/s, the median of ``--steps`` timed steps after ``--warmup`` untimed ones):

(a) the student's own training step: ``ind``'s ``training_step`` (the detector's losses,
    backward, SGD step), as the Student row of SSKD Tables 8–9 trains;
(b) one SSKD step of each backbone stage 1..5 (``conv1+layer1``, ``layer2``, ``layer3``,
    ``layer4``, ``fpn``): the SSKD method's own ``training_step`` after moving it to that phase
    with ``end_epoch`` (the student's stage k trained; its earlier stages and the frozen teacher
    run under ``no_grad``, the teacher in eval mode and only as far as stage k);
(c) the SSKD head-phase step (the detector's losses, backbone frozen, head trained);
(d) the teacher's forward to stage k alone (``no_grad``, eval mode, on the preprocessed batch),
    against the teacher's full backbone (ResNet + FPN, ``detector.backbone``).

and the ratio SSKD-step time / student-step time. Two checks make the "only as far as needed"
claim concrete: forward hooks on the teacher's stages record which of them ran during each SSKD
stage step, and the teacher's stage runner to stage 5 is compared with ``detector.backbone(x)``
by ``torch.equal``.

Images are random (uniform noise) with two random boxes each: the speed of a step does not
depend on what the pixels show (Faster R-CNN samples a fixed number of proposals and RoIs per
image in training; RetinaNet scores every anchor). The detectors are untrained; the teacher's
weights do not change its cost.

    python benchmarks/bench_sskd_detection.py [--size 256 --batch 2 --steps 5 --warmup 2
                                               --teachers resnet50 resnet101 --threads 1]

Writes ``benchmarks/results/bench_sskd_detection.{json,md}`` (``--stem`` to change).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, md_table, write_results  # noqa: E402

from dcmkd.methods.optimization import Schedule, SGDSettings  # noqa: E402
from dcmkd.tasks.build import detection_method  # noqa: E402

NUM_CLASSES = 10   # object classes (a CIFAR-10 canvas); the detectors add the background
OPTIM = SGDSettings(0.9, False, 1e-4)


def make_batch(size: int, batch: int, seed: int = 0) -> tuple[list[torch.Tensor], list[dict]]:
    """``batch`` random images in [0, 1] of ``size``² with two random boxes each (labels 1..K)."""
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, size, size, generator=g) for _ in range(batch)]
    targets = []
    for _ in range(batch):
        xy = torch.randint(0, size // 2, (2, 2), generator=g).float()
        wh = torch.randint(size // 8, size // 2, (2, 2), generator=g).float()
        targets.append({"boxes": torch.cat([xy, xy + wh], 1),
                        "labels": torch.randint(1, NUM_CLASSES + 1, (2,), generator=g)})
    return images, targets


def timed(fn: Callable[[], Any], warmup: int, steps: int) -> dict[str, Any]:
    """Seconds of ``fn`` per call: ``warmup`` untimed calls, then ``steps`` timed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "times_s": times}


def sgd_step(method: Any) -> Callable[[torch.Tensor, dict], None]:
    def step(loss: torch.Tensor, terms: dict) -> None:
        method.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        method.optimizer.step()
    return step


def profile_ops(fn: Callable[[], Any], top: int = 5) -> list[dict[str, Any]]:
    """The ``top`` operators of one call of ``fn`` by self CPU time (torch.profiler)."""
    from torch.profiler import profile

    with profile() as prof:
        fn()
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ops) or 1.0
    return [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3,
             "share": e.self_cpu_time_total / total, "calls": e.count} for e in ops[:top]]


def teacher_hooks(plan: Any) -> tuple[list[str], list[Any]]:
    """Forward hooks recording which of the teacher's stages ran (a stage's first module)."""
    ran: list[str] = []
    handles = [plan.modules(i)[0].register_forward_hook(
        lambda m, a, o, name=name: ran.append(name)) for i, name in enumerate(plan.names)]
    return ran, handles


def bench_pair(kind: str, teacher: str, student: str, args: argparse.Namespace) -> dict:
    opts = {"min_size": args.size, "max_size": args.size}
    images, targets = make_batch(args.size, args.batch)
    schedule = Schedule("constant", lr=0.01, epochs=1)
    per_img = args.batch

    # (a) the student's own training step
    torch.manual_seed(0)
    ind = detection_method("ind", kind, [student], NUM_CLASSES, detector_options=opts)
    ind.configure_optimization(OPTIM, schedule)
    ind.train()
    step = sgd_step(ind)

    def student_step() -> None:
        ind.begin_step(0.0)
        ind.training_step(images, targets, step)

    out: dict[str, Any] = {"kind": kind, "teacher": teacher, "student": student}
    out["student_step"] = timed(student_step, args.warmup, args.steps)
    if args.profile:
        out["student_step_profile"] = profile_ops(student_step)
    del ind

    # the teacher's own training step (the Teacher row's cost; for scale)
    torch.manual_seed(0)
    alone = detection_method("ind", kind, [teacher], NUM_CLASSES, detector_options=opts)
    alone.configure_optimization(OPTIM, schedule)
    alone.train()
    t_step = sgd_step(alone)

    def teacher_step() -> None:
        alone.begin_step(0.0)
        alone.training_step(images, targets, t_step)

    out["teacher_step"] = timed(teacher_step, args.warmup, args.steps)
    del alone

    # (b, c) SSKD steps of every phase
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # an untrained teacher: its cost is the same
        sskd = detection_method("sskd", kind, [teacher, student], NUM_CLASSES,
                                detector_options=opts,
                                sskd={"schedule": "epochs", "stage_epochs": 1, "head_epochs": 1})
    sskd.configure_optimization(OPTIM, schedule)
    step = sgd_step(sskd)
    plan = sskd.t_part
    ran, handles = teacher_hooks(plan)
    phases = []
    for index, phase in enumerate(sskd.phases):
        assert sskd.phase == phase
        sskd.train()

        def sskd_step() -> None:
            sskd.begin_step(float(index))
            sskd.training_step(images, targets, step)

        ran.clear()
        sskd_step()   # one more warm-up call, watched by the hooks
        teacher_ran = list(ran)
        result = {"phase": phase.name, "teacher_stages_run": teacher_ran,
                  **timed(sskd_step, max(0, args.warmup - 1), args.steps)}
        result["ratio_to_student"] = result["median_s"] / out["student_step"]["median_s"]
        phases.append(result)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sskd.end_epoch(index)
    for h in handles:
        h.remove()
    out["sskd_steps"] = phases

    # (d) the teacher's forward to each stage, and its whole backbone
    net = sskd.networks[0]
    net.eval()
    with torch.no_grad():
        x0 = net.prepare(images)
        full = net.detector.backbone(x0)
        staged = plan.run(x0)[-1]
        out["stage_runner_equals_backbone"] = list(full) == list(staged) and all(
            torch.equal(full[k], staged[k]) for k in full)
        forwards = []
        for k in range(1, len(plan) + 1):
            r = timed(lambda k=k: plan.run(x0, stop=k), args.warmup, args.steps)
            forwards.append({"stop": k, "last_stage": plan.names[k - 1], **r})
        out["teacher_backbone"] = timed(lambda: net.detector.backbone(x0), args.warmup,
                                        args.steps)
    for f in forwards:
        f["fraction_of_backbone"] = f["median_s"] / out["teacher_backbone"]["median_s"]
    out["teacher_forward"] = forwards
    out["input_shape"] = list(x0.shape)
    del sskd
    return out


def ips(seconds: float, batch: int) -> float:
    return batch / seconds


def markdown(results: list[dict], args: argparse.Namespace, env: dict, load: str) -> str:
    b = args.batch
    parts = [
        "# SSKD on a detector: step speed (issue 27, \"Speed\")", "",
        f"CPU, **{args.threads} thread(s)**, input {args.size}×{args.size} "
        f"(min_size = max_size = {args.size}), batch {b}, random images with 2 boxes each; "
        f"median of {args.steps} timed steps after {args.warmup} warm-up steps. "
        f"torch {env['torch']}, torchvision {env['torchvision']}, Python {env['python']}, "
        f"{env['machine']}. The detectors are torchvision's with its defaults (Faster R-CNN: "
        "2,000 training proposals and 512 sampled RoIs per image; RetinaNet: every anchor "
        "scored), untrained, built by `dcmkd.tasks.build.detection_method`.", "",
        f"**The machine was loaded** while this ran: {load} (other agents' training processes "
        "shared its 2 cores), so absolute images/s are pessimistic and noisy; the ratios, "
        "measured back to back in one process, are the figures to read.", "",
        "Ratio = SSKD step time / the student's own training step time (detector losses, "
        "backward, SGD). Teacher stages run: the teacher stages whose forward hook fired during "
        "that SSKD step.", "",
        "Reading: an SSKD stage step back-propagates through one student stage (and its 1×1 "
        "adapter) only; the student's earlier stages and the teacher up to that stage run "
        "forward-only under `no_grad`, and no task head runs, so it costs a fraction of the "
        "student's own step, growing with the stage (the teacher's forward is the larger part "
        "of the later stages). The head step runs the frozen backbone forward-only and "
        "back-propagates into the head alone (for Faster R-CNN no gradient reaches the pyramid, "
        "so RoIAlign's backward, a large part of the student's own step, is skipped; the "
        "profile below shows it). The teacher-forward table shows the cost of stopping early: "
        "stage k's forward is the k-stage prefix of the backbone's.", ""]
    for r in results:
        parts += [f"## {r['kind']}: {r['student']} student ← {r['teacher']} teacher "
                  f"(preprocessed batch {r['input_shape']})", ""]
        st = r["student_step"]["median_s"]
        rows = [["student's own training step", f"{st * 1e3:,.0f}", ips(st, b), 1.0, "none"]]
        tt = r["teacher_step"]["median_s"]
        rows.append([f"teacher's own training step ({r['teacher']}, for scale)",
                     f"{tt * 1e3:,.0f}", ips(tt, b), tt / st, "(all, with grad)"])
        for p in r["sskd_steps"]:
            rows.append([f"SSKD {p['phase']}", f"{p['median_s'] * 1e3:,.0f}",
                         ips(p["median_s"], b), p["ratio_to_student"],
                         ", ".join(p["teacher_stages_run"]) or "none"])
        parts.append(md_table(["step", "ms/step", "images/s", "ratio to student",
                               "teacher stages run"], rows))
        tb = r["teacher_backbone"]["median_s"]
        rows = [[f"to stage {f['stop']} ({f['last_stage']})", f"{f['median_s'] * 1e3:,.0f}",
                 ips(f["median_s"], b), f["fraction_of_backbone"]]
                for f in r["teacher_forward"]]
        rows.append(["full backbone (detector.backbone)", f"{tb * 1e3:,.0f}", ips(tb, b), 1.0])
        parts += ["Teacher forward alone (no_grad, eval mode):", "",
                  md_table(["teacher forward", "ms", "images/s", "fraction of full backbone"],
                           rows),
                  f"Stage runner to stage 5 `torch.equal` to `detector.backbone(x)`: "
                  f"**{r['stage_runner_equals_backbone']}** (stage 5 *is* the whole backbone, so "
                  "its fraction differs from 1 only by timing noise).", ""]
        if r.get("student_step_profile"):
            rows = [[e["op"], f"{e['self_ms']:,.0f}", f"{100 * e['share']:.0f}%", e["calls"]]
                    for e in r["student_step_profile"]]
            parts += ["Where the student's own step spends its time (one profiled step, "
                      "self CPU time):", "",
                      md_table(["operator", "self ms", "share", "calls"], rows)]
    parts += ["Command: `" + env["command"] + "`", ""]
    return "\n".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kinds", nargs="+", default=["fasterrcnn", "retinanet"])
    p.add_argument("--student", default="resnet18")
    p.add_argument("--teachers", nargs="+", default=["resnet50"],
                   help="teacher backbones (e.g. resnet50 resnet101)")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before each")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True,
                   help="profile one student step (top operators by self CPU time)")
    p.add_argument("--stem", default="bench_sskd_detection")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import torchvision

    env = {**environment(torch.device("cpu")), "torchvision": torchvision.__version__,
           "threads": torch.get_num_threads(), "machine": f"{platform.machine()}, "
           f"{platform.processor() or 'cpu'}"}
    load_before = _load()
    t0 = time.time()
    results = []
    for kind in args.kinds:
        for teacher in args.teachers:
            r = bench_pair(kind, teacher, args.student, args)
            results.append(r)
            print(f"{kind} {teacher}: student {ips(r['student_step']['median_s'], args.batch):.2f}"
                  " img/s; SSKD ratios " + ", ".join(f"{p['phase']} {p['ratio_to_student']:.2f}"
                                                     for p in r["sskd_steps"]), flush=True)
    load = f"load average {load_before} before, {_load()} after (1/5/15 min, 2 cores)"
    data = {"environment": env, "load": load, "args": vars(args),
            "wall_s": time.time() - t0, "results": results}
    jpath, mpath = write_results(args.stem, data, markdown(results, args, env, load))
    print(f"wrote {jpath} and {mpath} in {data['wall_s']:.0f} s")


def _load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


if __name__ == "__main__":
    main()

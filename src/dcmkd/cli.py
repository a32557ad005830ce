"""The ``dcmkd`` command line: ``dcmkd models``, ``dcmkd describe MODEL``.

Every sub-command turns its arguments into library calls; errors a user can cause (an unknown
model, kind or classifier, a bad option) exit with status 2 and a one-line message that lists the
valid choices.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def _giga(n: int) -> str:
    return f"{n / 1e9:.3f}G" if n >= 1e8 else f"{n / 1e6:.1f}M"


def cmd_models(args: argparse.Namespace) -> int:
    from dcmkd.heads.describe import model_rows

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


def cmd_describe(args: argparse.Namespace) -> int:
    from dcmkd.heads.describe import describe_model

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


def build_parser() -> argparse.ArgumentParser:
    from dcmkd import __version__

    p = argparse.ArgumentParser(prog="dcmkd", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"dcmkd {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("models", help="list every model with parameters and forward MACs")
    m.add_argument("--num-classes", type=int, default=None,
                   help="head size (default: 100 for CIFAR models, 1000 for ImageNet models)")
    m.add_argument("--json", action="store_true", help="machine-readable output")
    m.set_defaults(func=cmd_models)

    d = sub.add_parser("describe", help="stages and auxiliary classifiers of a model")
    d.add_argument("model")
    d.add_argument("--aux", default="default", metavar="KIND",
                   help="auxiliary classifier kind: default, apfc or narrow")
    d.add_argument("--classifiers", default=None,
                   help="auxiliary classifiers, e.g. C2,C3 (default) or C1+C2C3C4")
    d.add_argument("--num-classes", type=int, default=None)
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_describe)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from dcmkd.registry import UnknownNameError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UnknownNameError, ValueError) as e:
        print(f"dcmkd: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""What each rank runs in tests/test_distributed.py, under torchrun (CPU, gloo).

    torchrun --standalone --nproc-per-node 2 tests/dist_worker.py train OUT ARGS...
    torchrun ... tests/dist_worker.py gradients OUT       # dml of three networks, one step

``train``: one Trainer run of the config ARGS (dotted overrides) into OUT. The environment can
ask rank DCMKD_TEST_KILL_RANK to die (``os._exit``) at fractional epoch DCMKD_TEST_KILL_AT, on
the first attempt only (torchrun's TORCHELASTIC_RESTART_COUNT = 0). On ranks other than 0,
every file write raises: only rank 0 may write.
"""
from __future__ import annotations

import json
import os
import sys

import torch


def forbid_writes_off_rank_0() -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        return
    import dcmkd.run_folder
    import dcmkd.weights

    def refuse(*args, **kwargs):
        raise AssertionError(f"rank {os.environ['RANK']} tried to write a file")

    dcmkd.weights.atomic_write = refuse
    dcmkd.weights.atomic_save = refuse
    dcmkd.run_folder.atomic_save = refuse
    dcmkd.run_folder.atomic_write_text = refuse


def kill_when_asked() -> None:
    rank, at = os.environ.get("DCMKD_TEST_KILL_RANK"), os.environ.get("DCMKD_TEST_KILL_AT")
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if rank is None or at is None or not first_attempt or os.environ["RANK"] != rank:
        return
    from dcmkd.methods.base import Method

    original = Method.begin_step

    def dying(self, epoch):
        if epoch >= float(at):
            os._exit(17)
        return original(self, epoch)

    Method.begin_step = dying   # MutualMethod.begin_step reaches it through super()


def train(out: str, args: list[str]) -> None:
    from dcmkd.engine.config import resolve
    from dcmkd.engine.trainer import Trainer

    forbid_writes_off_rank_0()
    kill_when_asked()
    from dcmkd.engine import distributed

    Trainer(resolve(None, [*args, f"out={out}", "quiet=true"])).fit()
    distributed.shutdown()


def gradients(out: str) -> None:
    """dml of three networks on three ranks: each rank's gradient (one step, no update) equals
    the single-process gradient of its own network's loss L_n."""
    from dcmkd.engine import distributed
    from dcmkd.methods import create_method
    from dcmkd.methods.base import StepOutput

    ctx = distributed.context("networks", 3, "cpu")
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)

    def build():
        torch.manual_seed(0)
        return create_method("dml", ["resnet20"] * 3, 10)

    sharded = build()
    shapes = [net.num_classifiers for net in sharded.networks]
    sharded.shard(ctx.network, lambda own: ctx.gather_logits(own, shapes))
    out_step: StepOutput = sharded(x, y)
    out_step.total().backward()
    mine = [p.grad for p in sharded.networks[ctx.network].parameters()]

    reference = build()
    loss = reference.loss([list(net(x)) for net in reference.networks], y)
    own_loss = loss.total(ctx.network)
    ref = torch.autograd.grad(own_loss, list(reference.networks[ctx.network].parameters()))
    error = max(float((a - b).abs().max()) for a, b in zip(mine, ref))
    peers_untouched = all(p.grad is None for n, net in enumerate(sharded.networks)
                          if n != ctx.network for p in net.parameters())
    with open(f"{out}.rank{ctx.rank}.json", "w") as f:
        json.dump({"network": ctx.network, "max_abs_error": error,
                   "loss": float(own_loss), "sharded_loss": float(out_step.total()),
                   "peers_untouched": peers_untouched}, f)
    distributed.shutdown()


if __name__ == "__main__":
    torch.set_num_threads(1)
    command, out, *rest = sys.argv[1:]
    {"train": lambda: train(out, rest), "gradients": lambda: gradients(out)}[command]()

"""Several processes, launched by ``torchrun``: data-parallel, network-parallel, or both.

The processes form a 2-D mesh ``networks × data``, one process group per row and per column,
each with the run's ``dist_timeout``:

- **data-parallel** (``parallel=data``, the default under torchrun): a ``1 × W`` mesh. Every
  rank holds every network; each trainable network is wrapped in ``DistributedDataParallel``
  (a frozen teacher is not); the recipe's batch is the *global* batch, split over the ranks.
- **network-parallel** (``parallel=networks``): an ``N × D`` mesh for the N networks of a mutual
  method (``dml``, ``dml_ds``, ``dcm``, ``dcm1``, ``dcm2``), D = W / N data replicas. The ranks
  of one replica read the same batch; after the forward pass they all-gather the detached
  logits of every classifier, and each computes its own network's loss L_n (DCM Algorithm 1:
  the targets are detached, so no gradient crosses ranks) and steps its own network. With
  D > 1 each network is also data-parallel over its D replicas.

Only rank 0 writes the run folder. Metrics, evaluation counts and the non-finite flags are
reduced over the ranks, so every rank takes the same decisions. Process groups use NCCL on
GPUs and gloo on CPUs; their timeout (``dist_timeout`` seconds) bounds how long a rank waits
for a peer that died (torchrun then ends the job, or restarts it with ``--max-restarts``).
"""
from __future__ import annotations

import atexit
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

PARALLEL_MODES = ("data", "networks")

_CONTEXT: "Distributed | None" = None


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher setting the
    ``WORLD_SIZE`` / ``RANK`` environment) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@dataclass
class Distributed:
    """This process's place in the mesh and the process groups it talks through."""

    rank: int
    world: int
    local_rank: int
    networks: int                 # size of the networks dimension (1: data-parallel)
    replicas: int                 # size of the data dimension
    network: int | None           # the network this rank owns (None: all of them)
    replica: int                  # this rank's data shard
    data_group: Any = None        # the ranks that share this rank's network(s)
    network_group: Any = None     # the ranks that share this rank's batch
    mode: str = "data"
    bytes_sent: dict[str, int] = field(default_factory=lambda: {"all_reduce": 0,
                                                                 "all_gather": 0})

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- collectives -------------------------------------------------------------------------
    def sum_floats(self, values: Sequence[float]) -> list[float]:
        """Numbers summed over the data replicas (a method's own per-epoch statistics, e.g.
        SSKD's feature distance, so every replica takes the same decision)."""
        if self.replicas == 1:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.float64, device=self.device_for_collectives())
        dist.all_reduce(t, group=self.data_group)
        return t.tolist()

    def sync_replicas(self, tensors: Sequence[torch.Tensor]) -> None:
        """Give every data replica replica 0's values of ``tensors`` (parameters and buffers):
        BN running statistics that each replica updated from its own shard, and whatever a
        method re-initialised from a rank's own random stream."""
        if self.replicas == 1:
            return
        src = self.rank - self.replica   # replica 0 of this rank's data group
        by_kind: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
        for t in tensors:
            if t.numel():
                by_kind.setdefault((t.dtype, t.device), []).append(t.data)
        for group in by_kind.values():   # one broadcast per dtype and device
            flat = torch.cat([t.reshape(-1) for t in group])
            dist.broadcast(flat, src=src, group=self.data_group)
            offset = 0
            for t in group:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()

    def joint_norm(self, norm: torch.Tensor) -> torch.Tensor:
        """Network-parallel: the 2-norm over every network of this batch from each rank's own
        network's ``norm`` (the clipping norm of one process)."""
        sq = norm.detach().double().reshape(1).pow(2).to(self.device_for_collectives())
        dist.all_reduce(sq, group=self.network_group)
        return sq.sqrt().reshape(()).to(norm.device, norm.dtype)

    def min_over_all(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.device_for_collectives())
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return float(t.item())

    def merge_over_networks(self, values: dict[str, dict]) -> dict[str, dict]:
        """Union, field by field, of the dicts of dicts of the ranks of this batch
        (network-parallel: each rank holds its own network's entries)."""
        if self.networks == 1:
            return values
        parts: list[dict[str, dict]] = [{} for _ in range(self.networks)]
        dist.all_gather_object(parts, values, group=self.network_group)
        return {k: {key: v for p in parts for key, v in p[k].items()} for k in values}

    def gather_logits(self, own: Sequence[torch.Tensor], shapes: Sequence[int]
                      ) -> list[list[torch.Tensor]]:
        """Every network's classifier logits, detached, on every rank of this batch:
        ``shapes[n]`` is network n's number of classifiers (padded to the largest for the
        all-gather)."""
        k_max = max(shapes)
        stacked = torch.stack([z.detach() for z in own])
        if stacked.shape[0] < k_max:
            pad = stacked.new_zeros((k_max - stacked.shape[0], *stacked.shape[1:]))
            stacked = torch.cat([stacked, pad])
        out = [torch.empty_like(stacked) for _ in range(self.networks)]
        dist.all_gather(out, stacked.contiguous(), group=self.network_group)
        self.bytes_sent["all_gather"] += stacked.numel() * stacked.element_size()
        return [list(t[:k]) for t, k in zip(out, shapes)]

    def reduce_sums(self, sums: dict[str, float], count: int,
                    firsts: dict[str, float] | None = None
                    ) -> tuple[dict[str, float], int, dict[str, float]]:
        """Combine one rank's running sums (and a sample count) with the other ranks': summed
        over the data replicas, united over the networks. ``firsts`` (the step at which a loss
        first became non-finite, -1 if never) take the earliest over the replicas."""
        firsts = dict(firsts or {})
        if self.replicas > 1:
            keys, bad_keys = sorted(sums), sorted(firsts)
            t = torch.tensor([*(sums[k] for k in keys), float(count)], dtype=torch.float64,
                             device=self.device_for_collectives())
            dist.all_reduce(t, group=self.data_group)
            values = t.tolist()
            sums, count = dict(zip(keys, values[:-1])), int(values[-1])
            if bad_keys:
                b = torch.tensor([firsts[k] if firsts[k] >= 0 else float("inf") for k in bad_keys],
                                 dtype=torch.float64, device=self.device_for_collectives())
                dist.all_reduce(b, op=dist.ReduceOp.MIN, group=self.data_group)
                firsts = {k: (v if v != float("inf") else -1.0)
                          for k, v in zip(bad_keys, b.tolist())}
        if self.networks > 1:
            merged = self.merge_over_networks({"sums": sums, "firsts": firsts})
            sums, firsts = merged["sums"], merged["firsts"]
        return sums, count, firsts

    def broadcast_object(self, obj: Any = None, src: int = 0) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def agree(self, decide: Callable[[], Any]) -> Any:
        """``decide()`` on rank 0, its result on every rank; an error raised by it is raised on
        every rank (the same class and message)."""
        outcome: tuple[str, Any, str] = ("", None, "")
        error: BaseException | None = None
        if self.is_main:
            try:
                outcome = ("value", decide(), "")
            except Exception as e:  # noqa: BLE001 - raised on every rank below
                error, outcome = e, ("error", type(e), str(e))
        kind, value, message = self.broadcast_object(outcome)
        if kind == "error":
            if error is not None:
                raise error
            remote = value.__new__(value)
            Exception.__init__(remote, message)
            raise remote
        return value

    def gather_to_main(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` on rank 0 (ordered by rank), None on the others. Move tensors
        to the CPU first: an object is unpickled onto the device it was sent from."""
        out: list[Any] | None = [None] * self.world if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def owner_rank(self, network: int) -> int:
        """The rank (replica 0) that owns ``network`` in network-parallel training."""
        return network * self.replicas

    def sync_networks(self, networks: nn.ModuleList) -> None:
        """Network-parallel: give every rank every network's current weights (each network
        broadcast from its owner), before rank 0 checkpoints or exports them."""
        if self.network is None:
            return
        for n, net in enumerate(networks):
            for t in [*net.parameters(), *net.buffers()]:
                dist.broadcast(t.data, src=self.owner_rank(n))

    def device_for_collectives(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) \
            if dist.get_backend() == "nccl" else torch.device("cpu")

    def barrier(self) -> None:
        dist.barrier()


def context(parallel: str = "data", num_networks: int = 1, device: str = "auto",
            timeout: float = 300.0) -> Distributed | None:
    """This process's :class:`Distributed` context, initialising the process group the first
    time (None in a single process). ``parallel=networks`` needs the world size to be a
    multiple of ``num_networks``."""
    global _CONTEXT
    if _CONTEXT is not None:
        return _CONTEXT
    if not launched():
        if parallel == "networks":
            raise ValueError("parallel=networks needs one process per network: launch with "
                             "torchrun --nproc-per-node N (N = the number of networks)")
        return None
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"parallel must be one of {PARALLEL_MODES}, got {parallel!r}")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        backend, wait = "nccl" if use_cuda else "gloo", timedelta(seconds=timeout)
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if attempt is not None and "MASTER_ADDR" in os.environ:
            # a restarted job (torchrun --max-restarts) must not read the peer addresses that
            # the previous attempt left in the rendezvous store: one key space per attempt
            agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                 world, is_master=not agent and rank == 0, timeout=wait)
            dist.init_process_group(backend, store=dist.PrefixStore(f"dcmkd/{attempt}", base),
                                    rank=rank, world_size=world, timeout=wait)
        else:
            dist.init_process_group(backend, timeout=wait)
        atexit.register(shutdown)   # a process group left alive can abort the interpreter
    networks = num_networks if parallel == "networks" else 1
    if world % networks:
        raise ValueError(f"parallel=networks: {world} processes cannot hold {networks} "
                         f"networks equally (use a multiple of {networks})")
    replicas = world // networks
    wait = timedelta(seconds=timeout)
    # rank = network · replicas + replica; every rank creates every group, in the same order
    data_group = _subgroup([[n * replicas + d for d in range(replicas)]
                            for n in range(networks)], world, wait)
    network_group = _subgroup([[n * replicas + d for n in range(networks)]
                               for d in range(replicas)], world, wait)
    _CONTEXT = Distributed(
        rank, world, local_rank, networks, replicas,
        network=rank // replicas if parallel == "networks" else None, replica=rank % replicas,
        data_group=data_group, network_group=network_group, mode=parallel)
    return _CONTEXT


def in_turn(ctx: Distributed | None, make: Callable[[], Any]) -> Any:
    """``make()`` on rank 0 first, then on the first rank of every other node, then on the
    rest: data that a process downloads, extracts or caches are prepared once per file
    system, before the other processes read them. An error is raised after the turns, so
    no rank waits for one that failed."""
    if ctx is None:
        return make()
    turn = 0 if ctx.rank == 0 else 1 if ctx.local_rank == 0 else 2
    result, error = None, None
    for t in range(3):
        if t == turn:
            try:
                result = make()
            except Exception as e:  # noqa: BLE001 - raised after the last turn
                error = e
        dist.barrier()
    if error is not None:
        raise error
    return result


def _subgroup(rank_lists: list[list[int]], world: int, timeout: timedelta) -> Any:
    """This rank's group among ``rank_lists`` (one list per group), with ``timeout`` (torch's
    own default, 10 or 30 minutes, would apply to a subgroup otherwise); the default group
    when one list holds every rank."""
    if len(rank_lists[0]) == world:
        return dist.group.WORLD
    group, _ = dist.new_subgroups_by_enumeration(rank_lists, timeout=timeout)
    return group


def device_of(ctx: Distributed | None, name: str) -> str:
    """The device a rank trains on: its own GPU under torchrun (cuda:LOCAL_RANK); an explicit
    ``cuda:N`` would put every rank on one GPU and is refused."""
    if ctx is None:
        return name
    if name.startswith("cuda:"):
        raise ValueError(f"device={name}: under torchrun each process takes the GPU of its "
                         "local rank; use device=cuda (or auto), and CUDA_VISIBLE_DEVICES to "
                         "choose the GPUs")
    if name in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{ctx.local_rank}"
    return name


class _AllReduceSum(torch.autograd.Function):
    """A sum over a process group that autograd sees through: the gradient of a sum of the
    ranks' inputs with respect to each input is the sum of the ranks' output gradients."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:  # noqa: D102
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: D102
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class GroupBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training statistics are those of the batch of every rank of
    ``group``: the same forward and backward as one process on the whole batch. For devices
    without torch's fused ``SyncBatchNorm`` (which needs a GPU): the per-channel sums are
    all-reduced with a differentiable all-reduce, so autograd all-reduces their gradients
    too. The sums and the variance ``E[x²] − mean²`` are formed in float64, as torch's own CPU
    BatchNorm accumulates: in float32 that difference cancels catastrophically where a
    channel's mean is large beside its spread (mean/std = 100 already costs 3 digits), which
    made the synchronised statistics, not only their order of summation, differ from one
    process's. Evaluation uses the running statistics, as BatchNorm."""

    def __init__(self, *args: Any, group: Any = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or dist.get_world_size(self.group) == 1:
            return super().forward(x)
        c = x.shape[1]
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        xd = xf.double()
        local = torch.cat([xd.sum((0, 2, 3)), (xd * xd).sum((0, 2, 3)),
                           xd.new_tensor([x.numel() / c])])
        total = _AllReduceSum.apply(local, self.group)
        count = total[-1]
        mean64 = total[:c] / count
        var64 = (total[c:2 * c] / count - mean64 * mean64).clamp_min(0)
        mean = mean64.to(xf.dtype)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else \
                    1.0 / float(self.num_batches_tracked)
                unbiased = (var64 * count / (count - 1).clamp_min(1)).to(xf.dtype)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.detach(), alpha=m)
        invstd = torch.rsqrt(var64 + self.eps).to(xf.dtype)
        y = (xf - mean[None, :, None, None]) * invstd[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module, group: Any, cuda: bool) -> nn.Module:
    """Every ``BatchNorm2d`` of ``module`` synchronised over ``group``: torch's
    ``SyncBatchNorm`` on GPUs, :class:`GroupBatchNorm2d` elsewhere. The modules change class
    in place (same parameters, statistics and identity), so a method that holds references to
    its networks' layers (SSKD's stage partitions) runs the synchronised ones. Returns
    ``module``."""
    for m in module.modules():
        if type(m) is nn.BatchNorm2d:
            if cuda:
                m.__class__ = nn.SyncBatchNorm
                m.process_group = group
            else:
                m.__class__ = GroupBatchNorm2d
                m.group = group
    return module


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Every synchronised BatchNorm of ``module`` back to a plain ``BatchNorm2d`` (in place,
    weights and statistics kept): for exporting trained networks."""
    for m in module.modules():
        if type(m) in (nn.SyncBatchNorm, GroupBatchNorm2d):
            m.__class__ = nn.BatchNorm2d
            for attr in ("process_group", "group"):
                m.__dict__.pop(attr, None)
    return module


def wrap_data_parallel(ctx: Distributed, module: nn.Module) -> nn.Module:
    """``module`` (a trainable network) in DistributedDataParallel over this rank's data
    replicas; counts the bytes each gradient all-reduce sends."""
    device_ids = [ctx.local_rank] if next(module.parameters()).is_cuda else None
    ddp = nn.parallel.DistributedDataParallel(module, device_ids=device_ids,
                                              process_group=ctx.data_group)

    def counting_allreduce(state, bucket):  # no annotations: DDP inspects them at runtime
        buf = bucket.buffer()
        ctx.bytes_sent["all_reduce"] += buf.numel() * buf.element_size()
        buf.div_(ctx.replicas)
        return dist.all_reduce(buf, group=ctx.data_group, async_op=True).get_future().then(
            lambda fut: fut.value()[0])

    ddp.register_comm_hook(None, counting_allreduce)
    return ddp


def allreduce_gradients(ctx: Distributed, params: Sequence[nn.Parameter]) -> None:
    """Average the gradients over the data replicas (for methods whose step does not go
    through a DDP-wrapped network: SSKD's stages, the feature baselines)."""
    grads = [p.grad for p in params if p.grad is not None]
    if ctx.replicas == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    ctx.bytes_sent["all_reduce"] += flat.numel() * flat.element_size()
    dist.all_reduce(flat, group=ctx.data_group)
    flat /= ctx.replicas
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def shutdown() -> None:
    global _CONTEXT
    if dist.is_initialized():
        dist.destroy_process_group()
    _CONTEXT = None


__all__ = ["Distributed", "context", "in_turn", "launched", "device_of", "wrap_data_parallel",
           "allreduce_gradients", "convert_sync_batchnorm", "revert_sync_batchnorm",
           "GroupBatchNorm2d", "shutdown",
           "PARALLEL_MODES"]

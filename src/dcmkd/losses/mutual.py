"""The dense mutual-distillation loss of DCM (Eq. 6–9) as a 0/1 link matrix, for N ≥ 2 networks.

Nodes are (network, classifier) pairs; classifier 0 is the backbone's own C1, then C2, C3, …
A link ``(m, i) → (n, j)`` means classifier j of network n learns from classifier i of network m:

    L_n = CE(z[n][0], y)                                   # L_c
        + α · Σ_{c ≥ 1} CE(z[n][c], y)                     # L_ds, Eq. 7
        + β · Σ_{links (m,c)→(n,c)}  KD(P[m][c] → P[n][c]) # L_dcm1, Eq. 8 (same-staged)
        + γ · Σ_{links (m,i)→(n,j), i≠j} KD(P[m][i] → P[n][j])  # L_dcm2, Eq. 9 (different-staged)

with P = softmax(z / T) (Eq. 3) and KD the soft cross-entropy of Eq. 2, whose target is detached,
so network n receives gradient only from its own L_n (Algorithm 1, step 4). Eq. 5 (KL, DML) has
the same gradient as Eq. 2; the values reported are KL, so a perfect match reads 0
(``divergence="ce"`` reports Eq. 2's values instead). No link joins two classifiers of the same
network. DML, DML+DS, DCM-1, DCM-2, DCM and KD are all link matrices (SPEC.md §1):
:meth:`LinkMatrix.build`.

All pairwise terms come from one batched contraction over the stacked log-probabilities, so the
cost does not grow with Python loops over the (N·K)² pairs.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from dcmkd.registry import check_choice

LINK_PATTERNS = ("none", "final", "same", "cross", "dense")
REDUCTIONS = ("sum", "mean")


@dataclass(frozen=True)
class LinkMatrix:
    """0/1 links over (network, classifier) nodes; ``links[a, b] = 1``: node b learns from a."""

    num_classifiers: tuple[int, ...]
    links: torch.Tensor  # bool, [num_nodes, num_nodes]

    @property
    def nodes(self) -> list[tuple[int, int]]:
        return [(n, c) for n, k in enumerate(self.num_classifiers) for c in range(k)]

    @classmethod
    def build(cls, num_classifiers: Sequence[int], pattern: str = "dense",
              frozen: Iterable[int] = ()) -> "LinkMatrix":
        """Links of a named pattern between every pair of distinct networks.

        - ``none``: no link (independent training, DS)
        - ``final``: C1 ↔ C1 only (DML, DML+DS; KD with a frozen network)
        - ``same``: Ci ↔ Ci for every i both networks have (DCM-1, Eq. 8)
        - ``cross``: Ci ↔ Cj, i ≠ j (DCM-2, Eq. 9)
        - ``dense``: same + cross (DCM, Eq. 6)

        A ``frozen`` network (a KD teacher) receives no link: knowledge flows one way.
        """
        check_choice("link pattern", pattern, LINK_PATTERNS)
        frozen = set(frozen)
        nodes = [(n, c) for n, k in enumerate(num_classifiers) for c in range(k)]
        links = torch.zeros(len(nodes), len(nodes), dtype=torch.bool, device="cpu")
        for a, (m, i) in enumerate(nodes):
            for b, (n, j) in enumerate(nodes):
                if m == n or n in frozen:
                    continue
                links[a, b] = {"none": False, "final": i == 0 and j == 0, "same": i == j,
                               "cross": i != j, "dense": True}[pattern]
        matrix = cls(tuple(num_classifiers), links)
        matrix.blocks  # noqa: B018 - computed once here, never inside a training step
        return matrix

    @functools.cached_property
    def blocks(self) -> list[NetworkLinks]:
        """Per receiving network: its node indices and which kinds of links reach it, as
        Python values (so the loss makes no host read of a device tensor)."""
        nodes, links = self.nodes, self.links.tolist()
        out = []
        for n in range(len(self.num_classifiers)):
            idx = [b for b, (m, _) in enumerate(nodes) if m == n]
            pairs = [(a, b) for a in range(len(nodes)) for b in idx if links[a][b]]
            out.append(NetworkLinks(
                tuple(idx), bool(pairs),
                any(nodes[a][1] == nodes[b][1] for a, b in pairs),
                any(nodes[a][1] != nodes[b][1] for a, b in pairs)))
        return out

    def masks(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(links, same_stage)`` as bool tensors on ``device`` (copied there once)."""
        cache = self.__dict__.setdefault("_masks", {})
        if device not in cache:
            nodes = self.nodes
            same = torch.tensor([[i == j for (_, j) in nodes] for (_, i) in nodes], device="cpu")
            cache[device] = (self.links.to(device), same.to(device))
        return cache[device]

    def count(self) -> dict[str, int]:
        """Number of same-staged and different-staged links."""
        nodes = self.nodes
        same = sum(1 for a, b in self.links.nonzero().tolist() if nodes[a][1] == nodes[b][1])
        return {"same": same, "cross": int(self.links.sum()) - same}


@dataclass(frozen=True)
class NetworkLinks:
    """The links that reach one network: its node indices and whether any, any same-staged and
    any different-staged link arrive."""

    nodes: tuple[int, ...]
    any: bool
    same: bool
    cross: bool


@dataclass
class MutualLoss:
    """Result of :func:`mutual_distillation_loss`.

    ``per_network[n]`` maps term names (``ce``, ``ds``, ``dcm1``, ``dcm2``; only those present)
    to scalars whose sum is L_n; ``pairwise`` is the [nodes, nodes] matrix of unweighted
    divergences KD(P[a] → P[b]) (detached; zero where there is no link); ``ce`` the unweighted
    cross-entropy of every node (detached).
    """

    per_network: list[dict[str, torch.Tensor]]
    pairwise: torch.Tensor
    ce: torch.Tensor
    links: LinkMatrix

    def total(self, network: int) -> torch.Tensor:
        return sum(self.per_network[network].values())  # type: ignore[return-value]


def _cross_entropy(z: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0
                   ) -> torch.Tensor:
    return F.cross_entropy(z, targets, label_smoothing=label_smoothing)


def mutual_distillation_loss(logits: Sequence[Sequence[torch.Tensor]], targets: torch.Tensor,
                             links: LinkMatrix, alpha: float = 1.0, beta: float = 1.0,
                             gamma: float = 1.0, temperature: float = 1.0,
                             divergence: str = "kl", t2_scaling: bool = False,
                             label_smoothing: float = 0.0,
                             reduction: str = "sum",
                             criterion: Callable[..., torch.Tensor] | None = None
                             ) -> MutualLoss:
    """DCM Eq. 6–9 for ``logits[n][c]`` (network n, classifier c; [B, classes] each).

    Defaults are the paper's: α = β = γ = T = 1, plain sums, no T² scaling. Computation is in
    float32 whatever the logits' dtype.

    ``reduction="mean"`` (beyond the paper) averages the distillation terms each classifier
    receives over its sources instead of summing them: in DCM of two networks with three
    classifiers each, a classifier then gets CE + the mean of its 3 KL terms (the CE : KL balance
    of DML) instead of CE + their sum (Eq. 8 and 9 as printed). DML and KD, with one source per
    classifier, are unchanged.

    ``criterion(logits, targets, label_smoothing)``: the supervised term of each classifier
    (default cross-entropy; a face task's margin loss, :meth:`dcmkd.tasks.face.Face.criterion`).
    """
    check_choice("divergence", divergence, ("kl", "ce"))
    check_choice("distillation reduction", reduction, REDUCTIONS)
    if tuple(len(z) for z in logits) != links.num_classifiers:
        raise ValueError(f"logits have {[len(z) for z in logits]} classifiers per network, "
                         f"the link matrix {list(links.num_classifiers)}")
    # Each network's terms are built from its own logits only: indexing a tensor stacked over
    # all networks would send zero gradients (not None) to the peers.
    own = [torch.stack([z.float() for z in net]) for net in logits]   # [K_n, B, C] per network
    flat = torch.cat(own).detach()                                     # every node, as targets
    nodes = links.nodes
    batch = flat.shape[1]
    supervised = criterion or _cross_entropy
    ce_per_net = [[supervised(z, targets, label_smoothing) for z in zs] for zs in own]
    ce = torch.stack([c.detach() for cs in ce_per_net for c in cs])

    links_dev, same_stage = links.masks(flat.device)
    blocks = links.blocks
    if any(b.any for b in blocks):
        log_p = F.log_softmax(flat / temperature, dim=-1)   # targets, detached (Eq. 3)
        p = log_p.exp()
        entropy = -(p * log_p).sum(-1).mean(-1)                       # Eq. 5 = Eq. 2 − H(p)
    pairwise = torch.zeros(len(nodes), len(nodes), device=flat.device)
    per_network: list[dict[str, torch.Tensor]] = []
    for n, net_links in enumerate(blocks):
        idx = list(net_links.nodes)
        terms = {"ce": ce_per_net[n][0]}
        if len(idx) > 1:
            terms["ds"] = alpha * torch.stack(ce_per_net[n][1:]).sum()
        if net_links.any:
            incoming = links_dev[:, idx]
            # Only network n's own log-probabilities enter its block, so no gradient (not even
            # a zero one) reaches a peer: cross[a, j] = -(1/B) Σ_x Σ_m p_a log q_j  (Eq. 2)
            log_q = F.log_softmax(own[n] / temperature, dim=-1)
            cross = -torch.einsum("abc,jbc->aj", p, log_q) / batch
            if divergence == "kl":
                cross = cross - entropy[:, None]
            if t2_scaling:
                cross = cross * temperature ** 2
            block = torch.where(incoming, cross, torch.zeros_like(cross))
            pairwise[:, idx] = block.detach()
            if reduction == "mean":  # each classifier's sources averaged, not summed
                block = block / incoming.sum(0).clamp_min(1)
            same = same_stage[:, idx]
            if net_links.same:
                terms["dcm1"] = beta * (block * same).sum()
            if net_links.cross:
                terms["dcm2"] = gamma * (block * ~same).sum()
        per_network.append(terms)
    return MutualLoss(per_network, pairwise, ce, links)

"""Face verification on a list of image pairs: LFW's protocol (Huang, Ramesh, Berg,
Learned-Miller, "Labeled Faces in the Wild: A Database for Studying Face Recognition in
Unconstrained Environments", UMass Amherst technical report 07-49, 2007, Sec. 4: View 2,
10-fold cross-validation).

A pair's score is the cosine similarity of its two embeddings (:func:`pair_scores`); it is
called "same person" when the score is at or above a threshold. For each fold of the pairs file
the threshold is chosen on the *other* folds (the one with the best accuracy there,
:func:`best_threshold`) and applied to this fold; the report gives the mean of the fold
accuracies and their spread (:func:`evaluate_pairs`), plus the verification ROC over all pairs:
TAR at FAR (:func:`dcmkd.metrics.face.tar_at_far`) and its area.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple, Sequence

import numpy as np

from dcmkd.metrics.face import _array, _features, _far_key, l2_normalize, mean_std, tar_at_far


class Threshold(NamedTuple):
    """A decision threshold (accept ``score >= value``) and its accuracy (fraction) on the
    pairs it was chosen on."""
    value: float
    accuracy: float


def pair_scores(features: Any, index: Any) -> np.ndarray:
    """Cosine similarity of each pair: ``features`` ``[U, D]`` (one row per image, any scale),
    ``index`` ``[P, 2]`` the rows of the two images of each pair. ``[P]`` float64."""
    f = l2_normalize(_features(features, "features").astype(np.float64))
    idx = _array(index, "pair index", 2)
    if idx.shape[1] != 2 or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"pair index must be integers of shape [pairs, 2], got {idx.dtype} "
                         f"{idx.shape}")
    if idx.size and (idx.min() < 0 or idx.max() >= f.shape[0]):
        raise ValueError(f"pair index names row {int(idx.max())} of {f.shape[0]} features")
    return np.einsum("ij,ij->i", f[idx[:, 0]], f[idx[:, 1]])


def _checked(scores: Any, same: Any) -> tuple[np.ndarray, np.ndarray]:
    s = _array(scores, "scores", 1).astype(np.float64)
    y = _array(same, "same", 1).astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"{s.shape[0]} scores for {y.shape[0]} pair labels")
    if s.size == 0:
        raise ValueError("no pair to verify")
    if not np.isfinite(s).all():
        raise ValueError("verification scores contain NaN or infinite values")
    return s, y


def accuracy_at(scores: Any, same: Any, threshold: float) -> float:
    """The fraction of pairs decided right at ``threshold``: genuine pairs scoring
    ``>= threshold`` plus impostor pairs scoring below it, over all pairs."""
    s, y = _checked(scores, same)
    return float(np.mean((s >= threshold) == y))


def best_threshold(scores: Any, same: Any) -> Threshold:
    """The threshold with the highest accuracy on ``scores``/``same`` (LFW's protocol leaves
    the choice of the threshold to the method: any rule that sees only the training folds).

    **Choice**: every distinct decision is tried, not a grid (insightface's and FaceNet's LFW
    code try a fixed grid, e.g. ``np.arange(0, 4, 0.01)`` of distances, which may miss the best
    cut between two close scores). With ``u_0 < … < u_{m-1}`` the distinct scores, the decisions
    are "accept the scores ``>= u_k``" for k = 0..m (k = m: reject all); decision k's threshold
    is the midpoint ``(u_{k-1} + u_k) / 2`` (the cut farthest from the scores on both sides),
    ``-inf`` for k = 0 (accept all) and ``+inf`` for k = m (reject all). Among decisions of equal
    accuracy the lowest threshold wins (the first ``argmax`` over ascending thresholds, as those
    grid searches do)."""
    s, y = _checked(scores, same)
    u = np.unique(s)
    genuine, impostor = np.sort(s[y]), np.sort(s[~y])
    # decision k accepts scores >= u_k: genuine accepted + impostors rejected
    accepted = genuine.size - np.searchsorted(genuine, u, side="left")
    rejected = np.searchsorted(impostor, u, side="left")
    correct = np.append(accepted + rejected, impostor.size)   # k = m: reject all
    k = int(np.argmax(correct))
    if k == 0:
        value = -math.inf
    elif k == u.size:
        value = math.inf
    else:
        value = float((u[k - 1] + u[k]) / 2)
    return Threshold(value, float(correct[k] / s.size))


class FoldResult(NamedTuple):
    """One fold of :func:`fold_accuracies`: its label, the threshold chosen for it (on the other
    folds, or on itself for a one-fold file) and its accuracy (fraction) at that threshold."""
    fold: int
    threshold: float
    accuracy: float


def fold_accuracies(scores: Any, same: Any, folds: Any) -> list[FoldResult]:
    """LFW's 10-fold protocol (technical report 07-49, Sec. 4, View 2): for each fold (in
    ascending label order) the threshold of :func:`best_threshold` on the pairs of every other
    fold, and this fold's accuracy at it (:func:`accuracy_at`).

    **Choice** for a file of one fold (``pairsDevTest.txt``/``pairsDevTrain.txt`` style, whose
    threshold LFW's View 1 would choose on another file): the threshold is chosen on that fold
    itself, so its accuracy is the best achievable on those pairs, an *optimistic* estimate
    (:func:`evaluate_pairs` flags it and warns). Refusing would leave such a file unscored;
    taking a threshold from elsewhere needs a second file."""
    s, y = _checked(scores, same)
    f = _array(folds, "folds", 1)
    if f.shape != s.shape:
        raise ValueError(f"{f.shape[0]} fold labels for {s.shape[0]} pairs")
    labels = np.unique(f)
    out = []
    for fold in labels.tolist():
        test = f == fold
        train = ~test if labels.size > 1 else test
        t = best_threshold(s[train], y[train]).value
        out.append(FoldResult(int(fold), t, accuracy_at(s[test], y[test], t)))
    return out


def roc_auc(scores: Any, same: Any) -> float:
    """The area under the verification ROC of all pairs (scikit-learn's ``roc_auc_score``:
    tied scores count one half), a fraction."""
    from sklearn.metrics import roc_auc_score

    s, y = _checked(scores, same)
    if y.all() or not y.any():
        raise ValueError("a ROC needs genuine and impostor pairs")
    return float(roc_auc_score(y, s))


def evaluate_pairs(scores: Any, same: Any, folds: Any,
                   fars: Sequence[float] = (0.01, 0.001)) -> dict[str, Any]:
    """The LFW report of one model's pair scores, in percent.

    - ``"accuracy"``: the mean of the fold accuracies of :func:`fold_accuracies` (LFW's
      :math:`\\hat\\mu = \\sum_i p_i / 10`);
    - ``"accuracy_std"``: their sample standard deviation, ddof = 1 (LFW's
      :math:`\\hat\\sigma = \\sqrt{\\sum_i (p_i - \\hat\\mu)^2 / 9}`; :func:`~dcmkd.metrics.face.mean_std`,
      as the project's other tables. **Note**: insightface's and FaceNet's LFW scripts print
      ``np.std``, ddof = 0, smaller by :math:`\\sqrt{9/10}` for 10 folds);
    - ``"accuracy_se"``: the standard error of the mean :math:`S_E = \\hat\\sigma / \\sqrt{k}`,
      the "± S_E" of LFW's results tables;
    - ``"tar@far=0.01"``, ``"tar@far=0.001"``: TAR at FAR over all pairs of the file
      (:func:`~dcmkd.metrics.face.tar_at_far`, no threshold fitting: the ROC of the scores);
      ``None`` (not measured) where the FAR is below one over the impostor pairs;
    - ``"auc"``: the area under that ROC (:func:`roc_auc`);
    - ``"folds"`` (count), ``"fold_accuracy"`` and ``"thresholds"`` (per fold, ascending fold
      label; a threshold is ``None`` where the best one accepts or rejects every training pair,
      ±inf), ``"optimistic"``: True for a one-fold file (threshold chosen on the scored pairs,
      :func:`fold_accuracies`), then ``"accuracy_std"`` and ``"accuracy_se"`` are ``None``.
    """
    s, y = _checked(scores, same)
    per_fold = fold_accuracies(s, y, folds)
    accs = [100.0 * r.accuracy for r in per_fold]
    mean, std = mean_std([{"accuracy": a} for a in accs])["accuracy"]
    one = len(per_fold) == 1
    if one:
        warnings.warn("the pairs form one fold: its threshold is chosen on the same pairs it "
                      "scores, so the accuracy is optimistic (LFW's 10-fold pairs.txt chooses "
                      "each fold's threshold on the other nine)", stacklevel=2)
    out: dict[str, Any] = {"accuracy": mean, "accuracy_std": None if one else std,
                           "accuracy_se": None if one else std / math.sqrt(len(per_fold))}
    for far, tar in tar_at_far(s, y, fars).items():
        out[_far_key(far)] = None if math.isnan(tar) else 100.0 * tar
    out["auc"] = 100.0 * roc_auc(s, y)
    out.update({"folds": len(per_fold), "fold_accuracy": accs,
                "thresholds": [r.threshold if math.isfinite(r.threshold) else None
                               for r in per_fold],
                "optimistic": one})
    return out


__all__ = ["Threshold", "FoldResult", "pair_scores", "accuracy_at", "best_threshold",
           "fold_accuracies", "roc_auc", "evaluate_pairs"]

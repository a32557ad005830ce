"""Open-set face recognition metrics: verification (TAR at FAR) and identification (CMC).

Protocols:
- identity-folder test sets (:func:`evaluate_face`): verification over every pair of test
  images, identification with the first image of each identity as gallery;
- IJB-A (Klare et al., "Pushing the Frontiers of Unconstrained Face Detection and Recognition:
  IARPA Janus Benchmark A", CVPR 2015), the benchmark of the SSKD paper's Table 7: 1:1
  verification and 1:N search between templates, ten splits, mean and std (:func:`evaluate_ijba`,
  :func:`mean_std`).

Scores are cosine similarities of the embeddings (L2-normalised dot products); a pair is
accepted when its score is at or above the threshold.
"""
from __future__ import annotations

import csv
import math
import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import numpy as np
import torch

from dcmkd.data.faces import check_verifiable


def _array(x: Any, name: str, dims: int) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        x = x.numpy()
    a = np.asarray(x)
    if a.ndim != dims:
        raise ValueError(f"{name} must have {dims} dimension(s), got shape {a.shape}")
    return a


def _features(x: Any, name: str) -> np.ndarray:
    a = _array(x, name, 2)
    if not np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float64)
    elif a.dtype != np.float64:
        a = a.astype(np.float32)
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contain NaN or infinite values")
    return a


def _labels(x: Any, name: str, n: int) -> np.ndarray:
    a = _array(x, name, 1)
    if a.shape[0] != n:
        raise ValueError(f"{name} has {a.shape[0]} entries for {n} features")
    return a


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm (an all-zero row stays zero)."""
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, np.finfo(x.dtype).tiny)


def cosine_similarity_matrix(a: Any, b: Any) -> np.ndarray:
    """``[len(a), len(b)]`` cosine similarities between the rows of ``a`` and ``b`` (numpy or
    torch, computed in float32 unless the inputs are float64). A zero vector scores 0."""
    fa, fb = _features(a, "features a"), _features(b, "features b")
    if fa.shape[1] != fb.shape[1]:
        raise ValueError(f"feature sizes differ: {fa.shape[1]} vs {fb.shape[1]}")
    dtype = np.result_type(fa.dtype, fb.dtype)
    return l2_normalize(fa.astype(dtype)) @ l2_normalize(fb.astype(dtype)).T


def all_pairs(features: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Every unordered pair of distinct images (the upper triangle, ``i < j``, row-major):
    ``scores`` (cosine similarity) and ``same`` (True for a genuine pair, same identity)."""
    f = _features(features, "features")
    lab = _labels(labels, "labels", f.shape[0])
    sim = cosine_similarity_matrix(f, f)
    i, j = np.triu_indices(f.shape[0], k=1)
    return sim[i, j], lab[i] == lab[j]


def tar_at_far(scores: Any, same: Any, fars: Sequence[float] = (0.01, 0.001)) -> dict[float, float]:
    """True accept rate at each false accept rate, from scikit-learn's ROC of ``scores``.

    Rule: the highest TAR among the ROC's operating points whose FAR does not exceed the target
    (a threshold that keeps the false accepts within the budget; no interpolation between
    points). Tied scores are accepted or refused together, as a threshold must. (insightface's
    IJB code takes the ROC point whose FAR is *nearest* the target, which may exceed it; we do
    not let the FAR budget be overrun.)

    A FAR below ``1 / (number of impostor pairs)`` cannot be measured (no false accept fits the
    budget, the number would only say how many genuine pairs beat every impostor): it gives NaN
    and a warning naming the pairs needed. Fractions in [0, 1].
    """
    try:
        from sklearn.metrics import roc_curve
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("TAR at FAR needs scikit-learn: pip install 'dcmkd[train]'") from e

    s = _array(scores, "scores", 1).astype(np.float64)
    y = _array(same, "same", 1).astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"{s.shape[0]} scores for {y.shape[0]} pair labels")
    if not np.isfinite(s).all():
        raise ValueError("verification scores contain NaN or infinite values")
    n_gen, n_imp = int(y.sum()), int((~y).sum())
    if n_gen == 0 or n_imp == 0:
        raise ValueError(f"TAR at FAR needs genuine and impostor pairs, got {n_gen} genuine and "
                         f"{n_imp} impostor")
    fpr, tpr, _ = roc_curve(y, s)
    out: dict[float, float] = {}
    for far in fars:
        far = float(far)
        if not 0.0 < far <= 1.0:
            raise ValueError(f"a FAR must lie in (0, 1], got {far}")
        if n_imp * far < 1.0 - 1e-9:
            need = math.ceil(1 / far - 1e-9)
            warnings.warn(f"TAR at FAR={far:g} is NaN: it needs at least {need} "
                          f"impostor pairs, the test set has {n_imp}", stacklevel=2)
            out[far] = math.nan
            continue
        ok = fpr <= far + 1e-12
        out[far] = float(tpr[ok].max())
    return out


def _ranks(ranks: Iterable[int]) -> list[int]:
    out = []
    for r in ranks:
        if isinstance(r, bool) or int(r) != r or r < 1:
            raise ValueError(f"a rank must be a positive integer, got {r!r}")
        out.append(int(r))
    return out


def identification_rates(gallery: Any, gallery_labels: Any, probes: Any, probe_labels: Any,
                         ranks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Closed-set identification rate at each rank (the CMC curve), cosine similarity.

    Only probes whose identity is in the gallery count (IJB-A's search protocol also has
    non-mated probes; those belong to open-set metrics, not to Rank-k). An identity with several
    gallery entries scores by its best entry. A probe's rank is 1 + the number of *other*
    gallery identities scoring at least as high as its own (ties resolved pessimistically).
    Fractions in [0, 1].
    """
    g = _features(gallery, "gallery features")
    p = _features(probes, "probe features")
    gl = _labels(gallery_labels, "gallery labels", g.shape[0])
    pl = _labels(probe_labels, "probe labels", p.shape[0])
    ranks = _ranks(ranks)
    ids, g_idx = np.unique(gl, return_inverse=True)
    mated = np.isin(pl, ids)
    if not mated.any():
        raise ValueError("no probe identity is in the gallery: identification cannot be measured")
    p, pl = p[mated], pl[mated]
    sim = torch.from_numpy(np.ascontiguousarray(cosine_similarity_matrix(p, g)))
    best = torch.full((sim.shape[0], ids.size), -math.inf, dtype=sim.dtype)
    best.scatter_reduce_(1, torch.from_numpy(g_idx).long().expand(sim.shape[0], -1), sim,
                         reduce="amax")
    own = torch.from_numpy(np.searchsorted(ids, pl)).long()
    own_score = best.gather(1, own[:, None])
    rank = (best >= own_score).sum(1)  # counts the own identity once: 1 + others >= own
    return {r: float((rank <= r).double().mean()) for r in ranks}


def open_set_gallery_split(labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Gallery and probe indices for an identity-folder test set: the first image (lowest index,
    i.e. the first file name in sorted order) of each identity is its gallery entry, every other
    image is a probe. An identity with one image is a gallery entry only (a distractor)."""
    lab = _array(labels.cpu() if isinstance(labels, torch.Tensor) else labels, "labels", 1)
    _, first = np.unique(lab, return_index=True)
    is_gallery = np.zeros(lab.shape[0], dtype=bool)
    is_gallery[first] = True
    return np.flatnonzero(is_gallery), np.flatnonzero(~is_gallery)


def _far_key(far: float) -> str:
    return f"tar@far={far:g}"


def evaluate_face(features: Any, labels: Any, fars: Sequence[float] = (0.01, 0.001),
                  ranks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """The identity-folder open-set protocol: verification over all pairs of test images
    (:func:`all_pairs`, :func:`tar_at_far`) and identification of every non-first image of an
    identity against a gallery of first images (:func:`open_set_gallery_split`,
    :func:`identification_rates`). Keys ``"tar@far=0.01"``, ``"tar@far=0.001"``, ``"rank1"``,
    ``"rank5"``; values in percent (NaN where a FAR needs more impostor pairs than there are)."""
    f = _features(features, "features")
    lab = _labels(labels.cpu() if isinstance(labels, torch.Tensor) else labels, "labels",
                  f.shape[0])
    check_verifiable(lab)
    scores, same = all_pairs(f, lab)
    out = {_far_key(k): 100.0 * v for k, v in tar_at_far(scores, same, fars).items()}
    gal, pro = open_set_gallery_split(lab)
    rates = identification_rates(f[gal], lab[gal], f[pro], lab[pro], ranks)
    out.update({f"rank{r}": 100.0 * v for r, v in rates.items()})
    return out


# ----------------------------------------------------------------------------- IJB-A

#: columns of IJB-A's metadata files that we read (the files have more: SIGHTING_ID, FRAME,
#: FACE_X, FACE_Y, FACE_WIDTH, FACE_HEIGHT, landmarks, attributes)
IJBA_COLUMNS = ("TEMPLATE_ID", "SUBJECT_ID", "FILE", "MEDIA_ID")


#: the face box columns of IJB-A's metadata (pixels: left, top, width, height), read when present
IJBA_BOX_COLUMNS = ("FACE_X", "FACE_Y", "FACE_WIDTH", "FACE_HEIGHT")


class IjbaRows(NamedTuple):
    """One IJB-A metadata file (``verify_metadata_k``, ``search_gallery_k``,
    ``search_probe_k``): one row per face sighting. ``boxes``: ``[N, 4]`` face boxes
    (x, y, width, height) when the file has the :data:`IJBA_BOX_COLUMNS` (a row whose four box
    fields are all empty: NaN, no box), else None."""
    template_ids: np.ndarray
    subject_ids: np.ndarray
    files: list[str]
    media_ids: np.ndarray
    sighting_ids: list[str]
    boxes: np.ndarray | None = None


def read_ijba_metadata(path: str | os.PathLike) -> IjbaRows:
    """An IJB-A metadata CSV: a header naming at least TEMPLATE_ID, SUBJECT_ID, FILE, MEDIA_ID
    (SIGHTING_ID is read when present), then one row per face sighting. A template with rows of
    two subjects is an error."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"IJB-A metadata file {path} does not exist")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [c.strip().upper() for c in next(reader, [])]
        missing = [c for c in IJBA_COLUMNS if c not in header]
        if missing:
            raise ValueError(f"IJB-A metadata file {path} lacks the column(s) {', '.join(missing)} "
                             f"(header: {','.join(header) or 'none'})")
        col = {c: header.index(c) for c in IJBA_COLUMNS}
        sighting = header.index("SIGHTING_ID") if "SIGHTING_ID" in header else None
        box_cols = ([header.index(c) for c in IJBA_BOX_COLUMNS]
                    if all(c in header for c in IJBA_BOX_COLUMNS) else None)
        tids, sids, files, mids, sights, boxes = [], [], [], [], [], []
        subject_of: dict[int, int] = {}
        for line, row in enumerate(reader, start=2):
            if not any(c.strip() for c in row):
                continue
            try:
                if len(row) < len(header):
                    raise ValueError(f"{len(row)} fields for {len(header)} columns")
                t, s, m = (int(row[col[c]]) for c in ("TEMPLATE_ID", "SUBJECT_ID", "MEDIA_ID"))
            except ValueError as e:
                raise ValueError(f"IJB-A metadata file {path} line {line}: expected integer "
                                 f"TEMPLATE_ID, SUBJECT_ID, MEDIA_ID ({e})") from None
            if box_cols is not None and not any(row[c].strip() for c in box_cols):
                boxes.append([math.nan] * 4)   # a sighting without a box: the image uncropped
            elif box_cols is not None:
                try:
                    box = [float(row[c]) for c in box_cols]
                except ValueError:
                    box = [math.nan]
                if not all(math.isfinite(v) for v in box) or box[2] <= 0 or box[3] <= 0:
                    raise ValueError(f"IJB-A metadata file {path} line {line}: expected a face "
                                     f"box FACE_X, FACE_Y, FACE_WIDTH > 0, FACE_HEIGHT > 0, got "
                                     f"{','.join(row[c] for c in box_cols)}")
                boxes.append(box)
            if subject_of.setdefault(t, s) != s:
                raise ValueError(f"IJB-A metadata file {path} line {line}: template {t} has rows "
                                 f"of subjects {subject_of[t]} and {s}")
            tids.append(t)
            sids.append(s)
            mids.append(m)
            files.append(row[col["FILE"]].strip())
            sights.append(row[sighting].strip() if sighting is not None else "")
    if not tids:
        raise ValueError(f"IJB-A metadata file {path} has no row")
    return IjbaRows(np.array(tids, dtype=np.int64), np.array(sids, dtype=np.int64), files,
                    np.array(mids, dtype=np.int64), sights,
                    np.array(boxes, dtype=np.float64) if box_cols is not None else None)


def read_ijba_comparisons(path: str | os.PathLike) -> np.ndarray:
    """IJB-A's ``verify_comparisons_k.csv``: one template pair ``TEMPLATE_ID,TEMPLATE_ID`` a
    line, no header (a non-numeric first line is skipped as one). ``[pairs, 2]`` int64."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"IJB-A comparisons file {path} does not exist")
    pairs = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        for line, row in enumerate(csv.reader(f), start=1):
            row = [c.strip() for c in row if c.strip()]
            if not row:
                continue
            try:
                if len(row) != 2:
                    raise ValueError
                pairs.append((int(row[0]), int(row[1])))
            except ValueError:
                if line == 1 and not pairs:
                    continue
                raise ValueError(f"IJB-A comparisons file {path} line {line}: expected "
                                 f"'template_id,template_id', got {','.join(row)!r}") from None
    if not pairs:
        raise ValueError(f"IJB-A comparisons file {path} has no template pair")
    return np.array(pairs, dtype=np.int64)


def pool_templates(features: Any, template_ids: Any, media_ids: Any,
                   normalize_images: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Template features by media pooling: ``(sorted unique template ids, [T, D] features)``.

    The practice of insightface's IJB evaluation (``recognition/_evaluation_/ijb/ijb_11.py`` and
    ``ijb_1n.py``, ``image2template_feature``, written for IJB-B/C, whose templates have the
    same TEMPLATE_ID/MEDIA_ID structure as IJB-A's; the SSKD paper does not say how it pooled):
    (1) each image feature is L2-normalised (``normalize_images``, insightface's default), (2) the
    features of one media (a still image, or the frames of one video, IJB-A's MEDIA_ID) are
    averaged, so a long video weighs as much as one photo, (3) the media features of a template
    are averaged (insightface sums them; the direction is the same) and (4) L2-normalised.
    """
    f = _features(features, "features").astype(np.float64)
    t = _labels(template_ids, "template ids", f.shape[0]).astype(np.int64)
    m = _labels(media_ids, "media ids", f.shape[0]).astype(np.int64)
    if normalize_images:
        f = l2_normalize(f)
    tpl, t_idx = np.unique(t, return_inverse=True)
    tm, tm_idx = np.unique(np.stack([t_idx, m], 1), axis=0, return_inverse=True)
    tm_idx = tm_idx.reshape(-1)
    media = np.zeros((tm.shape[0], f.shape[1]))
    np.add.at(media, tm_idx, f)
    media /= np.bincount(tm_idx, minlength=tm.shape[0])[:, None]
    pooled = np.zeros((tpl.size, f.shape[1]))
    np.add.at(pooled, tm[:, 0], media)
    pooled /= np.bincount(tm[:, 0], minlength=tpl.size)[:, None]
    return tpl, l2_normalize(pooled)


def ijba_split_files(protocol_root: str | os.PathLike, split: int) -> dict[str, Path]:
    """The four protocol files of IJB-A split ``split`` (1..10). IJB-A's release layout:
    ``IJB-A_11_sets/split<k>/verify_metadata_<k>.csv``, ``.../verify_comparisons_<k>.csv`` and
    ``IJB-A_1N_sets/split<k>/search_gallery_<k>.csv``, ``.../search_probe_<k>.csv`` (the
    ``train_<k>.csv`` beside them is unused: the paper trains on CASIA-WebFace). A flat
    ``split<k>/`` folder, or the root itself, holding all four is accepted too."""
    root = Path(protocol_root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"IJB-A protocol folder {root} does not exist")
    k = int(split)
    names = {"verify_metadata": ("IJB-A_11_sets", f"verify_metadata_{k}.csv"),
             "verify_comparisons": ("IJB-A_11_sets", f"verify_comparisons_{k}.csv"),
             "search_gallery": ("IJB-A_1N_sets", f"search_gallery_{k}.csv"),
             "search_probe": ("IJB-A_1N_sets", f"search_probe_{k}.csv")}
    out = {}
    for key, (sets, name) in names.items():
        tried = [root / sets / f"split{k}" / name, root / f"split{k}" / name, root / name]
        found = next((p for p in tried if p.is_file()), None)
        if found is None:
            raise FileNotFoundError(f"IJB-A split {k}: {name} not found (looked for "
                                    f"{', '.join(str(p) for p in tried)})")
        out[key] = found
    return out


def _row_features(features_by_file: Mapping[Any, Any], rows: IjbaRows, path: Path,
                  key: str) -> np.ndarray:
    out = []
    for i, (name, sid) in enumerate(zip(rows.files, rows.sighting_ids)):
        k = name if key == "file" else sid
        v = features_by_file.get(k)
        if v is None and key == "sighting" and sid.isdigit():
            v = features_by_file.get(int(sid))
        if v is None:
            raise ValueError(f"no feature for {key.upper()} {k!r} ({path.name}, row {i + 1})")
        out.append(np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v,
                              dtype=np.float64).reshape(-1))
    try:
        return np.stack(out)
    except ValueError:
        raise ValueError(f"features of {path.name} differ in size") from None


def evaluate_ijba(features_by_file: Mapping[Any, Any], protocol_root: str | os.PathLike,
                  split: int, fars: Sequence[float] = (0.01, 0.001),
                  ranks: Sequence[int] = (1, 5), key: str = "file") -> dict[str, float]:
    """IJB-A 1:1 verification and 1:N identification for one split, in percent.

    ``features_by_file`` maps each sighting's FILE value (e.g. ``"img/27.jpg"``,
    ``"frame/30000_00001.png"``) to its embedding, or, with ``key="sighting"``, its SIGHTING_ID
    (the usual way when one image holds several annotated faces and crops are saved per
    sighting). Templates are pooled with :func:`pool_templates`; verification scores the
    comparison list of ``verify_comparisons_<k>.csv`` (genuine when both templates have one
    subject), identification ranks each mated probe template against the gallery templates.
    Keys as :func:`evaluate_face`: ``"tar@far=0.01"``, ``"tar@far=0.001"``, ``"rank1"``,
    ``"rank5"``.
    """
    if key not in ("file", "sighting"):
        raise ValueError(f"key must be 'file' or 'sighting', got {key!r}")
    files = ijba_split_files(protocol_root, split)
    meta = read_ijba_metadata(files["verify_metadata"])
    tpl, pooled = pool_templates(_row_features(features_by_file, meta, files["verify_metadata"],
                                               key), meta.template_ids, meta.media_ids)
    subject = dict(zip(meta.template_ids.tolist(), meta.subject_ids.tolist()))
    pairs = read_ijba_comparisons(files["verify_comparisons"])
    unknown = [t for t in np.unique(pairs).tolist() if t not in subject]
    if unknown:
        raise ValueError(f"{files['verify_comparisons'].name} compares template {unknown[0]}, "
                         f"which {files['verify_metadata'].name} does not define")
    a, b = np.searchsorted(tpl, pairs[:, 0]), np.searchsorted(tpl, pairs[:, 1])
    scores = np.einsum("ij,ij->i", pooled[a], pooled[b])
    same = np.array([subject[x] == subject[y] for x, y in pairs.tolist()])
    out = {_far_key(k): 100.0 * v for k, v in tar_at_far(scores, same, fars).items()}

    sides = []
    for name in ("search_gallery", "search_probe"):
        rows = read_ijba_metadata(files[name])
        t, feat = pool_templates(_row_features(features_by_file, rows, files[name], key),
                                 rows.template_ids, rows.media_ids)
        subj = dict(zip(rows.template_ids.tolist(), rows.subject_ids.tolist()))
        sides.append((feat, np.array([subj[x] for x in t.tolist()])))
    (g, gl), (p, pl) = sides
    rates = identification_rates(g, gl, p, pl, ranks)
    out.update({f"rank{r}": 100.0 * v for r, v in rates.items()})
    return out


class IjbaSighting(NamedTuple):
    """One face of IJB-A to embed: its image file (the FILE column) and face box (x, y, width,
    height; None when the metadata has no box columns: the file is a face crop already)."""
    file: str
    box: tuple[float, float, float, float] | None


def ijba_sightings(protocol_root: str | os.PathLike, splits: Sequence[int]
                   ) -> tuple[str, dict[str, IjbaSighting]]:
    """Every face the protocol files of ``splits`` use, once: ``(key, {key value: sighting})``.
    ``key`` is ``"sighting"`` (the SIGHTING_ID column, IJB-A's own) when every row of every file
    has one, else ``"file"``; the values are what :func:`evaluate_ijba` looks features up by.
    A key seen with two different files or boxes is an error naming it."""
    rows_of = []
    for k in splits:
        files = ijba_split_files(protocol_root, k)
        for name in ("verify_metadata", "search_gallery", "search_probe"):
            rows_of.append((files[name], read_ijba_metadata(files[name])))
    key = "sighting" if all(all(rows.sighting_ids) for _, rows in rows_of) else "file"
    out: dict[str, IjbaSighting] = {}
    for path, rows in rows_of:
        for i, (file, sid) in enumerate(zip(rows.files, rows.sighting_ids)):
            box = None if rows.boxes is None or np.isnan(rows.boxes[i]).any() else \
                tuple(float(v) for v in rows.boxes[i])
            face = IjbaSighting(file, box)   # type: ignore[arg-type]
            name = sid if key == "sighting" else file
            if out.setdefault(name, face) != face:
                what = "SIGHTING_ID" if key == "sighting" else "FILE (no SIGHTING_ID column)"
                raise ValueError(f"IJB-A {what} {name!r} is {out[name]} in one protocol file and "
                                 f"{face} in {path}: one face per "
                                 + ("sighting" if key == "sighting" else
                                    "file, or give every row a SIGHTING_ID"))
    unboxed = sum(face.box is None for face in out.values())
    if unboxed and any(rows.boxes is not None for _, rows in rows_of):
        warnings.warn(f"{unboxed} of the {len(out)} IJB-A faces have no box in the metadata: "
                      "their images are used uncropped", stacklevel=2)
    return key, out


def evaluate_ijba_splits(features_by_key: Mapping[Any, Any], protocol_root: str | os.PathLike,
                         splits: Sequence[int], key: str = "file",
                         fars: Sequence[float] = (0.01, 0.001), ranks: Sequence[int] = (1, 5)
                         ) -> dict[str, tuple[float, float]]:
    """The SSKD paper's Table 7 protocol: :func:`evaluate_ijba` on each of ``splits`` (IJB-A:
    1..10), then ``{metric: (mean, std)}`` over the splits (:func:`mean_std`)."""
    return mean_std([evaluate_ijba(features_by_key, protocol_root, k, fars, ranks, key)
                     for k in splits])


def mean_std(results: Sequence[Mapping[str, float]]) -> dict[str, tuple[float, float]]:
    """``{metric: (mean, std)}`` over splits (IJB-A: 10) or seeds; std is the sample standard
    deviation (ddof = 1, as the project's other tables; the SSKD paper does not say which),
    0.0 for a single result. Every result must have the same keys."""
    if not results:
        raise ValueError("mean_std needs at least one result")
    keys = list(results[0])
    for i, r in enumerate(results):
        if set(r) != set(keys):
            raise ValueError(f"result {i} has metrics {sorted(r)}, result 0 has {sorted(keys)}")
    out = {}
    for k in keys:
        v = np.array([float(r[k]) for r in results])
        out[k] = (float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0)
    return out

"""Face metrics: cosine scores, TAR at FAR, CMC, the identity-folder protocol and IJB-A, by hand."""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dcmkd.metrics.face import (all_pairs, cosine_similarity_matrix, evaluate_face, evaluate_ijba,
                                identification_rates, ijba_split_files, mean_std,
                                open_set_gallery_split, pool_templates, read_ijba_comparisons,
                                read_ijba_metadata, tar_at_far)

# four unit vectors, identities 0, 0, 1, 1: every pair score is known
F4 = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, 0.6]])
L4 = np.array([0, 0, 1, 1])


def test_cosine_similarity_matrix_by_hand():
    sim = cosine_similarity_matrix(np.array([[1.0, 0.0], [0.0, 2.0]]),
                                   torch.tensor([[1.0, 1.0], [0.0, 0.0]], dtype=torch.float64))
    r = 1 / math.sqrt(2)
    assert sim.tolist() == [pytest.approx([r, 0.0]), pytest.approx([r, 0.0])]
    with pytest.raises(ValueError, match="feature sizes differ: 2 vs 3"):
        cosine_similarity_matrix(np.ones((2, 2)), np.ones((1, 3)))
    with pytest.raises(ValueError, match="NaN or infinite"):
        cosine_similarity_matrix(np.array([[np.nan, 1.0]]), np.ones((1, 2)))


def test_all_pairs_upper_triangle():
    scores, same = all_pairs(F4 * np.array([[3.0], [1.0], [2.0], [5.0]]), L4)
    # (0,1) (0,2) (0,3) (1,2) (1,3) (2,3)
    assert scores.tolist() == pytest.approx([0.0, 0.6, 0.8, 0.8, 0.6, 0.96])
    assert same.tolist() == [True, False, False, False, False, True]
    with pytest.raises(ValueError, match="labels has 3 entries for 4 features"):
        all_pairs(F4, L4[:3])


def test_all_pairs_is_fast_on_a_million_pairs():
    rng = np.random.default_rng(0)
    f = rng.standard_normal((1443, 128)).astype(np.float32)
    t = time.perf_counter()
    scores, same = all_pairs(f, rng.integers(0, 74, 1443))
    took = time.perf_counter() - t
    assert scores.shape == same.shape == (1443 * 1442 // 2,)
    assert took < 2.0, f"all_pairs took {took:.2f} s for 1.04e6 pairs"  # ~0.3 s here


def test_tar_at_far_highest_tar_within_the_far_budget():
    genuine = [0.9, 0.8, 0.7, 0.4]
    impostor = [0.85] + [0.0] * 999  # 1000 impostor pairs
    scores = np.array(genuine + impostor)
    same = np.array([True] * 4 + [False] * 1000)
    out = tar_at_far(scores, same, fars=(0.01, 0.001))
    # FAR <= 0.001 allows one false accept: threshold 0.4 accepts the 0.85 impostor and all four
    assert out == {0.01: 1.0, 0.001: 1.0}
    impostor = [0.85, 0.75] + [0.0] * 998
    out = tar_at_far(np.array(genuine + impostor), same, fars=(0.01, 0.001))
    # 0.001: one false accept at most -> threshold 0.8 (0.85 accepted): TAR 2/4
    # 0.01: up to 10 -> threshold 0.4 accepts 0.85 and 0.75: TAR 4/4
    assert out == {0.01: 1.0, 0.001: 0.5}


def test_tar_at_far_ties_are_accepted_together():
    scores = np.array([0.5, 0.5] + [0.5, 0.5] + [0.1] * 98)
    same = np.array([True, True] + [False] * 100)
    # two impostors tie with both genuine pairs: FAR 2% at 0.5 exceeds 1%, nothing above it
    assert tar_at_far(scores, same, fars=(0.01, 0.02)) == {0.01: 0.0, 0.02: 1.0}


def test_tar_at_far_impossible_far_is_nan_with_a_reason():
    scores, same = all_pairs(F4, L4)  # 4 impostor pairs
    with pytest.warns(UserWarning, match=r"FAR=0.01 is NaN: it needs at least 100 impostor "
                                         r"pairs, the test set has 4"):
        out = tar_at_far(scores, same, fars=(0.01, 0.25))
    assert math.isnan(out[0.01]) and out[0.25] == 0.5
    with pytest.raises(ValueError, match="needs genuine and impostor pairs, got 0 genuine"):
        tar_at_far([0.1, 0.2], [False, False])
    with pytest.raises(ValueError, match=r"a FAR must lie in \(0, 1\], got 0.0"):
        tar_at_far(scores, same, fars=(0.0,))


def test_identification_rates_pessimistic_ties_and_unmated_probes():
    gallery = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    g_lab = np.array([0, 1, 2, 0])  # identity 0 has two gallery entries
    probes = np.array([[0.9, 0.1],    # id 0: rank 1
                       [0.6, 0.8],    # id 0: id 1 scores higher -> rank 2
                       [0.5, 0.5],    # id 1: tied with id 0 -> rank 2 (pessimistic)
                       [0.1, -0.9],   # id 0 via its second entry -> rank 1
                       [1.0, 0.0]])   # id 7 is not in the gallery: ignored
    p_lab = np.array([0, 0, 1, 0, 7])
    out = identification_rates(gallery, g_lab, probes, p_lab, ranks=(1, 2, 5))
    assert out == {1: 0.5, 2: 1.0, 5: 1.0}
    with pytest.raises(ValueError, match="no probe identity is in the gallery"):
        identification_rates(gallery, g_lab, probes[4:], p_lab[4:])
    with pytest.raises(ValueError, match="a rank must be a positive integer, got 0"):
        identification_rates(gallery, g_lab, probes, p_lab, ranks=(0,))


def test_open_set_gallery_split_first_image_of_each_identity():
    gal, pro = open_set_gallery_split(torch.tensor([2, 0, 2, 1, 0, 2]))
    assert gal.tolist() == [0, 1, 3] and pro.tolist() == [2, 4, 5]


def test_evaluate_face_by_hand():
    # pairs: genuine 0.0 and 0.96; impostors 0.6, 0.8, 0.8, 0.6
    # gallery: images 0 (id 0) and 2 (id 1); probe 1 (id 0) scores 0 vs 0.8 -> rank 2,
    # probe 3 (id 1) scores 0.8 vs 0.96 -> rank 1
    out = evaluate_face(torch.tensor(F4, dtype=torch.float32), torch.tensor(L4), fars=(0.5,),
                        ranks=(1, 5))
    assert out == {"tar@far=0.5": pytest.approx(50.0), "rank1": pytest.approx(50.0),
                   "rank5": pytest.approx(100.0)}
    with pytest.warns(UserWarning, match="needs at least 1000 impostor pairs"):
        out = evaluate_face(F4, L4)
    assert list(out) == ["tar@far=0.01", "tar@far=0.001", "rank1", "rank5"]
    assert math.isnan(out["tar@far=0.001"])
    with pytest.raises(ValueError, match="one image per identity: no genuine pair to verify"):
        evaluate_face(F4, [0, 1, 2, 3])


# ----------------------------------------------------------------------------- IJB-A

HEADER = ("TEMPLATE_ID,SUBJECT_ID,FILE,MEDIA_ID,SIGHTING_ID,FRAME,FACE_X,FACE_Y,FACE_WIDTH,"
          "FACE_HEIGHT,RIGHT_EYE_X,RIGHT_EYE_Y,LEFT_EYE_X,LEFT_EYE_Y,NOSE_BASE_X,NOSE_BASE_Y")

# (template, subject, file, media, sighting, feature)
VERIFY = [(1, 100, "frame/30000_00001.png", 10, 501, [1.0, 0.0]),
          (1, 100, "frame/30000_00002.png", 10, 502, [0.0, 1.0]),
          (1, 100, "img/11.jpg", 11, 503, [2.0, 0.0]),
          (2, 100, "img/20.jpg", 20, 504, [2.0, 0.0]),
          (3, 200, "img/30.jpg", 30, 505, [0.0, 3.0]),
          (4, 300, "img/40.jpg", 40, 506, [0.6, 0.8]),
          (5, 200, "img/50.jpg", 50, 507, [1.0, 0.0])]
# T1 pools to (3, 1)/sqrt(10): scores (1,2) G 0.949, (1,3) I 0.316, (2,3) I 0, (2,4) I 0.6,
# (3,4) I 0.8, (3,5) G 0
COMPARISONS = [(1, 2), (1, 3), (2, 3), (2, 4), (3, 4), (3, 5)]
GALLERY = [(101, 100, "img/g1.jpg", 60, 601, [1.0, 0.0]),
           (102, 200, "img/g2.jpg", 61, 602, [0.0, 1.0]),
           (103, 300, "img/g3.jpg", 62, 603, [-1.0, 0.0])]
PROBE = [(201, 100, "img/p1.jpg", 70, 701, [0.6, 0.8]),     # rank 2
         (202, 200, "img/p2a.jpg", 71, 702, [0.0, 1.0]),    # rank 1
         (202, 200, "img/p2b.jpg", 72, 703, [0.1, 1.0]),
         (203, 999, "img/p3.jpg", 73, 704, [1.0, 0.0])]     # not in the gallery


def _csv(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [HEADER] + [f"{t},{s},{f},{m},{g},,10,20,30,40,1,2,3,4,5,6"
                        for t, s, f, m, g, _ in rows]
    path.write_text("\n".join(lines) + "\n")


def make_ijba(root: Path, k: int = 1) -> dict:
    _csv(root / "IJB-A_11_sets" / f"split{k}" / f"verify_metadata_{k}.csv", VERIFY)
    (root / "IJB-A_11_sets" / f"split{k}" / f"verify_comparisons_{k}.csv").write_text(
        "".join(f"{a},{b}\n" for a, b in COMPARISONS))
    _csv(root / "IJB-A_1N_sets" / f"split{k}" / f"search_gallery_{k}.csv", GALLERY)
    _csv(root / "IJB-A_1N_sets" / f"split{k}" / f"search_probe_{k}.csv", PROBE)
    return {r[2]: np.array(r[5]) for r in VERIFY + GALLERY + PROBE}


def test_pool_templates_averages_media_first():
    feats = np.array([r[5] for r in VERIFY])
    tids = [r[0] for r in VERIFY]
    mids = [r[3] for r in VERIFY]
    tpl, pooled = pool_templates(feats, tids, mids)
    assert tpl.tolist() == [1, 2, 3, 4, 5]
    # media 10: mean of (1,0), (0,1) = (.5,.5); media 11: (1,0); template: (.75,.25) normalised
    assert pooled[0].tolist() == pytest.approx([3 / math.sqrt(10), 1 / math.sqrt(10)])
    assert pooled[2].tolist() == pytest.approx([0.0, 1.0])
    _, raw = pool_templates(feats, tids, mids, normalize_images=False)
    assert raw[0].tolist() == pytest.approx([5 / math.sqrt(26), 1 / math.sqrt(26)])


def test_ijba_readers(tmp_path):
    make_ijba(tmp_path)
    files = ijba_split_files(tmp_path, 1)
    rows = read_ijba_metadata(files["verify_metadata"])
    assert rows.template_ids.tolist() == [1, 1, 1, 2, 3, 4, 5]
    assert rows.files[0] == "frame/30000_00001.png" and rows.sighting_ids[6] == "507"
    assert read_ijba_comparisons(files["verify_comparisons"]).tolist() == [list(p) for p in
                                                                          COMPARISONS]
    bad = tmp_path / "bad.csv"
    bad.write_text("TEMPLATE_ID,SUBJECT_ID,FILE\n1,2,a.jpg\n")
    with pytest.raises(ValueError, match=r"bad\.csv lacks the column\(s\) MEDIA_ID"):
        read_ijba_metadata(bad)
    bad.write_text("TEMPLATE_ID,SUBJECT_ID,FILE,MEDIA_ID\n1,2,a.jpg,3\n1,5,b.jpg,4\n")
    with pytest.raises(ValueError, match="line 3: template 1 has rows of subjects 2 and 5"):
        read_ijba_metadata(bad)
    bad.write_text("TEMPLATE_ID,SUBJECT_ID,FILE,MEDIA_ID\n1,x,a.jpg,3\n")
    with pytest.raises(ValueError, match="line 2: expected integer TEMPLATE_ID, SUBJECT_ID"):
        read_ijba_metadata(bad)
    bad.write_text("1,2\n3;4\n")
    with pytest.raises(ValueError, match="line 2: expected 'template_id,template_id', got '3;4'"):
        read_ijba_comparisons(bad)
    with pytest.raises(FileNotFoundError, match="IJB-A split 2: verify_metadata_2.csv not found"):
        ijba_split_files(tmp_path, 2)


def test_evaluate_ijba_by_hand(tmp_path):
    feats = make_ijba(tmp_path)
    out = evaluate_ijba(feats, tmp_path, 1, fars=(0.25, 1.0), ranks=(1, 2))
    # verification: genuine 0.949 and 0; one false accept (0.8) allowed at FAR 0.25 -> TAR 1/2
    assert out == {"tar@far=0.25": pytest.approx(50.0), "tar@far=1": pytest.approx(100.0),
                   "rank1": pytest.approx(50.0), "rank2": pytest.approx(100.0)}
    by_sighting = {int(r[4]): np.array(r[5]) for r in VERIFY + GALLERY + PROBE}
    assert evaluate_ijba(by_sighting, tmp_path, 1, fars=(0.25,), ranks=(1,), key="sighting") == {
        "tar@far=0.25": pytest.approx(50.0), "rank1": pytest.approx(50.0)}
    del feats["img/p2b.jpg"]
    with pytest.raises(ValueError, match=r"no feature for FILE 'img/p2b.jpg' "
                                         r"\(search_probe_1.csv, row 3\)"):
        evaluate_ijba(feats, tmp_path, 1, fars=(0.25,))


def test_evaluate_ijba_unknown_template_in_comparisons(tmp_path):
    feats = make_ijba(tmp_path)
    (tmp_path / "IJB-A_11_sets" / "split1" / "verify_comparisons_1.csv").write_text("1,2\n1,9\n")
    with pytest.raises(ValueError, match="compares template 9, which verify_metadata_1.csv "
                                         "does not define"):
        evaluate_ijba(feats, tmp_path, 1)


def test_mean_std_over_splits():
    out = mean_std([{"rank1": 80.0, "tar@far=0.01": 50.0}, {"rank1": 90.0, "tar@far=0.01": 70.0},
                    {"rank1": 100.0, "tar@far=0.01": 60.0}])
    assert out == {"rank1": (pytest.approx(90.0), pytest.approx(10.0)),
                   "tar@far=0.01": (pytest.approx(60.0), pytest.approx(10.0))}
    assert mean_std([{"a": 3.0}]) == {"a": (3.0, 0.0)}
    with pytest.raises(ValueError, match="result 1 has metrics"):
        mean_std([{"a": 1.0}, {"b": 1.0}])

"""Face data: identity folders, identity splits, verifiability, LFW pairs, real CelebA crops."""
from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dcmkd.data.faces import (FacePair, IdentityFolder, check_verifiable, pair_paths,
                              read_pairs_file, read_split_csv, split_identities)

FACES_TAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "faces.tar"


def _solid(path: Path, colour, size=(10, 12), mode="RGB", fmt=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path, format=fmt)


def make_faces(root: Path) -> None:
    _solid(root / "bob" / "b1.png", (10, 20, 30))
    _solid(root / "bob" / "a0.png", (40, 50, 60))
    _solid(root / "alice" / "x.PGM", 77, mode="L", fmt="PPM")
    _solid(root / "alice" / "y.JPG", (200, 0, 0), fmt="JPEG")
    _solid(root / "carl" / "c.bmp", (1, 2, 3))
    (root / "bob" / "notes.txt").write_text("not an image")
    _solid(root / "bob" / ".hidden.png", (9, 9, 9))
    (root / ".cache").mkdir()


def test_identity_folder_decodes_sorted_identities_and_files(tmp_path):
    make_faces(tmp_path)
    ds = IdentityFolder(tmp_path, size=8)
    assert ds.identities == ["alice", "bob", "carl"]
    assert [p.relative_to(tmp_path).as_posix() for p in ds.paths] == [
        "alice/x.PGM", "alice/y.JPG", "bob/a0.png", "bob/b1.png", "carl/c.bmp"]
    assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == [0, 0, 1, 1, 2]
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (5, 3, 8, 8)
    assert (ds.images[0] == 77).all()  # greyscale -> R = G = B
    assert ds.images[2, :, 0, 0].tolist() == [40, 50, 60]  # a solid colour survives resizing
    assert (ds.images[4] == torch.tensor([1, 2, 3], dtype=torch.uint8)[:, None, None]).all()
    assert len(ds) == 5 and ds[3][1] == 1


def test_identity_folder_restricted_to_listed_identities(tmp_path):
    make_faces(tmp_path)
    ds = IdentityFolder(tmp_path, identities=["carl", "alice"], size=4)
    assert ds.identities == ["alice", "carl"] and ds.labels.tolist() == [0, 0, 1]
    with pytest.raises(FileNotFoundError, match=r"identity folder .*dave does not exist"):
        IdentityFolder(tmp_path, identities=["alice", "dave"])


def test_identity_folder_errors_are_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"face folder .*nowhere does not exist"):
        IdentityFolder(tmp_path / "nowhere")
    (tmp_path / "empty_root").mkdir()
    with pytest.raises(ValueError, match=r"no identity folder in .*empty_root"):
        IdentityFolder(tmp_path / "empty_root")
    make_faces(tmp_path / "r")
    (tmp_path / "r" / "dora").mkdir()
    (tmp_path / "r" / "dora" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=r"identity folder .*dora holds no image"):
        IdentityFolder(tmp_path / "r")
    (tmp_path / "r" / "dora" / "broken.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(ValueError, match=r"cannot read face image .*dora/broken\.jpg") as e:
        IdentityFolder(tmp_path / "r")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="size must be a positive integer"):
        IdentityFolder(tmp_path / "r", size=0)


def test_read_split_csv(tmp_path):
    p = tmp_path / "split.csv"
    p.write_text("identity_dir,celeba_identity,n_images,split\n"
                 "celeba_2,2,5,test\nceleba_1,1,30,train\nceleba_3,3,7,train\n")
    assert read_split_csv(p) == {"train": ["celeba_1", "celeba_3"], "test": ["celeba_2"]}
    p.write_text("identity,split\na,train\n")
    with pytest.raises(ValueError, match="has no 'identity_dir' column"):
        read_split_csv(p)
    p.write_text("identity_dir,split\na,train\nb,val\n")
    with pytest.raises(ValueError, match=r"line 3: split 'val' for 'b', expected 'train'"):
        read_split_csv(p)
    p.write_text("identity_dir,split\na,train\nb,test\na,train\n")
    with pytest.raises(ValueError, match=r"identity 'a' is listed twice \(lines 2 and 4\)"):
        read_split_csv(p)
    p.write_text("identity_dir,split\na,train\nb,test\na,test\n")
    with pytest.raises(ValueError, match=r"'a' is in both train \(line 2\) and test \(line 4\)"):
        read_split_csv(p)
    p.write_text("identity_dir,split\na,train\n")
    with pytest.raises(ValueError, match="has no 'test' identity"):
        read_split_csv(p)
    with pytest.raises(FileNotFoundError, match="split file .*missing.csv does not exist"):
        read_split_csv(tmp_path / "missing.csv")


def test_split_identities_is_deterministic_and_disjoint():
    names = [f"id{i}" for i in range(8)]
    s = split_identities(names, test_fraction=0.25, seed=0)
    assert len(s["test"]) == 2 and len(s["train"]) == 6
    assert sorted(s["train"] + s["test"]) == names
    assert split_identities(list(reversed(names)), 0.25, seed=0) == s  # order does not matter
    assert split_identities(names, 0.25, seed=0) == s
    assert any(split_identities(names, 0.25, seed=k) != s for k in (1, 2, 3))
    assert split_identities(["a", "b"], 0.9) == {"train": ["a"], "test": ["b"]} or \
        split_identities(["a", "b"], 0.9) == {"train": ["b"], "test": ["a"]}
    with pytest.raises(ValueError, match="at least 2 identities"):
        split_identities(["a"])
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        split_identities(names, test_fraction=1.0)


def test_check_verifiable_messages():
    check_verifiable(torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="^the face test set has one image per identity: no "
                                         "genuine pair to verify$"):
        check_verifiable([0, 1, 2])
    with pytest.raises(ValueError, match="one identity: no impostor pair"):
        check_verifiable(np.array([4, 4, 4]))
    with pytest.raises(ValueError, match="is empty"):
        check_verifiable([])


def _write_pairs(path: Path) -> None:
    path.write_text("2\t1\n"
                    "Ann_A\t1\t2\n"
                    "Ann_A\t1\tBob_B\t3\n"
                    "Bob_B 2 3\n"
                    "Bob_B 1 Ann_A 2\n")


def test_read_pairs_file_and_paths(tmp_path):
    p = tmp_path / "pairs.txt"
    _write_pairs(p)
    pairs = read_pairs_file(p)
    assert pairs == [FacePair("Ann_A", 1, "Ann_A", 2, True, 0),
                     FacePair("Ann_A", 1, "Bob_B", 3, False, 0),
                     FacePair("Bob_B", 2, "Bob_B", 3, True, 1),
                     FacePair("Bob_B", 1, "Ann_A", 2, False, 1)]
    root = tmp_path / "lfw"
    for name, idx in (("Ann_A", 1), ("Ann_A", 2), ("Bob_B", 1), ("Bob_B", 2), ("Bob_B", 3)):
        _solid(root / name / f"{name}_{idx:04d}.jpg", (5, 5, 5), fmt="JPEG")
    paths = pair_paths(root, pairs)
    assert paths[1] == (root / "Ann_A" / "Ann_A_0001.jpg", root / "Bob_B" / "Bob_B_0003.jpg")
    (root / "Bob_B" / "Bob_B_0003.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"pair 2 \(Ann_A 1 / Bob_B 3\): image .*"
                                                r"Bob_B_0003\.jpg does not exist"):
        pair_paths(root, pairs)


def test_read_pairs_file_errors_name_the_line(tmp_path):
    p = tmp_path / "pairs.txt"
    p.write_text("1 2\nA 1 2\nB 1 x\nA 1 B 1\nA 2 B 2\n")
    with pytest.raises(ValueError, match=r"line 3: expected a matched 'name idx1 idx2' pair"):
        read_pairs_file(p)
    p.write_text("1 1\nA 1 2\nA 1 B\n")
    with pytest.raises(ValueError, match=r"line 3: expected a mismatched 'name1 idx1 name2 idx2'"):
        read_pairs_file(p)
    p.write_text("10 300\nA 1 2\n")
    with pytest.raises(ValueError, match=r"promises 10 fold\(s\) of 300 .*6000 lines\), found 1"):
        read_pairs_file(p)
    p.write_text("ten\nA 1 2\n")
    with pytest.raises(ValueError, match=r"line 1: header 'ten'"):
        read_pairs_file(p)


@pytest.mark.skipif(not FACES_TAR.is_file(), reason=f"real face crops not found at {FACES_TAR}")
def test_real_celeba_crops(tmp_path):
    wanted = ("faces/SPLIT_SUGGESTED.csv", "faces/celeba_07201/", "faces/celeba_07202/",
              "faces/celeba_07204/")
    with tarfile.open(FACES_TAR) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith(wanted)]
        tar.extractall(tmp_path, members=members, filter="data")
    root = tmp_path / "faces"
    split = read_split_csv(root / "SPLIT_SUGGESTED.csv")
    assert (len(split["train"]), len(split["test"])) == (225, 74)  # the README's split
    assert not set(split["train"]) & set(split["test"])
    assert "celeba_07204" in split["test"] and "celeba_07201" in split["train"]
    ds = IdentityFolder(root, identities=["celeba_07201", "celeba_07202"], size=32)
    assert ds.identities == ["celeba_07201", "celeba_07202"]
    n1 = len(list((root / "celeba_07201").glob("*.jpg")))
    n2 = len(list((root / "celeba_07202").glob("*.jpg")))
    assert (n1, n2) == (30, 5)  # n_images in SPLIT_SUGGESTED.csv
    assert ds.images.shape == (35, 3, 32, 32) and ds.labels.tolist() == [0] * 30 + [1] * 5
    assert 20 < ds.images.float().mean().item() < 235  # real pixels, not a blank decode
    check_verifiable(ds.labels)

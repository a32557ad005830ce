"""YAML as dcmkd reads it: numbers as people write them, no object from a tag, no key twice."""
from __future__ import annotations

import pytest

from dcmkd import yamlio


def test_numbers_as_people_write_them():
    assert yamlio.loads("lr: 1e-3\nwd: 5e-4\nn: 3\nm: 2.5\n") == \
        {"lr": 0.001, "wd": 0.0005, "n": 3, "m": 2.5}


def test_a_python_tag_is_refused_not_built(tmp_path):
    with pytest.raises(yamlio.YAMLError, match="line 1: Python tags are refused"):
        yamlio.loads("m: !!python/object/apply:os.system ['echo pwned']\n", "c.yaml")


def test_a_key_twice_in_one_mapping_is_refused_with_its_line():
    with pytest.raises(yamlio.YAMLError, match=r"c.yaml line 3, column 1: .*'epochs' is given "
                                               r"twice"):
        yamlio.loads("epochs: 3\noptim: {lr: 0.1}\nepochs: 5\n", "c.yaml")
    with pytest.raises(yamlio.YAMLError, match="'lr' is given twice"):
        yamlio.loads("optim: {lr: 0.1, lr: 0.2}\n")


def test_merge_keys_and_keys_of_other_types_are_not_duplicates():
    text = ("base: &b {x: 1, y: 2}\n"
            "c: {<<: *b, y: 3}\n"              # a merge, then an override of its key
            "n: {1: a, '1': b}\n"              # the integer 1 and the string '1'
            "d: {c: &C {x: 1}, b: {<<: *C, x: 2}}\n")
    assert yamlio.loads(text) == {"base": {"x": 1, "y": 2}, "c": {"x": 1, "y": 3},
                                  "n": {1: "a", "1": "b"},
                                  "d": {"c": {"x": 1}, "b": {"x": 2}}}

"""Fixtures shared by the test files."""
from __future__ import annotations

import importlib
import os

import pytest
import torch

#: the optional packages some tests skip without (``pytest.importorskip``): ``make test`` and CI
#: install them all (the ``test`` extra) and set DCMKD_REQUIRE_EXTRAS=1, so that one that is
#: missing or does not load (e.g. a torchvision built for another torch) fails the session
#: instead of silently skipping the detection, face and ecosystem tests
EXTRAS = ("torchvision", "timm", "pycocotools", "safetensors", "PIL", "matplotlib", "sklearn",
          "tensorboard", "tqdm")


def missing_extras() -> list[str]:
    """The :data:`EXTRAS` that cannot be imported, each with its error."""
    missing = []
    for name in EXTRAS:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - a broken install fails in many ways
            missing.append(f"{name} ({type(e).__name__}: {' '.join(str(e).split())[:120]})")
    return missing


def pytest_sessionstart(session: pytest.Session) -> None:
    if os.environ.get("DCMKD_REQUIRE_EXTRAS") == "1":
        missing = missing_extras()
        if missing:
            raise pytest.UsageError("DCMKD_REQUIRE_EXTRAS=1 but these test dependencies do not "
                                    f"load: {'; '.join(missing)} (pip install -e '.[test]')")


@pytest.fixture(scope="module")
def module_one_thread():
    """One intra-op thread for a whole test file of tiny tensors (``pytestmark =
    pytest.mark.usefixtures("module_one_thread")``): on a busy shared machine torch's thread
    pool is many times slower than one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (restored after): on a small shared machine, two
    threads per detector step contend badly."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

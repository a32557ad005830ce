"""Warnings that point at the caller's code, not at a line inside dcmkd."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

_PACKAGE = str(Path(__file__).resolve().parent)


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the first frame outside the dcmkd package (the user's
    script, or the CLI's entry), so a Python API user sees their own line, not a quoted
    library source line."""
    level, frame = 2, sys._getframe(1)   # 2: the caller of warn()
    while frame is not None and _inside(frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def _inside(filename: str) -> bool:
    """A frame of dcmkd's own code (or code it generated: a dataclass's ``__init__``)."""
    return filename == "<string>" or str(Path(filename).resolve()).startswith(_PACKAGE)


def show_one_line(message: Warning | str, category: type, filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    """A warning as one line for a user of the command line (``warnings.showwarning``; Python's
    own format names a source file and quotes its code)."""
    print(f"dcmkd: warning: {message}", file=file or sys.stderr)


__all__ = ["warn", "show_one_line"]

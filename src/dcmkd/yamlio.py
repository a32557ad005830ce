"""YAML in and out: the one place dcmkd parses and writes YAML (run configs, experiment tables,
run folders' ``config.yaml``).

- Safe loading only: no tag constructs an object, and a Python tag
  (``!!python/object/apply:os.system``) is refused with a one-line error, never executed.
- Numbers as people write them: YAML 1.1 reads ``1e-3`` and ``5e-4`` (no dot in the mantissa)
  as *strings*; here they are floats, as in YAML 1.2 and Python.
- A syntax error names the file (or the override) and the line.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml


class YAMLError(ValueError):
    """Unreadable YAML: the message names where (file and line) and what."""


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2's float syntax (``1e-3``) that refuses a key written twice in
    one mapping (YAML says keys are unique; PyYAML keeps the last one silently). The check runs
    on the document as written, before merge keys (``<<: *base``) bring their keys in."""

    def compose_mapping_node(self, anchor: str | None) -> yaml.MappingNode:
        node = super().compose_mapping_node(anchor)
        seen: set[tuple[str, str]] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == MERGE_TAG:
                continue
            key = (key_node.tag, key_node.value)
            if key in seen:
                raise yaml.composer.ComposerError(
                    None, None, f"the key '{key_node.value}' is given twice",
                    key_node.start_mark)
            seen.add(key)
        return node


MERGE_TAG = "tag:yaml.org,2002:merge"


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def loads(text: str, where: str = "<string>") -> Any:
    """Parse ``text``; ``where`` (a file name, or ``override 'k=v'``) goes into the error."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.constructor.ConstructorError as e:
        tag = getattr(e, "problem", "") or ""
        line = f" line {e.problem_mark.line + 1}" if e.problem_mark is not None else ""
        if "python/" in tag:
            raise YAMLError(f"{where}{line}: Python tags are refused: dcmkd never builds objects "
                            "from YAML") from None
        raise YAMLError(f"{where}{line}: {tag}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise YAMLError(f"{where}{line}: not valid YAML ({problem})") from None


def load(path: str | Path) -> Any:
    """Parse a YAML file (see :func:`loads`)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {path}") from None
    except (IsADirectoryError, UnicodeDecodeError, PermissionError) as e:
        raise YAMLError(f"{path}: cannot be read as a YAML file ({type(e).__name__})") from None
    return loads(text, str(path))


def dumps(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


__all__ = ["YAMLError", "load", "loads", "dumps"]

"""Typed options: one dataclass field per config key, its type, range, doc and role in one place.

Every section of a run config is the dataclass of the code that uses it (the method's loss
options, the data config, the loop's settings…), and every field is declared with
:func:`option`, whose metadata (:class:`Spec`) is the only description of that key::

    temperature: float = option(1.0, "T of Eq. 3", above=0)

From that metadata come the checks of a config and of a dataclass built in Python
(:func:`check_value`, :func:`check_fields`), the run-defining keys (:func:`resumable_keys`), the
CLI's flags and ``dcmkd describe`` (:func:`schema_keys`). :func:`section` nests one dataclass in
another as a config section. The run config's root class registers itself with
:func:`register_schema` when :mod:`dcmkd.engine.config` is imported (importing ``dcmkd`` does).
"""
from __future__ import annotations

import dataclasses
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any, Callable, Iterator

from dcmkd.registry import UnknownNameError

_META = "dcmkd"
_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
               list: "a list", dict: "a mapping", tuple: "a list", None: "null"}


class ConfigError(ValueError):
    """A config value of the wrong type or out of range: the message names the key."""


@dataclass(frozen=True)
class Spec:
    """What a config key accepts and means.

    ``types``: accepted types (``None`` for null); empty: the default's type (an int is accepted
    where a float is expected, never a bool). ``low``/``high``: inclusive bounds of a number
    (``above``: ``low`` is exclusive). ``choices``: the accepted strings (a string value must be
    one). ``rule``: a further check, returning an error text (after the key name) or ``None``.
    ``run``: whether the key defines the run (changing it makes another run); ``False`` marks
    keys an interrupted run may resume with (folder, device, logging…). ``flag``: the CLI flag
    that sets it (``--<flag>``). ``applies``: the methods (or, for a section, the tasks) the key
    is for; a value other than the default elsewhere is an error. ``overrides``, of a section:
    (key, default) pairs where the config's default differs from the section class's own (the
    Python API's). ``added``: a key added after run folders without it exist; at its default it
    does not take part in a run's identity (:func:`added_defaults`), so an earlier folder is the
    same run and keeps its hash — every key added to the config from now on says so. Its
    default is then fixed for good (a run at another default would be taken for an earlier
    one), and must be a scalar, null or ``{}`` (flattened configs compare leaves). ``location``:
    a key naming where some data lives (a folder that may move or be mounted elsewhere): it
    defines the run by being set or not, not by its spelling (:func:`location_keys`); the data's
    own identity is the run's ``data.json``."""

    doc: str
    types: tuple = ()
    low: float | None = None
    high: float | None = None
    above: bool = False
    choices: tuple[str, ...] = ()
    rule: Callable[[Any], str | None] | None = None
    run: bool = True
    flag: str | None = None
    applies: tuple[str, ...] = ()
    overrides: tuple[tuple[str, Any], ...] = ()
    added: bool = False
    location: bool = False


def option(default: Any = MISSING, doc: str = "", *, factory: Callable[[], Any] | None = None,
           **spec: Any) -> Any:
    """A dataclass field with its :class:`Spec` (``doc`` and ``spec``'s keywords)."""
    meta = {_META: Spec(doc, **spec)}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def section(cls: type, doc: str, overrides: dict[str, Any] | None = None, **spec: Any) -> Any:
    """A nested dataclass as a config section (its own fields are its keys); ``overrides``:
    the config's defaults of some of its keys, where they differ from the class's."""
    meta = Spec(doc, overrides=tuple((overrides or {}).items()), **spec)
    return field(default_factory=lambda: cls(**(overrides or {})), metadata={_META: meta})


def spec_of(f: dataclasses.Field) -> Spec:
    spec = f.metadata.get(_META)
    if spec is None:
        raise TypeError(f"field {f.name} is not declared with dcmkd.options.option()")
    return spec


def default_of(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is MISSING else f.default   # type: ignore[misc]


def is_section(f: dataclasses.Field) -> bool:
    return f.default is MISSING and is_dataclass(default_of(f))


@dataclass(frozen=True)
class Key:
    """One key of a config tree: its dotted name, default and :class:`Spec`."""

    name: str
    default: Any
    spec: Spec

    @property
    def type_text(self) -> str:
        return " or ".join(_TYPE_NAMES.get(t, getattr(t, "__name__", str(t)))
                           for t in accepted_types(self))

    @property
    def range_text(self) -> str:
        s = self.spec
        return " | ".join(filter(None, (_bounds(s), *s.choices)))


def _bounds(s: Spec) -> str:
    if s.low is None and s.high is None:
        return ""
    if s.above:
        return f"> {s.low:g}"
    if s.high is None:
        return f"≥ {s.low:g}"
    return f"in [{s.low:g}, {s.high:g}]" if s.low is not None else f"≤ {s.high:g}"


def keys(tree: Any, prefix: str = "") -> Iterator[Key]:
    """Every key of the dataclass tree ``tree`` (a class: at its defaults; an instance: its
    values are the defaults), sections expanded, depth first, in order."""
    obj = tree() if isinstance(tree, type) else tree
    for f in fields(obj):
        spec, value = spec_of(f), getattr(obj, f.name)
        if is_section(f):
            yield from keys(value, f"{prefix}{f.name}.")
        else:
            yield Key(f"{prefix}{f.name}", _plain(value), spec)


def sections(tree: Any, prefix: str = "") -> Iterator[tuple[str, Spec]]:
    """The sections of a dataclass tree: dotted name and :class:`Spec`."""
    obj = tree() if isinstance(tree, type) else tree
    for f in fields(obj):
        if is_section(f):
            yield f"{prefix}{f.name}", spec_of(f)
            yield from sections(getattr(obj, f.name), f"{prefix}{f.name}.")


def defaults(tree: Any) -> dict[str, Any]:
    """The config tree of ``tree`` (a class at its defaults, or an instance) as plain mappings
    and lists."""
    obj = tree() if isinstance(tree, type) else tree
    return {f.name: defaults(getattr(obj, f.name)) if is_section(f)
            else _plain(getattr(obj, f.name)) for f in fields(obj)}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def accepted_types(key: Key) -> tuple:
    if key.spec.types:
        return key.spec.types
    return (type(key.default),)


def is_a(value: Any, accepted: tuple) -> bool:
    """Whether ``value`` is one of ``accepted`` (an int is a float here, a bool no number)."""
    for t in accepted:
        if t is None and value is None:
            return True
        if t is None:
            continue
        if t is bool:
            if isinstance(value, bool):
                return True
            continue
        if isinstance(value, bool):
            continue
        if t is float and isinstance(value, (int, float)):
            return True
        if t in (list, tuple) and isinstance(value, (list, tuple)):
            return True
        if isinstance(value, t):
            return True
    return False


def check_value(key: Key, value: Any) -> None:
    """Raise :class:`ConfigError` naming ``key`` if ``value`` is of the wrong type, out of
    range, not one of the choices, or fails the key's rule."""
    s = key.spec
    if not is_a(value, accepted_types(key)):
        raise ConfigError(f"{key.name}: expected {key.type_text}, got {value!r}")
    if isinstance(value, str) and s.choices and value not in s.choices:
        if any(t in (int, float) for t in accepted_types(key)):   # a number or a word
            number = f"a number {_bounds(s)}".rstrip()
            raise ConfigError(f"{key.name}: expected {number} or {' or '.join(s.choices)}, "
                              f"got {value!r}")
        raise UnknownNameError(key.name, value, s.choices)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        low_bad = s.low is not None and (value <= s.low if s.above else value < s.low)
        if low_bad or (s.high is not None and value > s.high):
            raise ConfigError(f"{key.name}: expected a value {_bounds(s)}, got {value!r}")
    if s.rule is not None:
        problem = s.rule(value)
        if problem:
            raise ConfigError(f"{key.name}: {problem}, got {value!r}")


def check_fields(obj: Any, prefix: str = "") -> None:
    """Check every field of a dataclass instance against its :class:`Spec` (a dataclass built
    in Python is held to the same rules as a config); sections are checked by their own
    ``__post_init__``."""
    for f in fields(obj):
        if not is_section(f):
            check_value(Key(f"{prefix}{f.name}", _plain(default_of(f)), spec_of(f)),
                        _plain(getattr(obj, f.name)))


def build(cls: type, given: dict[str, Any] | None, what: str) -> Any:
    """``cls`` from a mapping of some of its fields (the rest at their defaults); an unknown key
    raises :class:`UnknownNameError` naming ``what`` and the closest keys."""
    names = [f.name for f in fields(cls)]
    for k in given or {}:
        if k not in names:
            raise UnknownNameError(f"{what} option", k, names)
    return cls(**(given or {}))


def not_applying(cls: type, given: dict[str, Any], tags: tuple[str, ...],
                 unchanged: dict[str, Any] | None = None) -> str | None:
    """The first key of ``given`` whose :attr:`Spec.applies` names none of ``tags`` (a method's
    name and group) and whose value is not its default (nor ``unchanged``'s)."""
    for f in fields(cls):
        spec = spec_of(f)
        if f.name not in given or not spec.applies or set(spec.applies) & set(tags):
            continue
        value = _plain(given[f.name])
        if value != _plain(default_of(f)) and \
                not (unchanged and f.name in unchanged and value == unchanged[f.name]):
            return f.name
    return None


_SCHEMA: list[type] = []


def register_schema(cls: type) -> type:
    """Record ``cls`` as the run config's root (:mod:`dcmkd.engine.config` does, once)."""
    _SCHEMA[:] = [cls]
    return cls


def schema() -> type:
    if not _SCHEMA:
        raise RuntimeError("the run config schema is not loaded (import dcmkd)")
    return _SCHEMA[0]


def schema_keys() -> list[Key]:
    """Every key of the run config, with its metadata."""
    return list(keys(schema()))


def resumable_keys() -> frozenset[str]:
    """The dotted keys that do not define a run (``run=False``)."""
    return frozenset(k.name for k in schema_keys() if not k.spec.run)


def location_keys() -> frozenset[str]:
    """The dotted keys declared ``location=True``: in a run's identity, only whether they are
    set (:func:`dcmkd.run_folder.defining`)."""
    return frozenset(k.name for k in schema_keys() if k.spec.location)


def added_defaults() -> dict[str, Any]:
    """The dotted keys declared ``added=True`` with their defaults: at that value a key is left
    out of a run's identity (:func:`dcmkd.run_folder.defining`)."""
    return {k.name: k.default for k in schema_keys() if k.spec.added}


__all__ = ["ConfigError", "Key", "Spec", "accepted_types", "build", "check_fields", "check_value",
           "not_applying",
           "added_defaults", "defaults", "is_a", "keys", "location_keys", "option",
           "register_schema", "resumable_keys",
           "schema", "schema_keys", "section", "sections"]

"""Plain data <-> configuration dataclasses (``DINOConfig``, ``TrainConfig``, ``TransformConfig``).

A dataclass's field annotations are its schema: ``Literal`` of strings, fixed and variable
tuples, int / float / bool / str, optional values and nested dataclasses. Unknown keys get a
did-you-mean hint; YAML's quirks are smoothed over (``2e-4``, a string to PyYAML, is accepted
as a float; ``off``, ``False`` to PyYAML, stays ``"off"`` for a string or ``Literal`` field).
Every error reads ``"<dotted.key>: <why>, got <value>"``: ``__post_init__`` checks use
:func:`require` with keys relative to their class, :func:`from_dict` prefixes the section path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import math
import numbers
import types
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

__all__ = ["apply_override", "coerce_fields", "field_type", "from_dict", "is_finite_number",
           "is_int", "merge", "parse_set", "parse_value", "require", "to_dict"]

T = TypeVar("T", bound="DataclassInstance")


def is_int(value: object) -> bool:
    """An integer as a file (JSON, YAML) gives it: ``true`` / ``false`` are not."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value: object) -> bool:
    """A finite int or float that fits a float (booleans are not numbers here)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer of 309 digits or more
        return False


def require(ok: bool, key: str, value: object, why: str) -> None:
    """Raise ``ValueError("<key>: <why>, got <value>")`` unless ``ok``."""
    if not ok:
        raise ValueError(f"{key}: {why}, got {value!r}")


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """A ``cls`` from plain data, every key checked and every value coerced to its field's type.

    ``prefix`` (``"model."``) goes before every key an error names; sections may be mappings
    or instances.
    """
    require(isinstance(data, Mapping), prefix[:-1] or "<root>", data, "expected a mapping")
    kwargs = {str(k): _coerce(v, _field(cls, str(k), prefix, v), f"{prefix}{k}")
              for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as e:
        # The class's own checks name its fields relative to it; give them the section's path.
        raise ValueError(f"{prefix}{e}") from None


def to_dict(obj: DataclassInstance) -> dict[str, Any]:
    """Plain, JSON-serialisable data (nested dataclasses become dicts, tuples lists)."""
    return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}


def coerce_fields(obj: DataclassInstance) -> None:
    """Coerce a dataclass's fields in place (for ``__post_init__``): ``OptimConfig(betas=[0.9,
    0.99])`` stores a tuple, ``TrainConfig(epochs="many")`` is an error naming ``epochs``."""
    for name, tp in _hints(type(obj)).items():
        setattr(obj, name, _coerce(getattr(obj, name), tp, name))


def merge(tree: dict[str, Any], cls: type, updates: Mapping[str, Any], prefix: str = "") -> None:
    """Lay ``updates`` (a partial mapping of ``cls``'s fields) onto the plain data ``tree``.

    Keys and values are checked now, so an error belongs to the layer that gave the value;
    checks between fields wait for :func:`from_dict`. Sections merge key by key; ``None`` for
    a section (an empty YAML section) changes nothing.
    """
    for name, value in updates.items():
        key = f"{prefix}{name}"
        tp = _field(cls, str(name), prefix, value)
        section = _section(tp)
        if section is not None and value is None:
            continue
        if section is not None and isinstance(value, Mapping):
            node = _plain(tree.get(name))  # a section given as an object merges as its data
            tree[name] = node if isinstance(node, dict) else {}
            merge(tree[name], section, value, key + ".")
        else:
            tree[name] = _coerce(value, tp, key)


def field_type(cls: type, key: str, value: object = None) -> Any:
    """The annotation of a dotted ``key`` of ``cls``; ``value`` only fills the error message."""
    *path, leaf = key.split(".")
    prefix = ""
    for name in path:
        section = _section(_field(cls, name, prefix, value))
        prefix += name + "."
        if section is None:
            raise ValueError(f"{key}: unknown key ({prefix[:-1]} is not a section), got {value!r}")
        cls = section
    return _field(cls, leaf, prefix, value)


def parse_set(item: str) -> tuple[str, str]:
    """Split one ``--set key=value`` string into the dotted key and the raw value text."""
    key, sep, raw = item.partition("=")
    require(bool(sep and key.strip()), "--set", item, "expected key=value, e.g. optim.lr=2e-4")
    return key.strip(), raw.strip()


def parse_value(raw: str, tp: Any) -> Any:
    """YAML-parse ``raw``, but keep the text where the field wants a string (``amp=off``,
    ``out_dir=2024``); ``null`` / ``~`` still mean None for an optional field."""
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError:
        value = raw
    options = [t for t in _union(tp) or (tp,) if t is not type(None)]
    wants_text = len(options) == 1 and (options[0] is str or get_origin(options[0]) is Literal)
    if wants_text and not isinstance(value, str) and not (value is None and _optional(tp)):
        return raw
    return value


def apply_override(tree: dict[str, Any], cls: type, item: str) -> None:
    """Lay one ``--set a.b.c=value`` string onto the plain data ``tree`` of a ``cls``; errors
    start with ``--set a.b.c=value: ``, a mapping value (``optim={lr: 2e-4}``) sets its leaves."""
    key, raw = parse_set(item)
    try:
        value = parse_value(raw, field_type(cls, key, raw))
        for name in reversed(key.split(".")):
            value = {name: value}
        merge(tree, cls, value)
    except ValueError as e:
        raise ValueError(f"--set {key}={raw}: {e}") from None


# Fields and coercion


class _Mismatch(Exception):
    """A value that does not fit a type (turned into a ValueError naming the key)."""


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """Field name -> resolved annotation, in field order (string annotations evaluated once)."""
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _field(cls: type, name: str, prefix: str, value: object) -> Any:
    hints = _hints(cls)
    if name in hints:
        return hints[name]
    # A field of a section one level down is the likeliest slip (``data.eval_size`` for
    # ``data.transform.eval_size``); else the closest spelling.
    deeper = [f"{n}.{name}" for n, tp in hints.items()
              if (s := _section(tp)) is not None and name in _hints(s)]
    close = deeper or difflib.get_close_matches(name, list(hints), n=1)
    where = f" in {prefix[:-1]}" if prefix else ""
    why = (f"did you mean {prefix + close[0]!r}?" if close
           else f"known{where}: {', '.join(hints)}")
    raise ValueError(f"{prefix}{name}: unknown key ({why}), got {value!r}")


def _union(tp: Any) -> tuple[Any, ...]:
    return get_args(tp) if get_origin(tp) in (Union, types.UnionType) else ()


def _optional(tp: Any) -> bool:
    return type(None) in _union(tp)


def _section(tp: Any) -> type | None:
    """The dataclass behind a field type (``X`` or ``X | None``), else None."""
    for t in _union(tp) or (tp,):
        if isinstance(t, type) and dataclasses.is_dataclass(t):
            return t
    return None


def _coerce(value: Any, tp: Any, key: str) -> Any:
    section = _section(tp)
    if section is not None:
        if isinstance(value, Mapping):
            return from_dict(section, value, key + ".")
        require(isinstance(value, section) or (value is None and _optional(tp)), key, value,
                "expected a mapping")
        return value
    try:
        return _convert(value, tp)
    except _Mismatch:
        raise ValueError(f"{key}: expected {_describe(tp)}, got {value!r}") from None


def _convert(value: Any, tp: Any) -> Any:
    options = _union(tp)
    if options:
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is not type(None):
                with contextlib.suppress(_Mismatch):
                    return _convert(value, option)
        raise _Mismatch
    if get_origin(tp) is Literal:
        if isinstance(value, bool):  # YAML reads off / on as False / True
            value = "on" if value else "off"
        if isinstance(value, str) and value in get_args(tp):
            return value
        raise _Mismatch
    if get_origin(tp) is tuple:
        args = get_args(tp)
        variable = len(args) == 2 and args[1] is Ellipsis
        if variable and isinstance(value, (numbers.Number, str)):
            value = [value]  # one number where a list of any length is expected
        if not isinstance(value, (list, tuple)) or (not variable and len(value) != len(args)):
            raise _Mismatch
        return tuple(_convert(v, args[0] if variable else t)
                     for v, t in zip(value, [args[0]] * len(value) if variable else args))
    if tp not in (bool, int, float, str):
        raise TypeError(f"no coercion to {tp!r}")
    if isinstance(value, bool) != (tp is bool):  # true / false are neither numbers nor text
        raise _Mismatch
    if tp is bool or (tp is str and isinstance(value, str)):
        return value
    if tp is str and isinstance(value, numbers.Real):
        return str(value)  # out_dir: 2024 in a YAML file
    if tp is int and isinstance(value, float) and not value.is_integer():
        raise _Mismatch
    if tp in (int, float) and isinstance(value, (numbers.Real, str)):
        try:
            return tp(value)  # a string: PyYAML reads 2e-4 (no dot) as one
        except ValueError:
            raise _Mismatch from None
    raise _Mismatch


def _describe(tp: Any, plural: bool = False) -> str:
    """Words for a type in an error message: ``a list of 2 floats``, ``one of 'off', 'bf16'``."""
    if _union(tp):
        return " or ".join(_describe(t, plural) for t in _union(tp))
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) is tuple:
        args = get_args(tp)
        count = "" if len(args) == 2 and args[1] is Ellipsis else f"{len(args)} "
        return f"a list of {count}{_describe(args[0], plural=True)}"
    words = _WORDS.get(tp)
    return words[plural] if words else getattr(tp, "__name__", str(tp))


_WORDS: dict[Any, tuple[str, str]] = {
    str: ("a string", "strings"), int: ("an integer", "integers"), float: ("a float", "floats"),
    bool: ("true or false", "booleans"), type(None): ("null", "nulls")}


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_dict(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value

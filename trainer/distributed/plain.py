"""A prepared run as plain containers, for the job folder: dataclasses, tuples, dicts with any keys, dtypes and
paths become lists, dicts and strings that ``torch.load(weights_only=True)`` reads back -- so a job file can
carry tensors and settings to the workers but never code (unpickling a class can run code; this cannot).

Only the dataclasses a reader names can come back (``from_plain(value, classes)``); anything else is refused.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path, PurePath

import torch

_KIND = "__plain__"


def to_plain(value):
    """``value`` as nested lists, dicts with str keys, str/int/float/bool/None and tensors."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {_KIND: "dataclass", "class": type(value).__name__,
                "fields": {field.name: to_plain(getattr(value, field.name)) for field in dataclasses.fields(value)}}
    if isinstance(value, tuple):
        return {_KIND: "tuple", "items": [to_plain(item) for item in value]}
    if isinstance(value, (set, frozenset)):
        return {_KIND: "frozenset" if isinstance(value, frozenset) else "set",
                "items": [to_plain(item) for item in sorted(value, key=repr)]}
    if isinstance(value, list):
        return [to_plain(item) for item in value]
    if isinstance(value, dict):
        return {_KIND: "dict", "pairs": [[to_plain(key), to_plain(item)] for key, item in value.items()]}
    if isinstance(value, torch.dtype):
        return {_KIND: "dtype", "name": str(value).removeprefix("torch.")}
    if isinstance(value, PurePath):
        return {_KIND: "path", "path": str(value)}
    raise TypeError(f"a {type(value).__name__} cannot travel in a job file")


def from_plain(value, classes=()):
    """The inverse of to_plain; dataclasses only of ``classes`` (matched by class name)."""
    by_name = {cls.__name__: cls for cls in classes}
    return _rebuild(value, by_name)


def _rebuild(value, by_name: dict):
    if isinstance(value, list):
        return [_rebuild(item, by_name) for item in value]
    if not isinstance(value, dict) or _KIND not in value:
        return value
    kind = value[_KIND]
    if kind == "tuple":
        return tuple(_rebuild(item, by_name) for item in value["items"])
    if kind in ("set", "frozenset"):
        items = (_hashable(_rebuild(item, by_name)) for item in value["items"])
        return frozenset(items) if kind == "frozenset" else set(items)
    if kind == "dict":
        return {_hashable(_rebuild(key, by_name)): _rebuild(item, by_name) for key, item in value["pairs"]}
    if kind == "dtype":
        dtype = getattr(torch, value["name"], None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"{value['name']!r} is not a torch dtype")
        return dtype
    if kind == "path":
        return Path(value["path"])
    if kind == "dataclass":
        cls = by_name.get(value["class"])
        if cls is None:
            raise ValueError(f"a {value['class']} is not expected in this job file")
        fields = {name: _rebuild(item, by_name) for name, item in value["fields"].items()}
        declared = {field.name: field for field in dataclasses.fields(cls)}
        made = cls(**{name: item for name, item in fields.items() if declared[name].init})
        for name, item in fields.items():
            if not declared[name].init:
                object.__setattr__(made, name, item)
        return made
    raise ValueError(f"unknown plain kind {kind!r}")


def _hashable(key):
    return tuple(_hashable(item) for item in key) if isinstance(key, list) else key


def save(value, path: Path) -> None:
    """Write ``value`` (to_plain) to ``path`` atomically."""
    partial = Path(str(path) + ".partial")
    torch.save(to_plain(value), partial)
    partial.replace(path)


def load(path: Path, classes=()):
    return from_plain(torch.load(path, weights_only=True, map_location="cpu"), classes)

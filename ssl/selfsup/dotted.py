"""params.yaml's dotted names ("method.simclr.temperature") and the nested mappings they address: one
flattener for params, metrics, recipes and sweeps."""

from __future__ import annotations

from typing import Any


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1, "c": {"d": 2}}} -> {"a.b": 1, "a.c.d": 2}, each name after `prefix`; leaves as they are."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def set_dotted(raw: dict, dotted: str, value: Any) -> None:
    """raw["a"]["b"]["c"] = value for "a.b.c", making the sections on the way."""
    *parents, last = dotted.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def nested(flat: dict[str, Any]) -> dict:
    """{"a.b": 1, "a.c": 2} -> {"a": {"b": 1, "c": 2}}: params.yaml's shape."""
    tree: dict = {}
    for dotted, value in flat.items():
        set_dotted(tree, dotted, value)
    return tree

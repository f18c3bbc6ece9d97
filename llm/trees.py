"""Nested parameter dicts addressed by key paths (('layer_0', 'attn', 'query', 'kernel'))."""

from __future__ import annotations

from collections.abc import Sequence


def put(tree: dict, path: Sequence[str], value) -> None:
    """tree[path[0]]...[path[-1]] = value, creating the dicts on the way."""
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def at(tree, path: Sequence[str]):
    """tree[path[0]]...[path[-1]]."""
    for k in path:
        tree = tree[k]
    return tree

"""Recurrent state as typed NamedTuples of tensors, and its flat ``[B, S]`` form.

Every core's state is a ``typing.NamedTuple`` whose fields are tensors with the batch on the first
axis, or further NamedTuples (``DNCState(controller=LSTMState(...), access=AccessState(...))``).
SB3 stores recurrent state as plain tensors, so this module packs any such state into one flat
``[B, S]`` tensor and back, exactly (a concatenation of reshaped views; no arithmetic).

The structure used to unpack is a *shape tree*: the same NamedTuple types with each tensor replaced
by its per-batch-element shape tuple, as returned by ``MemoryCore.state_shapes_tree()``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor


def is_namedtuple(x: Any) -> bool:
    """True for instances of ``typing.NamedTuple`` / ``collections.namedtuple`` classes."""
    return isinstance(x, tuple) and hasattr(x, "_fields")


def leaves(state: Any) -> Iterator[Tensor]:
    """Yield the tensors of a (nested) state in field order."""
    if is_namedtuple(state):
        for field in state:
            yield from leaves(field)
    else:
        yield state


def named_leaves(state: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Yield ``(dotted_name, leaf)`` pairs, e.g. ``("access.memory", tensor)``."""
    for name, field in zip(state._fields, state, strict=True):
        full = f"{prefix}{name}"
        if is_namedtuple(field):
            yield from named_leaves(field, full + ".")
        else:
            yield full, field


def map_state(fn: Callable[..., Tensor], state: Any, *others: Any) -> Any:
    """Apply ``fn`` leaf-wise over one or more states of the same structure; keeps the types."""
    if is_namedtuple(state):
        return type(state)(*(map_state(fn, *fields) for fields in zip(state, *others, strict=True)))
    return fn(state, *others)


def shape_tree(state: Any) -> Any:
    """The shape tree of a batched state: each tensor ``[B, *s]`` replaced by the tuple ``s``."""
    if is_namedtuple(state):
        return type(state)(*(shape_tree(f) for f in state))
    return tuple(state.shape[1:])


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def state_size(shapes: Any) -> int:
    """Floats per batch element of a state with the given shape tree."""
    if is_namedtuple(shapes):
        return sum(state_size(f) for f in shapes)
    return _numel(shapes)


def pack(state: Any) -> Tensor:
    """Flatten a batched state into one tensor.

    :param state: a (nested) NamedTuple of tensors, each ``[B, ...]``.
    :return: ``[B, S]`` with ``S`` the sum of the per-element sizes, fields in declaration order.
    """
    flat = list(leaves(state))
    if not flat:
        raise ValueError("cannot pack a state without tensors")
    batch = flat[0].shape[0]
    return torch.cat([t.reshape(batch, -1) for t in flat], dim=1)


def unpack(flat: Tensor, shapes: Any) -> Any:
    """Inverse of :func:`pack`.

    :param flat: ``[B, S]``.
    :param shapes: the shape tree of the state (per-batch-element shapes).
    :return: the NamedTuple state; its tensors are views into ``flat``.
    """
    expected = state_size(shapes)
    if flat.dim() != 2 or flat.shape[1] != expected:
        raise ValueError(
            f"packed state has shape {tuple(flat.shape)}; expected [B, {expected}] for this core"
        )
    batch = flat.shape[0]
    offset = 0

    def build(node: Any) -> Any:
        nonlocal offset
        if is_namedtuple(node):
            return type(node)(*(build(f) for f in node))
        n = _numel(node)
        out = flat[:, offset : offset + n].reshape(batch, *node)
        offset += n
        return out

    return build(shapes)


def reset_where(state: Any, initial: Any, starts: Tensor) -> Any:
    """Replace the state of batch elements that start an episode by the initial state.

    ``torch.where`` rather than multiplication by ``1 - start``: a learned or constant initial state
    is restored exactly, and a NaN in a finished episode's state cannot leak into the next one.

    :param state: the current state, leaves ``[B, ...]``.
    :param initial: the initial state, leaves ``[B, ...]`` (or broadcastable to them).
    :param starts: ``[B]`` bool, True where the element's state is reset.
    """

    def one(s: Tensor, s0: Tensor) -> Tensor:
        mask = starts.view(-1, *([1] * (s.dim() - 1)))
        return torch.where(mask, s0, s)

    return map_state(one, state, initial)

"""How a rollout's episode segments become minibatches and training sequences ("columns").

Shared by the numpy sequence-start buffer (``memagents.sb3.ppo``) and the device buffer
(``memagents.sb3.device``), so that both cut the same rollout into the same minibatches: the
plan is made from the segments' lengths alone (a few thousand integers per rollout), the data
is then gathered by each buffer in its own way.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Generator

import numpy as np


def chunk_segments(
    order: np.ndarray, lengths: np.ndarray, batch_size: int
) -> Generator[np.ndarray, None, None]:
    """The segments in ``order``, grouped into runs of at least ``batch_size`` steps (the last
    may hold fewer).

    :param order: ``[n]`` segment numbers in the order to group them.
    :param lengths: ``[n_segments]`` steps of each segment.
    """
    order = np.asarray(order)
    steps = np.cumsum(lengths[order])  # steps of the first i + 1 segments of ``order``
    start, base = 0, 0
    while start < len(order):
        # the first segment at which the chunk reaches batch_size steps (or the last one)
        end = min(int(np.searchsorted(steps, base + batch_size, side="left")) + 1, len(order))
        yield order[start:end]
        start, base = end, int(steps[end - 1])


def pack_columns(
    segments: np.ndarray, lengths: np.ndarray, starts_episode: np.ndarray, pack: bool
) -> list[list[int]]:
    """A minibatch's training sequences: lists of segment numbers, each list's segments run one
    after another; the first segment of each list gives the stored state.

    Unpacked: one segment per column. Packed: segments that continue an episode from the
    previous rollout (no episode start at their first step) each head a column; the others,
    longest first, go into the column with the least room that still fits them within
    ``T = max length`` (on ties, the one that has had that room longest; a new column if none
    fits). This is best fit decreasing, the classic bin-packing heuristic, in ``O(n·T)`` for
    ``n`` segments.

    :param segments: ``[n]`` segment numbers of the minibatch.
    :param lengths: ``[n_segments]`` steps of each segment of the rollout.
    :param starts_episode: ``[n_segments]`` bool, the segment's first step starts an episode.
    :param pack: pack (True) or one segment per column (False).
    """
    if not pack:
        return [[int(seg)] for seg in segments]
    capacity = int(lengths[segments].max())
    first = starts_episode[segments]
    columns = [[int(seg)] for seg in segments[~first]]
    # room -> the columns with that much room left, in the order they got it; bit r of
    # ``nonempty`` is set while by_room[r] holds a column
    by_room: list[collections.deque[int]] = [collections.deque() for _ in range(capacity + 1)]
    nonempty = 0
    for i, col in enumerate(columns):
        room = capacity - int(lengths[col[0]])
        by_room[room].append(i)
        nonempty |= 1 << room
    rest = segments[first]
    order = rest[np.argsort(-lengths[rest], kind="stable")]
    for seg, length in zip(order.tolist(), lengths[order].tolist(), strict=True):
        fits = nonempty >> length  # bit j: a column with room length + j
        if fits:
            room = length + (fits & -fits).bit_length() - 1  # the least room that fits
            queue = by_room[room]
            i = queue.popleft()
            if not queue:
                nonempty &= ~(1 << room)
        else:
            i, room = len(columns), capacity
            columns.append([])
        columns[i].append(seg)
        left = room - length
        by_room[left].append(i)
        nonempty |= 1 << left
    return columns


def column_layout(
    columns: list[list[int]], lengths: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Where each segment of ``columns`` goes: its segment number, column and first time step
    within the column, in column order, and ``T``, the longest column's steps.

    :return: ``(segment [k], column [k], offset [k], T)`` for the ``k`` segments of the columns.
    """
    segment = np.array(list(itertools.chain.from_iterable(columns)), dtype=np.int64)
    column = np.repeat(np.arange(len(columns)), [len(col) for col in columns])
    seg_lengths = lengths[segment]
    ends = np.cumsum(seg_lengths)
    col_first = np.flatnonzero(np.r_[True, column[1:] != column[:-1]])  # first segment per col
    col_base = np.repeat(
        ends[col_first] - seg_lengths[col_first], np.diff(np.r_[col_first, len(column)])
    )
    offset = ends - seg_lengths - col_base
    T = int((offset + seg_lengths).max())
    return segment, column, offset, T

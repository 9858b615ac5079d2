"""The DARTS cell's wiring, in one place: its edges, their order and their names.

A cell has two input states (0: the cell two back, 1: the cell before) and ``steps``
intermediate nodes; node ``n`` (state ``2 + n``) reads every state before it, so it has
``2 + n`` incoming edges. Edges are numbered node by node, and within a node by source
state: the rows of every ``[num_edges, num_ops]`` matrix of alphas, mixing weights,
latencies or scores follow this order.
"""

from __future__ import annotations

from keras_das.space import primitives


def num_edges(steps: int) -> int:
    """Edges of a cell with ``steps`` intermediate nodes: 2 + 3 + ... + (steps + 1)."""
    return sum(2 + i for i in range(steps))


def edge_index(node: int, source: int) -> int:
    """Row of the edge from state ``source`` into intermediate node ``node``."""
    return num_edges(node) + source


def edge_names(steps: int) -> list[str]:
    """``"j->i"`` labels of a cell's edges (``i`` the state the edge feeds), in row order."""
    return [f"{j}->{2 + node}" for node in range(steps) for j in range(2 + node)]


def cell_output_shape(input_shape, channels: int, reduction: bool, concatenated: int):
    """The output shape of a cell called on ``[s0, s1]`` of shapes ``input_shape``: its
    nodes are ``channels`` wide at s1's resolution (halved in a reduction cell), and it
    concatenates ``concatenated`` of them."""
    state = primitives.strided_shape(tuple(input_shape[1]), 1, channels)
    node = primitives.strided_shape(state, 2, channels) if reduction else state
    return node[:-1] + (concatenated * channels,)


def check_partial_channels(partial_channels, channels: int) -> int:
    """Returns PC-DARTS's K, or raises a ValueError unless it is a positive int dividing
    ``channels`` (each edge's ops see the first ``channels / K`` channels)."""
    if not isinstance(partial_channels, int) or partial_channels < 1 or channels % partial_channels:
        raise ValueError(
            f"partial_channels must be a positive int dividing channels={channels}, got "
            f"{partial_channels!r}"
        )
    return partial_channels

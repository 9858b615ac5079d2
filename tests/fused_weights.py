"""A per-edge ``SearchCell``'s values in a ``FusedSearchCell``'s layout (tests only).

``per_edge_values(fused, cell)`` pairs every variable of ``fused`` with the value that
makes it compute what the per-edge ``cell`` computes; with a ``value_of`` mapping, any
per-edge values (gradients, say) are rearranged the same way. ``copy_weights`` loads them.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np
from keras import layers

from keras_das.space import stacked_ops

_CELL_FIELDS = (
    "channels",
    "reduction",
    "reduction_prev",
    "op_names",
    "steps",
    "multiplier",
    "partial_channels",
)


def _stack(arrays, axis=-1):
    return np.concatenate([np.asarray(a) for a in arrays], axis=axis)


def _bn_values(bn, bns, value_of):
    """The stacked batch norm's statistics from the per-edge ones."""
    return [
        (variable, _stack([value_of(b.weights[i]) for b in bns]))
        for i, variable in enumerate(bn.weights)
    ]


def _layers_of(op, cls):
    return [layer for layer in op.chain if isinstance(layer, cls)]


def _separable_values(stacked, per_edge, value_of):
    depthwise = [_layers_of(op, layers.DepthwiseConv2D) for op in per_edge]
    pointwise = [_layers_of(op, layers.Conv2D) for op in per_edge]
    bns = [_layers_of(op, layers.BatchNormalization) for op in per_edge]
    out = []
    for i in range(stacked.repeats):
        out.append((stacked.depthwise[i], _stack([value_of(d[i].kernel) for d in depthwise], 2)))
        out.append((stacked.pointwise[i], _stack([value_of(p[i].kernel) for p in pointwise])))
        out += _bn_values(stacked.bns[i], [b[i] for b in bns], value_of)
    return out


def _conv_values(stacked, per_edge, value_of):
    convs = [_layers_of(op, layers.Conv2D)[0] for op in per_edge]
    bns = [_layers_of(op, layers.BatchNormalization)[0] for op in per_edge]
    return [
        (stacked.kernel, _stack([value_of(conv.kernel) for conv in convs])),
        *_bn_values(stacked.bn, bns, value_of),
    ]


def _factorized_reduce_values(stacked, per_edge, value_of):
    return [
        (stacked.kernel_1, _stack([value_of(op.conv_1.kernel) for op in per_edge])),
        (stacked.kernel_2, _stack([value_of(op.conv_2.kernel) for op in per_edge])),
        *_bn_values(stacked.bn, [op.bn for op in per_edge], value_of),
    ]


def _shared_pool_values(shared, per_edge, value_of):
    """The statistics of the per-edge ``PoolBN`` ops, which must agree (they see the same
    batches in training; only an edited network makes them differ)."""
    bns = [_layers_of(op, layers.BatchNormalization)[0] for op in per_edge]
    values = [[np.asarray(value_of(u)) for u in bn.weights] for bn in bns]
    for bn, other in zip(bns[1:], values[1:]):
        if not all(np.array_equal(a, b) for a, b in zip(values[0], other)):
            raise ValueError(
                f"{bn.path} and {bns[0].path} have different statistics, but the fused "
                "cell keeps one batch norm for a pool on all the edges leaving a state"
            )
    return list(zip(shared.bn.weights, values[0]))


def _op_values(op, per_edge, value_of):
    """``[(variable of the stacked op, value)]`` from its ``edges`` per-edge ops."""
    if isinstance(op, stacked_ops.SharedPoolBN):
        return _shared_pool_values(op, per_edge, value_of)
    if isinstance(op, stacked_ops.StackedFactorizedReduce):
        return _factorized_reduce_values(op, per_edge, value_of)
    if isinstance(op, stacked_ops.StackedConv):
        return _conv_values(op, per_edge, value_of)
    return _separable_values(op, per_edge, value_of)


def _current_value(variable):
    return keras.ops.convert_to_numpy(variable.value)


def per_edge_values(fused, cell, value_of: Callable | None = None) -> list:
    """``[(variable of fused, value)]`` that make ``fused`` compute what ``cell`` computes.

    Args:
        fused: a built ``FusedSearchCell``.
        cell: a built ``SearchCell`` with the same configuration.
        value_of: maps each of ``cell``'s variables to the value to use for it
            (default: its current value).

    Returns:
        Pairs covering every variable of ``fused``.
    """
    value_of = value_of or _current_value
    mine, theirs = fused.get_config(), cell.get_config()
    differ = [f for f in _CELL_FIELDS if mine[f] != theirs[f]]
    if differ:
        detail = ", ".join(f"{f}: {theirs[f]!r} vs {mine[f]!r}" for f in differ)
        raise ValueError(f"cell {cell.name!r} differs from {fused.name!r} in {detail}")
    if not (fused.built and cell.built):
        raise ValueError("build both cells (call them on inputs) before copying weights")
    out = _op_values(fused.preprocess0, [cell.preprocess0], value_of)
    out += _op_values(fused.preprocess1, [cell.preprocess1], value_of)
    for j, source in enumerate(fused.sources):
        mixed_ops = [cell.edges[r] for r in fused._rows(j)]
        for i in range(len(source.op_names)):
            op = source._op(i)
            if op is not None:
                out += _op_values(op, [mix.ops[i] for mix in mixed_ops], value_of)
    return out


def copy_weights(cell, fused) -> None:
    """Loads the weights and batch-norm statistics of the per-edge ``cell`` into ``fused``."""
    for variable, value in per_edge_values(fused, cell):
        if tuple(variable.shape) != tuple(np.shape(value)):
            raise ValueError(f"{variable.path}: shape {tuple(variable.shape)} vs {np.shape(value)}")
        variable.assign(value)

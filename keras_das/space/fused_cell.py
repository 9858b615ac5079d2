"""FusedSearchCell: the DARTS search cell with the ops of all edges from one node fused.

Every state of a search cell (its two preprocessed inputs and each intermediate node)
feeds several edges, all at the same stride. ``SearchCell`` runs a ``MixedOp`` per edge,
so the DARTS supernet is tens of thousands of tiny ops on e.g. 32x32x8 feature maps, where
per-op costs dominate (tracing, Grappler and the executor all scale with the op count).
This cell processes the states in order and, for each state, computes every candidate op
for all its ``E`` outgoing edges at once, on stacked ``E * C``-channel tensors
(edge-major: channel ``e * C + c`` is channel ``c`` of edge ``e``):

- ``ReLU`` once per state, shared by every conv op of every edge.
The stacked ops (``keras_das.space.stacked_ops``) compute one candidate for the ``E`` edges:

- Sep and dil convs: the ``E`` edges' depthwise convolutions as one (of the input tiled
  ``E`` times), their pointwise 1x1 convolutions as one grouped convolution; for narrow
  ``C`` the first depthwise and pointwise pair as one dense convolution with the composed
  kernel (see ``stacked_ops._StackedSeparable``). ``conv_kxk``: one ``C -> E * C`` convolution.
- The per-edge batch norms (no affine): one over the ``E * C`` channels (per-channel
  statistics are the per-edge statistics), run by TensorFlow's fused kernel
  (``keras_das.space.fused_batch_norm.FusedBatchNorm``), which also applies each edge's
  mixing weight as its scale.
- Pools followed by batch norm without affine, and the identity, give the same output on
  every edge from a state: computed once per state, then mixed into all its edges by one
  matmul (``FusedMixedOps._mix_shared``).
- ``skip_connect`` at stride 2 (FactorizedReduce): one 2x2 stride-2 convolution.
- ``none`` adds nothing and is skipped, as ``MixedOp`` skips it.

The mix of edge ``e`` is ``sum_i w[edge, i] * op_i[..., e, :]``. A state's ``E`` edges go
to the last ``E`` nodes, so the partial sums of the unfinished nodes are one tensor
``[batch, h, w, nodes_left, C]`` to which each state's mixes are added in one op.

PC-DARTS's partial channels (``partial_channels=K``): each state's ops are built for
``C / K`` channels and read the state's first ``C / K``; the bypassed rest is the same on
every edge from the state, so it is computed (max-pooled at stride 2) and put in
``channel_shuffle``'s order once per state, then broadcast over the ``E`` mixes (see
``FusedSearchCell._partial_channel_mix``).

The cell computes what ``SearchCell`` computes with the same weights: same batch
statistics and moving-statistic updates, outputs equal to float32 rounding (about 1e-6
relative: summation orders and composed kernels differ), about a third of the graph ops.
One difference: second derivatives through batch norm are exact here, whereas Keras's
``BatchNormalization`` gets them slightly wrong (its variance stops the gradient of the
mean), which shows in the ``exact`` architect.

Layouts were chosen by timing the alternatives on the 2-core CPU this project targets
(``benchmarks/search_step.py`` times whole search steps); the docstrings say which won,
``benchmarks/README.md`` keeps the figures.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf  # splits, unstacks and matmuls with NumPy constants as single ops
from keras import layers
from keras import ops

from keras_das.space import gradients
from keras_das.space import kernels
from keras_das.space import primitives
from keras_das.space import stacked_ops
from keras_das.space import topology

# The ops FusedMixedOps has stacked forms of. A name is fused only while the registry
# still holds the package's own factory for it: a user who re-registers a name with
# another factory gets the per-edge cell, never a fused cell computing something else.
FUSABLE_OPS = (*primitives.DARTS_OPS, "conv_3x3", "conv_5x5")


def unfusable_ops(op_names: Sequence[str]) -> list[str]:
    """The names in ``op_names`` that ``FusedSearchCell`` cannot fuse.

    A name is fusable when it is one of ``FUSABLE_OPS`` and the op registry holds the
    built-in factory for it (``primitives.is_builtin_op``).
    """
    return [n for n in op_names if n not in FUSABLE_OPS or not primitives.is_builtin_op(n)]


def check_fusable(op_names: Sequence[str]) -> tuple[str, ...]:
    """Returns ``op_names`` as a tuple, or raises a ValueError naming the unfusable ones."""
    op_names = primitives.check_op_names(op_names)
    bad = unfusable_ops(op_names)
    if bad:
        raise ValueError(
            f"FusedSearchCell cannot fuse ops {bad} (user-registered or re-registered ops "
            f"run only in the per-edge SearchCell); fusable ops are {list(FUSABLE_OPS)}"
        )
    return op_names


def _split_edges(x, edges):
    """``[..., E * C]`` -> ``[..., E, C]`` (free: a reshape)."""
    shape = kernels.static_or_dynamic_shape(x)
    return ops.reshape(x, (*shape[:-1], edges, shape[-1] // edges))


# -- one state's edges --------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="keras_das")
class FusedMixedOps(layers.Layer):
    """The MixedOps of ``edges`` edges that read the same state, computed together.

    Call with ``(x, mixing_weights)``, ``mixing_weights`` ``[edges, num_ops]`` (one row
    per edge); returns the ``edges`` mixes as ``[batch, h, w, edges, channels]``.

    Args:
        op_names: fusable candidate op names (see ``FUSABLE_OPS``).
        channels: input and output channels.
        edges: how many edges read the state.
        strides: 1, or 2 for the input edges of a reduction cell.
    """

    def __init__(self, op_names, channels, edges, strides=1, **kwargs):
        super().__init__(**kwargs)
        self.op_names = check_fusable(op_names)
        self.channels = channels
        self.edges = edges
        self.strides = strides
        # Keras tracks layers in lists, not None: keep the op of index i at position i of
        # candidates only for ops with layers.
        self.op_layers = {}
        for i, name in enumerate(self.op_names):
            op = self._make_op(i, name)
            if op is not None:
                self.op_layers[str(i)] = op

    def _make_op(self, index, name):
        c, e, s = self.channels, self.edges, self.strides
        kwargs = dict(name=f"op_{index}_{name}", dtype=self.dtype_policy)
        if name == "none" or (name == "skip_connect" and s == 1):
            return None
        if name in ("max_pool_3x3", "avg_pool_3x3"):
            return stacked_ops.SharedPoolBN(name[:3], strides=s, **kwargs)
        if name == "skip_connect":
            return stacked_ops.StackedFactorizedReduce(c, e, **kwargs)
        kernel = int(name[-1])
        if name.startswith("sep_conv"):
            return stacked_ops.StackedSepConv(c, e, kernel, s, **kwargs)
        if name.startswith("dil_conv"):
            return stacked_ops.StackedDilConv(c, e, kernel, s, **kwargs)
        return stacked_ops.StackedConv(c, e, kernel, s, **kwargs)

    def _op(self, index):
        return self.op_layers.get(str(index))

    def _input_shape(self, op, input_shape):
        """The shape of the prepared input ``op`` reads."""
        shape = tuple(input_shape)
        if getattr(op, "input_kind", None) == "tiled":
            shape = shape[:-1] + (self.edges * shape[-1],)
        if isinstance(op, stacked_ops.StackedDilConv) and self.strides == 2:
            return primitives.strided_shape(shape, 2, shape[-1])
        return shape

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        if input_shape[-1] != self.channels:
            raise ValueError(
                f"FusedMixedOps {self.name!r} expects {self.channels} input channels, got "
                f"input shape {input_shape}"
            )
        for op in self.op_layers.values():
            op.build(self._input_shape(op, input_shape))

    def compute_output_shape(self, input_shape):
        shape = primitives.strided_shape(tuple(input_shape), self.strides, self.channels)
        return shape[:-1] + (self.edges, self.channels)

    def _prepared(self, x):
        """Returns ``get(op)``: the input of each op, each computed once and shared.

        ReLU, then at stride 2 the symmetric padding (strided sep convs and convs) or the
        even pixels (strided dil convs), then the tiling (wide sep and dil convs): padding
        and subsampling before tiling move 4x fewer bytes.
        """
        cache = {}

        def once(key, make):
            if key not in cache:
                cache[key] = make()
            return cache[key]

        def relu():
            return once("relu", lambda: ops.relu(x))

        def strided(op):
            """The ReLU as a strided ``op`` reads it, and a key naming that."""
            if isinstance(op, stacked_ops.StackedDilConv):
                # x[:, ::2, ::2] as a 1x1 pool: exact, and its gradient measured several
                # times faster than a strided slice's (a scatter).
                return once("even", lambda: ops.average_pool(relu(), 1, 2, "valid")), "even"
            p = op.kernel_size // 2
            return once(("pad", p), lambda: _pad(relu(), p)), ("pad", p)

        def get(op):
            if isinstance(op, stacked_ops.SharedPoolBN):
                return x
            if self.strides == 1 or isinstance(op, stacked_ops.StackedFactorizedReduce):
                base, key = relu(), "relu"
            else:
                base, key = strided(op)
            if op.input_kind == "tiled":
                return once(("tiled", key), lambda: ops.tile(base, (1, 1, 1, self.edges)))
            return base

        return get

    def call(self, inputs, mixing_weights, training=None):
        x = inputs
        w = ops.cast(mixing_weights, self.compute_dtype)
        get = self._prepared(x)
        total = None
        shared, shared_rows = [], []  # outputs alike on every edge, their weight columns
        scales = None
        for i, name in enumerate(self.op_names):
            op = self._op(i)
            if op is None and name != "skip_connect":
                continue  # none: contributes w * 0
            if op is None or isinstance(op, stacked_ops.SharedPoolBN):
                shared.append(x if op is None else op(x, training=training))
                shared_rows.append(i)
                continue
            if scales is None:
                scales = self._scales(w)
            # The mixing weight scales the op's last batch norm: no multiply of its own
            # (measured faster, see FusedBatchNorm).
            term = op(get(op), training=training, scale=scales[i])
            total = term if total is None else total + term
        if total is not None:  # summed as [..., E * C], split once
            total = _split_edges(total, self.edges)
        if shared:
            term = self._mix_shared(
                shared, tf.matmul(w, _one_hot(shared_rows, w.shape[1], w.dtype), transpose_b=True)
            )
            total = term if total is None else total + term
        if total is None:  # every candidate is none
            zeros = ops.zeros_like(x[:, :: self.strides, :: self.strides, :1])
            total = ops.expand_dims(zeros, -1) * ops.zeros((self.edges, self.channels), x.dtype)
        return total

    def _scales(self, weights):
        """Every op's batch-norm scale, ``[E * C]`` each: ``weights[e, i]`` on edge ``e``'s
        channels. Built once per state (a slice and ``ops.repeat`` per op were ~15 graph
        ops each; a transpose, a tile and two reshapes ~30 with their gradients): one
        matmul, ``weights^T`` times the constant ``[E, E * C]`` that repeats each row ``C``
        times (exact: each output one product by 1)."""
        repeat = np.kron(np.eye(self.edges), np.ones((1, self.channels)))
        repeat = repeat.astype(weights.dtype.as_numpy_dtype)
        return tf.unstack(tf.matmul(weights, repeat, transpose_a=True))

    def _mix_shared(self, outputs, weights):
        """``sum_o weights[e, o] * outputs[o]`` for every edge ``e``: ``[..., E, C]``.

        One matmul of the concatenated outputs with ``weights (x) identity(C)``. Broadcast
        multiplies (``outputs[o][..., None, :] * weights[:, o, None]``) cost more than the
        rest of a normal cell at size D: their gradients reduce over non-trailing axes.
        """
        c, n = self.channels, len(outputs)
        # A NumPy identity: a constant, where ops.eye is a graph op built on every call.
        eye = np.eye(c, dtype=weights.dtype.as_numpy_dtype)
        kernel = ops.einsum("eo,cd->oced", weights, eye)
        kernel = ops.reshape(kernel, (n * c, self.edges * c))
        x = gradients.concatenate(outputs, axis=-1)
        y = ops.matmul(ops.reshape(x, (-1, n * c)), kernel)
        return ops.reshape(y, (*kernels.static_or_dynamic_shape(x)[:-1], self.edges, c))

    def get_config(self):
        return {
            **super().get_config(),
            "op_names": list(self.op_names),
            "channels": self.channels,
            "edges": self.edges,
            "strides": self.strides,
        }


def _pad(x, p):
    return ops.pad(x, [[0, 0], [p, p], [p, p], [0, 0]])


def _one_hot(indices, size, dtype):
    """The constant ``[len(indices), size]`` 0/1 matrix whose row ``i`` picks entry
    ``indices[i]``. Rows (or columns) picked by a matmul with it are exact (one product by
    1, the rest by 0) and its gradient is one matmul, where a gather's is a scatter: some
    20 graph ops, with ``axis=1`` some 60 (2,376 of a size-D first-order step's 29,942)."""
    picks = np.zeros((len(indices), size), tf.as_dtype(dtype).as_numpy_dtype)
    picks[np.arange(len(indices)), indices] = 1.0
    return picks


def _split_off(x, size, axis):
    """``x`` split along ``axis`` (statically sized) into its first ``size`` and the rest:
    one op, where ``ops.split`` at an index builds ten to turn it into sizes."""
    return tf.split(x, [size, x.shape[axis] - size], axis=axis)


# -- the cell -----------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="keras_das")
class FusedSearchCell(layers.Layer):
    """A DARTS search cell computing the edges of each state together.

    Same constructor, call (``cell([s0, s1], mixing_weights)``, mixing weights
    ``[num_edges, num_ops]`` in ``SearchCell``'s edge order, optional PC-DARTS
    ``edge_weights`` ``[num_edges]`` and DARTS- ``aux_skip_beta``) and outputs as
    ``SearchCell``; see the module docstring for how it is computed.

    Args:
        channels: channels of every node (C).
        reduction: the edges from the two inputs have stride 2.
        reduction_prev: the cell before was a reduction cell (``s0`` has twice the
            resolution of ``s1``).
        op_names: candidate ops; all must be fusable (``FUSABLE_OPS``).
        steps: intermediate nodes.
        multiplier: nodes concatenated into the output.
        partial_channels: PC-DARTS's K: the first ``channels / K`` channels of each state
            go through the ops, the rest bypass them (see ``MixedOp``).

    Raises:
        ValueError: an op name cannot be fused (use ``SearchCell``), or
            ``partial_channels`` does not divide ``channels``.
    """

    def __init__(
        self,
        channels,
        reduction=False,
        reduction_prev=False,
        op_names=primitives.DARTS_OPS,
        steps=4,
        multiplier=4,
        partial_channels=1,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.partial_channels = topology.check_partial_channels(partial_channels, channels)
        self.channels = channels
        self.reduction = reduction
        self.reduction_prev = reduction_prev
        self.op_names = check_fusable(op_names)
        self.steps = steps
        self.multiplier = multiplier
        # SearchCell's preprocessing (search_network.preprocess), as one-edge stacked ops.
        dtype = self.dtype_policy
        if reduction_prev:
            self.preprocess0 = stacked_ops.StackedFactorizedReduceBlock(
                channels, 1, name="preprocess0", dtype=dtype
            )
        else:
            self.preprocess0 = stacked_ops.StackedReLUConvBN(
                channels, 1, 1, name="preprocess0", dtype=dtype
            )
        self.preprocess1 = stacked_ops.StackedReLUConvBN(
            channels, 1, 1, name="preprocess1", dtype=dtype
        )
        # State j feeds nodes max(0, j - 1) .. steps - 1; the last state feeds none.
        self.sources = []
        for j in range(steps + 1):
            self.sources.append(
                FusedMixedOps(
                    self.op_names,
                    channels // partial_channels,
                    edges=len(self._targets(j)),
                    strides=2 if reduction and j < 2 else 1,
                    name=f"state_{j}",
                    dtype=dtype,
                )
            )

    def _targets(self, source):
        return range(max(0, source - 1), self.steps)

    def _rows(self, source):
        return [topology.edge_index(node, source) for node in self._targets(source)]

    def build(self, input_shape):
        s0_shape, s1_shape = (tuple(s) for s in input_shape)
        self.preprocess0.build(s0_shape)
        self.preprocess1.build(s1_shape)
        state = primitives.strided_shape(s1_shape, 1, self.channels)
        node_shape = primitives.strided_shape(state, 2, self.channels) if self.reduction else state
        for j, source in enumerate(self.sources):
            shape = state if j < 2 else node_shape
            source.build(shape[:-1] + (source.channels,))

    def compute_output_shape(self, input_shape):
        return topology.cell_output_shape(
            input_shape, self.channels, self.reduction, self.multiplier
        )

    def call(self, inputs, mixing_weights, edge_weights=None, aux_skip_beta=None, training=None):
        s0, s1 = inputs
        states = [self.preprocess0(s0, training=training), self.preprocess1(s1, training=training)]
        pending = None  # [batch, h, w, nodes not finished, C]: their partial sums
        # Each state's rows of the mixing weights: one matmul picking them (see _one_hot)
        # and one split per cell, rather than a gather per state (a scatter in each's
        # gradient); with the edges' ops summed before their one split into [..., E, C]
        # below, that was 2-3% fewer graph ops per step (size S: first order 22,235 ->
        # 21,639, exact 72,129 -> 70,646).
        rows = [self._rows(j) for j in range(len(self.sources))]
        order = _one_hot(
            [r for state in rows for r in state], mixing_weights.shape[0], mixing_weights.dtype
        )
        by_state = tf.split(tf.matmul(order, mixing_weights), [len(state) for state in rows])
        for j, (source, weights) in enumerate(zip(self.sources, by_state)):
            if self.partial_channels > 1:
                mix = self._partial_channel_mix(source, states[j], weights, training)
            else:
                mix = source(states[j], weights, training=training)
            if aux_skip_beta is not None and not (self.reduction and j < 2):
                # DARTS-: beta * input on every stride-1 edge, broadcast over the edges.
                beta = ops.cast(aux_skip_beta, mix.dtype)
                mix = mix + beta * ops.expand_dims(states[j], axis=-2)
            if edge_weights is not None:  # PC-DARTS: each edge's output times its weight
                picks = _one_hot(rows[j], edge_weights.shape[0], edge_weights.dtype)
                scale = tf.matmul(picks, ops.expand_dims(edge_weights, -1))
                mix = mix * ops.cast(scale, mix.dtype)
            pending = mix if pending is None else pending + mix
            if j == 0:
                continue
            # The first unfinished node has all its inputs now. A split, not slices:
            # the gradient of a slice is a slow scatter (measured several times slower).
            if j < self.steps:
                node, pending = _split_off(pending, 1, axis=-2)
            else:
                node = pending
            states.append(ops.squeeze(node, axis=-2))
        return gradients.concatenate(states[-self.multiplier :], axis=-1)

    def _partial_channel_mix(self, source, x, mixing_weights, training):
        """``mixed_op.partial_channel_mix`` for every edge leaving the state ``x``.

        Returns ``[batch, h, w, E, C]``: on edge ``e``, ``channel_shuffle`` of edge ``e``'s
        mix of the first ``C / K`` channels concatenated with the bypassed rest.
        """
        k, part = self.partial_channels, self.channels // self.partial_channels
        # A split, not slices: the gradient of a slice is a slow scatter.
        x, rest = _split_off(x, part, axis=-1)
        mix = source(x, mixing_weights, training=training)  # [batch, h, w, E, C / K]
        if source.strides == 2:
            rest = ops.max_pool(rest, 2, 2, padding="same")
        # channel_shuffle(concatenate([mix, rest]), K) moves channel i of group g to
        # i * K + g, where group 0 is the mix and groups 1 .. K - 1 the rest. So the rest,
        # the same on every edge, is arranged once per state as [..., C / K, K - 1], and
        # each edge's mix goes in front of it: one concatenation for all edges, no gather.
        shape = kernels.static_or_dynamic_shape(rest)
        rest = ops.reshape(rest, (*shape[:-1], k - 1, part))
        rest = ops.expand_dims(ops.swapaxes(rest, -1, -2), axis=-3)  # [..., 1, C / K, K - 1]
        mix_shape = kernels.static_or_dynamic_shape(mix)
        rest = ops.broadcast_to(rest, (*mix_shape, k - 1))
        out = ops.concatenate([ops.expand_dims(mix, axis=-1), rest], axis=-1)
        return ops.reshape(out, (*mix_shape[:-1], self.channels))

    def get_config(self):
        return {
            **super().get_config(),
            "channels": self.channels,
            "reduction": self.reduction,
            "reduction_prev": self.reduction_prev,
            "op_names": list(self.op_names),
            "steps": self.steps,
            "multiplier": self.multiplier,
            "partial_channels": self.partial_channels,
        }

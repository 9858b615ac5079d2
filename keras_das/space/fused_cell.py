"""FusedSearchCell: the DARTS search cell with the ops of all edges from one node fused.

Every state of a search cell (its two preprocessed inputs and each intermediate node)
feeds several edges, all at the same stride. ``SearchCell`` runs a ``MixedOp`` per edge,
so the DARTS supernet is tens of thousands of tiny ops on e.g. 32x32x8 feature maps, where
per-op costs dominate (tracing, Grappler and the executor all scale with the op count).
This cell processes the states in order and, for each state, computes every candidate op
for all its ``E`` outgoing edges at once, on stacked ``E * C``-channel tensors
(edge-major: channel ``e * C + c`` is channel ``c`` of edge ``e``):

- ``ReLU`` once per state, shared by every conv op of every edge.
- Sep and dil convs: the ``E`` edges' depthwise convolutions as one (of the input tiled
  ``E`` times), their pointwise 1x1 convolutions as one grouped convolution; for narrow
  ``C`` the first depthwise and pointwise pair as one dense convolution with the composed
  kernel (see ``_StackedSeparable``). ``conv_kxk``: one ``C -> E * C`` convolution.
- The per-edge batch norms (no affine): one over the ``E * C`` channels (per-channel
  statistics are the per-edge statistics), run by TensorFlow's fused kernel
  (``FusedBatchNorm``), which also applies each edge's mixing weight as its scale.
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
mean), which shows in the ``exact`` architect. ``copy_weights_from`` loads a
``SearchCell``'s weights; ``per_edge_values`` maps any per-edge values (e.g. gradients).

Layouts were chosen by timing the alternatives on the 2-core CPU this project targets;
the docstrings below give the numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf  # kernels that keras.ops lacks (fused batch norm)
from keras import layers
from keras import ops

from keras_das.space import kernels
from keras_das.space import primitives
from keras_das.space import topology

# The ops this module knows how to fuse, with the op class (and its settings) that the
# registry must still build for each name: a user who re-registers a name with another
# factory gets the per-edge cell, never a fused cell computing something else.
FUSABLE_OPS = (*primitives.DARTS_OPS, "conv_3x3", "conv_5x5")


def _expected_op(name: str, strides: int) -> tuple[type, dict]:
    """The class and settings ``ops.make_op(name, ...)`` builds for a fusable name."""
    kind, _, size = name.rpartition("_")
    kernel = int(size[0]) if size[:1].isdigit() else None
    if name == "none":
        return primitives.Zero, {"strides": strides}
    if name in ("max_pool_3x3", "avg_pool_3x3"):
        return primitives.Pool, {"pool_type": name[:3], "pool_size": 3, "strides": strides}
    if name == "skip_connect":
        return (primitives.Identity, {}) if strides == 1 else (primitives.FactorizedReduce, {})
    if kind == "sep_conv":
        return primitives.SepConv, {"kernel_size": kernel, "strides": strides}
    if kind == "dil_conv":
        return primitives.DilConv, {"kernel_size": kernel, "strides": strides, "dilation_rate": 2}
    return primitives.ReLUConvBN, {"kernel_size": kernel, "strides": strides}


def unfusable_ops(op_names: Sequence[str]) -> list[str]:
    """The names in ``op_names`` that ``FusedSearchCell`` cannot fuse.

    A name is fusable when it is one of ``FUSABLE_OPS`` and the op registry still builds
    the built-in op for it (at stride 1 and 2).
    """
    bad = []
    for name in op_names:
        ok = name in FUSABLE_OPS and name in primitives.OPS
        for strides in (1, 2):
            if not ok:
                break
            op = primitives.OPS[name](8, strides, False)
            cls, settings = _expected_op(name, strides)
            ok = type(op) is cls and all(getattr(op, k) == v for k, v in settings.items())
        if not ok:
            bad.append(name)
    return bad


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


# Sep and dil convs on at most this many channels per edge compose each edge's depthwise
# and pointwise kernels into one dense convolution of the un-tiled input; wider ones tile
# the input and run a depthwise and a grouped 1x1 convolution. See _StackedSeparable.
_DENSE_MAX_CHANNELS = 16


@keras.saving.register_keras_serializable(package="keras_das")
class FusedBatchNorm(layers.BatchNormalization):
    """``BatchNormalization`` (no affine) that can scale its output and trains faster.

    In training mode, for float32 channels-last inputs and unless ``synchronized`` over
    several replicas, it runs TensorFlow's fused batch-norm kernel (one op forward and one backward instead of
    some ten element-wise ones each; exact second derivatives) and updates the moving
    statistics as ``BatchNormalization`` does, with the biased batch variance (not at all
    inside ``keras_das.space.primitives.discarding_batch_norm_statistics()``, where the caller throws
    the updates away). Otherwise (inference, synchronised statistics under a strategy,
    other dtypes) it is
    ``BatchNormalization``. Forward + backward of a normal cell at size S: 278 ms with
    it, 334 ms with ``BatchNormalization`` (mixing weights multiplied separately in both).

    Call with ``scale`` (``[channels]``) to multiply the output per channel: the fused
    kernel does it in its own pass, so the mixing weights cost no op of their own (226 ms
    for the same cell).
    """

    def call(self, inputs, training=None, scale=None):
        if (
            training
            and self.trainable
            and not (self.synchronized and tf.distribute.get_strategy().num_replicas_in_sync > 1)
            and not (self.center or self.scale or self.renorm)
            and self.axis in (-1, len(inputs.shape) - 1)
            and len(inputs.shape) == 4
            and inputs.dtype == "float32"
        ):
            return self._fused_training_call(inputs, scale)
        outputs = super().call(inputs, training=training)
        return outputs if scale is None else outputs * ops.cast(scale, outputs.dtype)

    def _fused_training_call(self, inputs, scale):
        # The kernel op directly, with NumPy constants and, for static shapes, the element
        # count as a Python number: tf.ones/tf.zeros, tf.nn's wrapper and a dynamic count
        # were about a quarter of a call's graph ops (Python tracing pays per op,
        # constants included).
        channels = inputs.shape[-1]
        dtype = inputs.dtype.as_numpy_dtype
        if scale is None:
            scale = np.ones((channels,), dtype)
        outputs, mean, variance, _, _, _ = tf.raw_ops.FusedBatchNormV3(
            x=inputs,
            scale=scale,
            offset=np.zeros((channels,), dtype),
            mean=np.zeros((0,), dtype),
            variance=np.zeros((0,), dtype),
            epsilon=self.epsilon,
            exponential_avg_factor=1.0,
            data_format="NHWC",
            is_training=True,
        )
        if primitives.batch_norm_statistics_discarded():
            return outputs
        # The kernel returns the unbiased variance (for PyTorch-style running statistics);
        # BatchNormalization averages the biased one.
        if None in tuple(inputs.shape):
            count = tf.cast(tf.size(inputs, out_type=tf.int64) // channels, inputs.dtype)
        else:
            count = float(np.prod(inputs.shape[:-1]))  # exact in float32, as the cast count
        variance = variance * (count - 1.0) / count
        momentum = self.momentum
        for moving, batch in ((self.moving_mean, mean), (self.moving_variance, variance)):
            moving.assign(moving.value * momentum + batch * (1.0 - momentum))
        return outputs


def _batch_norm(name=None):
    return FusedBatchNorm(
        momentum=primitives.BN_MOMENTUM,
        epsilon=primitives.BN_EPSILON,
        center=False,
        scale=False,
        name=name,
    )


# -- the stacked ops ------------------------------------------------------------------------
#
# Each computes one candidate op for E edges that read the same input. Inputs arrive
# already prepared (ReLU, padding, even pixels, tiling) by FusedMixedOps, which shares
# that work between ops; outputs are [batch, h, w, E * C], edge-major. ``scale``
# ([E * C]) multiplies the output per channel inside the last batch norm.


def _compose(depthwise, pointwise, edges):
    """The ``[k, k, C, E * D]`` kernel of depthwise-then-grouped-pointwise per edge.

    ``depthwise`` is ``[k, k, E * C, 1]``, ``pointwise`` ``[1, 1, C, E * D]``; the result
    read as a grouped kernel is the composition, read as a dense kernel on a ``C``-channel
    input it is every edge's depthwise-then-pointwise of that input.
    """
    k, c_total = depthwise.shape[0], depthwise.shape[2]
    c = c_total // edges
    d = pointwise.shape[-1] // edges
    dw = ops.reshape(depthwise, (k, k, edges, c))
    pw = ops.reshape(pointwise, (c, edges, d))
    kernel = ops.einsum("ijec,ced->ijced", dw, pw)
    return ops.reshape(kernel, (k, k, c, edges * d))


class _StackedOp(layers.Layer):
    """Base of the stacked ops: ``edges`` copies of a candidate op on one input."""

    input_kind = "relu"  # which prepared input FusedMixedOps hands to call()

    def __init__(self, channels, edges, strides=1, **kwargs):
        super().__init__(**kwargs)
        self.channels = channels
        self.edges = edges
        self.strides = strides

    def _kernel(self, name, shape, edge_shape):
        """A stacked kernel, initialised as Keras initialises each edge's ``edge_shape``
        kernel (Glorot uniform with the per-edge fans, not the stacked ones)."""
        receptive_field = int(np.prod(edge_shape[:-2]))
        fan_in, fan_out = edge_shape[-2] * receptive_field, edge_shape[-1] * receptive_field
        limit = float(np.sqrt(6.0 / (fan_in + fan_out)))
        initializer = keras.initializers.RandomUniform(-limit, limit)
        return self.add_weight(name=name, shape=shape, initializer=initializer, trainable=True)

    def per_edge_values(self, ops, value_of):
        """``[(variable, value)]`` that make this op compute the per-edge ``ops``.

        Args:
            ops: the ``edges`` per-edge op layers, in edge order.
            value_of: maps a per-edge variable to the array to use for it.
        """
        raise NotImplementedError(f"{type(self).__name__} defines per_edge_values()")

    def get_config(self):
        return {
            **super().get_config(),
            "channels": self.channels,
            "edges": self.edges,
            "strides": self.strides,
        }


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


class _StackedSeparable(_StackedOp):
    """Sep and dil convs: ``repeats`` times (depthwise, 1x1, BN), with ReLUs between.

    The first depthwise and 1x1 convolutions read the same ``C`` channels on every edge.
    With ``C <= _DENSE_MAX_CHANNELS`` they run as one dense ``k x k`` convolution
    ``C -> E * C`` whose kernel composes each edge's two (``dw[t, c] * pw[c, d]``, no
    nonlinearity between them); wider, as a depthwise convolution of the input tiled
    ``E`` times and a grouped 1x1 convolution. Later repeats read ``E * C`` stacked
    channels: a depthwise and a grouped 1x1 convolution.

    Timed forward + backward of a whole normal cell (minimum of 8-15 runs, the two
    variants back to back; other runs on the machine moved single figures by up to 2x):
    - C=8 at 32x32, batch 32: dense 222 ms, tiled 226 ms; C=16 at 32x32, batch 64: dense
      769-791 ms, tiled 796-802 ms, and 1.70 against 2.09 GB peak memory (no tiled
      input, no depthwise outputs to keep for the backward pass).
    - C=16 at 16x16, batch 32: dense 114 ms, tiled 107 ms; C=32 at 16x16, batch 64: dense
      546 ms, tiled 423 ms; C=64 at 8x8: dense 486 ms, tiled 258 ms (the dense kernel's
      FLOPs grow as C^2 k^2 against C k^2 + C^2).
    - Later repeats composed into a grouped ``k x k`` convolution instead: 242 against
      226 ms (C=8), 1034-1072 against 1003 ms (C=16 at 32x32, batch 64); not kept.
    The depthwise then grouped 1x1 layout itself: see ``kernels.grouped_pointwise``.
    """

    repeats = 1
    dilation = 1

    def __init__(self, channels, edges, kernel_size=3, strides=1, **kwargs):
        super().__init__(channels, edges, strides, **kwargs)
        self.kernel_size = kernel_size
        self.bns = [_batch_norm(f"bn_{i + 1}") for i in range(self.repeats)]

    @property
    def input_kind(self):
        return "relu" if self.channels <= _DENSE_MAX_CHANNELS else "tiled"

    def build(self, input_shape):
        k, c, e = self.kernel_size, self.channels, self.edges
        self.depthwise = []
        self.pointwise = []
        for i in range(self.repeats):
            self.depthwise.append(
                self._kernel(f"depthwise_{i + 1}", (k, k, e * c, 1), (k, k, c, 1))
            )
            self.pointwise.append(
                self._kernel(f"pointwise_{i + 1}", (1, 1, c, e * c), (1, 1, c, c))
            )
        shape = primitives.strided_shape(input_shape, self.strides, e * c)
        for bn in self.bns:
            bn.build(shape)

    def _first(self, x):
        """The first depthwise and pointwise convolutions (stride, dilation applied)."""
        strides, padding, dilation = self.strides, "valid", 1  # stride 2: input padded
        if self.strides == 1:
            padding, dilation = "same", self.dilation
        elif self.dilation > 1:
            strides, padding = 1, "same"  # the input is the even pixels: undilated conv
        if self.input_kind == "relu":
            kernel = _compose(self.depthwise[0], self.pointwise[0], self.edges)
            return ops.conv(x, kernel, strides, padding, dilation_rate=dilation)
        x = ops.depthwise_conv(x, self.depthwise[0], strides, padding, dilation_rate=dilation)
        return kernels.grouped_pointwise(x, self.pointwise[0])

    def call(self, inputs, training=None, scale=None):
        x = self._first(inputs)
        for i in range(1, self.repeats):
            x = ops.relu(self.bns[i - 1](x, training=training))
            x = ops.depthwise_conv(x, self.depthwise[i], 1, "same")
            x = kernels.grouped_pointwise(x, self.pointwise[i])
        return self.bns[-1](x, training=training, scale=scale)

    def per_edge_values(self, ops, value_of):
        depthwise = [_layers_of(op, layers.DepthwiseConv2D) for op in ops]
        pointwise = [_layers_of(op, layers.Conv2D) for op in ops]
        bns = [_layers_of(op, layers.BatchNormalization) for op in ops]
        out = []
        for i in range(self.repeats):
            out.append((self.depthwise[i], _stack([value_of(d[i].kernel) for d in depthwise], 2)))
            out.append((self.pointwise[i], _stack([value_of(p[i].kernel) for p in pointwise])))
            out += _bn_values(self.bns[i], [b[i] for b in bns], value_of)
        return out

    def get_config(self):
        return {**super().get_config(), "kernel_size": self.kernel_size}


@keras.saving.register_keras_serializable(package="keras_das")
class StackedSepConv(_StackedSeparable):
    """``sep_conv_kxk`` of ``edges`` edges: (depthwise, grouped 1x1, BN) twice.

    Its input is the ReLU of the state (padded at stride 2, tiled ``edges`` times).
    """

    repeats = 2


@keras.saving.register_keras_serializable(package="keras_das")
class StackedDilConv(_StackedSeparable):
    """``dil_conv_kxk`` of ``edges`` edges: dilated depthwise, grouped 1x1, BN.

    Its input is the ReLU of the state (at stride 2 its even pixels, where the dilated
    strided convolution is an undilated one; tiled ``edges`` times).
    """

    dilation = 2


@keras.saving.register_keras_serializable(package="keras_das")
class StackedConv(_StackedOp):
    """``conv_kxk`` (ReLU, conv, BN) of ``edges`` edges: one ``C -> E * C`` convolution.

    Its input is the ReLU of the state (padded at stride 2).
    """

    def __init__(self, channels, edges, kernel_size=3, strides=1, **kwargs):
        super().__init__(channels, edges, strides, **kwargs)
        self.kernel_size = kernel_size
        self.bn = _batch_norm("bn")

    def build(self, input_shape):
        k, c, e = self.kernel_size, self.channels, self.edges
        c_in = input_shape[-1]
        self.kernel = self._kernel("kernel", (k, k, c_in, e * c), (k, k, c_in, c))
        self.bn.build(primitives.strided_shape(input_shape, self.strides, e * c))

    def call(self, inputs, training=None, scale=None):
        padding = "same" if self.strides == 1 else "valid"
        x = ops.conv(inputs, self.kernel, self.strides, padding)
        return self.bn(x, training=training, scale=scale)

    def per_edge_values(self, ops, value_of):
        convs = [_layers_of(op, layers.Conv2D)[0] for op in ops]
        bns = [_layers_of(op, layers.BatchNormalization)[0] for op in ops]
        return [
            (self.kernel, _stack([value_of(conv.kernel) for conv in convs])),
            *_bn_values(self.bn, bns, value_of),
        ]

    def get_config(self):
        return {**super().get_config(), "kernel_size": self.kernel_size}


@keras.saving.register_keras_serializable(package="keras_das")
class StackedFactorizedReduce(_StackedOp):
    """``skip_connect`` at stride 2 (FactorizedReduce) of ``edges`` edges.

    Per edge, two 1x1 convolutions to ``C / 2`` channels read the pixels ``x[::2, ::2]``
    and ``x[1::2, 1::2]``, concatenated, then BN. Here both are one 2x2 stride-2
    convolution whose kernel is zero but at the taps (0, 0) (first half of each edge's
    channels) and (1, 1) (second half): no strided slices (whose gradients are slow
    scatters), no concatenation, and the edges come out interleaved as they should.
    Timed forward + backward (32x32, C=8, E=4, batch 32): 1.7 ms, against 3.4 ms with
    slices, two 1x1 convolutions and a concatenation. Exact: the zero taps add zeros.

    Its input is the ReLU of the state.
    """

    def __init__(self, channels, edges, strides=2, **kwargs):
        super().__init__(channels, edges, strides, **kwargs)
        if channels % 2:
            raise ValueError(f"FactorizedReduce needs an even number of channels, got {channels}")
        self.bn = _batch_norm("bn")

    def build(self, input_shape):
        half, e, c_in = self.channels // 2, self.edges, input_shape[-1]
        self.kernel_1 = self._kernel("kernel_1", (1, 1, c_in, e * half), (1, 1, c_in, half))
        self.kernel_2 = self._kernel("kernel_2", (1, 1, c_in, e * half), (1, 1, c_in, half))
        self.bn.build(primitives.strided_shape(input_shape, 2, e * self.channels))

    def _taps(self):
        c_in, e, half = self.kernel_1.shape[-2], self.edges, self.channels // 2
        first = ops.reshape(self.kernel_1, (c_in, e, half))
        second = ops.reshape(self.kernel_2, (c_in, e, half))
        zeros = ops.zeros_like(first)
        even = ops.reshape(ops.concatenate([first, zeros], axis=-1), (c_in, e * 2 * half))
        odd = ops.reshape(ops.concatenate([zeros, second], axis=-1), (c_in, e * 2 * half))
        none = ops.zeros_like(even)
        return ops.stack([ops.stack([even, none]), ops.stack([none, odd])])

    def call(self, inputs, training=None, scale=None):
        x = inputs
        height, width = x.shape[1], x.shape[2]
        if height is None or width is None or height % 2 or width % 2:
            # Odd sizes: the odd pixels of the last row or column are zeros, as in
            # FactorizedReduce (unknown sizes: padding by the parity is exact as well).
            shape = ops.shape(x)
            x = ops.pad(x, [[0, 0], [0, shape[1] % 2], [0, shape[2] % 2], [0, 0]])
        x = ops.conv(x, self._taps(), 2, "valid")
        return self.bn(x, training=training, scale=scale)

    def per_edge_values(self, ops, value_of):
        return [
            (self.kernel_1, _stack([value_of(op.conv_1.kernel) for op in ops])),
            (self.kernel_2, _stack([value_of(op.conv_2.kernel) for op in ops])),
            *_bn_values(self.bn, [op.bn for op in ops], value_of),
        ]


@keras.saving.register_keras_serializable(package="keras_das")
class StackedReLUConvBN(StackedConv):
    """A cell's preprocessing ``ReLUConvBN`` (one edge), with the ReLU included."""

    def call(self, inputs, training=None, scale=None):
        return super().call(ops.relu(inputs), training=training, scale=scale)


@keras.saving.register_keras_serializable(package="keras_das")
class StackedFactorizedReduceBlock(StackedFactorizedReduce):
    """A cell's preprocessing ``FactorizedReduce`` (one edge), with the ReLU included."""

    def call(self, inputs, training=None, scale=None):
        return super().call(ops.relu(inputs), training=training, scale=scale)


def _split_edges(x, edges):
    """``[..., E * C]`` -> ``[..., E, C]`` (free: a reshape)."""
    shape = kernels.static_or_dynamic_shape(x)
    return ops.reshape(x, (*shape[:-1], edges, shape[-1] // edges))


@keras.saving.register_keras_serializable(package="keras_das")
class PoolBatchNorm(layers.Layer):
    """A pool and a batch norm without affine (``PoolBN``), with the fused batch norm.

    The output is the same on every edge from a state: computed once per state.
    """

    def __init__(self, pool_type, strides=1, **kwargs):
        super().__init__(**kwargs)
        self.pool_type = pool_type
        self.strides = strides
        self.pool = primitives.Pool(pool_type, 3, strides)
        self.bn = _batch_norm("bn")

    def build(self, input_shape):
        self.bn.build(self.pool.compute_output_shape(input_shape))

    def call(self, inputs, training=None):
        return self.bn(self.pool(inputs), training=training)

    def per_edge_values(self, ops, value_of):
        """The statistics of the per-edge ``PoolBN`` ops, which must agree (they see the
        same batches in training; only an edited network makes them differ)."""
        bns = [_layers_of(op, layers.BatchNormalization)[0] for op in ops]
        values = [[np.asarray(value_of(u)) for u in bn.weights] for bn in bns]
        for bn, other in zip(bns[1:], values[1:]):
            if not all(np.array_equal(a, b) for a, b in zip(values[0], other)):
                raise ValueError(
                    f"{bn.path} and {bns[0].path} have different statistics, but the fused "
                    "cell keeps one batch norm for a pool on all the edges leaving a state"
                )
        return list(zip(self.bn.weights, values[0]))

    def get_config(self):
        return {**super().get_config(), "pool_type": self.pool_type, "strides": self.strides}


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
        label = f"op_{index}_{name}"
        if name == "none" or (name == "skip_connect" and s == 1):
            return None
        if name in ("max_pool_3x3", "avg_pool_3x3"):
            return PoolBatchNorm(name[:3], strides=s, name=label)
        if name == "skip_connect":
            return StackedFactorizedReduce(c, e, name=label)
        kernel = int(name[-1])
        if name.startswith("sep_conv"):
            return StackedSepConv(c, e, kernel, s, name=label)
        if name.startswith("dil_conv"):
            return StackedDilConv(c, e, kernel, s, name=label)
        return StackedConv(c, e, kernel, s, name=label)

    def _op(self, index):
        return self.op_layers.get(str(index))

    def _input_shape(self, op, input_shape):
        """The shape of the prepared input ``op`` reads."""
        shape = tuple(input_shape)
        if getattr(op, "input_kind", None) == "tiled":
            shape = shape[:-1] + (self.edges * shape[-1],)
        if isinstance(op, StackedDilConv) and self.strides == 2:
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
            if isinstance(op, StackedDilConv):
                # x[:, ::2, ::2] as a 1x1 pool: exact, and its gradient is 2.6-4.5x faster
                # than a strided slice's (a scatter) at 32x32, C=16-32.
                return once("even", lambda: ops.average_pool(relu(), 1, 2, "valid")), "even"
            p = op.kernel_size // 2
            return once(("pad", p), lambda: _pad(relu(), p)), ("pad", p)

        def get(op):
            if isinstance(op, PoolBatchNorm):
                return x
            if self.strides == 1 or isinstance(op, StackedFactorizedReduce):
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
            if op is None or isinstance(op, PoolBatchNorm):
                shared.append(x if op is None else op(x, training=training))
                shared_rows.append(i)
                continue
            if scales is None:
                scales = self._scales(w)
            # The mixing weight scales the op's last batch norm: no multiply of its own
            # (forward + backward of a normal cell at size S: 226 against 278 ms).
            term = _split_edges(op(get(op), training=training, scale=scales[i]), self.edges)
            total = term if total is None else total + term
        if shared:
            term = self._mix_shared(shared, tf.gather(w, shared_rows, axis=1))
            total = term if total is None else total + term
        if total is None:  # every candidate is none
            zeros = ops.zeros_like(x[:, :: self.strides, :: self.strides, :1])
            total = ops.expand_dims(zeros, -1) * ops.zeros((self.edges, self.channels), x.dtype)
        return total

    def _scales(self, weights):
        """Every op's batch-norm scale, ``[E * C]`` each: ``weights[e, i]`` on edge ``e``'s
        channels. Built once per state (a slice and ``ops.repeat`` per op were ~15 graph
        ops each)."""
        n, e, c = len(self.op_names), self.edges, self.channels
        columns = tf.reshape(tf.transpose(weights), (n, e, 1))
        return tf.unstack(tf.reshape(tf.tile(columns, (1, 1, c)), (n, e * c)))

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
        x = outputs[0] if n == 1 else ops.concatenate(outputs, axis=-1)
        y = ops.matmul(ops.reshape(x, (-1, n * c)), kernel)
        return ops.reshape(y, (*kernels.static_or_dynamic_shape(x)[:-1], self.edges, c))

    def per_edge_values(self, mixed_ops, value_of):
        """``[(variable, value)]`` to compute what the per-edge ``mixed_ops`` compute.

        A pool has one batch norm here for the ``edges`` ones of the per-edge MixedOps,
        whose statistics must agree (see ``PoolBatchNorm.per_edge_values``).
        """
        out = []
        for i in range(len(self.op_names)):
            op = self._op(i)
            if op is None:
                continue
            out += op.per_edge_values([mix.ops[i] for mix in mixed_ops], value_of)
        return out

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
        if reduction_prev:
            self.preprocess0 = StackedFactorizedReduceBlock(channels, 1, name="preprocess0")
        else:
            self.preprocess0 = StackedReLUConvBN(channels, 1, 1, name="preprocess0")
        self.preprocess1 = StackedReLUConvBN(channels, 1, 1, name="preprocess1")
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
        for j, source in enumerate(self.sources):
            rows = self._rows(j)
            weights = tf.gather(mixing_weights, rows, axis=0)
            if self.partial_channels > 1:
                mix = self._partial_channel_mix(source, states[j], weights, training)
            else:
                mix = source(states[j], weights, training=training)
            if aux_skip_beta is not None and not (self.reduction and j < 2):
                # DARTS-: beta * input on every stride-1 edge, broadcast over the edges.
                beta = ops.cast(aux_skip_beta, mix.dtype)
                mix = mix + beta * ops.expand_dims(states[j], axis=-2)
            if edge_weights is not None:  # PC-DARTS: each edge's output times its weight
                scale = ops.cast(ops.take(edge_weights, rows, axis=0), mix.dtype)
                mix = mix * ops.reshape(scale, (len(rows), 1))
            pending = mix if pending is None else pending + mix
            if j == 0:
                continue
            # The first unfinished node has all its inputs now. A split, not slices:
            # the gradient of a slice is a slow scatter (9.2 ms against 1.7 ms forward +
            # backward at 32x32, C=8, E=4, batch 32).
            if j < self.steps:
                node, pending = ops.split(pending, [1], axis=-2)
            else:
                node = pending
            states.append(ops.squeeze(node, axis=-2))
        return ops.concatenate(states[-self.multiplier :], axis=-1)

    def _partial_channel_mix(self, source, x, mixing_weights, training):
        """``mixed_op.partial_channel_mix`` for every edge leaving the state ``x``.

        Returns ``[batch, h, w, E, C]``: on edge ``e``, ``channel_shuffle`` of edge ``e``'s
        mix of the first ``C / K`` channels concatenated with the bypassed rest.
        """
        k, part = self.partial_channels, self.channels // self.partial_channels
        # A split, not slices: the gradient of a slice is a slow scatter.
        x, rest = ops.split(x, [part], axis=-1)
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

    # -- weights of a per-edge cell -------------------------------------------------------

    def per_edge_values(self, cell: layers.Layer, value_of: Callable | None = None) -> list:
        """``[(variable of this cell, value)]`` that make it compute what ``cell`` computes.

        Args:
            cell: a built ``SearchCell`` with the same configuration.
            value_of: maps each of ``cell``'s variables to the value to use for it
                (default: its current value). Pass e.g. a dict lookup of gradients to
                rearrange per-edge gradients into this cell's layout.

        Returns:
            Pairs covering every variable of this cell.
        """
        if value_of is None:

            def value_of(variable):
                return keras.ops.convert_to_numpy(variable.value)

        mine, theirs = self.get_config(), cell.get_config()
        fields = (
            "channels",
            "reduction",
            "reduction_prev",
            "op_names",
            "steps",
            "multiplier",
            "partial_channels",
        )
        differ = [f for f in fields if mine[f] != theirs[f]]
        if differ:
            detail = ", ".join(f"{f}: {theirs[f]!r} vs {mine[f]!r}" for f in differ)
            raise ValueError(f"cell {cell.name!r} differs from {self.name!r} in {detail}")
        if not (self.built and cell.built):
            raise ValueError("build both cells (call them on inputs) before copying weights")
        out = self.preprocess0.per_edge_values([cell.preprocess0], value_of)
        out += self.preprocess1.per_edge_values([cell.preprocess1], value_of)
        for j, source in enumerate(self.sources):
            out += source.per_edge_values([cell.edges[r] for r in self._rows(j)], value_of)
        return out

    def copy_weights_from(self, cell: layers.Layer) -> None:
        """Loads the weights and batch-norm statistics of the per-edge ``cell``."""
        for variable, value in self.per_edge_values(cell):
            if tuple(variable.shape) != tuple(np.shape(value)):
                raise ValueError(
                    f"{variable.path}: shape {tuple(variable.shape)} vs {np.shape(value)}"
                )
            variable.assign(value)

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

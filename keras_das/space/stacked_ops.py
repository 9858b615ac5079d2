"""The stacked ops: one candidate op for the ``E`` edges that read the same state.

``FusedMixedOps`` (``keras_das.space.fused_cell``) computes every candidate of a state's
outgoing edges with these. Each stacked op holds the weights of ``E`` per-edge ops and
computes them at once on stacked ``E * C``-channel tensors, edge-major (channel
``e * C + c`` is channel ``c`` of edge ``e``). Inputs arrive already prepared (ReLU,
padding, even pixels, tiling) by ``FusedMixedOps``, which shares that work between ops;
outputs are ``[batch, h, w, E * C]``. ``scale`` (``[E * C]``) multiplies the output per
channel inside the last batch norm (the mixing weights, see ``FusedBatchNorm``).

``SharedPoolBN`` is the exception: a pool and a batch norm without affine give the same
output on every edge from a state, so it is computed once, for all of them.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf  # the depthwise ops, with static paddings
from keras import layers
from keras import ops

from keras_das.space import fused_batch_norm
from keras_das.space import kernels
from keras_das.space import primitives

# Sep and dil convs on at most this many channels per edge compose each edge's depthwise
# and pointwise kernels into one dense convolution of the un-tiled input; wider ones tile
# the input and run a depthwise and a grouped 1x1 convolution. See _StackedSeparable.
_DENSE_MAX_CHANNELS = 8


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


def _depthwise(x, kernel, strides, padding, dilation=1):
    """``ops.depthwise_conv`` of channels-last ``x`` (static spatial shape) in the ops
    TensorFlow's ``tf.nn.depthwise_conv2d`` runs, with their paddings computed here: the
    depthwise op, and for a dilation (stride 1) its undilated form between a
    ``SpaceToBatchND`` and a ``BatchToSpaceND``. The same ops with the same arguments, in
    3 graph ops (1 undilated) where TensorFlow's wrapper builds 13 (3), mostly constants
    for the paddings. Unknown spatial sizes: ``ops.depthwise_conv``."""
    if None in tuple(x.shape[1:3]):
        return ops.depthwise_conv(x, kernel, strides, padding, dilation_rate=dilation)
    if dilation == 1:
        return tf.raw_ops.DepthwiseConv2dNative(
            input=x, filter=kernel, strides=[1, strides, strides, 1], padding=padding.upper()
        )
    if strides != 1:
        raise ValueError(f"a dilated depthwise convolution has stride 1, got {strides}")
    k = kernel.shape[0]
    # TensorFlow's required_space_to_batch_paddings: "same" pads (k - 1) * dilation around,
    # then each spatial size is padded at its end to a multiple of the dilation.
    total = (k - 1) * dilation if padding.lower() == "same" else 0
    paddings, crops = [], []
    for size in x.shape[1:3]:
        start, end = total // 2, total - total // 2
        extra = -(size + start + end) % dilation
        paddings.append([start, end + extra])
        crops.append([0, extra])
    blocks = np.array([dilation, dilation], np.int32)
    y = tf.raw_ops.SpaceToBatchND(
        input=x, block_shape=blocks, paddings=np.array(paddings, np.int32)
    )
    y = tf.raw_ops.DepthwiseConv2dNative(
        input=y, filter=kernel, strides=[1, 1, 1, 1], padding="VALID"
    )
    return tf.raw_ops.BatchToSpaceND(input=y, block_shape=blocks, crops=np.array(crops, np.int32))


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

    def get_config(self):
        return {
            **super().get_config(),
            "channels": self.channels,
            "edges": self.edges,
            "strides": self.strides,
        }


class _StackedSeparable(_StackedOp):
    """Sep and dil convs: ``repeats`` times (depthwise, 1x1, BN), with ReLUs between.

    The first depthwise and 1x1 convolutions read the same ``C`` channels on every edge.
    With ``C <= _DENSE_MAX_CHANNELS`` they run as one dense ``k x k`` convolution
    ``C -> E * C`` whose kernel composes each edge's two (``dw[t, c] * pw[c, d]``, no
    nonlinearity between them); wider, as a depthwise convolution of the input tiled
    ``E`` times and a grouped 1x1 convolution. Later repeats read ``E * C`` stacked
    channels: a depthwise and a grouped 1x1 convolution.

    Dense is lighter in peak memory (no tiled input, no depthwise outputs to keep for the
    backward pass) and about even in time at C=8; from C=16 on tiled is faster (the dense
    kernel's FLOPs grow as ``C^2 k^2`` against ``C k^2 + C^2``): a whole size-D search
    step ran 9-10% faster with the C=16 cells tiled, with TensorFlow's portable and with
    oneDNN's kernels alike, for 0.3-1.3 GB more peak memory. Hence the threshold. Composing
    the later repeats into a grouped ``k x k`` convolution as well measured slower; not kept.
    Figures: ``benchmarks/README.md``. The depthwise then grouped 1x1 layout itself: see
    ``kernels.grouped_pointwise``.
    """

    repeats = 1
    dilation = 1

    def __init__(self, channels, edges, kernel_size=3, strides=1, **kwargs):
        super().__init__(channels, edges, strides, **kwargs)
        self.kernel_size = kernel_size
        self.bns = [
            fused_batch_norm.batch_norm(f"bn_{i + 1}", self.dtype_policy)
            for i in range(self.repeats)
        ]

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
        x = _depthwise(x, self.depthwise[0], strides, padding, dilation)
        return kernels.grouped_pointwise(x, self.pointwise[0])

    def call(self, inputs, training=None, scale=None):
        x = self._first(inputs)
        for i in range(1, self.repeats):
            x = ops.relu(self.bns[i - 1](x, training=training))
            x = _depthwise(x, self.depthwise[i], 1, "same")
            x = kernels.grouped_pointwise(x, self.pointwise[i])
        return self.bns[-1](x, training=training, scale=scale)

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
        self.bn = fused_batch_norm.batch_norm("bn", self.dtype_policy)

    def build(self, input_shape):
        k, c, e = self.kernel_size, self.channels, self.edges
        c_in = input_shape[-1]
        self.kernel = self._kernel("kernel", (k, k, c_in, e * c), (k, k, c_in, c))
        self.bn.build(primitives.strided_shape(input_shape, self.strides, e * c))

    def call(self, inputs, training=None, scale=None):
        padding = "same" if self.strides == 1 else "valid"
        x = ops.conv(inputs, self.kernel, self.strides, padding)
        return self.bn(x, training=training, scale=scale)

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
    Measured faster forward and backward than slices, two 1x1 convolutions and a
    concatenation (see ``benchmarks/README.md``). Exact: the zero taps add zeros.

    Its input is the ReLU of the state.
    """

    def __init__(self, channels, edges, strides=2, **kwargs):
        super().__init__(channels, edges, strides, **kwargs)
        if channels % 2:
            raise ValueError(f"FactorizedReduce needs an even number of channels, got {channels}")
        self.bn = fused_batch_norm.batch_norm("bn", self.dtype_policy)

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


@keras.saving.register_keras_serializable(package="keras_das")
class SharedPoolBN(layers.Layer):
    """``primitives.PoolBN`` (no affine) once for all the edges leaving a state.

    Its output is the same on every edge from the state, so it is computed once per state
    and mixed into all of them; its batch norm is a ``FusedBatchNorm``.
    """

    def __init__(self, pool_type, strides=1, **kwargs):
        super().__init__(**kwargs)
        self.pool_type = pool_type
        self.strides = strides
        self.pool = primitives.Pool(pool_type, 3, strides, dtype=self.dtype_policy)
        self.bn = fused_batch_norm.batch_norm("bn", self.dtype_policy)

    def build(self, input_shape):
        self.bn.build(self.pool.compute_output_shape(input_shape))

    def call(self, inputs, training=None):
        return self.bn(self.pool(inputs), training=training)

    def get_config(self):
        return {**super().get_config(), "pool_type": self.pool_type, "strides": self.strides}

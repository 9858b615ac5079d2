"""Candidate operations and the registry that builds them by name.

Every op is a Keras layer built from ``(channels, strides, affine)``: ``channels`` is the
number of output channels, ``strides`` is 1 or 2, and ``affine`` says whether its batch
norms learn a scale and offset (``False`` in the search network, as in DARTS).

The definitions follow the DARTS reference (``cnn/operations.py`` of quark0/darts),
including its padding: at stride 2 the reference pads symmetrically, which TensorFlow's
``"same"`` padding does not, so strided ops pad explicitly and the outputs line up pixel
for pixel with the reference.

Example:
    >>> op = keras_das.space.primitives.make_op("sep_conv_3x3", channels=16, strides=2, affine=False)
    >>> keras_das.space.primitives.register_op("conv_7x1_1x7", my_factory)
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

import keras
from keras import layers
from keras import ops

# Batch-norm settings of the PyTorch reference (momentum 0.1 there is 0.9 here).
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

DARTS_OPS = (
    "none",
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
)

# Ops with no learnable weights (what a skip-connection collapse is made of).
PARAMETER_FREE_OPS = frozenset({"none", "max_pool_3x3", "avg_pool_3x3", "skip_connect"})

OpFactory = Callable[[int, int, bool], keras.layers.Layer]


def batch_norm(affine: bool, name: str | None = None, dtype=None) -> layers.BatchNormalization:
    """The reference's BatchNorm2d: momentum 0.1 (PyTorch convention), eps 1e-5."""
    return layers.BatchNormalization(
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        center=affine,
        scale=affine,
        name=name,
        dtype=dtype,
    )


_statistics = threading.local()


@contextlib.contextmanager
def discarding_batch_norm_statistics():
    """Within this context, batch norms that can (``keras_das.space.fused_batch_norm``'s)
    build no moving-statistic updates.

    For model calls in a ``keras.StatelessScope`` whose updates are thrown away (the
    architect's losses at other weights): the updates would be dead graph ops, which
    cost tracing time (about a third of a fused batch norm's ops) and nothing else.
    """
    previous = getattr(_statistics, "discarded", False)
    _statistics.discarded = True
    try:
        yield
    finally:
        _statistics.discarded = previous


def batch_norm_statistics_discarded() -> bool:
    """Whether inside ``discarding_batch_norm_statistics()`` (on this thread)."""
    return getattr(_statistics, "discarded", False)


def synchronize_batch_norm(model: keras.layers.Layer, enabled: bool = True) -> int:
    """Makes every batch norm in ``model`` use global-batch statistics under ``tf.distribute``.

    With per-replica statistics a step on N replicas differs from the same step on one
    device; synchronised, the two match. Returns how many layers were set.
    """
    count = 0
    for layer in model._flatten_layers(include_self=True, recursive=True):
        if isinstance(layer, layers.BatchNormalization):
            layer.synchronized = enabled
            count += 1
    return count


def _check_strides(strides: int) -> None:
    if strides not in (1, 2):
        raise ValueError(f"strides must be 1 or 2, got {strides!r}")


def _symmetric_pad(size: int, dtype) -> layers.Layer:
    return layers.ZeroPadding2D(((size, size), (size, size)), dtype=dtype)


@keras.saving.register_keras_serializable(package="keras_das")
class OpChain(layers.Layer):
    """A fixed chain of sublayers, made and built one after another in ``build``.

    The base class of the composite ops: a subclass makes its chain in ``_make_layers``
    from its constructor arguments (which are also its config) and the input width, each
    sublayer on the chain's dtype policy.
    """

    def _make_layers(self, input_channels: int) -> list[layers.Layer]:
        raise NotImplementedError("OpChain subclasses define _make_layers()")

    def build(self, input_shape):
        self.chain = self._make_layers(input_shape[-1])
        shape = tuple(input_shape)
        for layer in self.chain:
            layer.build(shape)
            shape = tuple(layer.compute_output_shape(shape))

    def compute_output_shape(self, input_shape):
        chain = self.chain if self.built else self._make_layers(input_shape[-1])
        shape = tuple(input_shape)
        for layer in chain:
            shape = tuple(layer.compute_output_shape(shape))
        return shape

    def call(self, inputs, training=None):
        x = inputs
        for layer in self.chain:
            x = layer(x, training=training)
        return x


@keras.saving.register_keras_serializable(package="keras_das")
class ReLUConvBN(OpChain):
    """ReLU, k x k convolution (no bias), batch norm."""

    def __init__(self, channels, kernel_size=1, strides=1, affine=True, **kwargs):
        super().__init__(**kwargs)
        _check_strides(strides)
        self.channels = channels
        self.kernel_size = kernel_size
        self.strides = strides
        self.affine = affine

    def _make_layers(self, input_channels):
        pad = self.kernel_size // 2
        dtype = self.dtype_policy
        chain = [layers.ReLU(dtype=dtype)]
        if self.strides > 1 and pad:
            chain.append(_symmetric_pad(pad, dtype))
        chain += [
            layers.Conv2D(
                self.channels,
                self.kernel_size,
                strides=self.strides,
                padding="same" if self.strides == 1 else "valid",
                use_bias=False,
                dtype=dtype,
            ),
            batch_norm(self.affine, dtype=dtype),
        ]
        return chain

    def get_config(self):
        return {
            **super().get_config(),
            "channels": self.channels,
            "kernel_size": self.kernel_size,
            "strides": self.strides,
            "affine": self.affine,
        }


@keras.saving.register_keras_serializable(package="keras_das")
class DilConv(OpChain):
    """ReLU, depthwise k x k with dilation, pointwise 1x1, batch norm.

    TensorFlow has no strided dilated convolution. With dilation 2, stride 2 and the
    reference's padding, every tap lands on an even pixel, so the op equals an undilated
    stride-1 convolution of the even pixels: that is how stride 2 runs here (exactly, and
    at a quarter of the cost).
    """

    def __init__(self, channels, kernel_size=3, strides=1, dilation_rate=2, affine=True, **kwargs):
        super().__init__(**kwargs)
        _check_strides(strides)
        if strides == 2 and dilation_rate != 2:
            raise ValueError(f"strided DilConv needs dilation_rate 2, got {dilation_rate!r}")
        self.channels = channels
        self.kernel_size = kernel_size
        self.strides = strides
        self.dilation_rate = dilation_rate
        self.affine = affine

    def _make_layers(self, input_channels):
        dtype = self.dtype_policy
        chain = [layers.ReLU(dtype=dtype)]
        if self.strides == 2:
            chain.append(EvenPixels(dtype=dtype))
            dilation = 1
        else:
            dilation = self.dilation_rate
        chain += [
            layers.DepthwiseConv2D(
                self.kernel_size,
                padding="same",
                dilation_rate=dilation,
                use_bias=False,
                dtype=dtype,
            ),
            layers.Conv2D(self.channels, 1, use_bias=False, dtype=dtype),
            batch_norm(self.affine, dtype=dtype),
        ]
        return chain

    def get_config(self):
        return {
            **super().get_config(),
            "channels": self.channels,
            "kernel_size": self.kernel_size,
            "strides": self.strides,
            "dilation_rate": self.dilation_rate,
            "affine": self.affine,
        }


@keras.saving.register_keras_serializable(package="keras_das")
class SepConv(OpChain):
    """Two stacked (ReLU, depthwise k x k, pointwise 1x1, batch norm); only the first strides."""

    def __init__(self, channels, kernel_size=3, strides=1, affine=True, **kwargs):
        super().__init__(**kwargs)
        _check_strides(strides)
        self.channels = channels
        self.kernel_size = kernel_size
        self.strides = strides
        self.affine = affine

    def _make_layers(self, input_channels):
        k = self.kernel_size
        dtype = self.dtype_policy
        chain = [layers.ReLU(dtype=dtype)]
        if self.strides == 2:
            chain.append(_symmetric_pad(k // 2, dtype))
        chain += [
            layers.DepthwiseConv2D(
                k,
                strides=self.strides,
                padding="same" if self.strides == 1 else "valid",
                use_bias=False,
                dtype=dtype,
            ),
            # keeps C_in, as the reference
            layers.Conv2D(input_channels, 1, use_bias=False, dtype=dtype),
            batch_norm(self.affine, dtype=dtype),
            layers.ReLU(dtype=dtype),
            layers.DepthwiseConv2D(k, padding="same", use_bias=False, dtype=dtype),
            layers.Conv2D(self.channels, 1, use_bias=False, dtype=dtype),
            batch_norm(self.affine, dtype=dtype),
        ]
        return chain

    def get_config(self):
        return {
            **super().get_config(),
            "channels": self.channels,
            "kernel_size": self.kernel_size,
            "strides": self.strides,
            "affine": self.affine,
        }


@keras.saving.register_keras_serializable(package="keras_das")
class EvenPixels(layers.Layer):
    """``x[:, ::2, ::2]``: the pixels a stride-2 1x1 convolution reads."""

    def call(self, inputs):
        return inputs[:, ::2, ::2, :]

    def compute_output_shape(self, input_shape):
        return strided_shape(input_shape, 2, input_shape[-1])


@keras.saving.register_keras_serializable(package="keras_das")
class FactorizedReduce(layers.Layer):
    """Halves the resolution without losing half the pixels.

    ReLU, then two stride-2 1x1 convolutions with ``channels // 2`` outputs each, the second
    on the input shifted by one pixel, concatenated, then batch norm. A stride-2 1x1
    convolution reads the even pixels, so the two halves read ``x[::2, ::2]`` and
    ``x[1::2, 1::2]``; for odd sizes the second is zero-padded to the first's size (the
    reference requires even sizes).
    """

    def __init__(self, channels, affine=True, **kwargs):
        super().__init__(**kwargs)
        if channels % 2:
            raise ValueError(f"FactorizedReduce needs an even number of channels, got {channels}")
        self.channels = channels
        self.affine = affine
        dtype = self.dtype_policy
        self.conv_1 = layers.Conv2D(channels // 2, 1, use_bias=False, dtype=dtype)
        self.conv_2 = layers.Conv2D(channels // 2, 1, use_bias=False, dtype=dtype)
        self.bn = batch_norm(affine, dtype=dtype)

    def build(self, input_shape):
        half = strided_shape(input_shape, 2, input_shape[-1])
        self.conv_1.build(half)
        self.conv_2.build(half)
        self.bn.build(strided_shape(input_shape, 2, self.channels))

    def compute_output_shape(self, input_shape):
        return strided_shape(input_shape, 2, self.channels)

    def call(self, inputs, training=None):
        x = ops.relu(inputs)
        even = x[:, ::2, ::2, :]
        odd = x[:, 1::2, 1::2, :]
        even_shape, odd_shape = ops.shape(even), ops.shape(odd)
        missing = [even_shape[1] - odd_shape[1], even_shape[2] - odd_shape[2]]
        if not all(isinstance(m, int) and m == 0 for m in missing):
            odd = ops.pad(odd, [[0, 0], [0, missing[0]], [0, missing[1]], [0, 0]])
        out = ops.concatenate([self.conv_1(even), self.conv_2(odd)], axis=-1)
        return self.bn(out, training=training)

    def get_config(self):
        return {**super().get_config(), "channels": self.channels, "affine": self.affine}


@keras.saving.register_keras_serializable(package="keras_das")
class Pool(layers.Layer):
    """3x3 max or average pooling with the reference's padding of 1.

    Average pooling excludes the padding from the count (``count_include_pad=False``).
    At stride 1 TensorFlow's ``"same"`` pooling is exactly that; at stride 2 the padding
    is made explicit so that windows start one pixel before the image, as in the reference.
    """

    def __init__(self, pool_type, pool_size=3, strides=1, **kwargs):
        super().__init__(**kwargs)
        if pool_type not in ("max", "avg"):
            raise ValueError(f"Unknown pool_type {pool_type!r}; expected 'max' or 'avg'")
        _check_strides(strides)
        self.pool_type = pool_type
        self.pool_size = pool_size
        self.strides = strides

    def compute_output_shape(self, input_shape):
        return strided_shape(input_shape, self.strides, input_shape[-1])

    def call(self, inputs):
        pool = ops.max_pool if self.pool_type == "max" else ops.average_pool
        if self.strides == 1:
            return pool(inputs, self.pool_size, 1, padding="same")
        p = self.pool_size // 2
        paddings = [[0, 0], [p, p], [p, p], [0, 0]]
        if self.pool_type == "max":
            padded = ops.pad(inputs, paddings, constant_values=float("-inf"))
            return ops.max_pool(padded, self.pool_size, self.strides, padding="valid")
        total = ops.average_pool(ops.pad(inputs, paddings), self.pool_size, self.strides, "valid")
        ones = ops.pad(ops.ones_like(inputs[:1, :, :, :1]), paddings)
        count = ops.average_pool(ones, self.pool_size, self.strides, "valid")
        return total / count

    def get_config(self):
        return {
            **super().get_config(),
            "pool_type": self.pool_type,
            "pool_size": self.pool_size,
            "strides": self.strides,
        }


@keras.saving.register_keras_serializable(package="keras_das")
class PoolBN(OpChain):
    """A pool followed by batch norm, as pools are in the DARTS search network."""

    def __init__(self, pool_type, strides=1, affine=False, **kwargs):
        super().__init__(**kwargs)
        self.pool_type = pool_type
        self.strides = strides
        self.affine = affine

    def _make_layers(self, input_channels):
        dtype = self.dtype_policy
        pool = Pool(self.pool_type, 3, self.strides, dtype=dtype)
        return [pool, batch_norm(self.affine, dtype=dtype)]

    def get_config(self):
        return {
            **super().get_config(),
            "pool_type": self.pool_type,
            "strides": self.strides,
            "affine": self.affine,
        }


@keras.saving.register_keras_serializable(package="keras_das")
class Identity(layers.Layer):
    """Returns its input (``skip_connect`` at stride 1)."""

    is_identity = True

    def call(self, inputs):
        return inputs

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)


@keras.saving.register_keras_serializable(package="keras_das")
class Zero(layers.Layer):
    """Outputs zeros of the strided shape (``none``).

    A MixedOp skips zero candidates: they add nothing to the mix, so computing them
    would only cost time and memory.
    """

    is_zero = True

    def __init__(self, channels, strides=1, **kwargs):
        super().__init__(**kwargs)
        _check_strides(strides)
        self.channels = channels
        self.strides = strides

    def compute_output_shape(self, input_shape):
        return strided_shape(input_shape, self.strides, self.channels)

    def call(self, inputs):
        x = inputs[:, :: self.strides, :: self.strides, :1]
        return ops.zeros_like(x) * ops.zeros((self.channels,), dtype=x.dtype)

    def get_config(self):
        return {**super().get_config(), "channels": self.channels, "strides": self.strides}


def strided_shape(shape, strides, channels):
    def out(size):
        return None if size is None else (size + strides - 1) // strides

    return (shape[0], out(shape[1]), out(shape[2]), channels)


def _skip_connect(channels, strides, affine):
    # At stride 1 the identity; a channel change is left to MixedOp's adapters.
    return Identity() if strides == 1 else FactorizedReduce(channels, affine=affine)


OPS: dict[str, OpFactory] = {
    "none": lambda c, s, affine: Zero(c, strides=s),
    # Plain pools, as in the reference; the search network's MixedOps add a batch norm.
    "max_pool_3x3": lambda c, s, affine: Pool("max", 3, strides=s),
    "avg_pool_3x3": lambda c, s, affine: Pool("avg", 3, strides=s),
    "skip_connect": _skip_connect,
    "sep_conv_3x3": lambda c, s, affine: SepConv(c, 3, strides=s, affine=affine),
    "sep_conv_5x5": lambda c, s, affine: SepConv(c, 5, strides=s, affine=affine),
    "dil_conv_3x3": lambda c, s, affine: DilConv(c, 3, strides=s, dilation_rate=2, affine=affine),
    "dil_conv_5x5": lambda c, s, affine: DilConv(c, 5, strides=s, dilation_rate=2, affine=affine),
    "conv_3x3": lambda c, s, affine: ReLUConvBN(c, 3, strides=s, affine=affine),
    "conv_5x5": lambda c, s, affine: ReLUConvBN(c, 5, strides=s, affine=affine),
    "factorized_reduce": lambda c, s, affine: FactorizedReduce(c, affine=affine),
}

# The factories the package ships, kept apart from OPS, which users may change.
_BUILTIN_OPS = dict(OPS)


def is_builtin_op(name: str) -> bool:
    """Whether ``OPS[name]`` is the factory the package ships under ``name``.

    False for a user-registered name and for a built-in name re-registered with
    ``overwrite=True`` (whatever the new factory builds).
    """
    return name in OPS and OPS[name] is _BUILTIN_OPS.get(name)


def register_op(name: str, factory: OpFactory, overwrite: bool = False) -> None:
    """Adds a candidate op under ``name``.

    Args:
        name: the name configs and genotypes use for the op.
        factory: ``factory(channels, strides, affine)`` returning a Keras layer whose output
            has ``channels`` channels (or any width, if a MixedOp's adapters are to fix it)
            and a spatial size divided by ``strides``.
        overwrite: replace an op already registered under ``name``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"op name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise TypeError(f"factory for op {name!r} must be callable, got {factory!r}")
    if name in OPS and not overwrite:
        raise ValueError(f"op {name!r} is already registered; pass overwrite=True to replace it")
    OPS[name] = factory


def check_op_names(names, valid=None) -> tuple[str, ...]:
    """Returns ``names`` as a tuple, or raises naming the first unknown one."""
    valid = OPS if valid is None else valid
    if isinstance(names, str):
        raise TypeError(f"expected a sequence of op names, got the string {names!r}")
    names = tuple(names)
    for name in names:
        if name not in valid:
            raise ValueError(f"Unknown op {name!r}; expected one of {sorted(valid)}")
    return names


def make_op(
    name: str, channels: int, strides: int = 1, affine: bool = True, dtype=None
) -> layers.Layer:
    """Builds the registered op ``name``, on the dtype policy ``dtype`` if given.

    Factories take no dtype, so the policy is set on the op and on every sublayer it has
    made by then (composite ops make the rest in ``build``, on the op's policy).
    """
    check_op_names([name])
    _check_strides(strides)
    op = OPS[name](channels, strides, affine)
    if dtype is not None:
        for layer in op._flatten_layers(include_self=True, recursive=True):
            layer.dtype_policy = dtype
    return op

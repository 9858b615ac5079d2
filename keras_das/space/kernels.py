"""Kernels whose best formulation depends on the platform, chosen once by capability.

TensorFlow's CPU kernels differ between builds and CPUs: the oneDNN kernels (on by default
only on CPUs with AVX-512 VNNI/BF16 or AMX, or with ``TF_ENABLE_ONEDNN_OPTS=1``) compute
gradients that the portable Eigen kernels lack. Code here asks the runtime what it can do
(a tiny probe, run once per process and device type) and picks a formulation that works
there; no environment variable is needed.

Every TensorFlow op the package differentiates was checked with ``TF_ENABLE_ONEDNN_OPTS=0``;
the only one without a portable CPU gradient is a grouped convolution
(``Conv2DBackpropInput``/``Conv2DBackpropFilter`` with fewer filter input channels than
input channels), used here for the per-edge 1x1 convolutions of stacked tensors.
"""

from __future__ import annotations

import functools

import numpy as np
import tensorflow as tf
from keras import ops


def _device_type() -> str:
    """The type of the device eager ops are placed on now (``CPU``, ``GPU``, ...)."""
    return tf.DeviceSpec.from_string(tf.constant(0.0).device).device_type or "CPU"


def onednn_enabled() -> bool | None:
    """Whether TensorFlow's oneDNN CPU kernels are on in this process (None if it cannot
    say): as ``TF_ENABLE_ONEDNN_OPTS`` says where it is set, else on only on CPUs with
    AVX-512 VNNI/BF16 or AMX."""
    try:
        from tensorflow.python.util import _pywrap_util_port
    except ImportError:
        return None
    return bool(_pywrap_util_port.IsMklEnabled())


@functools.cache
def _grouped_conv_gradient_supported(device_type: str) -> bool:
    # Without oneDNN the CPU kernels refuse grouped gradients; asking first spares users the
    # warning TensorFlow logs for the failing probe op.
    if device_type == "CPU" and onednn_enabled() is False:
        return False
    # The two kernels of the gradient, called directly (tapes do not record under
    # tf.init_scope): 2 groups of 2 input and 2 output channels, all ones.
    x = tf.ones((1, 2, 2, 4))
    kernel = tf.ones((1, 1, 2, 4))
    strides, padding = [1, 1, 1, 1], "VALID"
    try:
        dx = tf.raw_ops.Conv2DBackpropInput(
            input_sizes=tf.shape(x),
            filter=kernel,
            out_backprop=x,
            strides=strides,
            padding=padding,
        )
        dk = tf.raw_ops.Conv2DBackpropFilter(
            input=x,
            filter_sizes=tf.shape(kernel),
            out_backprop=x,
            strides=strides,
            padding=padding,
        )
        return bool(tf.reduce_all(dx == 2.0)) and bool(tf.reduce_all(dk == 4.0))
    except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError, tf.errors.NotFoundError):
        return False


def grouped_conv_gradient_supported() -> bool:
    """Whether TensorFlow differentiates grouped convolutions on the current device.

    True on GPUs and on CPUs with oneDNN kernels, False on TensorFlow's portable CPU path.
    Probed eagerly once per process and device type (safe to call while tracing).
    """
    with tf.init_scope():
        return _grouped_conv_gradient_supported(_device_type())


def static_or_dynamic_shape(x):
    """``x``'s shape: Python ints where all are static (no graph ops), else ``ops.shape``."""
    shape = tuple(x.shape)
    return shape if None not in shape else ops.shape(x)


def grouped_pointwise(x, kernel):
    """A grouped 1x1 convolution: group ``g`` of ``x``'s channels through ``kernel``'s ``g``.

    Args:
        x: ``[..., G * C]``.
        kernel: ``[1, 1, C, G * D]``; output channels ``g * D .. (g + 1) * D - 1`` read
            input channels ``g * C .. (g + 1) * C - 1``.

    Returns:
        ``[..., G * D]``.

    Where TensorFlow differentiates grouped convolutions (GPUs, oneDNN CPUs) this is its
    grouped kernel; elsewhere a matmul with the block-diagonal ``[G * C, G * D]`` kernel
    (G times the FLOPs of the grouped kernel, but one well-tuned op: forward + backward of a
    depthwise then grouped 1x1 convolution, G=4, timed against per-group convolutions and a
    batched matmul over the group axis, was the fastest or as fast within noise at
    C = 8 .. 64; see ``benchmarks/README.md``). Both give the same numbers to float32
    rounding.
    """
    c, gd = kernel.shape[-2], kernel.shape[-1]
    groups = x.shape[-1] // c
    if len(x.shape) == 4 and grouped_conv_gradient_supported():
        return tf.nn.conv2d(x, kernel, 1, "VALID")
    d = gd // groups
    # dense[g, c, h, d] = kernel[c, h, d] * (g == h): [G * C, G * D], zero off the diagonal
    # blocks. The mask is a NumPy constant and the shapes Python ints where static: built
    # per call (the architect calls the supernet up to 4 times a step), the ops.eye,
    # transpose and dynamic-shape version was 24 graph ops (constants included) against 12.
    blocks = ops.reshape(kernel, (1, c, groups, d))
    mask = np.eye(groups, dtype=blocks.dtype.as_numpy_dtype).reshape(groups, 1, groups, 1)
    dense = ops.reshape(blocks * mask, (groups * c, groups * d))
    # One einsum with a label per leading axis: TensorFlow's kernel folds them into one
    # matmul's rows itself (an ellipsis would make them batch axes), where the reshape,
    # matmul, reshape version was six more graph ops a call with its gradients.
    rows = "abcdefghijklmnopqrstuvw"[: len(x.shape) - 1]
    return tf.einsum(f"{rows}y,yz->{rows}z", x, dense)

"""FusedBatchNorm: batch norm without affine on TensorFlow's fused kernel, with a scale.

The stacked ops of ``keras_das.space.stacked_ops`` end in it: one batch norm over the
``E * C`` channels of ``E`` edges (per-channel statistics are the per-edge statistics),
whose ``scale`` argument applies each edge's mixing weight in the kernel's own pass.

The kernel is the first version of TensorFlow's op (``FusedBatchNorm``, float32 only):
the tape differentiates it without a zeros constant for each unused output (the mean,
variance and reserve spaces), which ``FusedBatchNormV3`` (``BatchNormalization``'s) gets,
five constants and a ``ZerosLike`` per call. The same kernels compute both on CPUs
(timed alike); on GPUs the first version runs cuDNN without V3's reserve space (not
measured here).

Second derivatives: by tapes, TensorFlow's gradient of the kernel's gradient op
(``FusedBatchNormGrad``), which re-derives the gradient in some twenty ops; forward over
reverse (the exact architect's), the JVPs of both ops written out in
``keras_das.space.jvp_rules``. Both exact, see ``tests/test_fused_cell.py`` and
``tests/test_gradients.py``.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf  # the fused kernel, which keras.ops lacks
from keras import layers
from keras import ops

from keras_das.space import primitives


@keras.saving.register_keras_serializable(package="keras_das")
class FusedBatchNorm(layers.BatchNormalization):
    """``BatchNormalization`` (no affine) that can scale its output and trains faster.

    For float32 channels-last inputs it runs TensorFlow's fused batch-norm kernel: in
    training mode (unless ``synchronized`` over several replicas) one op forward and one
    backward instead of some ten element-wise ones each, exact second derivatives, and the
    moving statistics updated as ``BatchNormalization`` updates them, with the biased batch
    variance (not at all inside
    ``keras_das.space.primitives.discarding_batch_norm_statistics()``, where the caller
    throws the updates away); in inference, one op with the moving statistics. Otherwise
    (synchronised statistics under a strategy, other dtypes such as ``mixed_bfloat16``'s
    bfloat16 inputs) it is ``BatchNormalization``, which computes the statistics in float32
    under a mixed policy. The fused kernel measured faster than ``BatchNormalization`` for a
    whole normal cell's forward and backward pass (see ``benchmarks/README.md``).

    Call with ``scale`` (``[channels]``) to multiply the output per channel: the fused
    kernel does it in its own pass, so the mixing weights cost no op of their own (also
    measured faster than a separate multiply).
    """

    def call(self, inputs, training=None, scale=None):
        if (
            not (self.center or self.scale or self.renorm)
            and self.axis in (-1, len(inputs.shape) - 1)
            and len(inputs.shape) == 4
            and inputs.dtype == "float32"
        ):
            ones = np.ones((inputs.shape[-1],), inputs.dtype.as_numpy_dtype)
            kernel_scale = ones if scale is None else scale
            if not (training and self.trainable):  # as BatchNormalization decides
                moving = (self.moving_mean.value, self.moving_variance.value)
                return _kernel(inputs, kernel_scale, self.epsilon, *moving, training=False)[0]
            if not (self.synchronized and tf.distribute.get_strategy().num_replicas_in_sync > 1):
                return self._fused_training_call(inputs, kernel_scale)
        outputs = super().call(inputs, training=training)
        return outputs if scale is None else outputs * ops.cast(scale, outputs.dtype)

    def _fused_training_call(self, inputs, scale):
        if primitives.batch_norm_statistics_discarded():
            return _kernel(inputs, scale, self.epsilon)[0]
        # The kernel updates the moving statistics itself (its exponential average), in the
        # op: some ten fewer graph ops per call than the update written out, a tenth of a
        # search step's graph. It averages the unbiased batch variance (PyTorch's running
        # statistics); BatchNormalization averages the biased one, v * (n - 1) / n, so with
        # f = 1 - momentum the variance's update is taken back to
        # (1 - f) old + f v (n - 1) / n = new (n - 1) / n + old (1 - f) / n.
        # Read once each (a variable handed to two ops is read twice).
        moving_mean = tf.convert_to_tensor(self.moving_mean.value)
        moving_variance = tf.convert_to_tensor(self.moving_variance.value)
        factor = 1.0 - self.momentum
        outputs, mean, variance = _kernel(
            inputs, scale, self.epsilon, moving_mean, moving_variance, factor
        )[:3]
        n = _count(inputs)
        self.moving_mean.assign(mean)
        self.moving_variance.assign(
            variance * ((n - 1.0) / n) + moving_variance * (self.momentum / n)
        )
        return outputs


def _kernel(x, scale, epsilon, moving_mean=None, moving_variance=None, factor=1.0, training=True):
    """The fused kernel in training mode: outputs, batch mean, unbiased batch variance and
    the two reserve spaces its gradient op reads. Given the moving statistics and a
    ``factor`` below 1, the mean and variance it returns are the moving ones updated,
    ``(1 - factor) * moving + factor * batch`` (the reserve spaces stay the batch's). With
    ``training=False``, the outputs normalised with the moving statistics.

    The op directly, with NumPy constants: ``tf.ones``/``tf.zeros`` and ``tf.nn``'s wrapper
    were about a quarter of a call's graph ops (Python tracing pays per op, constants
    included)."""
    channels, dtype = x.shape[-1], x.dtype.as_numpy_dtype
    if moving_mean is None:
        moving_mean = moving_variance = np.zeros((0,), dtype)
    return tf.raw_ops.FusedBatchNorm(
        x=x,
        scale=scale,
        offset=np.zeros((channels,), dtype),
        mean=moving_mean,
        variance=moving_variance,
        epsilon=epsilon,
        exponential_avg_factor=factor,
        data_format="NHWC",
        is_training=training,
    )


def _count(x):
    """The number of values per channel of channels-last ``x``, in its dtype: a Python
    number for static shapes (exact in float32, as the cast count)."""
    if None in tuple(x.shape):
        return tf.cast(tf.size(x, out_type=tf.int64) // x.shape[-1], x.dtype)
    return float(np.prod(x.shape[:-1]))


def batch_norm(name: str | None = None, dtype=None) -> FusedBatchNorm:
    """``primitives.batch_norm(affine=False)``'s settings, on the fused kernel."""
    return FusedBatchNorm(
        momentum=primitives.BN_MOMENTUM,
        epsilon=primitives.BN_EPSILON,
        center=False,
        scale=False,
        name=name,
        dtype=dtype,
    )

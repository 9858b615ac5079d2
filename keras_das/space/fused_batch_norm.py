"""FusedBatchNorm: batch norm without affine on TensorFlow's fused kernel, with a scale.

The stacked ops of ``keras_das.space.stacked_ops`` end in it: one batch norm over the
``E * C`` channels of ``E`` edges (per-channel statistics are the per-edge statistics),
whose ``scale`` argument applies each edge's mixing weight in the kernel's own pass.
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

    In training mode, for float32 channels-last inputs and unless ``synchronized`` over
    several replicas, it runs TensorFlow's fused batch-norm kernel (one op forward and one
    backward instead of some ten element-wise ones each; exact second derivatives) and
    updates the moving statistics as ``BatchNormalization`` does, with the biased batch
    variance (not at all inside
    ``keras_das.space.primitives.discarding_batch_norm_statistics()``, where the caller
    throws the updates away). Otherwise (inference, synchronised statistics under a
    strategy, other dtypes such as ``mixed_bfloat16``'s bfloat16 inputs) it is
    ``BatchNormalization``, which computes the statistics in float32 under a mixed policy.
    The fused kernel measured faster than ``BatchNormalization`` for a whole normal cell's
    forward and backward pass (see ``benchmarks/README.md``).

    Call with ``scale`` (``[channels]``) to multiply the output per channel: the fused
    kernel does it in its own pass, so the mixing weights cost no op of their own (also
    measured faster than a separate multiply).
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

"""Batch moments with exact second derivatives, for the exact architect.

Keras's normalisation layers (``BatchNormalization``, ``LayerNormalization``,
``GroupNormalization``) take their statistics from ``keras.ops.moments``, which on
TensorFlow is ``tf.nn.moments``: its variance is ``mean((x - stop_gradient(mean))^2)``.
First derivatives are right (the mean's term vanishes), second derivatives are not, and the
exact architect differentiates a gradient: on a small float64 model with LayerNorm and
GroupNorm the hypergradient was 7% off (tests/test_hypergradient.py).

Within ``exact_second_derivatives()`` (on the calling thread: each replica of a
``tf.distribute`` strategy traces in a thread of its own), Keras's moments are computed
without the stop-gradient. Forward values are the same; outside the context nothing
changes.
"""

from __future__ import annotations

import contextlib
import threading

import tensorflow as tf
from keras.src.backend.tensorflow import nn as keras_tf_nn

_state = threading.local()
_KERAS_MOMENTS = "_compute_moments"


def _moments(x, axes, keepdims):
    mean = tf.reduce_mean(x, axes, keepdims=True)
    variance = tf.reduce_mean(tf.square(x - mean), axes, keepdims=keepdims)
    if not keepdims:
        mean = tf.squeeze(mean, axes)
    return mean, variance


def _dispatching(keras_moments):
    def moments(x, axes, keepdims):
        if getattr(_state, "exact", False):
            return _moments(x, axes, keepdims)
        return keras_moments(x, axes, keepdims)

    moments.keras_das_dispatch = True
    return moments


def install() -> None:
    """Routes Keras's moments through this module (idempotent; a no-op outside the context).

    Raises:
        RuntimeError: this Keras has no ``_compute_moments`` to route.
    """
    current = getattr(keras_tf_nn, _KERAS_MOMENTS, None)
    if current is None:
        raise RuntimeError(
            "architect='exact' needs keras.src.backend.tensorflow.nn._compute_moments, "
            "which this Keras version lacks (its normalisation layers would have wrong "
            "second derivatives); use architect='second_order'"
        )
    if not getattr(current, "keras_das_dispatch", False):
        setattr(keras_tf_nn, _KERAS_MOMENTS, _dispatching(current))


@contextlib.contextmanager
def exact_second_derivatives():
    """Within this context, Keras's moments have exact second derivatives (see module)."""
    install()
    previous = getattr(_state, "exact", False)
    _state.exact = True
    try:
        yield
    finally:
        _state.exact = previous

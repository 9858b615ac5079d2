"""Shared test helpers: the checks every layer goes through (after keras-hub's run_layer_test)."""

from __future__ import annotations

import os

import keras
import numpy as np
import pytest

# The prepared CIFAR-10 that TFDS reads offline: TFDS_DATA_DIR, which CI and conftest.py set
# (to ../shared/tfds beside the checkout when it is there). Tests that need it skip without.
CIFAR10_DATA_DIR = os.environ.get("TFDS_DATA_DIR")
if not (CIFAR10_DATA_DIR and os.path.isdir(os.path.join(CIFAR10_DATA_DIR, "cifar10"))):
    CIFAR10_DATA_DIR = None
needs_cifar10 = pytest.mark.skipif(
    CIFAR10_DATA_DIR is None,
    reason="no prepared CIFAR-10 where TFDS_DATA_DIR points (see ../shared/tfds/README.md)",
)

# A search network small enough for unit tests (3 cells of 2 nodes, 4 channels).
TINY_NETWORK = dict(num_classes=3, channels=4, num_cells=3, steps=2, multiplier=2, seed=0)


def tiny_search_network(**overrides):
    """``SearchNetwork(**TINY_NETWORK)`` with ``overrides``."""
    from keras_das import SearchNetwork

    return SearchNetwork(**{**TINY_NETWORK, **overrides})


def random_inputs(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def run_layer_test(make_layer, input_shape, expected_output_shape, tmp_path, trains=True):
    """Output shape, config round trip, one training step, and .keras save/reload.

    Args:
        make_layer: builds a fresh layer.
        input_shape: a batch shape, e.g. ``(2, 8, 8, 4)``.
        expected_output_shape: the batch output shape.
        tmp_path: a folder for the saved model.
        trains: the layer has trainable weights that a training step must change.
    """
    x = random_inputs(input_shape)
    layer = make_layer()
    y = layer(x, training=False)
    assert tuple(y.shape) == tuple(expected_output_shape)
    assert tuple(layer.compute_output_shape(input_shape)) == tuple(expected_output_shape)

    clone = layer.__class__.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    assert tuple(clone(x).shape) == tuple(expected_output_shape)

    inputs = keras.Input(input_shape[1:])
    model = keras.Model(inputs, make_layer()(inputs))
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    before = [v.numpy().copy() for v in model.trainable_variables]
    target = random_inputs(expected_output_shape, seed=1)
    history = model.fit(x, target, batch_size=input_shape[0], epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    if trains:
        assert before, "expected trainable weights"
        assert any(
            not np.array_equal(b, v.numpy()) for b, v in zip(before, model.trainable_variables)
        )
    else:
        assert not before

    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    reloaded = keras.models.load_model(path)
    np.testing.assert_allclose(
        reloaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-6
    )
    return model

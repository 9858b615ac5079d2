"""Every Keras layer the package registers goes through one contract check: it is built by a
call, its config round-trips, and saved in the .keras format and loaded back it computes
the same outputs (inference mode).

A new registered layer without an entry in LAYERS fails ``test_every_registered_layer_is_covered``.
"""

import json
import os

import keras
import numpy as np
import pytest
from keras.src.saving import saving_lib

import keras_das
from keras_das.discrete import discrete_network
from keras_das.discrete import training
from keras_das.engine import search_model
from keras_das.space import fused_batch_norm
from keras_das.space import fused_cell
from keras_das.space import mixed_op
from keras_das.space import primitives
from keras_das.space import search_network
from keras_das.space import stacked_ops
from tests.testing import random_inputs

OPS = ("none", "max_pool_3x3", "skip_connect", "sep_conv_3x3")
X = random_inputs((2, 8, 8, 4))
IMAGES = random_inputs((2, 8, 8, 3), seed=1)
WEIGHTS_5 = np.random.default_rng(2).dirichlet(np.ones(len(OPS)), 5).astype("float32")
WEIGHTS_2 = WEIGHTS_5[:2]
GENE = (("sep_conv_3x3", 0), ("skip_connect", 1), ("max_pool_3x3", 2), ("sep_conv_3x3", 0))


def _single(make, inputs=X, **kwargs):
    return make, lambda layer: layer(inputs, training=False, **kwargs)


def _plain_model():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    return keras.Model(inputs, keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(x)))


def _cell(cls):
    make = lambda: cls(channels=4, op_names=OPS, steps=2, multiplier=2)  # noqa: E731
    return make, lambda layer: layer([X, X], WEIGHTS_5, training=False)


LAYERS = {
    # Ops of the search space.
    "Zero": _single(lambda: primitives.Zero(4)),
    "Identity": _single(primitives.Identity),
    "EvenPixels": _single(primitives.EvenPixels),
    "Pool": _single(lambda: primitives.Pool("max", 3, 1)),
    "PoolBN": _single(lambda: primitives.PoolBN("avg", 2)),
    "ReLUConvBN": _single(lambda: primitives.ReLUConvBN(6, 3, 1)),
    "SepConv": _single(lambda: primitives.SepConv(4, 3, 2)),
    "DilConv": _single(lambda: primitives.DilConv(4, 3, 1)),
    "FactorizedReduce": _single(lambda: primitives.FactorizedReduce(6)),
    "MixedOp": _single(lambda: mixed_op.MixedOp(list(OPS), channels=4, seed=0)),
    # The fused cell's parts.
    "FusedBatchNorm": _single(fused_batch_norm.FusedBatchNorm),
    "SharedPoolBN": _single(lambda: stacked_ops.SharedPoolBN("max", 1)),
    "StackedSepConv": _single(
        lambda: stacked_ops.StackedSepConv(4, 2), inputs=np.concatenate([X, X], -1)
    ),
    "StackedDilConv": _single(
        lambda: stacked_ops.StackedDilConv(4, 2), inputs=np.concatenate([X, X], -1)
    ),
    "StackedConv": _single(lambda: stacked_ops.StackedConv(4, 2)),
    "StackedReLUConvBN": _single(lambda: stacked_ops.StackedReLUConvBN(4, 1, kernel_size=1)),
    "StackedFactorizedReduce": _single(lambda: stacked_ops.StackedFactorizedReduce(4, 2)),
    "StackedFactorizedReduceBlock": _single(lambda: stacked_ops.StackedFactorizedReduceBlock(4, 1)),
    "FusedMixedOps": (
        lambda: fused_cell.FusedMixedOps(OPS, 4, 2),
        lambda layer: layer(X, WEIGHTS_2, training=False),
    ),
    # Cells and networks.
    "SearchCell": _cell(search_network.SearchCell),
    "FusedSearchCell": _cell(fused_cell.FusedSearchCell),
    "SearchNetwork": _single(
        lambda: keras_das.SearchNetwork(
            num_classes=3, channels=4, num_cells=3, steps=2, multiplier=2, op_names=OPS, seed=0
        ),
        inputs=IMAGES,
    ),
    "SearchModel": _single(
        lambda: search_model.SearchModel(
            keras_das.SearchNetwork(
                num_classes=3, channels=4, num_cells=3, steps=2, multiplier=2, op_names=OPS
            )
        ),
        inputs=IMAGES,
    ),
    "Cell": (
        lambda: discrete_network.Cell(GENE, (2, 3), 4),
        lambda layer: layer([X, X], training=False),
    ),
    "DropPath": (
        lambda: discrete_network.DropPath(seed=0),
        lambda layer: layer(X, rate=0.5, training=False),
    ),
    "AuxiliaryHead": _single(lambda: discrete_network.AuxiliaryHead(3)),
    "DiscreteNetwork": _single(
        lambda: keras_das.DiscreteNetwork(
            keras_das.DARTS_V2, num_classes=3, channels=4, num_cells=3, auxiliary=True, seed=0
        ),
        inputs=IMAGES,
    ),
    # The retrain binary's trainer of a plain .keras architecture.
    "Retraining": _single(lambda: training.Retraining(_plain_model()), inputs=IMAGES),
}
# Registered, but not layers a user builds: the base class of composite ops, and the
# learning-rate schedule (its config round trip is tested in test_search_model.py).
NOT_LAYERS = {"OpChain", "EpochCosineDecay"}


def test_every_registered_layer_is_covered():
    registered = {
        name.partition(">")[2]
        for name in keras.saving.get_custom_objects()
        if name.startswith("keras_das>")
    }
    assert registered - NOT_LAYERS == set(LAYERS)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_config_and_save_load_round_trip(name, tmp_path):
    make, call = LAYERS[name]
    layer = make()
    expected = keras.tree.map_structure(keras.ops.convert_to_numpy, call(layer))
    assert layer.built

    clone = type(layer).from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()

    path = os.path.join(tmp_path, f"{name}.keras")
    saving_lib.save_model(layer, path)
    reloaded = saving_lib.load_model(path)
    assert type(reloaded) is type(layer)
    as_json = lambda config: json.loads(json.dumps(config))  # noqa: E731 (tuples -> lists)
    assert as_json(reloaded.get_config()) == as_json(layer.get_config())
    got = keras.tree.map_structure(keras.ops.convert_to_numpy, call(reloaded))
    keras.tree.map_structure(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, expected
    )


@pytest.mark.parametrize("name", ["MixedOp", "SearchCell", "FusedSearchCell", "Cell"])
def test_output_shape_follows_the_argument(name):
    """``compute_output_shape`` answers for the shape it is given (another resolution and an
    unknown batch than the one the layer was built with), before and after building."""
    make, call = LAYERS[name]
    x = random_inputs((3, 16, 16, 4))
    two = name != "MixedOp"
    layer = make()
    shapes = [(None, 16, 16, 4)] * 2 if two else (None, 16, 16, 4)
    before = tuple(layer.compute_output_shape(shapes)) if name != "MixedOp" else None
    call(layer)  # built on 8x8 inputs
    after = tuple(layer.compute_output_shape(shapes))
    if two:
        args = (WEIGHTS_5,) if name != "Cell" else ()
        actual = layer([x, x], *args, training=False).shape
    else:
        actual = layer(x, training=False).shape
    assert after == (None, *actual[1:])
    assert before in (None, after)


MIXED = "mixed_bfloat16"


_SEARCH = dict(num_classes=3, channels=4, num_cells=3, steps=2, multiplier=2, seed=0)
# Both search-cell implementations and a discrete network, given dtype=MIXED.
_MIXED_NETWORKS = {
    "fused": lambda: keras_das.SearchNetwork(**_SEARCH, dtype=MIXED),
    "per_edge": lambda: keras_das.SearchNetwork(
        **_SEARCH, cell_implementation="per_edge", dtype=MIXED
    ),
    "discrete": lambda: keras_das.DiscreteNetwork(
        keras_das.DARTS_V2, num_classes=3, channels=4, num_cells=3, auxiliary=True, dtype=MIXED
    ),
}


def _assert_every_layer_on_the_mixed_policy(net):
    net(IMAGES, training=True)  # built: the composite ops' chains exist
    off = [
        (layer.path, layer.dtype_policy.name)
        for layer in net._flatten_layers(include_self=True, recursive=True)
        if layer.dtype_policy.name != MIXED
    ]
    assert not off, off
    logits = net(IMAGES, training=False)
    assert logits.dtype == "bfloat16"
    assert np.all(np.isfinite(keras.ops.convert_to_numpy(keras.ops.cast(logits, "float32"))))


@pytest.mark.parametrize("name", ["fused", "per_edge", "discrete"])
def test_sublayers_follow_the_network_dtype_policy(name):
    """A network made with ``dtype="mixed_bfloat16"`` puts every sublayer on that policy
    (Keras 3 passes a layer's policy to the sublayers it makes) and runs forward."""
    _assert_every_layer_on_the_mixed_policy(_MIXED_NETWORKS[name]())


def test_sublayers_follow_the_global_dtype_policy():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(MIXED)
    try:
        net = keras_das.SearchNetwork(**_SEARCH)
        _assert_every_layer_on_the_mixed_policy(net)
        alphas = keras_das.arch_variables(net)
        assert alphas and all(v.dtype == "float32" for v in alphas)
    finally:
        keras.config.set_dtype_policy(previous)

"""Architecture parameters versus network weights.

Layers that own architecture parameters (alphas) create them with ``add_arch_weight``,
which tags the variable. ``arch_variables`` and ``weight_variables`` then split the
trainable variables of any Keras model, whatever the depth at which MixedOps sit.
"""

from __future__ import annotations

import keras

_ARCH_TAG = "_keras_das_arch"

# DARTS initialises alphas as 1e-3 * N(0, 1).
ALPHA_STDDEV = 1e-3


def add_arch_weight(layer: keras.layers.Layer, name: str, shape, initializer=None, seed=None):
    """Creates a trainable architecture parameter on ``layer`` (call it from ``build``).

    It is not autocast: under a mixed policy (``mixed_bfloat16``) the relaxation reads it in
    float32, so the mixing weights and the alphas' gradients keep float32's resolution
    (alphas start ~1e-3 apart, below bfloat16's 2^-8 relative step); the layers that mix
    cast the resulting weights to their compute dtype.
    """
    if initializer is None:
        initializer = keras.initializers.RandomNormal(stddev=ALPHA_STDDEV, seed=seed)
    variable = layer.add_weight(
        name=name, shape=shape, initializer=initializer, trainable=True, autocast=False
    )
    setattr(variable, _ARCH_TAG, True)
    return variable


def add_temperature(layer: keras.layers.Layer, value: float):
    """Creates the relaxation's temperature on ``layer``: a non-trainable scalar that
    schedules assign, read as float32 beside the alphas (not autocast)."""
    return layer.add_weight(
        name="temperature",
        shape=(),
        initializer=keras.initializers.Constant(value),
        trainable=False,
        autocast=False,
    )


def is_arch_variable(variable) -> bool:
    return getattr(variable, _ARCH_TAG, False)


def arch_variables(model: keras.layers.Layer) -> list:
    """The architecture parameters (alphas) of ``model``, in a stable order."""
    return [v for v in model.trainable_variables if is_arch_variable(v)]


def weight_variables(model: keras.layers.Layer) -> list:
    """The trainable network weights of ``model``: everything trainable but the alphas."""
    return [v for v in model.trainable_variables if not is_arch_variable(v)]


def count_weights(variables) -> int:
    """Number of scalars in ``variables``."""
    total = 0
    for v in variables:
        size = 1
        for dim in v.shape:
            size *= int(dim)
        total += size
    return total


def arch_owners(model: keras.layers.Layer) -> list:
    """The layers of ``model`` that own alphas and turn them into mixing weights.

    An owner has ``named_mixing_weights(training)`` and ``owns_alpha``: a MixedOp used
    alone, or a DARTS ``SearchNetwork`` (whose cells' MixedOps share its alphas).
    """
    return [
        layer
        for layer in model._flatten_layers(include_self=True, recursive=True)
        if hasattr(layer, "named_mixing_weights") and getattr(layer, "owns_alpha", False)
    ]

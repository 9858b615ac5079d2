"""Packed per-variable arithmetic: the same values as per variable, in a few graph ops.

References: NumPy's own concatenation and Keras's optimizers stepping real variables.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_das.engine import packing
from keras_das.engine.virtual_step import next_weights

SHAPES = [(3, 3, 4, 1), (2,), (1, 1, 4, 8), (3, 3, 4, 1), (2,), (5,), (3, 3, 4, 1)]


def _tensors(seed, dtypes=None):
    rng = np.random.default_rng(seed)
    dtypes = dtypes or ["float32"] * len(SHAPES)
    return [tf.constant(rng.normal(size=s).astype(d)) for s, d in zip(SHAPES, dtypes)]


def test_pack_and_unpack_round_trip_and_hold_every_element():
    tensors = _tensors(0)
    layout = packing.Packing(tensors)
    (vector,) = layout.pack(tensors)
    flat = np.concatenate([t.numpy().ravel() for t in tensors])
    np.testing.assert_array_equal(np.sort(vector.numpy()), np.sort(flat))
    for got, want in zip(layout.unpack((vector,)), tensors):
        assert got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    # Elementwise work on the packed vector is elementwise work on each tensor.
    others = _tensors(1)
    summed = layout.unpack(packing.map_parts(tf.add, layout.pack(tensors), layout.pack(others)))
    for got, a, b in zip(summed, tensors, others):
        np.testing.assert_array_equal(got, a.numpy() + b.numpy())


def test_one_vector_per_dtype_and_the_norm_over_all():
    dtypes = ["float32", "float64", "float32", "float32", "float64", "float32", "float64"]
    tensors = _tensors(2, dtypes)
    layout = packing.Packing(tensors)
    assert layout.dtypes == (tf.float32, tf.float64)
    parts = layout.pack(tensors)
    assert [p.dtype for p in parts] == [tf.float32, tf.float64]
    for got, want in zip(layout.unpack(parts), tensors):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    norm = np.sqrt(sum(np.sum(t.numpy().astype("float64") ** 2) for t in tensors))
    np.testing.assert_allclose(packing.global_norm(parts), norm, rtol=1e-6)


def test_spread_gives_each_tensor_its_number():
    tensors = _tensors(3)
    layout = packing.Packing(tensors)
    numbers = [float(i + 1) for i in range(len(tensors))]
    for got, t, n in zip(layout.unpack(layout.spread(numbers)), tensors, numbers):
        np.testing.assert_array_equal(got, np.full(t.shape, n, "float32"))


def test_packing_is_few_ops_however_many_tensors():
    """Ops grow with the shapes, not the tensors: 60 tensors of 3 shapes."""
    tensors = [tf.zeros(SHAPES[i % 3]) for i in range(60)]
    layout = packing.Packing(tensors)

    @tf.function
    def packed_step(ts):
        return layout.unpack(packing.map_parts(lambda t: t * 2.0 + 1.0, layout.pack(ts)))

    graph = packed_step.get_concrete_function(tensors).graph
    # Besides each input's placeholder and each output's identity: ~3 ops a shape and 4
    # for the arithmetic, where per tensor it would be 120.
    inner = [op for op in graph.get_operations() if op.type not in ("Placeholder", "Identity")]
    assert len(inner) < 30, sorted(op.type for op in inner)


def test_bad_input_is_refused_with_the_offending_value():
    with pytest.raises(ValueError, match=r"fully defined shapes; tensor 1: \(None, 2\)"):
        packing.Packing([tf.zeros((2,)), tf.TensorSpec((None, 2))])
    layout = packing.Packing(_tensors(0))
    with pytest.raises(ValueError, match="Packing of 7 tensors given 6"):
        layout.pack(_tensors(0)[:6])


OPTIMIZERS = {
    "sgd": lambda: keras.optimizers.SGD(0.1),
    "momentum": lambda: keras.optimizers.SGD(0.1, momentum=0.9),
    "nesterov": lambda: keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True),
    "adam": lambda: keras.optimizers.Adam(0.01, beta_1=0.5, beta_2=0.9),
    "amsgrad": lambda: keras.optimizers.Adam(0.01, beta_1=0.5, beta_2=0.9, amsgrad=True),
    "adamw": lambda: keras.optimizers.AdamW(0.01, weight_decay=0.05),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_the_virtual_step_is_where_keras_steps(name):
    """``next_weights`` (packed) against the optimizer stepping real variables, after two
    steps of history; AdamW with two variables excluded from its decay; a variable without
    a gradient stays."""
    optimizer = OPTIMIZERS[name]()
    variables = [keras.Variable(t, name=f"v{i}") for i, t in enumerate(_tensors(4))]
    if name == "adamw":
        optimizer.exclude_from_weight_decay(var_names=["v1", "v3"])
    optimizer.build(variables)
    for seed in (5, 6):  # history in the slots
        optimizer.apply(_tensors(seed), variables)
    weights = [tf.constant(v.numpy()) for v in variables]
    grads = _tensors(7)
    grads[5] = None
    stepped = next_weights(optimizer, variables, weights, grads, weight_decay=0.0)
    optimizer.apply(
        [g for g in grads if g is not None], [v for v in variables if v is not variables[5]]
    )
    for i, (got, v) in enumerate(zip(stepped, variables)):
        np.testing.assert_allclose(got, v.numpy(), rtol=1e-6, atol=1e-7, err_msg=f"v{i}")
    np.testing.assert_array_equal(stepped[5], weights[5])

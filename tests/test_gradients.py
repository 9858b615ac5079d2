import numpy as np
import pytest
import tensorflow as tf

from keras_das.space import gradients


def _derivatives(concatenate, parts, vector):
    """A loss through ``concatenate(parts)``: its gradient w.r.t. every part, and the
    derivatives of the gradient's product with ``vector`` (second derivatives)."""
    with tf.GradientTape() as outer:
        outer.watch(parts)
        with tf.GradientTape() as inner:
            inner.watch(parts)
            joined = concatenate(parts, axis=-1)
            loss = tf.reduce_sum(tf.sin(joined) * tf.cos(joined[..., ::-1]))
        grads = inner.gradient(loss, parts)
        product = tf.add_n([tf.reduce_sum(g * v) for g, v in zip(grads, vector)])
    return [joined, *grads, *outer.gradient(product, parts)]


def _parts(rng, widths):
    return [tf.constant(rng.normal(size=(2, 3, 3, w)), tf.float32) for w in widths]


@pytest.mark.parametrize("traced", [False, True])
def test_concatenate_matches_tensorflows_concat_to_second_derivatives(traced):
    rng = np.random.default_rng(0)
    parts, vector = _parts(rng, (2, 5, 3)), _parts(rng, (2, 5, 3))
    derivatives = tf.function(_derivatives) if traced else _derivatives
    ours = derivatives(gradients.concatenate, parts, vector)
    reference = _derivatives(lambda t, axis: tf.concat(t, axis), parts, vector)
    for a, b in zip(ours, reference):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-6)


def test_concatenate_is_differentiated_by_one_split_each_way():
    """Traced, the gradient is a split (no ConcatOffset and slices), and the split's own
    gradient a concatenation (no slice gradients' paddings)."""
    rng = np.random.default_rng(1)
    parts, vector = _parts(rng, (4, 4, 4, 4)), _parts(rng, (4, 4, 4, 4))

    def op_types(concatenate):
        graph = tf.function(_derivatives).get_concrete_function(concatenate, parts, vector)
        return [op.type for op in graph.graph.get_operations()]

    ours = op_types(gradients.concatenate)
    theirs = op_types(lambda t, axis: tf.concat(t, axis))
    assert "ConcatOffset" in theirs and "Slice" in theirs
    assert "ConcatOffset" not in ours and "Slice" not in ours and "Pad" not in ours
    assert "SplitV" in ours
    assert len(ours) < len(theirs)


def test_concatenate_of_unknown_sizes_is_tensorflows():
    """Sizes along the axis unknown when tracing: the plain concatenation, still right."""

    @tf.function(input_signature=[tf.TensorSpec([2, None]), tf.TensorSpec([2, None])])
    def joined_and_gradient(a, b):
        with tf.GradientTape() as tape:
            tape.watch([a, b])
            y = gradients.concatenate([a, b], axis=-1)
            loss = tf.reduce_sum(y * tf.range(tf.shape(y)[-1], dtype=y.dtype))
        return y, tape.gradient(loss, [a, b])

    y, (ga, gb) = joined_and_gradient(tf.ones([2, 2]), tf.ones([2, 3]))
    assert y.shape == (2, 5)
    np.testing.assert_array_equal(ga.numpy(), [[0, 1]] * 2)
    np.testing.assert_array_equal(gb.numpy(), [[2, 3, 4]] * 2)


def test_concatenate_of_one_tensor_is_that_tensor():
    x = tf.ones([2, 3])
    assert gradients.concatenate([x]) is x

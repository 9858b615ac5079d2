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


def _network_hvp(accumulator, x, kernel, weight, u_kernel, u_weight):
    """Forward over reverse through a small conv net (convolution, depthwise, pooling,
    batch statistics, a split and a concatenation, ops with integer inputs): the gradient
    of its loss w.r.t. ``weight`` and that gradient's derivative as ``kernel, weight``
    move along ``u_kernel, u_weight``."""
    with accumulator([kernel, weight], [u_kernel, u_weight]) as acc:
        with tf.GradientTape() as tape:
            tape.watch(weight)
            h = tf.nn.relu(tf.nn.conv2d(x, kernel, 1, "SAME"))
            h = tf.nn.depthwise_conv2d(h, weight, [1, 1, 1, 1], "SAME")
            mean, variance = tf.nn.moments(h, [0, 1, 2])
            h = (h - mean) * tf.math.rsqrt(variance + 1e-3)
            a, b = tf.split(tf.nn.max_pool2d(h, 3, 1, "SAME"), 2, axis=-1)
            h = gradients.concatenate([tf.tanh(a), b * b])
            loss = tf.reduce_sum(tf.reshape(h, [-1]) ** 2)
        grad = tape.gradient(loss, weight)
    return grad, acc.jvp(grad)


def test_forward_accumulator_is_tensorflows_when_traced(monkeypatch):
    """The same gradients and JVPs as ``tf.autodiff.ForwardAccumulator`` (two contexts
    traced into one function, each with its own functions), and an error inside the
    context leaves TensorFlow's lookup in place for the next one."""
    rng = np.random.default_rng(4)

    def constant(*shape):
        return tf.constant(rng.normal(size=shape), tf.float32)

    x, kernel, weight = constant(2, 6, 6, 3), constant(3, 3, 3, 4), constant(3, 3, 4, 1)
    u_kernel, u_weight = constant(3, 3, 3, 4), constant(3, 3, 4, 1)
    arguments = (x, kernel, weight, u_kernel, u_weight)

    @tf.function(autograph=False)
    def ours_twice(*arguments):
        first = _network_hvp(gradients.forward_accumulator, *arguments)
        return first, _network_hvp(gradients.forward_accumulator, *arguments)

    reference = tf.function(_network_hvp, autograph=False)(
        tf.autodiff.ForwardAccumulator, *arguments
    )
    assert np.abs(reference[1].numpy()).max() > 0
    for ours in ours_twice(*arguments):
        for a, b in zip(ours, reference):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-5)

    @tf.function(autograph=False)
    def failing():
        with gradients.forward_accumulator([kernel], [u_kernel]):
            raise RuntimeError("inside")

    with pytest.raises(RuntimeError, match="inside"):
        failing()
    ours_called = []
    helper = gradients._jvp_helper
    monkeypatch.setattr(gradients, "_jvp_helper", lambda *a: ours_called.append(a) or helper(*a))
    again = tf.function(_network_hvp, autograph=False)(tf.autodiff.ForwardAccumulator, *arguments)
    np.testing.assert_allclose(again[1].numpy(), reference[1].numpy(), rtol=1e-6)
    assert not ours_called  # TensorFlow's own lookup again


def test_forward_accumulator_finds_each_ops_function_once(monkeypatch):
    """Traced, a per-op JVP function is traced once per op signature and then reused."""
    traced = []
    helper = gradients._jvp_helper
    monkeypatch.setattr(gradients, "_jvp_helper", lambda *a: traced.append(a[0]) or helper(*a))
    x, u = tf.ones([4, 5]), tf.fill([4, 5], 0.5)

    @tf.function(autograph=False)
    def jvp():
        with gradients.forward_accumulator([x], [u]) as acc:
            y = x
            for _ in range(6):  # six ops of one signature, each way
                y = tf.sin(y)
        return acc.jvp(y)

    expected = u
    y = x
    for _ in range(6):
        expected, y = expected * tf.cos(y), tf.sin(y)
    np.testing.assert_allclose(jvp().numpy(), expected.numpy(), rtol=1e-6)
    assert traced == ["Sin"]

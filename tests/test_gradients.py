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


def _batch_norm(x, scale):
    """The fused batch norm's kernel in training mode (``fused_batch_norm._kernel``'s)."""
    empty = tf.zeros([0])
    return tf.raw_ops.FusedBatchNorm(
        x=x, scale=scale, offset=tf.zeros(scale.shape), mean=empty, variance=empty, is_training=True
    )


def _batch_norm_grad(g, x, scale):
    _, _, _, mean, variance = _batch_norm(x, scale)
    return tf.raw_ops.FusedBatchNormGrad(
        y_backprop=g, x=x, scale=scale, reserve_space_1=mean, reserve_space_2=variance
    )


_POOL = dict(ksize=[1, 3, 3, 1], strides=[1, 1, 1, 1], padding="SAME")
_CONV = dict(strides=[1, 2, 2, 1], padding="SAME", dilations=[1, 1, 1, 1])
_DEPTHWISE = dict(strides=[1, 2, 2, 1], padding="SAME")


def _convolution_gradient_cases(op, filter_shape, gradient_shape, attrs):
    """Rule cases for a convolution's input and filter gradient ops (of a [2, 6, 6, 3]
    input)."""
    input_shape = (2, 6, 6, 3)
    input_gradient = getattr(tf.raw_ops, f"{op}BackpropInput")
    filter_gradient = getattr(tf.raw_ops, f"{op}BackpropFilter")
    return {
        f"{op}BackpropInput": (
            lambda k, g: input_gradient(
                input_sizes=list(input_shape), filter=k, out_backprop=g, **attrs
            ),
            [filter_shape, gradient_shape],
            [0, 1],
        ),
        f"{op}BackpropFilter": (
            lambda x, g: filter_gradient(
                input=x, filter_sizes=list(filter_shape), out_backprop=g, **attrs
            ),
            [input_shape, gradient_shape],
            [0, 1],
        ),
    }


# op type (and a variant) -> (the op of its float arguments, their shapes, which of them
# have tangents). Every op with a written rule has a case here (checked below).
_RULE_CASES = {
    "Reshape": (lambda x: tf.reshape(x, [6, -1]), [(2, 3, 4, 5)], [0]),
    "Squeeze": (lambda x: tf.squeeze(x, axis=2), [(2, 3, 1, 5)], [0]),
    "ExpandDims": (lambda x: tf.expand_dims(x, 1), [(2, 3, 5)], [0]),
    "Tile": (lambda x: tf.tile(x, [1, 2, 1, 3]), [(2, 3, 4, 5)], [0]),
    "Pad": (lambda x: tf.pad(x, [[0, 0], [1, 2], [1, 0], [0, 0]]), [(2, 3, 4, 5)], [0]),
    "Slice": (lambda x: tf.slice(x, [0, 1, 1, 0], [2, 2, 2, 3]), [(2, 3, 4, 5)], [0]),
    "StridedSlice": (lambda x: x[:, 1::2, :-1, 1], [(2, 3, 4, 5)], [0]),
    "SpaceToBatchND": (
        lambda x: tf.space_to_batch(x, [2, 2], [[0, 0], [0, 0]]),
        [(2, 4, 4, 3)],
        [0],
    ),
    "BatchToSpaceND": (
        lambda x: tf.batch_to_space(x, [2, 2], [[0, 0], [0, 0]]),
        [(8, 2, 2, 3)],
        [0],
    ),
    "Sum": (lambda x: tf.reduce_sum(x, [1, 2], keepdims=True), [(2, 3, 4, 5)], [0]),
    "Mean": (lambda x: tf.reduce_mean(x, [0, 1, 2]), [(2, 3, 4, 5)], [0]),
    "AvgPool": (lambda x: tf.nn.avg_pool2d(x, 3, 2, "SAME"), [(2, 5, 5, 3)], [0]),
    "SplitV": (lambda x: tf.split(x, [1, 4], axis=-1), [(2, 3, 4, 5)], [0]),
    "Split": (lambda x: tf.split(x, 2, axis=1), [(2, 4, 4, 5)], [0]),
    "Transpose": (lambda x: tf.transpose(x, [0, 3, 1, 2]), [(2, 3, 4, 5)], [0]),
    "Neg": (lambda x: -x, [(2, 3)], [0]),
    "AvgPoolGrad": (
        lambda g: tf.raw_ops.AvgPoolGrad(orig_input_shape=[2, 5, 5, 3], grad=g, **_POOL),
        [(2, 5, 5, 3)],
        [0],
    ),
    "AddV2": (lambda x, y: x + y, [(2, 3, 4), (2, 3, 4)], [0, 1]),
    "AddV2 broadcast": (lambda x, b: x + b, [(2, 3, 4), (4,)], [1]),
    "AddN": (lambda x, y, z: tf.add_n([x, y, z]), [(2, 3)] * 3, [0, 2]),
    "AddN one": (lambda x, y: tf.add_n([x, y]), [(2, 3)] * 2, [1]),
    "Pack": (lambda x, y: tf.stack([x, y], axis=1), [(2, 3), (2, 3)], [1]),
    "ConcatV2": (lambda x, y: tf.concat([x, y], axis=-1), [(2, 3, 2), (2, 3, 4)], [0]),
    "Sub": (lambda x, y: x - y, [(2, 3, 4), (2, 3, 4)], [0, 1]),
    "Sub broadcast": (lambda x, b: x - b, [(2, 3, 4), (4,)], [1]),
    "Sub first": (lambda x, b: x - b, [(2, 3, 4), (4,)], [0]),
    "Mul": (lambda x, b: x * b, [(2, 3, 4), (4,)], [0, 1]),
    "MatMul": (lambda a, b: tf.matmul(a, b, transpose_b=True), [(3, 4), (5, 4)], [0, 1]),
    "BatchMatMulV2": (lambda a, b: tf.matmul(a, b), [(2, 3, 4), (2, 4, 5)], [0, 1]),
    "Einsum": (lambda x, k: tf.einsum("nhwc,cd->nhwd", x, k), [(2, 3, 3, 4), (4, 6)], [0, 1]),
    "Conv2D": (lambda x, k: tf.nn.conv2d(x, k, 2, "SAME"), [(2, 6, 6, 3), (3, 3, 3, 4)], [0, 1]),
    **_convolution_gradient_cases("Conv2D", (3, 3, 3, 4), (2, 3, 3, 4), _CONV),
    "DepthwiseConv2dNative": (
        lambda x, k: tf.raw_ops.DepthwiseConv2dNative(input=x, filter=k, **_DEPTHWISE),
        [(2, 6, 6, 3), (3, 3, 3, 1)],
        [0, 1],
    ),
    **_convolution_gradient_cases("DepthwiseConv2dNative", (3, 3, 3, 1), (2, 3, 3, 3), _DEPTHWISE),
    "RealDiv": (lambda x, y: x / (y * y + 1.0), [(2, 3, 4), (4,)], [0, 1]),
    "DivNoNan": (lambda x, y: tf.math.divide_no_nan(x, tf.nn.relu(y)), [(2, 3, 4), (4,)], [0, 1]),
    "Relu": (tf.nn.relu, [(2, 3, 4)], [0]),
    "ReluGrad": (
        lambda g, x: tf.raw_ops.ReluGrad(gradients=g, features=x),
        [(2, 3, 4), (2, 3, 4)],
        [0, 1],
    ),
    "MaxPool": (lambda x: tf.nn.max_pool2d(x, 3, 1, "SAME"), [(2, 5, 5, 3)], [0]),
    "MaxPoolGrad": (
        lambda x, g: tf.raw_ops.MaxPoolGrad(
            orig_input=x, orig_output=tf.nn.max_pool2d(x, 3, 1, "SAME"), grad=g, **_POOL
        ),
        [(2, 5, 5, 3), (2, 5, 5, 3)],
        [0, 1],
    ),
    "FusedBatchNorm": (lambda x, s: _batch_norm(x, s), [(2, 4, 4, 3), (3,)], [0, 1]),
    "FusedBatchNorm input": (lambda x, s: _batch_norm(x, s)[0], [(2, 4, 4, 3), (3,)], [0]),
    "FusedBatchNormGrad": (
        lambda g, x, s: _batch_norm_grad(g, x, s),
        [(2, 4, 4, 3), (2, 4, 4, 3), (3,)],
        [0, 1, 2],
    ),
    "FusedBatchNormGrad input": (
        lambda g, x, s: _batch_norm_grad(g, x, s),
        [(2, 4, 4, 3), (2, 4, 4, 3), (3,)],
        [1],
    ),
    "FusedBatchNormGrad scale": (
        lambda g, x, s: _batch_norm_grad(g, x, s),
        [(2, 4, 4, 3), (2, 4, 4, 3), (3,)],
        [2],
    ),
    "Shape": (lambda x: tf.cast(tf.shape(x), tf.float32), [(2, 3)], [0]),
    "ShapeN": (
        lambda x, y: tf.cast(tf.concat(tf.shape_n([x, y]), 0), tf.float32),
        [(2, 3), (4,)],
        [0, 1],
    ),
}


def test_every_written_jvp_rule_has_a_case():
    from keras_das.space import jvp_rules

    rules = {*jvp_rules._RULES, *jvp_rules._RULES_IN_FUNCTIONS}
    assert rules == {name.split()[0] for name in _RULE_CASES}


@pytest.mark.parametrize("case", sorted(_RULE_CASES))
def test_written_jvp_rule_is_tensorflows(case, monkeypatch):
    """Each op's written-out JVP (traced, TensorFlow's per-op function not called) equals
    ``tf.autodiff.ForwardAccumulator``'s, the transpose of TensorFlow's gradient."""
    op, shapes, watched = _RULE_CASES[case]
    rng = np.random.default_rng(sum(map(ord, case)))
    floats = [tf.constant(rng.normal(size=s), tf.float32) for s in shapes]
    tangents = [tf.constant(rng.normal(size=shapes[i]), tf.float32) for i in watched]

    def jvps(accumulator):  # (tf.function would unwrap a context manager argument)
        @tf.function(autograph=False)
        def traced(floats, tangents):
            primals = [floats[i] for i in watched]
            with accumulator(primals, tangents) as acc:
                outputs = tf.nest.flatten(op(*floats))
            return [acc.jvp(o, unconnected_gradients="zero") for o in outputs]

        return traced(floats, tangents)

    helper_calls = []
    helper = gradients._jvp_helper
    monkeypatch.setattr(
        gradients, "_jvp_helper", lambda *a: helper_calls.append(a[0]) or helper(*a)
    )
    ours = jvps(gradients.forward_accumulator)
    assert not helper_calls, f"{case}: TensorFlow's function was used for {helper_calls}"
    reference = jvps(tf.autodiff.ForwardAccumulator)
    for a, b in zip(ours, reference):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
    if case.split()[0] not in ("Shape", "ShapeN"):
        assert max(np.abs(a.numpy()).max(initial=0.0) for a in reference) > 0


def test_written_jvp_rules_leave_out_zero_tangents():
    """Tangents that are zeros by construction (the accumulator's for inputs without one,
    or a caller's ``tf.zeros``) add no terms, and all-zero ones give zero JVPs."""
    rng = np.random.default_rng(5)
    x = tf.constant(rng.normal(size=(2, 5, 5, 3)), tf.float32)
    kernel = tf.constant(rng.normal(size=(3, 3, 3, 4)), tf.float32)

    @tf.function(autograph=False)
    def jvps(u):
        with gradients.forward_accumulator([x, kernel], [tf.zeros_like(x), u]) as acc:
            y = tf.nn.relu(tf.nn.conv2d(x, kernel, 1, "SAME"))
            z = tf.nn.relu(x)  # only a zero tangent reaches it
        return acc.jvp(y), acc.jvp(z, unconnected_gradients="zero"), y

    u = tf.constant(rng.normal(size=(3, 3, 3, 4)), tf.float32)
    dy, dz, y = jvps(u)
    expected = tf.nn.conv2d(x, u, 1, "SAME") * tf.cast(y > 0, tf.float32)
    np.testing.assert_allclose(dy.numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(dz.numpy(), np.zeros_like(dz.numpy()))
    graph = jvps.get_concrete_function(u).graph
    assert [op.type for op in graph.get_operations()].count("Conv2D") == 2  # y, and u's term


def test_written_jvps_are_differentiated_by_an_outer_tape():
    """Reverse over forward: a tape outside the accumulator differentiates the JVP with
    respect to the tangent and the primal, as it does TensorFlow's accumulator's."""
    rng = np.random.default_rng(6)

    def constant(*shape):
        return tf.constant(rng.normal(size=shape), tf.float32)

    x, kernel, depthwise, scale = (
        constant(2, 6, 6, 3),
        constant(3, 3, 3, 4),
        constant(3, 3, 4, 1),
        constant(4),
    )
    u, v = constant(3, 3, 3, 4), constant(3, 3, 4, 1)

    def reverse_over_forward(accumulator):
        @tf.function(autograph=False)
        def traced(u, v):
            with tf.GradientTape() as outer:
                outer.watch([u, v, kernel])
                with accumulator([kernel, depthwise], [u, v]) as acc:
                    h = tf.nn.relu(tf.nn.conv2d(x, kernel, 1, "SAME"))
                    h = tf.nn.depthwise_conv2d(h, depthwise, [1, 1, 1, 1], "SAME")
                    h = _batch_norm(h, scale)[0]
                    h = tf.nn.max_pool2d(tf.reshape(h, [2, 6, 6, 4]), 3, 1, "SAME")
                    loss = tf.reduce_sum(tf.sin(h))
                jvp = acc.jvp(loss)
            return jvp, outer.gradient(jvp, [u, v, kernel])

        return traced(u, v)

    ours, reference = (
        reverse_over_forward(a)
        for a in (gradients.forward_accumulator, tf.autodiff.ForwardAccumulator)
    )
    np.testing.assert_allclose(ours[0].numpy(), reference[0].numpy(), rtol=1e-5)
    for a, b in zip(ours[1], reference[1]):
        assert a is not None
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5)

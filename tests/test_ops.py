import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_das.space import primitives
from tests import testing

ALL_OPS = sorted(primitives.OPS)
PARAMETER_FREE = {"none", "max_pool_3x3", "avg_pool_3x3", "skip_connect"}


# FactorizedReduce always halves the resolution, whatever the stride.
@pytest.mark.parametrize(
    "name,strides",
    [(n, s) for n in ALL_OPS for s in (1, 2) if not (n == "factorized_reduce" and s == 1)],
)
def test_every_op_shape_training_config_and_saving(name, strides, tmp_path):
    out = 4 if strides == 2 or name == "factorized_reduce" else 8
    trains = name not in PARAMETER_FREE or (name == "skip_connect" and strides == 2)
    testing.run_layer_test(
        lambda: primitives.make_op(name, 6, strides, affine=True),
        (3, 8, 8, 6),
        (3, out, out, 6),
        tmp_path,
        trains=trains,
    )


def test_unknown_op_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"Unknown op 'sep_conv_7x7'.*sep_conv_3x3"):
        primitives.make_op("sep_conv_7x7", 8)


def test_bad_strides_rejected_at_construction():
    with pytest.raises(ValueError, match="strides must be 1 or 2, got 3"):
        primitives.make_op("sep_conv_3x3", 8, strides=3)


def test_register_custom_op_and_refuse_silent_overwrite():
    name = "test_conv_1x1"
    primitives.register_op(name, lambda c, s, affine: primitives.ReLUConvBN(c, 1, s, affine))
    try:
        op = primitives.make_op(name, 4, 2)
        assert tuple(op(np.zeros((1, 8, 8, 3), "float32")).shape) == (1, 4, 4, 4)
        with pytest.raises(ValueError, match="already registered"):
            primitives.register_op(name, lambda c, s, affine: None)
    finally:
        del primitives.OPS[name]


def test_builtin_ops_are_told_from_re_registered_ones():
    """The fused cell fuses a name only while the registry holds the package's factory."""
    assert primitives.is_builtin_op("sep_conv_3x3")
    assert not primitives.is_builtin_op("no_such_op")
    shipped = primitives.OPS["sep_conv_3x3"]
    same_op = lambda c, s, affine: primitives.SepConv(c, 3, strides=s, affine=affine)  # noqa: E731
    primitives.register_op("sep_conv_3x3", same_op, overwrite=True)
    try:
        assert not primitives.is_builtin_op("sep_conv_3x3")  # whatever the factory builds
    finally:
        primitives.OPS["sep_conv_3x3"] = shipped
    assert primitives.is_builtin_op("sep_conv_3x3")


def _copy_weights(src, dst):
    for s, d in zip(src.weights, dst.weights):
        assert s.shape == d.shape
        d.assign(s)


@pytest.mark.parametrize(
    "name",
    [
        "max_pool_3x3",
        "avg_pool_3x3",
        "sep_conv_3x3",
        "sep_conv_5x5",
        "dil_conv_3x3",
        "dil_conv_5x5",
        "conv_3x3",
        "conv_5x5",
    ],
)
def test_stride_2_matches_reference_padding(name):
    """The reference pads k//2 symmetrically, so output i of the strided op is output 2i of
    the unstrided one; TensorFlow's 'same' padding at stride 2 would be off by one pixel."""
    x = testing.random_inputs((2, 10, 10, 4))
    op1 = primitives.make_op(name, 4, 1)
    op2 = primitives.make_op(name, 4, 2)
    op1(x)
    op2(x)
    rng = np.random.default_rng(0)
    for v in op1.trainable_weights:
        v.assign(rng.normal(size=v.shape).astype("float32"))
    _copy_weights(op1, op2)
    if "sep_conv" in name:
        # Only the first half of a SepConv strides; compare that half.
        first1, first2 = op1.chain[:3], op2.chain[:4]
        y1, y2 = x, x
        for layer in first1:
            y1 = layer(y1)
        for layer in first2:
            y2 = layer(y2)
    else:
        y1, y2 = op1(x, training=False), op2(x, training=False)
    np.testing.assert_allclose(np.asarray(y2), np.asarray(y1)[:, ::2, ::2], rtol=1e-5, atol=1e-5)


def test_avg_pool_excludes_padding_from_the_count():
    x = np.arange(16, dtype="float32").reshape(1, 4, 4, 1)
    y = np.asarray(primitives.Pool("avg", strides=2)(x))[0, :, :, 0]
    # Corner window covers x[0:2, 0:2] only (count_include_pad=False).
    assert y[0, 0] == pytest.approx(np.mean([0, 1, 4, 5]))
    assert y[1, 1] == pytest.approx(np.mean(x[0, 1:4, 1:4, 0]))


def test_max_pool_pads_with_minus_infinity():
    x = -np.ones((1, 4, 4, 1), "float32")
    y = primitives.Pool("max", strides=2)(x)
    np.testing.assert_array_equal(np.asarray(y), -np.ones((1, 2, 2, 1)))


def test_dil_conv_stride_2_equals_strided_dilated_convolution():
    """Our strided DilConv runs on the even pixels; check against a direct computation."""
    x = testing.random_inputs((1, 12, 12, 3))
    op = primitives.make_op("dil_conv_5x5", 3, 2)
    op(x)
    depthwise = op.chain[2].kernel.numpy()  # [5, 5, 3, 1]
    pointwise = op.chain[3].kernel.numpy()
    relu = np.maximum(x, 0)
    padded = np.pad(relu, [(0, 0), (4, 4), (4, 4), (0, 0)])
    out = np.zeros((1, 6, 6, 3), "float32")
    for i in range(6):
        for j in range(6):
            patch = padded[0, 2 * i : 2 * i + 9 : 2, 2 * j : 2 * j + 9 : 2, :]  # dilation 2
            out[0, i, j] = np.sum(patch * depthwise[..., 0], axis=(0, 1))
    expected = out @ pointwise[0, 0]
    actual = op.chain[3](op.chain[2](op.chain[1](op.chain[0](x))))
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=1e-4, atol=1e-5)


def test_factorized_reduce_reads_even_and_shifted_pixels():
    x = testing.random_inputs((1, 6, 6, 2))
    op = primitives.FactorizedReduce(4, affine=False)
    op(x)
    w1, w2 = op.conv_1.kernel.numpy()[0, 0], op.conv_2.kernel.numpy()[0, 0]
    relu = np.maximum(x, 0)
    expected = np.concatenate([relu[:, ::2, ::2] @ w1, relu[:, 1::2, 1::2] @ w2], axis=-1)
    before_bn = keras.ops.concatenate(
        [op.conv_1(relu[:, ::2, ::2]), op.conv_2(relu[:, 1::2, 1::2])], axis=-1
    )
    np.testing.assert_allclose(np.asarray(before_bn), expected, rtol=1e-5, atol=1e-6)
    # Batch norm without affine normalises each channel with batch statistics.
    y = np.asarray(op(x, training=True))
    np.testing.assert_allclose(y.mean(axis=(0, 1, 2)), 0, atol=1e-5)


def test_factorized_reduce_handles_odd_sizes():
    y = primitives.FactorizedReduce(4)(np.ones((2, 7, 7, 3), "float32"))
    assert tuple(y.shape) == (2, 4, 4, 4)


def test_skip_connect_is_identity_or_factorized_reduce():
    x = testing.random_inputs((2, 8, 8, 4))
    identity = primitives.make_op("skip_connect", 4, 1)
    np.testing.assert_array_equal(np.asarray(identity(x)), x)
    assert isinstance(primitives.make_op("skip_connect", 4, 2), primitives.FactorizedReduce)


@pytest.mark.parametrize("strides", [1, 2])
def test_none_is_zeros_of_the_strided_shape(strides):
    y = primitives.make_op("none", 5, strides)(testing.random_inputs((2, 8, 8, 3)))
    assert tuple(y.shape) == (2, 8 // strides, 8 // strides, 5)
    assert not np.any(np.asarray(y))


def test_search_ops_have_batch_norm_without_affine():
    for name in ("sep_conv_3x3", "dil_conv_5x5", "conv_3x3"):
        op = primitives.make_op(name, 4, 1, affine=False)
        op(np.zeros((1, 4, 4, 4), "float32"))
        bns = [x for x in op.chain if isinstance(x, keras.layers.BatchNormalization)]
        assert bns and all(not bn.center and not bn.scale for bn in bns)
        assert all(bn.epsilon == 1e-5 and bn.momentum == 0.9 for bn in bns)
        assert not any(bn.trainable_weights for bn in bns)


def test_sep_conv_parameter_count_matches_reference():
    # Reference: two (depthwise k*k*C + pointwise C*C); no biases, no BN affine.
    op = primitives.make_op("sep_conv_5x5", 16, 1, affine=False)
    op(np.zeros((1, 8, 8, 16), "float32"))
    assert sum(int(np.prod(v.shape)) for v in op.trainable_weights) == 2 * (25 * 16 + 16 * 16)


def test_ops_run_in_a_compiled_function():
    x = tf.constant(testing.random_inputs((2, 8, 8, 4)))
    op = primitives.make_op("avg_pool_3x3", 4, 2)
    np.testing.assert_allclose(tf.function(lambda t: op(t))(x), op(x), rtol=1e-6)

import keras
import numpy as np
import pytest
from keras import layers

import keras_das
from keras_das import MixedOp
from keras_das.space import relaxations
from tests import testing

X = testing.random_inputs((2, 8, 8, 4))


def _softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


def _three_candidates():
    return [
        layers.Conv2D(4, 3, padding="same", name="c3"),
        layers.Conv2D(4, 1, name="c1"),
        layers.AveragePooling2D(3, 1, padding="same", name="pool"),
    ]


@pytest.mark.parametrize("temperature", [1.0, 0.3, 5.0])
@pytest.mark.parametrize("relaxation", ["softmax", "sigmoid", "gumbel", "gumbel_hard"])
def test_output_is_the_hand_computed_weighted_sum(relaxation, temperature):
    mix = MixedOp(_three_candidates(), relaxation=relaxation, temperature=temperature)
    mix(X)
    alpha = np.array([0.7, -0.4, 0.2], "float32")
    mix.alpha.assign(alpha)
    outs = [np.asarray(op(X)) for op in mix.ops]
    logits = alpha / temperature
    if relaxation in ("softmax", "gumbel"):
        w = _softmax(logits)
    elif relaxation == "sigmoid":
        w = _sigmoid(logits)
    else:  # gumbel_hard at inference: the argmax
        w = np.eye(3)[np.argmax(alpha)]
    expected = sum(wi * o for wi, o in zip(w, outs))
    np.testing.assert_allclose(np.asarray(mix(X, training=False)), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mix.get_mixing_weights(), w, rtol=1e-6)


def _recover_weights(mix, y):
    """Solves y = sum_i w_i * op_i(X) for w by least squares."""
    outs = np.stack([np.asarray(op(X)).ravel() for op in mix.ops], axis=1)
    w, *_ = np.linalg.lstsq(outs, np.asarray(y).ravel(), rcond=None)
    return w


@pytest.mark.parametrize("relaxation", ["gumbel", "gumbel_hard"])
def test_gumbel_samples_while_training(relaxation):
    mix = MixedOp(_three_candidates(), relaxation=relaxation, temperature=0.5, seed=3)
    mix(X)
    samples = np.array([_recover_weights(mix, mix(X, training=True)) for _ in range(6)])
    np.testing.assert_allclose(samples.sum(axis=1), 1.0, atol=1e-4)
    assert np.all(samples > -1e-4)
    assert len({tuple(np.round(s, 3)) for s in samples}) > 1  # noise changes the sample
    if relaxation == "gumbel_hard":
        np.testing.assert_allclose(np.sort(samples, axis=1)[:, -1], 1.0, atol=1e-4)


def test_gumbel_hard_passes_the_soft_gradient():
    alpha = keras.Variable(np.array([0.3, 0.1, -0.2], "float32"))
    import tensorflow as tf

    with tf.GradientTape() as tape:
        w = relaxations.mixing_weights(
            alpha, "gumbel_hard", 1.0, training=True, seed=keras.random.SeedGenerator(0)
        )
        loss = tf.reduce_sum(w * tf.constant([1.0, 2.0, 3.0]))
    grad = tape.gradient(loss, alpha.value)
    assert np.any(np.asarray(grad) != 0)
    assert sorted(np.asarray(w).tolist()) == [0.0, 0.0, 1.0]


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_sigmoid_gate_of_max_and_avg_pool(temperature):
    gate = MixedOp(
        ["max_pool_3x3", "avg_pool_3x3"],
        relaxation="gate",
        temperature=temperature,
        pool_batch_norm=False,
    )
    gate(X)
    gate.alpha.assign([0.8])
    s = _sigmoid(0.8 / temperature)
    max_pool = keras.ops.max_pool(X, 3, 1, "same")
    avg_pool = keras.ops.average_pool(X, 3, 1, "same")
    expected = s * np.asarray(max_pool) + (1 - s) * np.asarray(avg_pool)
    np.testing.assert_allclose(np.asarray(gate(X)), expected, rtol=1e-5, atol=1e-6)
    assert tuple(gate.alpha.shape) == (1,)


def test_gate_needs_two_candidates():
    with pytest.raises(ValueError, match="exactly 2 candidates, got 3"):
        MixedOp(["max_pool_3x3", "avg_pool_3x3", "skip_connect"], relaxation="gate")


def test_bad_arguments_fail_at_construction():
    with pytest.raises(ValueError, match=r"Unknown op 'conv_9x9'"):
        MixedOp(["conv_9x9", "skip_connect"])
    with pytest.raises(ValueError, match=r"Unknown relaxation 'argmax'.*softmax"):
        MixedOp(["conv_3x3", "skip_connect"], relaxation="argmax")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        MixedOp(["conv_3x3", "skip_connect"], temperature=0)
    with pytest.raises(TypeError, match="op name or a keras Layer"):
        MixedOp(["conv_3x3", 3])
    with pytest.raises(ValueError, match="at least 2 candidates"):
        MixedOp(["conv_3x3"])


def test_adapters_bring_16_and_32_channels_to_the_widest():
    mix = MixedOp([layers.Conv2D(16, 3, padding="same"), layers.Conv2D(32, 5, padding="same")])
    y = mix(testing.random_inputs((2, 8, 8, 3)))
    assert tuple(y.shape) == (2, 8, 8, 32)
    assert mix.adapters[0] is not None and mix.adapters[1] is None
    assert tuple(mix.adapters[0].kernel.shape) == (1, 1, 16, 32)


def test_adapters_to_a_width_the_user_sets():
    mix = MixedOp(
        [
            layers.Conv2D(16, 3, padding="same"),
            layers.Conv2D(32, 5, padding="same"),
            "skip_connect",
            "none",
        ],
        channels=24,
    )
    y = mix(testing.random_inputs((2, 8, 8, 3)))
    assert tuple(y.shape) == (2, 8, 8, 24)
    # Both convs and the 3-channel identity are projected; the zero op is made 24 wide.
    assert [a is not None for a in mix.adapters] == [True, True, True, False]


def test_adapter_output_is_the_weighted_sum_of_projections():
    mix = MixedOp([layers.Conv2D(16, 3, padding="same"), layers.Conv2D(32, 1)])
    x = testing.random_inputs((1, 6, 6, 3))
    mix(x)
    w = mix.get_mixing_weights()
    expected = w[0] * np.asarray(mix.adapters[0](mix.ops[0](x))) + w[1] * np.asarray(mix.ops[1](x))
    np.testing.assert_allclose(np.asarray(mix(x)), expected, rtol=1e-5, atol=1e-6)


def test_spatial_mismatch_is_a_clear_error():
    mix = MixedOp([layers.Conv2D(8, 3, padding="same"), layers.Conv2D(8, 3, strides=2)])
    with pytest.raises(ValueError, match="disagree on spatial shape"):
        mix(X)


def test_reports_weights_and_choice_and_skips_none():
    mix = MixedOp(["none", "conv_3x3", "skip_connect"])
    mix(X)
    mix.alpha.assign([5.0, 1.0, 0.5])
    assert mix.chosen_name() == "conv_3x3"  # `none` never chosen, as in DARTS
    assert mix.chosen_index() == 1
    np.testing.assert_allclose(
        mix.get_mixing_weights(), _softmax(np.array([5.0, 1.0, 0.5])), rtol=1e-6
    )


def test_shared_alpha_mode_takes_weights_from_its_owner():
    mix = MixedOp(["conv_3x3", "skip_connect"], owns_alpha=False)
    y = mix(X, mixing_weights=np.array([0.25, 0.75], "float32"))
    assert not mix.trainable_weights or not keras_das.arch_variables(mix)
    expected = 0.25 * np.asarray(mix.ops[0](X)) + 0.75 * X
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="owns_alpha=False"):
        mix.get_mixing_weights()


def test_layer_contract(tmp_path):
    testing.run_layer_test(
        lambda: MixedOp(["sep_conv_3x3", "max_pool_3x3", layers.Conv2D(8, 1), "none"], seed=1),
        (2, 8, 8, 4),
        (2, 8, 8, 8),
        tmp_path,
    )


def test_strided_named_candidates(tmp_path):
    testing.run_layer_test(
        lambda: MixedOp(keras_das.DARTS_OPS, strides=2, channels=4),
        (2, 8, 8, 4),
        (2, 4, 4, 4),
        tmp_path,
    )


def _classification_data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8, 8, 3)).astype("float32")
    y = (x[..., 0].mean(axis=(1, 2)) > 0).astype("int32")
    return x, y


def _fit_and_check(model):
    x, y = _classification_data()
    model.compile(keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy")
    alphas = keras_das.arch_variables(model)
    assert len(alphas) == 2
    before = [a.numpy().copy() for a in alphas]
    history = model.fit(x, y, batch_size=16, epochs=3, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert all(not np.array_equal(b, a.numpy()) for b, a in zip(before, alphas))


def test_mixed_op_in_a_functional_model_trains_with_fit():
    inputs = keras.Input((8, 8, 3))
    x = MixedOp([layers.Conv2D(8, 3, padding="same"), layers.Conv2D(16, 5, padding="same")])(inputs)
    x = MixedOp(["max_pool_3x3", "avg_pool_3x3"], relaxation="gate")(x)
    x = layers.GlobalAveragePooling2D()(x)
    _fit_and_check(keras.Model(inputs, layers.Dense(2, activation="softmax")(x)))


def test_mixed_op_in_a_sequential_model_trains_with_fit():
    _fit_and_check(
        keras.Sequential(
            [
                keras.Input((8, 8, 3)),
                layers.Conv2D(8, 3, padding="same"),
                MixedOp(["sep_conv_3x3", "skip_connect", "dil_conv_3x3"], relaxation="sigmoid"),
                MixedOp(["conv_3x3", "avg_pool_3x3"], relaxation="gumbel", seed=0),
                layers.GlobalAveragePooling2D(),
                layers.Dense(2, activation="softmax"),
            ]
        )
    )


@keras.saving.register_keras_serializable(package="tests")
class _Block(layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.inner = keras.Sequential([MixedOp(["conv_3x3", "skip_connect"])])
        self.other = MixedOp([layers.Conv2D(4, 1), layers.Conv2D(4, 3, padding="same")])

    def call(self, x):
        return self.other(self.inner(x))


def test_arch_and_weight_variables_split_at_any_depth():
    inputs = keras.Input((8, 8, 4))
    model = keras.Model(inputs, _Block()(layers.Conv2D(4, 1)(inputs)))
    alphas = keras_das.arch_variables(model)
    weights = keras_das.weight_variables(model)
    assert len(alphas) == 2 and all(a.path.endswith("alpha") for a in alphas)
    assert {id(v) for v in alphas}.isdisjoint(id(v) for v in weights)
    assert len(alphas) + len(weights) == len(model.trainable_variables)
    # Temperatures and batch-norm statistics are neither.
    assert not any("temperature" in v.path for v in alphas + weights)


def test_channel_shuffle_interleaves_groups_as_pytorch():
    from keras_das.space.mixed_op import channel_shuffle

    x = np.arange(6, dtype="float32").reshape(1, 1, 1, 6)  # groups of 3: [0 1 2 | 3 4 5]
    np.testing.assert_array_equal(np.asarray(channel_shuffle(x, 2)).ravel(), [0, 3, 1, 4, 2, 5])


@pytest.mark.parametrize("strides", [1, 2])
def test_partial_channels_mix_a_quarter_and_bypass_the_rest(strides):
    from keras_das.space.mixed_op import channel_shuffle

    x = testing.random_inputs((2, 8, 8, 8))
    mix = MixedOp(
        ["sep_conv_3x3", "max_pool_3x3", "skip_connect"],
        strides=strides,
        partial_channels=4,
        pool_batch_norm=False,
    )
    y = np.asarray(mix(x, training=False))
    assert y.shape == (2, 8 // strides, 8 // strides, 8)
    assert mix.ops[0].chain[-1].moving_mean.shape == (2,)  # the ops see 8 / 4 channels
    w = mix.get_mixing_weights()
    part = x[..., :2]
    mixed = sum(w[i] * np.asarray(op(part, training=False)) for i, op in enumerate(mix.ops))
    rest = x[..., 2:] if strides == 1 else np.asarray(keras.ops.max_pool(x[..., 2:], 2, 2, "same"))
    expected = np.asarray(channel_shuffle(np.concatenate([mixed, rest], axis=-1), 4))
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_partial_channels_need_a_divisible_width():
    with pytest.raises(ValueError, match="partial_channels=4 needs input channels divisible"):
        MixedOp(["conv_3x3", "skip_connect"], partial_channels=4)(
            testing.random_inputs((1, 4, 4, 6))
        )
    with pytest.raises(ValueError, match="partial_channels must be a positive int"):
        MixedOp(["conv_3x3", "skip_connect"], partial_channels=0)

"""Hypergradient tests on a tiny float64 model of smooth ops.

With ReLU and max-pool, activations switch between w+ and w-, and the finite-difference
Hessian-vector product of DARTS differs from the exact one by 10-100x for any step size;
with smooth ops it converges, so these tests use tanh, softplus and average pooling.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

import keras_das
from keras_das import MixedOp
from keras_das.engine.architect import _replace


@pytest.fixture
def float64():
    keras.config.set_floatx("float64")
    yield
    keras.config.set_floatx("float32")


def _smooth_supernet():
    inputs = keras.Input((6, 6, 2))
    h = layers.Conv2D(3, 3, padding="same", activation="tanh")(inputs)
    h = layers.BatchNormalization()(h)
    h = MixedOp(
        [
            layers.Conv2D(3, 3, padding="same", activation="softplus"),
            layers.Conv2D(3, 1, activation="tanh"),
            layers.AveragePooling2D(3, 1, padding="same"),
        ]
    )(h)
    # A batch norm whose input depends on the alphas: its second derivatives are in the
    # hypergradient (BatchNormalization's own are not exact; see SearchModel.compile).
    h = layers.BatchNormalization()(h)
    h = MixedOp(
        [
            layers.Conv2D(4, 3, padding="same", activation="tanh"),
            layers.AveragePooling2D(3, 1, "same"),
        ],
        relaxation="sigmoid",
    )(h)
    h = layers.GlobalAveragePooling2D()(h)
    return keras.Model(inputs, layers.Dense(3)(h))


def _batches(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(16, 6, 6, 2))
    y = rng.integers(0, 3, size=16)
    return (tf.constant(x[:8]), tf.constant(y[:8])), (tf.constant(x[8:]), tf.constant(y[8:]))


def _search_model(architect, fd_epsilon=0.01):
    keras.utils.set_random_seed(0)  # the same weights for every architect
    net = _smooth_supernet()
    rng = np.random.default_rng(1)
    for alpha in keras_das.arch_variables(net):
        alpha.assign(rng.normal(scale=0.5, size=alpha.shape))
    sm = keras_das.SearchModel(net)
    sm.compile(
        weight_optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        architect=architect,
        fd_epsilon=fd_epsilon,
    )
    # A non-zero momentum state, so the virtual step's momentum term is exercised.
    for m in sm.weight_optimizer.momentums:
        m.assign(rng.normal(scale=0.01, size=m.shape))
    return sm


def _flat(tensors):
    return np.concatenate([np.ravel(np.asarray(t)) for t in tensors])


def _relative(a, b):
    return np.linalg.norm(_flat(a) - _flat(b)) / np.linalg.norm(_flat(b))


def _unrolled_val_loss(sm, alphas, train, val):
    """L_val(w'(alpha), alpha): the function whose gradient the exact architect returns."""
    arch = sm.architect
    values = [v.value for v in sm.supernet.trainable_variables]
    values = _replace(values, sm.arch_index, alphas)
    g, _, _ = arch.gradients(values, sm.weight_index, *train, with_penalty=False)
    w_virtual = arch.virtual_step([values[i] for i in sm.weight_index], g)
    loss, _ = arch.loss_at(_replace(values, sm.weight_index, w_virtual), *val)
    return float(loss)


def test_exact_matches_central_differences_of_the_unrolled_loss(float64):
    sm = _search_model("exact")
    train, val = _batches()
    exact, _, _ = sm.architect(train, val)
    alphas = [a.numpy() for a in sm.arch_vars]
    h = 1e-5
    numeric = []
    for k, alpha in enumerate(alphas):
        grad = np.zeros_like(alpha)
        for i in np.ndindex(alpha.shape):
            plus = [a.copy() for a in alphas]
            minus = [a.copy() for a in alphas]
            plus[k][i] += h
            minus[k][i] -= h
            grad[i] = (
                _unrolled_val_loss(sm, [tf.constant(a) for a in plus], train, val)
                - _unrolled_val_loss(sm, [tf.constant(a) for a in minus], train, val)
            ) / (2 * h)
        numeric.append(grad)
    assert _relative(exact, numeric) < 1e-6


def test_second_order_approaches_exact_as_eps_shrinks(float64):
    train, val = _batches()
    exact, _, _ = _search_model("exact").architect(train, val)
    gaps = []
    for eps in (1e-1, 1e-2, 1e-3):
        second, _, _ = _search_model("second_order", fd_epsilon=eps).architect(train, val)
        gaps.append(_relative(second, exact))
    assert gaps[1] < 1e-3  # DARTS's eps = 0.01 / ||v||
    assert gaps[0] > gaps[1] > gaps[2]
    # Central differences: the error falls ~100x per 10x smaller eps.
    assert gaps[0] / gaps[1] > 30


def test_second_order_differs_from_first_order(float64):
    train, val = _batches()
    first, _, _ = _search_model("first_order").architect(train, val)
    second, _, _ = _search_model("second_order").architect(train, val)
    assert _relative(second, first) > 1e-3


def test_first_order_is_the_plain_validation_gradient(float64):
    sm = _search_model("first_order")
    train, val = _batches()
    grads, _, _ = sm.architect(train, val)
    x, y = val
    with tf.GradientTape() as tape:
        loss = sm.loss_fn(y, sm.supernet(x, training=True))
    expected = tape.gradient(loss, sm.arch_vars)
    np.testing.assert_allclose(_flat(grads), _flat(expected), rtol=1e-12, atol=1e-15)


def test_gradients_at_w_plus_and_w_minus_differ(float64):
    sm = _search_model("second_order")
    terms = sm.architect.second_order_terms(*_batches())
    assert _relative(terms["grad_plus"], terms["grad_minus"]) > 1e-6
    assert float(terms["eps"]) > 0


def test_virtual_step_lands_where_the_keras_optimizer_steps(float64):
    """The virtual step uses the Keras SGD momentum convention (m <- mu m - lr g)."""
    sm = _search_model("second_order")
    train, _ = _batches()
    arch = sm.architect
    values = [v.value for v in sm.supernet.trainable_variables]
    g, _, _ = arch.gradients(values, sm.weight_index, *train, with_penalty=False)
    w = [values[i] for i in sm.weight_index]
    virtual = arch.virtual_step(w, g)
    sm.weight_optimizer.apply([gi + sm.weight_decay * wi for gi, wi in zip(g, w)], sm.weight_vars)
    np.testing.assert_allclose(_flat(sm.weight_vars), _flat(virtual), rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("architect", ["first_order", "second_order", "exact"])
def test_arch_step_leaves_weights_bit_identical(architect, float64):
    sm = _search_model(architect)
    train, val = _batches()
    snapshot = [v.numpy().copy() for v in sm.supernet.weights]  # incl. BN statistics
    momentum = [m.numpy().copy() for m in sm.weight_optimizer.momentums]
    alphas = [a.numpy().copy() for a in sm.arch_vars]
    sm.arch_step(train, val)
    for before, v in zip(snapshot, sm.supernet.weights):
        if keras_das.space.variables.is_arch_variable(v):
            continue
        assert np.array_equal(before, v.numpy()), v.path
    for before, m in zip(momentum, sm.weight_optimizer.momentums):
        assert np.array_equal(before, m.numpy())
    assert all(not np.array_equal(a, v.numpy()) for a, v in zip(alphas, sm.arch_vars))


def test_unknown_architect_is_rejected_at_compile():
    sm = keras_das.SearchModel(_smooth_supernet())
    with pytest.raises(ValueError, match=r"Unknown architect 'third_order'.*first_order"):
        sm.compile(architect="third_order")


def test_a_traced_step_traces_one_pass_and_steps_as_the_eager_step(float64):
    """A second-order step evaluates the supernet five times (train and virtual weights,
    w +- eps * u, the weight step); traced, one trace of the architect's pass serves all
    five, and the step moves every variable (alphas, weights, momentum, batch-norm moving
    statistics) as the eager step, where each pass runs on its own, does."""
    eager, traced = _search_model("second_order"), _search_model("second_order")
    train, val = _batches()
    eager.train_step((train, val))
    tf.function(lambda t, v: traced.train_step((t, v)))(train, val)
    assert traced.architect._pass.experimental_get_tracing_count() == 1
    pairs = list(zip(traced.supernet.variables, eager.supernet.variables))
    pairs += list(zip(traced.weight_optimizer.variables, eager.weight_optimizer.variables))
    for a, b in pairs:
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-10, atol=1e-13, err_msg=a.path)


def test_two_steps_in_one_graph_step_as_two_eager_steps(float64):
    """Two second-order steps traced into one graph (as ``steps_per_execution=2`` runs
    them): the second step's passes see the statistics and random states the first left
    (the pass reads no variable itself; they are handed to it), as two eager steps do."""
    eager, traced = _search_model("second_order"), _search_model("second_order")
    train, val = _batches()
    for _ in range(2):
        eager.train_step((train, val))

    @tf.function
    def two_steps(t, v):
        traced.train_step((t, v))
        traced.train_step((t, v))

    two_steps(train, val)
    pairs = list(zip(traced.supernet.variables, eager.supernet.variables))
    pairs += list(zip(traced.weight_optimizer.variables, eager.weight_optimizer.variables))
    for a, b in pairs:
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-10, atol=1e-13, err_msg=a.path)


def test_traced_architect_passes_keep_the_moving_statistics(float64):
    sm = _search_model("second_order")
    stats = [v for v in sm.supernet.non_trainable_weights if "moving" in v.path]
    before = [v.numpy() for v in stats]
    tf.function(lambda t, v: sm.arch_step(t, v))(*_batches())
    assert stats and all(np.array_equal(v.numpy(), b) for v, b in zip(stats, before))
    tf.function(lambda t: sm.weight_step(*t))(_batches()[0])
    assert not any(np.array_equal(v.numpy(), b) for v, b in zip(stats, before))

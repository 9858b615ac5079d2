"""The architects against an independent exact hypergradient.

The reference here shares no code with ``keras_das.engine``: the model's forward pass is
written again in plain TensorFlow from its variables (not through Keras's normalisation
layers, whose ``tf.nn.moments`` stops the mean's gradient inside the variance), the
optimizer's next step is written again from the update rules of Keras's SGD, Adam and
AdamW, and the hypergradient ``d L_val(w'(a), a) / da`` is two nested gradient tapes.

The model (float64, smooth ops so that finite differences converge) has LayerNorm,
GroupNorm and BatchNorm after the mixes, kernel regularisers and dropout. The dropout is
deterministic here: a fixed Bernoulli mask (scaled by ``1 / (1 - rate)``) applied in
training, the same in every pass. A fresh mask per pass (what ``keras.layers.Dropout`` draws)
would make the reference replay the architect's random-number sequence; that dropout and
Gumbel noise do get a fresh sample per pass is tested in tests/test_search_model.py.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

import keras_das
from keras_das import MixedOp

RATE = 0.25
BATCH = 8
CONV_L2 = 0.0625  # exact in float32, as Keras holds it
DENSE_L2 = 0.125
WEIGHT_DECAY = 3e-4
NORM_EPSILON = 1e-3  # Keras's default for the three normalisation layers
ITERATIONS = 3  # the weight optimizer has taken 3 steps (Adam's bias correction)


@pytest.fixture
def float64():
    keras.config.set_floatx("float64")
    yield
    keras.config.set_floatx("float32")


class FixedMaskDropout(layers.Layer):
    """Dropout with one fixed mask: ``x * mask / (1 - rate)`` in training, ``x`` otherwise."""

    def __init__(self, mask, **kwargs):
        super().__init__(**kwargs)
        self.mask = np.asarray(mask, dtype="float64") / (1.0 - RATE)

    def call(self, inputs, training=None):
        return inputs * keras.ops.cast(self.mask, inputs.dtype) if training else inputs


def _mask():
    return (np.random.default_rng(7).uniform(size=(BATCH, 4)) > RATE).astype("float64")


def _model():
    conv = dict(padding="same")
    inputs = keras.Input((6, 6, 2))
    h = layers.Conv2D(
        4,
        3,
        activation="tanh",
        kernel_regularizer=keras.regularizers.L2(CONV_L2),
        name="conv",
        **conv,
    )(inputs)
    h = layers.LayerNormalization(name="ln")(h)
    h = MixedOp(
        [
            layers.Conv2D(4, 3, activation="softplus", name="m1_conv3", **conv),
            layers.Conv2D(4, 1, activation="tanh", name="m1_conv1"),
            layers.AveragePooling2D(3, 1, **conv),
        ],
        name="mix1",
    )(h)
    h = layers.GroupNormalization(groups=2, name="gn")(h)
    h = layers.BatchNormalization(name="bn")(h)
    h = MixedOp(
        [
            layers.Conv2D(4, 3, activation="tanh", name="m2_conv", **conv),
            layers.AveragePooling2D(3, 1, **conv),
        ],
        relaxation="sigmoid",
        name="mix2",
    )(h)
    h = layers.GlobalAveragePooling2D()(h)
    h = FixedMaskDropout(_mask(), name="drop")(h)
    out = layers.Dense(3, kernel_regularizer=keras.regularizers.L2(DENSE_L2), name="dense")(h)
    return keras.Model(inputs, out)


# -- the reference: the same function, in plain TensorFlow --------------------------------


def _normalize(x, axes):
    mean = tf.reduce_mean(x, axes, keepdims=True)
    variance = tf.reduce_mean(tf.square(x - mean), axes, keepdims=True)
    return (x - mean) / tf.sqrt(variance + NORM_EPSILON)


def _forward(p, alphas, x):
    """The model's training-mode output; ``p`` maps layer name to ``[kernel/gamma, bias/beta]``."""

    def conv(h, name):
        return tf.nn.conv2d(h, p[name][0], 1, "SAME") + p[name][1]

    def pool(h):
        return tf.nn.avg_pool2d(h, 3, 1, "SAME")

    h = tf.tanh(conv(x, "conv"))
    h = _normalize(h, [3]) * p["ln"][0] + p["ln"][1]
    w = tf.nn.softmax(alphas[0])
    h = (
        w[0] * tf.nn.softplus(conv(h, "m1_conv3"))
        + w[1] * tf.tanh(conv(h, "m1_conv1"))
        + w[2] * pool(h)
    )
    groups = tf.reshape(h, [-1, 6, 6, 2, 2])
    h = tf.reshape(_normalize(groups, [1, 2, 4]), [-1, 6, 6, 4]) * p["gn"][0] + p["gn"][1]
    h = _normalize(h, [0, 1, 2]) * p["bn"][0] + p["bn"][1]
    w = tf.sigmoid(alphas[1])
    h = w[0] * tf.tanh(conv(h, "m2_conv")) + w[1] * pool(h)
    h = tf.reduce_mean(h, [1, 2]) * _mask() / (1.0 - RATE)
    return tf.matmul(h, p["dense"][0]) + p["dense"][1]


def _loss(p, alphas, x, y):
    """Cross-entropy + the kernel regularisers (the loss ``fit`` would minimise)."""
    logits = _forward(p, alphas, x)
    ce = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
    l2 = CONV_L2 * tf.reduce_sum(tf.square(p["conv"][0]))
    return ce + l2 + DENSE_L2 * tf.reduce_sum(tf.square(p["dense"][0]))


def _params(names, values):
    p = {}
    for name, value in zip(names, values):
        p.setdefault(name, []).append(value)
    return p


# Each optimizer's next step, from Keras 3's update rules (keras/src/optimizers/*.py).
OPTIMIZERS = {
    "sgd": lambda: keras.optimizers.SGD(0.1),
    "momentum": lambda: keras.optimizers.SGD(0.1, momentum=0.9),
    "nesterov": lambda: keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True),
    "adam": lambda: keras.optimizers.Adam(0.01, beta_1=0.5, beta_2=0.9),
    "adamw": lambda: keras.optimizers.AdamW(0.01, weight_decay=0.05, beta_1=0.5, beta_2=0.9),
}


def _reference_step(optimizer, slots, w, g):
    """``w'`` for coupled decay ``g + wd * w`` and ``optimizer``'s state ``slots``."""
    g = [gi + WEIGHT_DECAY * wi for gi, wi in zip(g, w)]
    lr = 0.1 if isinstance(optimizer, keras.optimizers.SGD) else 0.01
    if isinstance(optimizer, keras.optimizers.SGD):
        if not optimizer.momentum:
            return [wi - lr * gi for wi, gi in zip(w, g)]
        out = []
        for wi, gi, m in zip(w, g, slots[0]):
            m_next = 0.9 * m - lr * gi  # Keras: the momentum slot holds -lr * velocity
            out.append(wi + (0.9 * m_next - lr * gi if optimizer.nesterov else m_next))
        return out
    t = ITERATIONS + 1
    step = lr * np.sqrt(1 - 0.9**t) / (1 - 0.5**t)
    out = []
    for wi, gi, m, v in zip(w, g, *slots):
        if isinstance(optimizer, keras.optimizers.AdamW):
            wi = wi - wi * 0.05 * lr  # decoupled decay, before the Adam step
        m = 0.5 * m + 0.5 * gi
        v = 0.9 * v + 0.1 * tf.square(gi)
        out.append(wi - step * m / (tf.sqrt(v) + 1e-7))
    return out


def _reference_hypergradient(sm, train, val):
    names = [v.path.split("/")[-2] for v in sm.weight_vars]
    w = [tf.constant(v.numpy()) for v in sm.weight_vars]
    alphas = [tf.constant(a.numpy()) for a in sm.arch_vars]
    optimizer = sm.weight_optimizer
    slots = _slots(optimizer)
    with tf.GradientTape() as outer:
        outer.watch(alphas)
        with tf.GradientTape() as inner:
            inner.watch(w)
            train_loss = _loss(_params(names, w), alphas, *train)
        g = inner.gradient(train_loss, w)
        w_next = _reference_step(optimizer, slots, w, g)
        val_loss = _loss(_params(names, w_next), alphas, *val)
    return outer.gradient(val_loss, alphas)


def _slots(optimizer):
    if isinstance(optimizer, keras.optimizers.SGD):
        return [[tf.constant(m.numpy()) for m in optimizer.momentums]]
    return [
        [tf.constant(m.numpy()) for m in optimizer._momentums],
        [tf.constant(v.numpy()) for v in optimizer._velocities],
    ]


# -- the search model under test ------------------------------------------------------------


def _batches():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2 * BATCH, 6, 6, 2))
    y = rng.integers(0, 3, size=2 * BATCH)
    return (tf.constant(x[:BATCH]), tf.constant(y[:BATCH])), (
        tf.constant(x[BATCH:]),
        tf.constant(y[BATCH:]),
    )


def _search_model(architect, optimizer="momentum", fd_epsilon=0.01):
    keras.utils.set_random_seed(0)
    net = _model()
    rng = np.random.default_rng(1)
    for variable in net.trainable_variables:  # away from the initial gamma = 1, beta = 0
        variable.assign(variable.numpy() + rng.normal(scale=0.2, size=variable.shape))
    sm = keras_das.SearchModel(net)
    sm.compile(
        weight_optimizer=OPTIMIZERS[optimizer](),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        architect=architect,
        fd_epsilon=fd_epsilon,
        weight_decay=WEIGHT_DECAY,
    )
    sm.weight_optimizer.iterations.assign(ITERATIONS)
    for slot in sm.weight_optimizer.variables:  # non-zero momenta; positive velocities
        if len(slot.shape) and slot.path != sm.weight_optimizer.iterations.path:
            slot.assign(np.abs(rng.normal(scale=0.01, size=slot.shape)))
    return sm


def _flat(tensors):
    return np.concatenate([np.ravel(np.asarray(t)) for t in tensors])


def _relative(a, b):
    return np.linalg.norm(_flat(a) - _flat(b)) / np.linalg.norm(_flat(b))


def test_reference_is_the_keras_model(float64):
    sm = _search_model("first_order")
    (x, y), _ = _batches()
    names = [v.path.split("/")[-2] for v in sm.weight_vars]
    p = _params(names, [v.value for v in sm.weight_vars])
    np.testing.assert_allclose(
        _forward(p, [a.value for a in sm.arch_vars], x),
        sm.supernet(x, training=True),
        rtol=1e-10,
        atol=1e-12,
    )
    keras_loss = sm.loss_fn(y, sm.supernet(x, training=True)) + tf.add_n(sm.supernet.losses)
    assert float(_loss(p, [a.value for a in sm.arch_vars], x, y)) == pytest.approx(
        float(keras_loss), rel=1e-12
    )


def test_architect_loss_includes_the_regularisers_the_weight_step_uses(float64):
    sm = _search_model("first_order")
    train, _ = _batches()
    loss, _ = sm.architect.loss_at(sm.architect.current_values(), *train)
    names = [v.path.split("/")[-2] for v in sm.weight_vars]
    reference = _loss(_params(names, [v.value for v in sm.weight_vars]), sm.arch_vars, *train)
    assert float(loss) == pytest.approx(float(reference), rel=1e-12)


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("traced", [False, True])
def test_exact_matches_the_nested_tape_reference(optimizer, traced, float64):
    """Eagerly, and traced (where the architect's forward accumulator looks its per-op
    derivatives up in its own cache)."""
    sm = _search_model("exact", optimizer)
    train, val = _batches()
    if traced:
        exact = tf.function(lambda t, v: sm.architect(t, v)[0], autograph=False)(train, val)
    else:
        exact, _, _ = sm.architect(train, val)
    assert _relative(exact, _reference_hypergradient(sm, train, val)) <= 1e-6


@pytest.mark.parametrize("optimizer", ["momentum", "nesterov", "adam"])
def test_second_order_error_falls_as_eps_squared(optimizer, float64):
    train, val = _batches()
    reference = _reference_hypergradient(_search_model("exact", optimizer), train, val)
    gaps = []
    for eps in (1e-1, 1e-2, 1e-3):
        second, _, _ = _search_model("second_order", optimizer, eps).architect(train, val)
        gaps.append(_relative(second, reference))
    assert gaps[1] < 1e-3, gaps  # DARTS's eps = 0.01 / ||v||
    # Central differences: the error falls ~100x per 10x smaller eps.
    assert gaps[0] / gaps[1] > 30 and gaps[1] / gaps[2] > 30, gaps


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "nesterov", "adam"])
@pytest.mark.parametrize("traced", [False, True])
def test_weight_step_takes_the_optimizers_step(optimizer, traced, float64):
    """The weight step (clip, coupled decay, the optimizer's rule; Keras SGD on TensorFlow's
    fused kernels) lands where the reference step from the reference loss says."""
    sm = _search_model("first_order", optimizer)
    train, _ = _batches()
    names = [v.path.split("/")[-2] for v in sm.weight_vars]
    w = [tf.constant(v.numpy()) for v in sm.weight_vars]
    alphas = [tf.constant(a.numpy()) for a in sm.arch_vars]
    with tf.GradientTape() as tape:
        tape.watch(w)
        loss = _loss(_params(names, w), alphas, *train)
    g = tape.gradient(loss, w)
    scale = min(1.0, sm.grad_clip / float(tf.linalg.global_norm(g)))
    expected = _reference_step(
        sm.weight_optimizer, _slots(sm.weight_optimizer), w, [scale * gi for gi in g]
    )
    step = tf.function(sm.weight_step) if traced else sm.weight_step
    step(*train)
    # Keras's Adam rounds beta_2 to float32 (beta_2 ** t then differs by ~3e-8).
    rtol, atol = (1e-7, 1e-9) if optimizer == "adam" else (1e-12, 1e-14)
    np.testing.assert_allclose(_flat(sm.weight_vars), _flat(expected), rtol=rtol, atol=atol)
    assert int(sm.weight_optimizer.iterations.numpy()) == ITERATIONS + 1
    if traced and optimizer in ("momentum", "nesterov"):
        graph = step.get_concrete_function(*train).graph
        assert "ResourceApplyKerasMomentum" in {op.type for op in graph.get_operations()}

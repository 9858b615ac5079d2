"""DARTS-PT's perturbation-based selection."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_das import DARTS_OPS
from keras_das.engine import selection
from keras_das.space import genotype as genotype_lib
from tests.testing import random_inputs
from tests.testing import tiny_search_network

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


class LinearSupernet:
    """A stand-in whose loss is ``-sum(weights * importance)`` over both cells: removing
    op o of edge e raises the loss by exactly ``weights[e, o] * importance[e, o]``."""

    op_names = tuple(DARTS_OPS)
    compute_dtype = "float32"

    def __init__(self, weights, importance):
        self.weights, self.importance = weights, importance

    def compute_mixing_weights(self, training=False):
        return tuple(tf.constant(w) for w in self.weights)

    def __call__(self, x, training=False, mixing_weights=None):
        value = sum(tf.reduce_sum(w * i) for w, i in zip(mixing_weights, self.importance))
        return tf.fill([1, 1], value)

    def genotype(self, weights):
        return genotype_lib.derive_genotype(weights["normal"], weights["reduce"], self.op_names)


def test_scores_are_the_loss_rise_when_one_op_is_removed():
    rng = np.random.default_rng(0)
    weights = [rng.dirichlet(np.ones(8), 14).astype("float32") for _ in range(2)]
    importance = [rng.normal(size=(14, 8)).astype("float32") for _ in range(2)]
    net = LinearSupernet(weights, importance)
    scores = selection.perturbation_scores(net, [(None, None)], lambda y, logits: -logits[0, 0])
    for index, cell in enumerate(("normal", "reduce")):
        expected = weights[index] * importance[index]
        np.testing.assert_allclose(scores[cell][:, 1:], expected[:, 1:], rtol=1e-4, atol=1e-5)
        assert np.all(scores[cell][:, 0] == -np.inf)  # none is never chosen


def test_selection_keeps_what_the_supernet_needs_not_the_largest_alpha():
    """Skip connections carry the largest weights but the supernet does not use them;
    sep_conv_3x3 has small weights and matters: the argmax rule keeps the skips, the
    perturbation rule the convolutions."""
    skip, conv = DARTS_OPS.index("skip_connect"), DARTS_OPS.index("sep_conv_3x3")
    weights = np.full((14, 8), 0.1, "float32")
    weights[:, skip] = 0.3
    importance = np.zeros((14, 8), "float32")
    importance[:, conv] = 1.0
    net = LinearSupernet([weights, weights], [importance, importance])
    argmax = net.genotype({"normal": weights, "reduce": weights})
    assert {op for op, _ in argmax.normal} == {"skip_connect"}
    chosen = selection.perturbation_genotype(net, [(None, None)], lambda y, p: -p[0, 0])
    assert {op for op, _ in chosen.normal + chosen.reduce} == {"sep_conv_3x3"}


def test_scores_of_a_real_supernet_match_a_direct_evaluation():
    net = tiny_search_network(op_names=("none", "skip_connect", "sep_conv_3x3", "avg_pool_3x3"))
    x = random_inputs((4, 8, 8, 3))
    y = np.array([0, 1, 2, 0])
    net(x, training=True)  # build, and move the batch-norm statistics off their defaults
    scores = selection.perturbation_scores(net, [(x, y)], LOSS)
    normal, reduce = (w.numpy() for w in net.compute_mixing_weights())

    def loss(n, r):
        return float(LOSS(y, net(x, training=False, mixing_weights=(n, r))))

    reference = loss(normal, reduce)
    for edge, op in [(0, 1), (2, 2), (4, 3)]:
        n = normal.copy()
        n[edge, op] = 0.0
        assert scores["normal"][edge, op] == pytest.approx(loss(n, reduce) - reference, abs=1e-5)
        r = reduce.copy()
        r[edge, op] = 0.0
        assert scores["reduce"][edge, op] == pytest.approx(loss(normal, r) - reference, abs=1e-5)
    genotype = selection.perturbation_genotype(net, [(x, y)], LOSS)
    assert genotype.steps == 2 and "none" not in {op for op, _ in genotype.normal}


def test_no_batches_is_an_error():
    with pytest.raises(ValueError, match="at least one validation batch"):
        selection.perturbation_scores(None, [], LOSS)


def test_mixed_op_scores_of_a_user_model_match_a_forward_pass_written_out():
    """DARTS-PT on a user's model: each score is the loss with one candidate's weight set to
    zero (the others kept, not renormalised) minus the loss of the whole mixture, computed
    here by calling the model's layers by hand with explicit mixing weights."""
    from tests import user_models

    info = type("Info", (), {"image_shape": (8, 8, 3), "num_classes": 3})()
    model = user_models.functional(info)
    rng = np.random.default_rng(0)
    for mix in ("block_1", "block_2"):  # away from uniform, so the candidates differ
        alpha = model.get_layer(mix).alpha
        alpha.assign(rng.normal(size=alpha.shape).astype("float32"))
    batches = [
        (tf.constant(rng.normal(size=(4, 8, 8, 3)), tf.float32), tf.constant([0, 1, 2, 1]))
        for _ in range(2)
    ]
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    stem, mix_1, pool, mix_2, gap, head = (
        model.layers[i] for i in range(1, 7)
    )  # Input, Conv2D, MixedOp, MaxPooling2D, MixedOp, GlobalAveragePooling2D, Dense

    def loss_by_hand(w1, w2):
        losses = []
        for x, y in batches:
            h = mix_2(pool(mix_1(stem(x), mixing_weights=w1)), mixing_weights=w2)
            losses.append(float(loss_fn(y, head(gap(h)))))
        return np.mean(losses)

    base = [model.get_layer(n).get_mixing_weights() for n in ("block_1", "block_2")]
    reference = loss_by_hand(*base)
    scores = selection.mixed_op_scores(model, batches, loss_fn)
    for index, name in enumerate(("block_1", "block_2")):
        for c in range(3):
            weights = [w.copy() for w in base]
            weights[index][c] = 0.0
            expected = loss_by_hand(*weights) - reference
            assert scores[name][c] == pytest.approx(expected, rel=1e-4, abs=1e-6), (name, c)
    choices = selection.mixed_op_choices(model, batches, loss_fn)
    assert choices == {name: int(np.argmax(s)) for name, s in scores.items()}

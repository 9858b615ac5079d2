import keras
import numpy as np
import pytest

import keras_das
from keras_das.discrete.discrete_network import Cell
from keras_das.discrete.discrete_network import DiscreteNetwork
from keras_das.space import variables
from tests import testing


def test_darts_v2_retrain_network_has_3_3m_weights():
    net = DiscreteNetwork(
        keras_das.DARTS_V2, num_classes=10, channels=36, num_cells=20, auxiliary=True
    )
    net.build((None, 32, 32, 3))
    aux = variables.count_weights(net.auxiliary_head.trainable_variables)
    # quark0/darts train.py prints "param size = 3.349342MB" for DARTS_V2 (auxiliary excluded).
    assert variables.count_weights(net.trainable_variables) - aux == 3_349_342


def test_cell_output_shape():
    cell = Cell(keras_das.DARTS_V2.reduce, keras_das.DARTS_V2.reduce_concat, 8, reduction=True)
    y = cell([testing.random_inputs((2, 16, 16, 6)), testing.random_inputs((2, 16, 16, 6))])
    assert tuple(y.shape) == (2, 8, 8, 32)


def _tiny(auxiliary=True):
    return DiscreteNetwork(
        keras_das.DARTS_V1, num_classes=3, channels=4, num_cells=3, auxiliary=auxiliary, seed=0
    )


def test_auxiliary_logits_only_while_training():
    net = _tiny()
    x = testing.random_inputs((2, 32, 32, 3))
    logits, aux = net(x, training=True)
    assert tuple(logits.shape) == tuple(aux.shape) == (2, 3)
    assert tuple(net(x, training=False).shape) == (2, 3)


def test_fit_with_auxiliary_loss_and_drop_path(tmp_path):
    net = _tiny()
    x = testing.random_inputs((8, 32, 32, 3))
    y = np.arange(8) % 3
    net.compile(
        keras.optimizers.SGD(0.05),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    net.build((None, 32, 32, 3))
    net.drop_path_rate.assign(0.3)
    history = net.fit(x, y, batch_size=4, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"])) and "accuracy" in history.history
    # The auxiliary head is trained through its loss.
    assert all(np.any(v.numpy() != 0) for v in net.auxiliary_head.trainable_variables)
    path = str(tmp_path / "net.keras")
    net.save(path)
    reloaded = keras.models.load_model(path)
    np.testing.assert_allclose(
        reloaded.predict(x, verbose=0), net.predict(x, verbose=0), rtol=1e-4, atol=1e-5
    )
    assert reloaded.genotype == keras_das.DARTS_V1


def test_auxiliary_loss_is_added_with_its_weight():
    net = _tiny()
    net.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = testing.random_inputs((4, 32, 32, 3))
    y = np.array([0, 1, 2, 0])
    logits, aux = net(x, training=True)
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    expected = float(ce(y, logits)) + 0.4 * float(ce(y, aux))
    assert float(net.compute_loss(x, y, (logits, aux))) == pytest.approx(expected, rel=1e-5)


def test_drop_path_drops_whole_examples_and_rescales():
    drop = keras_das.discrete.discrete_network.DropPath(seed=0)
    x = np.ones((200, 2, 2, 1), "float32")
    y = np.asarray(drop(x, rate=0.25, training=True))
    per_example = y.reshape(200, -1)
    np.testing.assert_allclose(np.unique(per_example), [0.0, 1 / 0.75], rtol=1e-6)
    assert np.all(per_example.min(axis=1) == per_example.max(axis=1))
    assert 0.1 < np.mean(per_example[:, 0] == 0) < 0.4
    np.testing.assert_array_equal(np.asarray(drop(x, rate=0.25, training=False)), x)


def test_genotype_ops_are_validated():
    bad = keras_das.Genotype.from_dict(
        {**keras_das.DARTS_V2.to_dict(), "normal": [["conv_7x7", 0]] * 8}
    )
    with pytest.raises(ValueError, match="uses op 'conv_7x7'"):
        DiscreteNetwork(bad)

import keras
import numpy as np
import pytest

import keras_das
from keras_das import SearchCell
from keras_das import SearchNetwork
from keras_das import variables
from tests import testing

# A small space keeps compiled training steps quick to trace.
SMALL_OPS = ("none", "max_pool_3x3", "skip_connect", "sep_conv_3x3")


def test_weight_count_matches_the_reference():
    """quark0/darts Network(C=8, num_classes=10, layers=5): 394,210 trainable weights."""
    net = SearchNetwork(num_classes=10, channels=8, num_cells=5)
    net.build((None, 32, 32, 3))
    assert variables.count_weights(keras_das.weight_variables(net)) == 394_210
    alphas = keras_das.arch_variables(net)
    assert [tuple(a.shape) for a in alphas] == [(14, 8), (14, 8)]
    assert np.abs(alphas[0].numpy()).max() < 1e-2  # 1e-3 * N(0, 1)


def test_reduction_cells_at_one_and_two_thirds():
    net = SearchNetwork(channels=4, num_cells=8)
    assert [c.reduction for c in net.cells] == [
        False,
        False,
        True,
        False,
        False,
        True,
        False,
        False,
    ]
    assert [c.channels for c in net.cells] == [4, 4, 8, 8, 8, 16, 16, 16]


def test_cell_shapes_and_edges():
    cell = SearchCell(8, reduction=True, reduction_prev=False)
    s0 = testing.random_inputs((2, 16, 16, 12))
    s1 = testing.random_inputs((2, 16, 16, 12))
    weights = np.full((14, 8), 1 / 8, "float32")
    y = cell([s0, s1], mixing_weights=weights)
    assert tuple(y.shape) == (2, 8, 8, 32)
    assert len(cell.edges) == 14
    # Edges from the two inputs stride; edges from intermediate nodes do not.
    assert [e.strides for e in cell.edges[:5]] == [2, 2, 2, 2, 1]


def test_all_normal_cells_share_one_alpha():
    net = SearchNetwork(channels=4, num_cells=3)
    x = testing.random_inputs((2, 16, 16, 3))
    net(x)
    assert len(keras_das.arch_variables(net)) == 2
    assert not any(keras_das.arch_variables(cell) for cell in net.cells)


@pytest.mark.parametrize("relaxation", ["softmax", "sigmoid", "gumbel", "gumbel_hard"])
def test_network_trains_and_reloads(relaxation, tmp_path):
    net = SearchNetwork(
        num_classes=3,
        channels=4,
        num_cells=3,
        steps=2,
        multiplier=2,
        op_names=SMALL_OPS,
        relaxation=relaxation,
        seed=0,
    )
    x = testing.random_inputs((4, 16, 16, 3))
    y = np.array([0, 1, 2, 0])
    net.build(x.shape)
    net.compile(
        keras.optimizers.SGD(0.05), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    before = [v.numpy().copy() for v in keras_das.weight_variables(net)]
    history = net.fit(x, y, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert any(
        not np.array_equal(b, v.numpy()) for b, v in zip(before, keras_das.weight_variables(net))
    )
    path = str(tmp_path / "net.keras")
    net.save(path)
    reloaded = keras.models.load_model(path)
    np.testing.assert_allclose(
        reloaded.predict(x, verbose=0), net.predict(x, verbose=0), rtol=1e-4, atol=1e-5
    )
    np.testing.assert_array_equal(
        keras_das.arch_variables(reloaded)[0].numpy(), keras_das.arch_variables(net)[0].numpy()
    )
    assert reloaded.genotype() == net.genotype()


def test_genotype_follows_the_alphas():
    net = SearchNetwork(channels=4, num_cells=3)
    net.build((None, 16, 16, 3))
    favoured = np.zeros((14, 8), "float32")
    favoured[:, keras_das.DARTS_OPS.index("sep_conv_5x5")] = 3.0
    net.alpha_normal.assign(favoured)
    g = net.genotype()
    assert {op for op, _ in g.normal} == {"sep_conv_5x5"}
    assert g.normal_concat == (2, 3, 4, 5)


def test_temperature_is_a_variable_schedules_can_assign():
    net = SearchNetwork(channels=4, num_cells=3, temperature=2.0)
    net.build((None, 16, 16, 3))
    net.alpha_normal.assign(np.tile(np.arange(8, dtype="float32"), (14, 1)))
    hot = net.get_mixing_weights()["normal"]
    net.temperature.assign(0.5)
    cold = net.get_mixing_weights()["normal"]
    assert cold.max() > hot.max()


def test_bad_sizes_fail_at_construction():
    with pytest.raises(ValueError, match="num_cells must be a positive int, got 0"):
        SearchNetwork(num_cells=0)
    with pytest.raises(ValueError, match="multiplier=5 exceeds the 4 nodes"):
        SearchNetwork(multiplier=5)
    with pytest.raises(ValueError, match="Unknown op 'sep_conv_9x9'"):
        SearchNetwork(op_names=["none", "sep_conv_9x9"])

import keras
import numpy as np
import pytest

import keras_das
from keras_das import SearchCell
from keras_das import SearchNetwork
from keras_das.space import variables
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
    net = testing.tiny_search_network(op_names=SMALL_OPS, relaxation=relaxation)
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


def test_edge_normalization_weights_are_a_softmax_per_node():
    from keras_das.space.search_network import edge_normalization_weights

    betas = np.arange(5, dtype="float32")
    w = np.asarray(edge_normalization_weights(betas, steps=2))
    np.testing.assert_allclose(w[:2].sum(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(w[2:].sum(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(w[:2], np.exp([0, 1]) / np.exp([0, 1]).sum(), rtol=1e-6)


def test_pc_darts_network_has_betas_and_fewer_weights():
    full = SearchNetwork(channels=8, num_cells=3)
    full.build((None, 16, 16, 3))
    pc = SearchNetwork(channels=8, num_cells=3, partial_channels=4, edge_normalization=True)
    pc.build((None, 16, 16, 3))
    assert pc.cell_implementation == "fused"  # partial channels run on the fused cells
    assert [tuple(a.shape) for a in keras_das.arch_variables(pc)] == [
        (14, 8),
        (14, 8),
        (14,),
        (14,),
    ]
    assert variables.count_weights(keras_das.weight_variables(pc)) < 0.3 * variables.count_weights(
        keras_das.weight_variables(full)
    )
    # Derivation ranks edges by op weight times edge weight.
    pc.beta_normal.assign(np.array([5.0, -5.0] + [0.0] * 12, "float32"))
    favour = np.zeros((14, 8), "float32")
    favour[0, 4] = favour[1, 5] = 3.0  # both edges into node 0 strong on their own ...
    pc.alpha_normal.assign(favour)
    g = pc.genotype()
    assert g.normal[0] == ("sep_conv_3x3", 0)  # ... but edge 0 wins on its beta
    assert SearchNetwork.from_config(pc.get_config()).partial_channels == 4


def test_auxiliary_skip_adds_beta_times_the_input_on_stride_1_edges():
    cell = SearchCell(4, reduction=False, op_names=("none", "sep_conv_3x3"), steps=2, multiplier=2)
    s0 = testing.random_inputs((2, 8, 8, 4))
    s1 = testing.random_inputs((2, 8, 8, 4), seed=1)
    zero = np.zeros((5, 2), "float32")  # every op weight 0: only the auxiliary skip remains
    y = np.asarray(cell([s0, s1], mixing_weights=zero, aux_skip_beta=0.5, training=False))
    p0 = np.asarray(cell.preprocess0(s0, training=False))
    p1 = np.asarray(cell.preprocess1(s1, training=False))
    node0 = 0.5 * (p0 + p1)
    node1 = 0.5 * (p0 + p1 + node0)
    np.testing.assert_allclose(y, np.concatenate([node0, node1], axis=-1), rtol=1e-5, atol=1e-6)
    net = SearchNetwork(channels=4, num_cells=3, aux_skip=True)
    net.build((None, 8, 8, 3))
    assert (
        float(net.aux_skip_beta.numpy()) == 1.0 and not keras_das.arch_variables(net)[0].shape == ()
    )

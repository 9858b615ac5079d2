"""FusedSearchCell computes what the per-edge SearchCell computes, weights copied across."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_das
from keras_das import FusedSearchCell
from keras_das import SearchCell
from keras_das import SearchNetwork
from keras_das.space import gradients
from keras_das.space import primitives
from keras_das.space import stacked_ops
from keras_das.space import variables
from keras_das.space.fused_batch_norm import FusedBatchNorm
from keras_das.space.topology import num_edges
from tests import fused_weights
from tests import testing

pytestmark = pytest.mark.kernel_path

LOGITS_CE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

OP_SUBSETS = {
    "darts": primitives.DARTS_OPS,
    "convs": ("none", "conv_3x3", "skip_connect", "conv_5x5", "sep_conv_3x3"),
    "parameter_free": ("max_pool_3x3", "none", "skip_connect", "avg_pool_3x3"),
    "dil_only": ("dil_conv_5x5", "dil_conv_3x3"),
}


def _assert_close(actual, expected, rel, what, floor=1e-30):
    """``max |actual - expected| <= rel * max(max |expected|, floor)``, same shapes.

    ``floor`` is the scale of the quantities ``expected`` is computed from, where its own
    values can be near zero (a batch mean of zero-mean features).
    """
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, what
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    err = float(np.max(np.abs(actual - expected))) if expected.size else 0.0
    assert err <= rel * max(scale, floor), f"{what}: max error {err:.3g}, scale {scale:.3g}"


def _cell_pair(
    reduction,
    reduction_prev,
    op_names,
    steps=4,
    multiplier=4,
    size=8,
    seed=0,
    channels=4,
    partial_channels=1,
):
    """A per-edge and a fused cell with the same weights, and inputs for them."""
    rng = np.random.default_rng(seed)
    s0_size = 2 * size if reduction_prev else size
    s0 = tf.constant(rng.normal(size=(3, s0_size, s0_size, 6)).astype("float32"))
    s1 = tf.constant(rng.normal(size=(3, size, size, 5)).astype("float32"))
    logits = rng.normal(size=(num_edges(steps), len(op_names)))
    w = tf.constant(keras.ops.convert_to_numpy(keras.ops.softmax(logits, axis=-1)), "float32")
    args = (channels, reduction, reduction_prev, op_names, steps, multiplier, partial_channels)
    per_edge, fused = SearchCell(*args), FusedSearchCell(*args)
    per_edge.build((s0.shape, s1.shape))
    fused.build((s0.shape, s1.shape))
    # Distinct batch-norm statistics, so that copying them is tested too (but alike for
    # the pools of one state's edges, which see the same batches in any real training).
    for layer in per_edge._flatten_layers():
        if isinstance(layer, keras.layers.BatchNormalization) and not any(
            layer is op.chain[1] for op in _pool_ops(per_edge)
        ):
            for v in layer.non_trainable_variables:
                v.assign(rng.uniform(0.5, 1.5, size=v.shape).astype("float32"))
    fused_weights.copy_weights(per_edge, fused)
    return per_edge, fused, (s0, s1, w)


def _pool_ops(cell):
    return [op for mix in cell.edges for op in mix.ops if isinstance(op, primitives.PoolBN)]


def _forward_and_grads(cell, s0, s1, w, training=True):
    probe = tf.constant(
        np.random.default_rng(7).normal(size=cell.compute_output_shape([s0.shape, s1.shape])[1:]),
        "float32",
    )
    with tf.GradientTape() as tape:
        tape.watch([s0, s1, w])
        y = cell([s0, s1], w, training=training)
        loss = tf.reduce_sum(probe * y) + 0.1 * tf.reduce_sum(tf.square(y))
    grads = tape.gradient(loss, [s0, s1, w, *cell.trainable_variables])
    grads = [tf.convert_to_tensor(g) for g in grads]  # gathered rows give IndexedSlices
    return y, grads[:3], dict(zip((id(v) for v in cell.trainable_variables), grads[3:]))


def _mapped(fused, per_edge, by_id):
    """Per-edge values (by variable id; others: current values) in the fused layout."""

    def value_of(variable):
        return keras.ops.convert_to_numpy(
            by_id[id(variable)] if id(variable) in by_id else variable
        )

    return fused_weights.per_edge_values(fused, per_edge, value_of)


@pytest.mark.parametrize(
    "subset, layout",
    [(name, "dense") for name in OP_SUBSETS] + [("darts", "tiled")],
)
@pytest.mark.parametrize(
    "reduction, reduction_prev", [(False, False), (True, False), (False, True), (True, True)]
)
def test_fused_cell_matches_the_per_edge_cell(
    subset, layout, reduction, reduction_prev, monkeypatch
):
    if layout == "tiled":  # the layout of sep and dil convs on more than 8 channels
        monkeypatch.setattr(stacked_ops, "_DENSE_MAX_CHANNELS", 0)
    per_edge, fused, inputs = _cell_pair(reduction, reduction_prev, OP_SUBSETS[subset])
    _assert_cells_agree(per_edge, fused, *inputs)


@pytest.mark.parametrize("partial_channels", [2, 4])
@pytest.mark.parametrize(
    "reduction, reduction_prev, layout",
    [
        (False, False, "dense"),
        (True, False, "dense"),
        (False, True, "dense"),
        (True, True, "dense"),
        (True, False, "tiled"),
    ],
)
def test_partial_channels_match_the_per_edge_cell(
    partial_channels, reduction, reduction_prev, layout, monkeypatch
):
    """PC-DARTS: ops on the first C/K channels, the rest bypassed (pooled at stride 2),
    channel-shuffled together on every edge."""
    if layout == "tiled":
        monkeypatch.setattr(stacked_ops, "_DENSE_MAX_CHANNELS", 0)
    per_edge, fused, inputs = _cell_pair(
        reduction,
        reduction_prev,
        primitives.DARTS_OPS,
        channels=8,
        partial_channels=partial_channels,
    )
    assert all(source.channels == 8 // partial_channels for source in fused.sources)
    _assert_cells_agree(per_edge, fused, *inputs)


def _assert_cells_agree(per_edge, fused, s0, s1, w):
    """Outputs, gradients and moving statistics of a training call, then inference."""
    y_ref, input_grads_ref, grads_ref = _forward_and_grads(per_edge, s0, s1, w)
    y, input_grads, grads = _forward_and_grads(fused, s0, s1, w)

    _assert_close(y, y_ref, 1e-5, "outputs")
    for name, g, g_ref in zip(("s0", "s1", "mixing weights"), input_grads, input_grads_ref):
        _assert_close(g, g_ref, 1e-4, f"gradient w.r.t. {name}")
    expected = _mapped(fused, per_edge, grads_ref)
    assert {id(v) for v, _ in expected if v.trainable} == set(grads)
    for variable, g_ref in expected:
        if variable.trainable:
            _assert_close(grads[id(variable)], g_ref, 1e-4, f"gradient of {variable.path}")
    # Moving statistics after the training call. The fused cell keeps one batch norm for
    # the pools of all edges leaving a state: those of the per-edge cell must stay equal.
    for variable, value in fused_weights.per_edge_values(fused, per_edge):
        if not variable.trainable:
            _assert_close(variable.numpy(), value, 1e-5, f"{variable.path}", floor=1.0)
    for i, name in enumerate(per_edge.op_names):
        for source in range(2 + per_edge.steps - 1) if "pool" in name else ():
            stats = [
                [v.numpy() for v in mix.ops[i].non_trainable_variables]
                for mix in per_edge.edges
                if mix.name.endswith(f"_{source}")
            ]
            assert len(stats) > 0
            for other in stats[1:]:
                for a, b in zip(stats[0], other):
                    np.testing.assert_array_equal(a, b)
    # Inference uses the (copied, then updated) moving statistics.
    y_ref = per_edge([s0, s1], w, training=False)
    _assert_close(fused([s0, s1], w, training=False), y_ref, 1e-5, "inference outputs")


def test_copying_pools_with_diverged_statistics_is_an_error():
    """The fused cell keeps one batch norm for a pool on all edges leaving a state."""
    per_edge, fused, _ = _cell_pair(False, False, OP_SUBSETS["parameter_free"], steps=2)
    bn = per_edge.edges[-1].ops[0].chain[1]  # max pool of node 1's edge from state 2
    bn.moving_mean.assign(bn.moving_mean + 1.0)
    fused_weights.copy_weights(per_edge, fused)  # state 2 feeds one edge only: nothing to disagree
    bn = per_edge.edges[0].ops[0].chain[1]  # max pool of node 0's edge from state 0
    bn.moving_mean.assign(bn.moving_mean + 1.0)
    with pytest.raises(ValueError, match=r"different statistics.*one batch norm for a pool"):
        fused_weights.copy_weights(per_edge, fused)


@pytest.mark.parametrize("partial_channels, channels", [(1, 4), (4, 8)])
@pytest.mark.parametrize("reduction", [False, True])
def test_edge_weights_and_auxiliary_skip_match_the_per_edge_cell(
    reduction, partial_channels, channels
):
    """PC-DARTS edge weights and DARTS-'s auxiliary skip (stride-1 edges only), also
    with partial channels (the edge weight scales the bypassed channels too)."""
    per_edge, fused, (s0, s1, w) = _cell_pair(
        reduction,
        False,
        OP_SUBSETS["convs"],
        channels=channels,
        partial_channels=partial_channels,
    )
    rng = np.random.default_rng(3)
    edge_weights = tf.constant(rng.uniform(0.2, 1.0, size=num_edges(4)).astype("float32"))
    beta = tf.constant(0.7)

    def forward(cell):
        with tf.GradientTape() as tape:
            tape.watch([w, edge_weights, beta])
            y = cell([s0, s1], w, edge_weights=edge_weights, aux_skip_beta=beta, training=True)
            loss = tf.reduce_sum(tf.sin(y))
        grads = tape.gradient(loss, [w, edge_weights, beta])
        return y, [tf.convert_to_tensor(g) for g in grads]  # gathered rows: IndexedSlices

    y_ref, grads_ref = forward(per_edge)
    y, grads = forward(fused)
    _assert_close(y, y_ref, 1e-5, "outputs")
    for name, g, g_ref in zip(("mixing weights", "edge weights", "beta"), grads, grads_ref):
        _assert_close(g, g_ref, 1e-4, f"gradient w.r.t. {name}")
    without = fused([s0, s1], w, training=False)
    assert float(tf.reduce_max(tf.abs(without - fused([s0, s1], w, training=False)))) == 0.0
    assert float(tf.reduce_max(tf.abs(y - without))) > 0.1  # the extras change the output


@pytest.mark.parametrize("partial_channels", [1, 2])
def test_fused_network_with_pc_darts_and_auxiliary_skip(partial_channels):
    """Every remedy keeps the fused cells under ``auto``, and ``fused`` accepts them."""
    extras = dict(edge_normalization=True, aux_skip=True, partial_channels=partial_channels)
    net = testing.tiny_search_network(**extras)
    per_edge = testing.tiny_search_network(**extras, cell_implementation="per_edge")
    assert net.cell_implementation == "fused"
    assert all(type(cell) is FusedSearchCell for cell in net.cells)
    assert {cell.partial_channels for cell in net.cells} == {partial_channels}
    x = testing.random_inputs((2, 8, 8, 3))
    net(x), per_edge(x)
    assert [v.path.split("/")[-1] for v in keras_das.arch_variables(net)] == [
        v.path.split("/")[-1] for v in keras_das.arch_variables(per_edge)
    ]
    assert variables.count_weights(keras_das.weight_variables(net)) == variables.count_weights(
        keras_das.weight_variables(per_edge)
    )
    explicit = testing.tiny_search_network(**extras, cell_implementation="fused")
    assert explicit.cell_implementation == "fused"
    clone = SearchNetwork.from_config(net.get_config())
    assert clone.cell_implementation == "fused"
    assert {cell.partial_channels for cell in clone.cells} == {partial_channels}


@pytest.mark.parametrize("partial_channels", [1, 2])
def test_odd_sizes_and_few_steps(partial_channels):
    """FactorizedReduce and strided ops (and the pooled bypass) on a 7x7 input; 2 nodes,
    1 concatenated."""
    per_edge, fused, (s0, s1, w) = _cell_pair(
        True,
        False,
        primitives.DARTS_OPS,
        steps=2,
        multiplier=1,
        size=7,
        partial_channels=partial_channels,
    )
    y_ref, input_grads_ref, _ = _forward_and_grads(per_edge, s0, s1, w)
    y, input_grads, _ = _forward_and_grads(fused, s0, s1, w)
    assert tuple(y.shape) == (3, 4, 4, 4)
    _assert_close(y, y_ref, 1e-5, "outputs")
    for g, g_ref in zip(input_grads, input_grads_ref):
        _assert_close(g, g_ref, 1e-4, "input gradients")


def test_synchronized_batch_norm_falls_back_to_keras():
    """Under a strategy every batch norm must sync: FusedBatchNorm then runs Keras's path."""
    per_edge, fused, (s0, s1, w) = _cell_pair(False, False, primitives.DARTS_OPS, steps=2)
    count = primitives.synchronize_batch_norm(fused)
    assert count == sum(isinstance(x, FusedBatchNorm) for x in fused._flatten_layers())
    assert count > 0
    y_ref = per_edge([s0, s1], w, training=True)
    _assert_close(fused([s0, s1], w, training=True), y_ref, 1e-5, "synchronized outputs")


@pytest.mark.parametrize("partial_channels", [1, 2])
def test_config_round_trip_and_construction_errors(partial_channels):
    kwargs = dict(
        reduction=True,
        op_names=("none", "skip_connect"),
        steps=2,
        partial_channels=partial_channels,
    )
    cell = FusedSearchCell(8, **kwargs)
    clone = FusedSearchCell.from_config(cell.get_config())
    assert clone.get_config() == cell.get_config()
    assert clone.partial_channels == partial_channels
    reference = SearchCell(8, **kwargs)
    shared = (
        "channels",
        "reduction",
        "reduction_prev",
        "op_names",
        "steps",
        "multiplier",
        "partial_channels",
    )
    assert {k: cell.get_config()[k] for k in shared} == {
        k: reference.get_config()[k] for k in shared
    }
    with pytest.raises(ValueError, match=r"Unknown op 'conv_9x9'"):
        FusedSearchCell(8, op_names=("none", "conv_9x9"))
    for bad in (0, 4, 2.0):
        with pytest.raises(ValueError, match=r"partial_channels must be a positive int dividing"):
            FusedSearchCell(6, partial_channels=bad)
    per_edge = SearchCell(4, op_names=("none", "skip_connect"))
    fused = FusedSearchCell(4, op_names=("none", "max_pool_3x3"))
    with pytest.raises(ValueError, match=r"op_names: \['none', 'skip_connect'\] vs"):
        fused_weights.copy_weights(per_edge, fused)
    fused = FusedSearchCell(4, op_names=("none", "skip_connect"), partial_channels=2)
    with pytest.raises(ValueError, match=r"partial_channels: 1 vs 2"):
        fused_weights.copy_weights(per_edge, fused)


@pytest.fixture
def custom_ops():
    """Registers 'my_conv' and re-registers 'sep_conv_3x3'; restores the registry after."""
    saved = dict(primitives.OPS)
    keras_das.register_op("my_conv", lambda c, s, affine: primitives.ReLUConvBN(c, 3, s, affine))
    keras_das.register_op(
        "sep_conv_3x3",
        lambda c, s, affine: primitives.SepConv(c, 5, strides=s, affine=affine),
        overwrite=True,
    )
    yield
    primitives.OPS.clear()
    primitives.OPS.update(saved)


def test_unfusable_ops_fall_back_to_the_per_edge_cell(custom_ops):
    for name in ("my_conv", "sep_conv_3x3"):
        with pytest.raises(ValueError, match=rf"cannot fuse ops \['{name}'\].*fusable ops are"):
            FusedSearchCell(4, op_names=("none", name))
        net = SearchNetwork(channels=4, num_cells=3, op_names=("none", name))
        assert net.cell_implementation == "per_edge"
        assert all(type(cell) is SearchCell for cell in net.cells)
        with pytest.raises(ValueError, match=rf"cannot fuse ops \['{name}'\]"):
            SearchNetwork(channels=4, num_cells=3, op_names=(name,), cell_implementation="fused")


def test_cell_implementation_argument():
    net = SearchNetwork(channels=4, num_cells=3)
    assert net.cell_implementation == "fused"
    assert all(type(cell) is FusedSearchCell for cell in net.cells)
    assert net.get_config()["cell_implementation"] == "fused"
    per_edge = SearchNetwork(channels=4, num_cells=3, cell_implementation="per_edge")
    assert all(type(cell) is SearchCell for cell in per_edge.cells)
    with pytest.raises(
        ValueError, match=r"'fast'; expected one of \['auto', 'fused', 'per_edge'\]"
    ):
        SearchNetwork(cell_implementation="fast")
    assert SearchNetwork.from_config(per_edge.get_config()).cell_implementation == "per_edge"


def test_weight_count_is_the_reference_for_both_implementations():
    """quark0/darts Network(C=8, num_classes=10, layers=5): 394,210 trainable weights."""
    for implementation in ("fused", "per_edge"):
        net = SearchNetwork(
            num_classes=10, channels=8, num_cells=5, cell_implementation=implementation
        )
        net.build((None, 32, 32, 3))
        assert variables.count_weights(keras_das.weight_variables(net)) == 394_210


# -- whole networks ---------------------------------------------------------------------


def _network_pair(op_names=primitives.DARTS_OPS, **kwargs):
    per_edge, fused = (
        testing.tiny_search_network(op_names=op_names, cell_implementation=c, **kwargs)
        for c in ("per_edge", "fused")
    )
    for net in (per_edge, fused):
        net.build((None, 8, 8, 3))
    _copy_network(per_edge, fused)
    return per_edge, fused


def _copy_network(per_edge, fused):
    for a, b in [*zip(per_edge.stem, fused.stem), (per_edge.classifier, fused.classifier)]:
        b.set_weights(a.get_weights())
    for a, b in zip(per_edge.cells, fused.cells):
        fused_weights.copy_weights(a, b)
    for a, b in zip(keras_das.arch_variables(per_edge), keras_das.arch_variables(fused)):
        b.assign(a)  # alphas, and betas with edge normalisation


def _network_grads(net, x, y):
    with tf.GradientTape() as tape:
        loss = LOGITS_CE(y, net(x, training=True))
    grads = tape.gradient(loss, net.trainable_variables)
    return loss, dict(zip((id(v) for v in net.trainable_variables), grads))


def _expected_network_values(per_edge, fused, by_id):
    """Per-edge values (by variable id) in the fused network's variables."""
    pairs = []
    for a, b in [*zip(per_edge.stem, fused.stem), (per_edge.classifier, fused.classifier)]:
        pairs += [(v, by_id[id(u)]) for v, u in zip(b.trainable_variables, a.trainable_variables)]
    for a, b in zip(per_edge.cells, fused.cells):
        pairs += [(v, g) for v, g in _mapped(b, a, by_id) if v.trainable]
    pairs += [
        (b, by_id[id(a)])
        for a, b in zip(keras_das.arch_variables(per_edge), keras_das.arch_variables(fused))
    ]
    return pairs


@pytest.mark.parametrize(
    "remedies",
    [{}, dict(partial_channels=2, edge_normalization=True, aux_skip=True)],
    ids=["plain", "pc_darts_and_aux_skip"],
)
def test_network_logits_and_gradients_match(remedies):
    per_edge, fused = _network_pair(**remedies)
    x = testing.random_inputs((4, 8, 8, 3))
    y = np.array([0, 1, 2, 0])
    loss_ref, grads_ref = _network_grads(per_edge, x, y)
    loss, grads = _network_grads(fused, x, y)
    assert float(loss) == pytest.approx(float(loss_ref), rel=1e-5)
    _assert_close(fused.predict(x, verbose=0), per_edge.predict(x, verbose=0), 1e-5, "logits")
    expected = _expected_network_values(per_edge, fused, grads_ref)
    assert len(expected) == len(grads) == len(fused.trainable_variables)
    for variable, g_ref in expected:
        _assert_close(grads[id(variable)], g_ref, 1e-4, f"gradient of {variable.path}")


def test_fused_network_saves_and_reloads(tmp_path):
    _, net = _network_pair()
    x = testing.random_inputs((4, 8, 8, 3))
    net(x, training=True)  # moves the batch-norm statistics away from their start
    path = str(tmp_path / "net.keras")
    net.save(path)
    reloaded = keras.models.load_model(path)
    assert reloaded.cell_implementation == "fused"
    assert all(type(cell) is FusedSearchCell for cell in reloaded.cells)
    np.testing.assert_allclose(
        reloaded.predict(x, verbose=0), net.predict(x, verbose=0), rtol=1e-5, atol=1e-6
    )
    assert reloaded.genotype() == net.genotype()


def _search_model(net, architect):
    search = keras_das.SearchModel(net)
    search.build((None, 8, 8, 3))
    search.compile(loss=LOGITS_CE, architect=architect)
    return search


def _batches(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(8, 8, 8, 3)).astype("float32")
    y = rng.integers(0, 3, size=8).astype("int32")
    return (tf.constant(x[:4]), tf.constant(y[:4])), (tf.constant(x[4:]), tf.constant(y[4:]))


@pytest.mark.parametrize("architect", ["first_order", "second_order"])
def test_search_model_steps_with_fused_cells(architect):
    net = testing.tiny_search_network(op_names=OP_SUBSETS["convs"])
    assert net.cell_implementation == "fused"
    search = _search_model(net, architect)
    train, val = _batches()
    data = tf.data.Dataset.from_tensors((train, val))
    before = [v.numpy().copy() for v in net.trainable_variables]
    history = search.fit(data, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    after = [v.numpy() for v in net.trainable_variables]
    changed = [not np.array_equal(b, a) for b, a in zip(before, after)]
    alphas = [variables.is_arch_variable(v) for v in net.trainable_variables]
    assert all(c for c, a in zip(changed, alphas) if a)  # both alphas moved
    assert sum(c for c, a in zip(changed, alphas) if not a) > 0.9 * (len(alphas) - 2)


def test_exact_architect_agrees_across_implementations():
    """Second derivatives through the fused cell: the hypergradient of the ``exact``
    architect (forward over reverse, through the virtual step) equals the per-edge one,
    eagerly and traced.

    The fused batch-norm kernel's second derivatives are exact (see
    ``test_fused_batch_norm_second_derivatives``); ``BatchNormalization``'s are only in
    its synchronised form, which ``compile(architect="exact")`` selects.
    """
    per_edge, fused = _network_pair(op_names=OP_SUBSETS["convs"] + ("max_pool_3x3",))
    train, val = _batches(1)
    grads = []
    for net, traced in ((per_edge, False), (fused, False), (fused, True)):
        search = _search_model(net, "exact")
        exact = search.architect.exact
        if traced:
            exact = tf.function(exact, autograph=False)
        g, loss, _ = exact(train, val)
        assert np.isfinite(float(loss))
        grads.append([keras.ops.convert_to_numpy(t) for t in g])
    for fused_grads in grads[1:]:
        for g, g_ref, name in zip(fused_grads, grads[0], ("alpha_normal", "alpha_reduce")):
            assert np.abs(g_ref).max() > 0, name
            _assert_close(g, g_ref, 1e-4, f"exact hypergradient of {name}")


def _batch_norm_reference(x, scale, epsilon=primitives.BN_EPSILON):
    """Batch norm in plain float64 ops, whose derivatives of any order are exact."""
    mean = tf.reduce_mean(x, [0, 1, 2])
    variance = tf.reduce_mean(tf.square(x - mean), [0, 1, 2])
    return (x - mean) * tf.math.rsqrt(variance + epsilon) * scale


def _hessian_vector_product(f, x, scale, vector, scale_vector):
    """The gradient of a loss through ``f`` w.r.t. ``x`` and ``scale``, and the
    derivatives of its product with ``(vector, scale_vector)`` w.r.t. both."""
    with tf.GradientTape() as outer:
        outer.watch([x, scale])
        with tf.GradientTape() as inner:
            inner.watch([x, scale])
            loss = tf.reduce_sum(tf.sin(f(x, scale)))
        grads = inner.gradient(loss, [x, scale])
        projected = tf.reduce_sum(grads[0] * vector)
        if scale_vector is not None:
            projected += tf.reduce_sum(grads[1] * scale_vector)
    return [*grads, *outer.gradient(projected, [x, scale])]


def _forward_over_reverse(f, x, scale, vector, scale_vector):
    """``_hessian_vector_product`` forward over reverse, as the exact architect takes it:
    the gradient under a forward accumulator whose tangents are the vectors."""
    tangents = [vector, tf.zeros_like(scale) if scale_vector is None else scale_vector]
    with gradients.forward_accumulator([x, scale], tangents) as accumulator:
        with tf.GradientTape() as tape:
            tape.watch([x, scale])
            loss = tf.reduce_sum(tf.sin(f(x, scale)))
        grads = tape.gradient(loss, [x, scale])
    return [*grads, *(accumulator.jvp(g) for g in grads)]


@pytest.mark.parametrize("traced", [False, True])
@pytest.mark.parametrize("scale_term", [True, False])
@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_fused_batch_norm_second_derivatives(mode, scale_term, traced):
    """The fused batch norm differentiated twice, reverse over reverse (TensorFlow's
    gradient of the kernel's gradient op) and forward over reverse (the exact architect's
    way: traced, the JVPs written out in ``jvp_rules``), against plain float64 ops,
    eagerly and in a traced function; without
    ``scale_term`` the product leaves out the gradient w.r.t. the scale, as the exact
    architect's does."""
    rng = np.random.default_rng(3)
    x, vector = (rng.normal(size=(4, 5, 5, 6)) for _ in range(2))
    scale, scale_vector = (rng.normal(size=(6,)) for _ in range(2))
    if not scale_term:
        scale_vector = None
    bn = FusedBatchNorm(center=False, scale=False, epsilon=primitives.BN_EPSILON)
    bn.build(x.shape)

    def fused(x, scale):
        with primitives.discarding_batch_norm_statistics():
            return bn(x, training=True, scale=scale)

    arrays = (x, scale, vector, scale_vector)

    def constants(dtype):
        return [None if a is None else tf.constant(a, dtype) for a in arrays]

    expected = _hessian_vector_product(_batch_norm_reference, *constants("float64"))
    product = {"reverse": _hessian_vector_product, "forward": _forward_over_reverse}[mode]
    actual = (tf.function(product) if traced else product)(fused, *constants("float32"))
    what = ("gradient w.r.t. x", "gradient w.r.t. scale", "Hv w.r.t. x", "Hv w.r.t. scale")
    for a, e, name in zip(actual, expected, what):
        _assert_close(a, e, 1e-5, name)


@pytest.mark.parametrize(
    "size, kernel, strides, padding, dilation",
    [
        ((8, 8), 3, 1, "same", 1),
        ((7, 9), 5, 1, "same", 2),
        ((6, 5), 3, 1, "same", 2),
        ((9, 9), 3, 2, "valid", 1),
        ((10, 11), 3, 1, "valid", 2),
    ],
)
def test_stacked_depthwise_is_tensorflows(size, kernel, strides, padding, dilation):
    """The stacked ops' depthwise convolution (its paddings computed in Python) gives
    ``keras.ops.depthwise_conv``'s outputs and gradients exactly, traced."""
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(2, *size, 6)).astype("float32"))
    k = tf.constant(rng.normal(size=(kernel, kernel, 6, 1)).astype("float32"))

    def both(x, k):
        with tf.GradientTape(persistent=True) as tape:
            tape.watch([x, k])
            ours = stacked_ops._depthwise(x, k, strides, padding, dilation)
            keras_op = keras.ops.depthwise_conv(x, k, strides, padding, dilation_rate=dilation)
        seed = tf.reshape(1.0 + tf.range(tf.size(ours), dtype=ours.dtype) % 7, tf.shape(ours))
        return (
            ours,
            keras_op,
            tape.gradient(ours, [x, k], seed),
            tape.gradient(keras_op, [x, k], seed),
        )

    ours, keras_op, ours_grads, keras_grads = tf.function(both)(x, k)
    np.testing.assert_array_equal(ours.numpy(), keras_op.numpy())
    for a, b in zip(ours_grads, keras_grads):
        np.testing.assert_array_equal(a.numpy(), b.numpy())

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_das
from configs import cifar
from keras_das import MixedOp
from keras_das.engine import remedies
from keras_das.space import latency
from keras_das.space import relaxations


def _sigmoid_model():
    inputs = keras.Input((4, 4, 2))
    mix = MixedOp(
        ["skip_connect", "avg_pool_3x3", "conv_3x3"], relaxation="sigmoid", channels=2, name="mix"
    )
    return keras.Model(inputs, mix(inputs)), mix


def _grad(penalty, model, alpha):
    with tf.GradientTape() as tape:
        value = penalty(model)
    return float(value), tape.gradient(value, alpha.value if hasattr(alpha, "value") else alpha)


def test_l1_penalty_value_and_gradient():
    model, mix = _sigmoid_model()
    mix.alpha.assign([0.5, -1.0, 2.0])
    s = 1 / (1 + np.exp(-np.array([0.5, -1.0, 2.0])))
    with tf.GradientTape() as tape:
        value = remedies.l1_penalty(0.1)(model)
    grad = tape.gradient(value, mix.alpha.value)
    assert float(value) == pytest.approx(0.1 * s.mean(), rel=1e-6)
    np.testing.assert_allclose(np.asarray(grad), 0.1 / 3 * s * (1 - s), rtol=1e-5)


def test_zero_one_penalty_value_and_gradient_push_away_from_one_half():
    model, mix = _sigmoid_model()
    mix.alpha.assign([0.2, -0.3, 1.0])
    a = np.array([0.2, -0.3, 1.0])
    s = 1 / (1 + np.exp(-a))
    with tf.GradientTape() as tape:
        value = remedies.zero_one_penalty(10.0)(model)
    grad = np.asarray(tape.gradient(value, mix.alpha.value))
    assert float(value) == pytest.approx(-10 * np.mean((s - 0.5) ** 2), rel=1e-6)
    np.testing.assert_allclose(grad, -10 * 2 * (s - 0.5) * s * (1 - s) / 3, rtol=1e-5)
    # Descending the gradient moves each weight further from 0.5.
    assert np.all(np.sign(-grad) == np.sign(s - 0.5))


@pytest.mark.parametrize(
    "kind,start,end,expected",
    [
        ("constant", 1.0, 0.1, [1.0, 1.0, 1.0]),
        ("linear", 1.0, 0.0, [1.0, 0.5, 0.0]),
        ("exponential", 10.0, 0.1, [10.0, 1.0, 0.1]),
    ],
)
def test_schedule_values(kind, start, end, expected):
    values = [remedies.schedule_value(kind, start, end, p) for p in (0.0, 0.5, 1.0)]
    np.testing.assert_allclose(values, expected, rtol=1e-12)


def test_schedule_rejects_unknown_kinds_and_non_positive_exponential_ends():
    with pytest.raises(
        ValueError, match=r"Unknown schedule 'cosine'; expected one of \['constant'"
    ):
        remedies.schedule_value("cosine", 1, 0, 0.5)
    with pytest.raises(ValueError, match="positive ends"):
        remedies.schedule_value("exponential", 1.0, 0.0, 0.5)


def test_temperature_schedule_sets_every_owner_per_epoch():
    model, mix = _sigmoid_model()
    schedule = remedies.TemperatureSchedule("exponential", 10.0, 0.1, epochs=5)
    schedule.set_model(model)
    seen = []
    for epoch in range(5):
        schedule.on_epoch_begin(epoch)
        seen.append(float(mix.temperature.numpy()))
    np.testing.assert_allclose(seen, [10.0, 10**0.5, 1.0, 10**-0.5, 0.1], rtol=1e-6)


def _search_net():
    net = keras_das.SearchNetwork(num_classes=2, channels=4, num_cells=3, seed=0)
    net.build((None, 8, 8, 3))
    return net


def test_early_stop_when_the_normal_cell_reaches_the_skip_cap():
    net = _search_net()
    stop = remedies.EarlyStopSearch(max_skips=2)
    stop.set_model(net)
    convs = np.zeros((14, 8), "float32")
    convs[:, keras_das.DARTS_OPS.index("sep_conv_3x3")] = 5.0
    net.alpha_normal.assign(convs)
    stop.on_epoch_end(0)
    assert stop.stopped_epoch is None and not getattr(net, "stop_training", False)
    favour = np.zeros((14, 8), "float32")
    favour[:3, keras_das.DARTS_OPS.index("skip_connect")] = 5.0
    net.alpha_normal.assign(favour)
    stop.on_epoch_end(1)
    assert stop.stopped_epoch == 1 and net.stop_training and "3 skip connections" in stop.reason


def test_early_stop_when_the_ranking_is_stable():
    net = _search_net()
    stop = remedies.EarlyStopSearch(max_skips=0, stable_epochs=2)
    stop.set_model(net)
    for epoch in range(2):
        stop.on_epoch_end(epoch)
        assert stop.stopped_epoch is None
        net.alpha_normal.assign(np.random.default_rng(epoch).normal(size=(14, 8)).astype("float32"))
    stop.on_epoch_end(2)  # changed again: not stable
    assert stop.stopped_epoch is None
    stop.on_epoch_end(3)
    stop.on_epoch_end(4)
    assert stop.stopped_epoch == 4 and "stable for 2 epochs" in stop.reason


def test_latency_penalty_gradient_favours_the_faster_op():
    net = _search_net()
    tables = {
        f"{net.name}/normal": np.tile(np.arange(8, dtype=float), (14, 1)),
        f"{net.name}/reduce": np.zeros((14, 8)),
    }
    penalty = remedies.latency_penalty(0.5, tables)
    with tf.GradientTape() as tape:
        value = penalty(net)
    grad = np.asarray(tape.gradient(value, net.alpha_normal.value))
    # Uniform softmax: expected latency is the mean op latency times the edges.
    assert float(value) == pytest.approx(0.5 * 14 * np.mean(np.arange(8)), rel=1e-2)
    # Descending the gradient raises the weight of fast ops and lowers slow ones.
    assert np.all(np.diff(-grad, axis=1) < 0)
    assert remedies.expected_latency(net, tables) == pytest.approx(float(value) / 0.5)


def test_latency_table_measures_once_and_caches(tmp_path):
    path = str(tmp_path / "table.json")
    table = latency.LatencyTable(path, repeats=7)
    # Big enough that the ranking survives a busy machine (the suite runs two workers):
    # identity against ~3 MFLOPs of 5x5 separable convolutions.
    shape = (32, 32, 16)
    fast = table.lookup("skip_connect", shape, 1, 16)
    slow = table.lookup("sep_conv_5x5", shape, 1, 16)
    assert table.measured == 2 and table.lookup("none", shape, 1, 16) == 0.0
    assert slow > fast > 0
    table.save()
    again = latency.LatencyTable(path, measure_missing=False)
    assert again.lookup("sep_conv_5x5", shape, 1, 16) == slow and again.measured == 0
    with pytest.raises(ValueError, match="has no entry"):
        again.lookup("dil_conv_5x5", shape, 1, 16)


def test_search_network_tables_cover_every_cell():
    net = keras_das.SearchNetwork(
        num_classes=2,
        channels=2,
        num_cells=3,
        steps=1,
        multiplier=1,
        op_names=("none", "skip_connect"),
    )
    net.build((None, 8, 8, 3))

    class Fake:
        def lookup(self, op, input_shape, strides, channels):
            return 0.0 if op == "none" else input_shape[0] * 1000 + strides * 10 + channels

    tables = latency.search_network_tables(net, Fake(), (8, 8, 3))
    # Cells 1 and 2 reduce (3 cells: reductions at 1 and 2); cell 0 is normal at 8x8.
    np.testing.assert_allclose(tables[f"{net.name}/normal"][:, 1], [8000 + 10 + 2, 8000 + 10 + 2])
    np.testing.assert_allclose(
        tables[f"{net.name}/reduce"][:, 1], [8000 + 20 + 4 + 4000 + 20 + 8] * 2
    )
    assert set(tables) == set(relaxations.model_mixing_weights(net))


def _cifar_config():
    return cifar.get_config()


def test_plan_of_the_default_section_switches_on_only_the_selection_and_the_report():
    plan = remedies.plan(_cifar_config().remedies, epochs=50)
    assert plan.network_options == {
        "partial_channels": 1,
        "edge_normalization": False,
        "aux_skip": False,
        "genotype_max_skips": None,
        "genotype_min_param_ops": 0,
    }
    # DARTS-PT's selection (measured better than the argmax) and the report are on by default.
    assert (plan.frozen_epochs, plan.freezable_arch, plan.perturbation_batches) == (0, False, 4)
    assert plan.gap_report_batches == 20
    assert plan.penalties() == [] and plan.callbacks() == []
    assert plan.latency_tables(None, (32, 32, 3)) is None


def test_plan_translates_each_switch():
    section = _cifar_config().remedies
    for name in ("skip_cap", "param_paths", "aux_skip", "warmup", "partial_channels"):
        section[name].enabled = True
    for name in ("l1", "early_stop", "perturbation"):
        section[name].enabled = True
    section.warmup.epochs, section.partial_channels.k, section.perturbation.batches = 3, 2, 5
    section.temperature.schedule, section.temperature.end = "linear", 0.5
    section.gap_report.enabled = False
    plan = remedies.plan(section, epochs=10)
    assert plan.network_options == {
        "partial_channels": 2,
        "edge_normalization": True,
        "aux_skip": True,
        "genotype_max_skips": 2,
        "genotype_min_param_ops": 1,
    }
    assert (plan.frozen_epochs, plan.freezable_arch, plan.perturbation_batches) == (3, True, 5)
    assert plan.gap_report_batches is None
    assert [p.__name__ for p in plan.penalties()] == ["l1_penalty"]
    history = object()
    callbacks = plan.callbacks(history)
    assert [type(c).__name__ for c in callbacks] == [
        "TemperatureSchedule",
        "AuxiliarySkipSchedule",
        "ArchWarmup",
        "EarlyStopSearch",
    ]
    assert callbacks[0].epochs == 10 and callbacks[-1].history is history


@pytest.mark.parametrize(
    "field,value,relaxation,message",
    [
        ("temperature.schedule", "cosine", "softmax", r"config.remedies.temperature.schedule: "),
        ("zero_one.enabled", True, "softmax", r"config.remedies.zero_one acts on sigmoid"),
        ("partial_channels.k", 0, "softmax", r"config.remedies.partial_channels.k must be a"),
        ("perturbation.batches", -1, "softmax", r"config.remedies.perturbation.batches must"),
        ("warmup.epochs", -2, "softmax", r"config.remedies.warmup.epochs must be >= 0"),
        ("latency.table", "/no/such.json", "softmax", r"latency.table='/no/such.json' does"),
    ],
)
def test_plan_names_the_bad_field(field, value, relaxation, message):
    section = _cifar_config().remedies
    group, key = field.split(".")
    section[group][key] = value
    if group in ("partial_channels", "perturbation", "warmup") and key != "enabled":
        section[group].enabled = True
    with pytest.raises(ValueError, match=message):
        remedies.plan(section, epochs=10, relaxation=relaxation)

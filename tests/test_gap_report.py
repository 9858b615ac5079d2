import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_das
from keras_das.runs import gap_report
from tests import testing

OPS = ("none", "max_pool_3x3", "skip_connect", "sep_conv_3x3")


def _search(cell_implementation="auto"):
    net = testing.tiny_search_network(op_names=OPS, cell_implementation=cell_implementation)
    search = keras_das.SearchModel(net)
    search.build((None, 8, 8, 3))
    search.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return search, net


def _data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8, 8, 3)).astype("float32")
    y = rng.integers(0, 3, n).astype("int32")
    return x, y, tf.data.Dataset.from_tensor_slices((x, y)).batch(8)


@pytest.mark.parametrize("cell_implementation", ["per_edge", "fused"])
def test_genotype_weights_compute_only_the_derived_network(cell_implementation):
    _, net = _search(cell_implementation)
    x, _, _ = _data(4)
    g = net.genotype()
    fixed = net.genotype_weights(g)
    before = np.asarray(net(x, training=False, mixing_weights=fixed))
    # The alphas no longer matter ...
    net.alpha_normal.assign(np.random.default_rng(1).normal(size=(5, 4)).astype("float32"))
    np.testing.assert_allclose(
        np.asarray(net(x, training=False, mixing_weights=fixed)), before, rtol=1e-6
    )
    # ... and neither do ops the genotype dropped, while the kept ones do.
    assert np.asarray(fixed[0]).sum() == 4 and np.asarray(fixed[1]).sum() == 4
    assert not np.allclose(np.asarray(net(x, training=False)), before)


def test_recalibration_averages_batch_statistics_and_report_restores_the_supernet():
    search, net = _search()
    x, y, ds = _data()
    bns = gap_report._batch_norms(net)
    saved = [bn.moving_mean.numpy().copy() for bn in bns]
    one_hot = net.genotype_weights(net.genotype())
    gap_report.recalibrate_batch_norm(net, ds, 4, one_hot)
    stem_bn = bns[0]  # the stem's batch norm sees the images through one conv
    stem = net.stem[0](x)
    per_batch = [np.asarray(stem[i : i + 8]).mean(axis=(0, 1, 2)) for i in range(0, 32, 8)]
    np.testing.assert_allclose(
        stem_bn.moving_mean.numpy(), np.mean(per_batch, axis=0), rtol=1e-4, atol=1e-6
    )
    assert stem_bn.momentum == pytest.approx(0.9)  # restored
    for bn, value in zip(bns, saved):
        bn.moving_mean.assign(value)

    report = gap_report.report(
        search, net.genotype(), ds, ds, 4, (8, 8, 3), 3, recalibration_steps=2, latency_repeats=3
    )
    for bn, value in zip(bns, saved):
        np.testing.assert_array_equal(bn.moving_mean.numpy(), value)
    assert report["gap"] == pytest.approx(
        report["supernet_val_accuracy"] - report["derived_val_accuracy_inherited_weights"]
    )
    derived = report["derived_network"]
    assert derived["parameters"] > 0 and derived["flops"] > 0 and derived["latency_ms"] > 0
    assert set(report["skip_connections"]) == {"normal", "reduce"}

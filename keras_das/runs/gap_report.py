"""The discretisation-gap report: how much a search loses when its supernet becomes discrete.

The supernet is evaluated on the search-val split; then the derived architecture with the
weights it inherits. For the DARTS cells (``report``) that is the supernet itself with
one-hot mixing weights on the chosen (edge, op) pairs and zero on every other edge; for a
user's model (``model_report``) it is its ``keras_das.discretize`` copy. Batch-norm
statistics were gathered under the mixture, so they are recalibrated first (averaged over
training batches, no gradient steps); the supernet's own statistics are restored afterwards.
Accuracy is top-1 over the last axis, per example or per pixel.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from keras_das.discrete.discrete_network import DiscreteNetwork
from keras_das.space import latency as latency_lib
from keras_das.space import primitives
from keras_das.space import variables


def _batch_norms(model):
    return [
        layer
        for layer in model._flatten_layers(include_self=True, recursive=True)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]


def accuracy(net, dataset, steps: int, mixing_weights=None) -> float:
    """Top-1 accuracy of ``net`` (inference mode) over ``steps`` batches of ``dataset``."""

    kwargs = {} if mixing_weights is None else {"mixing_weights": mixing_weights}

    @tf.function
    def predict(x):
        return net(x, training=False, **kwargs)

    correct = total = 0
    for x, y in dataset.take(steps):
        pred = np.argmax(predict(x).numpy(), axis=-1)
        correct += int(np.sum(pred == y.numpy()))
        total += pred.size  # examples, or pixels of a dense prediction
    return correct / max(total, 1)


def recalibrate_batch_norm(net, dataset, steps: int, mixing_weights=None) -> None:
    """Sets every batch norm's moving statistics to their average over ``steps`` training
    batches (forward passes in training mode, no weight changes)."""
    bns = _batch_norms(net)
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.momentum = 0.0  # each call leaves that batch's statistics in the moving variables

    kwargs = {} if mixing_weights is None else {"mixing_weights": mixing_weights}

    @tf.function
    def forward(x):
        net(x, training=True, **kwargs)

    sums = (
        [np.zeros(bn.moving_mean.shape) for bn in bns],
        [np.zeros(bn.moving_variance.shape) for bn in bns],
    )
    count = 0
    try:
        for x, _ in dataset.take(steps):
            forward(x)
            for i, bn in enumerate(bns):
                sums[0][i] += bn.moving_mean.numpy()
                sums[1][i] += bn.moving_variance.numpy()
            count += 1
    finally:
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
    for i, bn in enumerate(bns):
        bn.moving_mean.assign(sums[0][i] / count)
        bn.moving_variance.assign(sums[1][i] / count)


def model_report(
    supernet,
    chosen,
    train_ds,
    val_ds,
    steps: int,
    input_shape,
    recalibration_steps: int = 20,
    latency_repeats: int = 30,
) -> dict:
    """Supernet vs its discretized copy on the search-val split, and the copy's cost.

    Args:
        supernet: the user's model with MixedOps.
        chosen: ``keras_das.discretize(supernet)``, with the weights it inherits; its
            batch norms are recalibrated here (it is a copy: the supernet is untouched).
        train_ds, val_ds: ``(x, y)`` batch streams (search-train, search-val).
        steps: validation batches to evaluate.
        input_shape: one example's input shape.
        recalibration_steps: training batches for the batch-norm recalibration.
        latency_repeats: timed inferences for the latency (median).
    """
    supernet_acc = accuracy(supernet, val_ds, steps)
    recalibrated = recalibration_steps if _batch_norms(chosen) else 0
    if recalibrated:
        recalibrate_batch_norm(chosen, train_ds, recalibration_steps)
    chosen_acc = accuracy(chosen, val_ds, steps)
    return {
        "supernet_val_accuracy": supernet_acc,
        "derived_val_accuracy_inherited_weights": chosen_acc,
        "gap": supernet_acc - chosen_acc,
        "val_batches": steps,
        "bn_recalibration_batches": recalibrated,
        "derived_network": {
            "parameters": variables.count_weights(chosen.trainable_variables),
            "flops": count_flops(chosen, input_shape),
            "latency_ms": latency_lib.network_latency(chosen, input_shape, 1, latency_repeats),
            "latency_batch_size": 1,
            "device": latency_lib.device_key(),
        },
    }


def count_flops(model, input_shape) -> int:
    """Floating-point operations of one forward pass (a multiply-add counts 2)."""
    spec = tf.TensorSpec((1, *tuple(input_shape)), tf.float32)
    graph = tf.function(lambda x: model(x, training=False)).get_concrete_function(spec).graph
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    info = tf.compat.v1.profiler.profile(
        graph=graph, run_meta=tf.compat.v1.RunMetadata(), cmd="op", options=options
    )
    return int(info.total_float_ops)


def report(
    search,
    genotype,
    train_ds,
    val_ds,
    steps: int,
    input_shape,
    num_classes: int,
    recalibration_steps: int = 20,
    latency_repeats: int = 30,
) -> dict:
    """Supernet vs derived network on the search-val split, and the derived network's cost.

    Args:
        search: the ``SearchModel`` (its supernet a ``SearchNetwork``).
        genotype: the derived genotype.
        train_ds, val_ds: ``(x, y)`` batch streams (search-train, search-val).
        steps: validation batches to evaluate.
        input_shape: image shape (H, W, C).
        num_classes: classifier width.
        recalibration_steps: training batches for the batch-norm recalibration.
        latency_repeats: timed inferences for the latency (median).
    """
    net = search.supernet
    saved = [[v.numpy() for v in (bn.moving_mean, bn.moving_variance)] for bn in _batch_norms(net)]
    one_hot = net.genotype_weights(genotype)
    supernet_acc = accuracy(net, val_ds, steps)
    try:
        recalibrate_batch_norm(net, train_ds, recalibration_steps, one_hot)
        derived_acc = accuracy(net, val_ds, steps, one_hot)
    finally:
        for bn, (mean, var) in zip(_batch_norms(net), saved):
            bn.moving_mean.assign(mean)
            bn.moving_variance.assign(var)

    derived = DiscreteNetwork(
        genotype,
        num_classes=num_classes,
        channels=net.channels,
        num_cells=net.num_cells,
        stem_multiplier=net.stem_multiplier,
    )
    derived.build((None, *tuple(input_shape)))
    return {
        "supernet_val_accuracy": supernet_acc,
        "derived_val_accuracy_inherited_weights": derived_acc,
        "gap": supernet_acc - derived_acc,
        "val_batches": steps,
        "bn_recalibration_batches": recalibration_steps,
        "skip_connections": {c: genotype.count("skip_connect", c) for c in ("normal", "reduce")},
        "parameter_free_ops": {
            c: sum(op in primitives.PARAMETER_FREE_OPS for op, _ in getattr(genotype, c))
            for c in ("normal", "reduce")
        },
        "derived_network": {
            "channels": net.channels,
            "num_cells": net.num_cells,
            "parameters": variables.count_weights(derived.trainable_variables),
            "flops": count_flops(derived, input_shape),
            "latency_ms": latency_lib.network_latency(derived, input_shape, 1, latency_repeats),
            "latency_batch_size": 1,
            "device": latency_lib.device_key(),
        },
    }

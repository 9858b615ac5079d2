"""Gradient updates as the PyTorch DARTS code makes them, correct under tf.distribute.

DARTS clips the *global* norm of the weight gradients, then adds L2 weight decay to the
gradient (PyTorch SGD's ``weight_decay``, which momentum then accumulates), then steps.
Keras's own ``global_clipnorm`` clips each replica's gradients before they are summed, and
its ``weight_decay`` is decoupled, so neither reproduces this; ``apply_gradients`` does.
"""

from __future__ import annotations

import keras
import tensorflow as tf


def num_replicas() -> int:
    return tf.distribute.get_strategy().num_replicas_in_sync


def all_reduce_sum(tensors):
    """Sums ``tensors`` over the replicas of the current strategy (identity on one).

    ``None`` entries (variables the loss does not reach) stay ``None``.
    """
    tensors = list(tensors)
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return tensors
    present = [i for i, t in enumerate(tensors) if t is not None]
    reduced = context.all_reduce(tf.distribute.ReduceOp.SUM, [tensors[i] for i in present])
    for i, r in zip(present, reduced):
        tensors[i] = r
    return tensors


def apply_gradients(optimizer, grads, variables, weight_decay=0.0, grad_clip=None, reduced=False):
    """Sums ``grads`` over replicas, clips their global norm, adds ``weight_decay * w``, steps.

    Args:
        optimizer: a Keras optimizer without clipping or weight decay of its own.
        grads: gradients of a loss scaled by ``1 / num_replicas`` (as Keras losses are), so
            that their sum over replicas is the global batch's gradient.
        variables: the variables, in the order of ``grads``.
        weight_decay: coupled L2 decay.
        grad_clip: global-norm clip (None: none).
        reduced: the gradients are already summed over replicas.

    Variables without a gradient are left alone, as PyTorch skips parameters whose grad is
    None (no decay either).
    """
    if not reduced:
        grads = all_reduce_sum(grads)
    if grad_clip is not None:
        present = [g for g in grads if g is not None]
        clipped = iter(tf.clip_by_global_norm(present, grad_clip)[0])
        grads = [None if g is None else next(clipped) for g in grads]
    pairs = [(g + weight_decay * v, v) for g, v in zip(grads, variables) if g is not None]
    # Keras optimizers sum gradients over replicas themselves in a replica context; ours are
    # summed already, so hand each replica its share.
    replicas = num_replicas()
    optimizer.apply([g / replicas if replicas > 1 else g for g, _ in pairs], [v for _, v in pairs])


def check_optimizer(name: str, optimizer, allow_weight_decay: bool = False) -> None:
    """Rejects an optimizer that would clip or decay on its own (and differ from DARTS), or
    one that expects loss-scaled gradients.

    ``allow_weight_decay`` lets decoupled weight decay through (AdamW's, by choice).
    """
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        raise ValueError(
            f"{name} is a LossScaleOptimizer ({optimizer.inner_optimizer!r} inside), but "
            "keras_das does not loss-scale its steps: pass the inner optimizer, and use "
            "mixed_bfloat16 or float32 rather than mixed_float16"
        )
    decays = optimizer.weight_decay and not allow_weight_decay
    if optimizer.global_clipnorm or optimizer.clipnorm or optimizer.clipvalue or decays:
        raise ValueError(
            f"{name} clips or decays by itself; pass grad_clip / weight_decay to compile "
            "instead (DARTS couples weight decay into the gradient and clips the global norm "
            "of the gradients summed over replicas)"
        )


def mean_over_replicas(logs: dict) -> dict:
    """Averages step results over replicas, so every replica returns the global values.

    Keras then reduces the replicas' results with a mean over axis 0, which fails on scalars
    under MultiWorkerMirroredStrategy; there the results get a leading axis of 1 (the mean
    over it is the scalar again).
    """
    strategy = tf.distribute.get_strategy()
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return logs
    names = list(logs)
    values = context.all_reduce(
        tf.distribute.ReduceOp.MEAN, [tf.cast(logs[n], tf.float32) for n in names]
    )
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        values = [tf.reshape(v, [1]) for v in values]
    return dict(zip(names, values))

"""Gradient updates as the PyTorch DARTS code makes them, correct under tf.distribute.

DARTS clips the *global* norm of the weight gradients, then adds L2 weight decay to the
gradient (PyTorch SGD's ``weight_decay``, which momentum then accumulates), then steps.
Keras's own ``global_clipnorm`` clips each replica's gradients before they are summed, and
its ``weight_decay`` is decoupled, so neither reproduces this; ``apply_gradients`` does.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from keras_das.engine import packing


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


def apply_gradients(
    optimizer, grads, variables, weight_decay=0.0, grad_clip=None, reduced=False, values=None
):
    """Sums ``grads`` over replicas, clips their global norm, adds ``weight_decay * w``, steps.

    Args:
        optimizer: a Keras optimizer without clipping or weight decay of its own.
        grads: gradients of a loss scaled by ``1 / num_replicas`` (as Keras losses are), so
            that their sum over replicas is the global batch's gradient.
        variables: the variables, in the order of ``grads``.
        weight_decay: coupled L2 decay.
        grad_clip: global-norm clip (None: none).
        reduced: the gradients are already summed over replicas.
        values: the variables' current values as tensors, where the caller has read them
            (the decay then reads no variable again: one graph op fewer per variable).

    Variables without a gradient are left alone, as PyTorch skips parameters whose grad is
    None (no decay either).
    """
    if not reduced:
        grads = all_reduce_sum(grads)
    if values is None:
        values = [v.value for v in variables]
    kept = [i for i, g in enumerate(grads) if g is not None]
    grads, variables, values = ([seq[i] for i in kept] for seq in (grads, variables, values))
    if grad_clip is not None or weight_decay:
        grads = _clipped_and_decayed(grads, values, weight_decay, grad_clip)
    if not _fused_sgd_step(optimizer, grads, variables):
        # Keras optimizers sum gradients over replicas themselves in a replica context;
        # ours are summed already, so hand each replica its share.
        replicas = num_replicas()
        optimizer.apply([g / replicas if replicas > 1 else g for g in grads], variables)


def _clipped_and_decayed(grads, values, weight_decay, grad_clip):
    """``clip(grads) + weight_decay * values``, the dense gradients packed into one vector
    per dtype (a few ops instead of three per variable; see ``packing``), sparse ones (an
    Embedding's) per variable."""
    dense = [i for i, g in enumerate(grads) if not isinstance(g, tf.IndexedSlices)]
    sparse = [i for i, g in enumerate(grads) if isinstance(g, tf.IndexedSlices)]
    # Laid out as the weights (a gradient's static shape may be partly unknown: an
    # Embedding's, made dense).
    layout = packing.Packing([values[i] for i in dense])
    packed = layout.pack([grads[i] for i in dense])
    others = [grads[i] for i in sparse]
    if grad_clip is not None:
        scale = _clip_scale(list(packed) + others, grad_clip)
        packed = packing.map_parts(lambda g: g * tf.cast(scale, g.dtype), packed)
        others = [_scaled(g, scale) for g in others]
    if weight_decay:
        weights = layout.pack([values[i] for i in dense])
        packed = packing.map_parts(
            lambda g, w: g + tf.constant(weight_decay, g.dtype) * w, packed, weights
        )
        others = [
            g + tf.constant(weight_decay, g.dtype) * tf.cast(values[i], g.dtype)
            for g, i in zip(others, sparse)
        ]
    out = [None] * len(grads)
    for i, g in zip(dense + sparse, layout.unpack(packed) + others):
        out[i] = g
    return out


def _clip_scale(grads, clip_norm):
    """What ``tf.clip_by_global_norm`` multiplies ``grads`` by (``min(1, clip / norm)``,
    NaN where the norm is not finite), without its identity op per gradient."""
    norm = tf.linalg.global_norm(grads)
    scale = clip_norm * tf.minimum(1.0 / norm, tf.constant(1.0, norm.dtype) / clip_norm)
    return scale + (norm - norm)  # NaN (not 0 or clip) for a NaN or infinite norm


def _scaled(g, scale):
    if isinstance(g, tf.IndexedSlices):
        return tf.IndexedSlices(_scaled(g.values, scale), g.indices, g.dense_shape)
    return g * tf.cast(scale, g.dtype)


def _fused_sgd_step(optimizer, grads, variables) -> bool:
    """Keras ``SGD``'s step on TensorFlow's fused kernels, where nothing else is asked of it.

    ``ResourceApplyKerasMomentum`` is Keras's momentum rule (``m <- mu * m - lr * g``;
    ``w <- w + m``, or ``w + mu * m - lr * g`` with Nesterov) as one op per variable, where
    ``optimizer.apply`` builds about ten; the DARTS weight step has some 500 variables at
    size D, and every graph op costs tracing and optimisation time before the first step.
    Returns False (the caller uses ``optimizer.apply``) for other optimizers, several
    replicas, sparse gradients, variable constraints or overwrite-with-gradient variables,
    loss scaling, EMA and gradient accumulation.
    """
    if (
        type(optimizer) is not keras.optimizers.SGD
        or num_replicas() > 1
        or optimizer.use_ema
        or optimizer.gradient_accumulation_steps
        or optimizer.loss_scale_factor is not None
        or any(isinstance(g, tf.IndexedSlices) for g in grads)
        or any(v.constraint is not None or v.overwrite_with_gradient for v in variables)
    ):
        return False
    if not optimizer.built:  # as optimizer.apply builds it (its slots named the same way)
        with keras.name_scope(optimizer.name, caller=optimizer):
            optimizer.build(variables)
    learning_rate = optimizer.learning_rate  # the schedule's, at the current iteration
    by_dtype = {}
    for g, v in zip(grads, variables):
        if v.dtype not in by_dtype:
            by_dtype[v.dtype] = (
                tf.cast(learning_rate, v.dtype),
                tf.constant(optimizer.momentum, v.dtype),
            )
        lr, momentum = by_dtype[v.dtype]
        g = tf.cast(g, v.dtype)
        if optimizer.momentum:
            tf.raw_ops.ResourceApplyKerasMomentum(
                var=v.handle,
                accum=optimizer.momentums[optimizer._get_variable_index(v)].handle,
                lr=lr,
                grad=g,
                momentum=momentum,
                use_nesterov=optimizer.nesterov,
            )
        else:
            tf.raw_ops.ResourceApplyGradientDescent(var=v.handle, alpha=lr, delta=g)
    optimizer.iterations.assign_add(1)
    return True


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

"""The virtual step: where the weight optimizer's next step would take the weights.

The second-order and exact architects evaluate the validation loss at ``w'``, the weights
after the weight optimizer's next step on the training gradient, and differentiate through
that step. The step is written here from Keras 3's own update rules
(``keras/src/optimizers/{sgd,adam}.py`` and ``base_optimizer.py``), for the optimizers it
supports: ``SGD`` (with or without momentum, Nesterov), ``Adam`` (``amsgrad`` too) and
``AdamW``. The gradient it steps on is the weight step's: the training gradient plus the
coupled decay ``wd * w`` of ``SearchModel.compile``, before global clipping (as in DARTS).
A weight without a gradient (the loss does not reach it) stays where it is, as the weight
step leaves it.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from keras_das.engine import packing

SUPPORTED = (keras.optimizers.SGD, keras.optimizers.Adam, keras.optimizers.AdamW)


def check_optimizer(optimizer, architect: str) -> None:
    """Refuses a weight optimizer whose next step this module cannot take exactly."""
    name = type(optimizer).__name__
    if type(optimizer) not in SUPPORTED:
        raise ValueError(
            f"architect={architect!r} takes the weight optimizer's next step itself and "
            f"supports {[c.__name__ for c in SUPPORTED]}, got {name} ({optimizer!r}); "
            "use one of those, or architect='first_order' (which takes no virtual step)"
        )
    if optimizer.gradient_accumulation_steps or optimizer.use_ema:
        raise ValueError(
            f"architect={architect!r} cannot step a {name} with gradient_accumulation_steps="
            f"{optimizer.gradient_accumulation_steps} or use_ema={optimizer.use_ema}; "
            "turn them off or use architect='first_order'"
        )


def next_weights(optimizer, variables, weights, grads, weight_decay: float) -> list:
    """``w'`` for each of ``variables`` (at values ``weights``, gradients ``grads``)."""
    moved = [i for i, g in enumerate(grads) if g is not None]
    layout = packing.Packing([weights[i] for i in moved])
    stepped = next_packed(
        optimizer,
        [variables[i] for i in moved],
        layout.pack([weights[i] for i in moved]),
        layout.pack([grads[i] for i in moved]),
        weight_decay,
        layout,
    )
    out = list(weights)
    for i, w in zip(moved, layout.unpack(stepped)):
        out[i] = w
    return out


def next_packed(optimizer, variables, weights, grads, weight_decay: float, layout) -> tuple:
    """``next_weights`` on tensors packed by ``layout`` (a ``packing.Packing`` over
    ``variables``, all of which have gradients): elementwise, so a few ops in all."""
    learning_rate = optimizer.learning_rate
    grads = packing.map_parts(lambda g, w: g + weight_decay * w, grads, weights)
    if optimizer.weight_decay:  # decoupled (AdamW), first, where the optimizer decays

        def decay(w, *mask):
            wd, lr = (tf.cast(x, w.dtype) for x in (optimizer.weight_decay, learning_rate))
            return w - (w * mask[0] if mask else w) * wd * lr  # as Keras: w - w * wd * lr

        decayed = [1.0 if optimizer._use_weight_decay(v) else 0.0 for v in variables]
        masks = [layout.spread(decayed)] if 0.0 in decayed else []
        weights = packing.map_parts(decay, weights, *masks)
    slots = [
        layout.pack([slot[optimizer._get_variable_index(v)] for v in variables])
        for slot in _slots(optimizer)
    ]
    step = _sgd if isinstance(optimizer, keras.optimizers.SGD) else _adam
    return packing.map_parts(
        lambda w, g, *s: step(optimizer, w, g, tf.cast(learning_rate, w.dtype), *s),
        weights,
        grads,
        *slots,
    )


def _slots(optimizer) -> list:
    """The optimizer's per-variable state lists the step reads, in ``_sgd``/``_adam``'s
    argument order."""
    if isinstance(optimizer, keras.optimizers.SGD):
        return [optimizer.momentums] if optimizer.momentum else []
    slots = [optimizer._momentums, optimizer._velocities]
    return slots + [optimizer._velocity_hats] if optimizer.amsgrad else slots


def step_vector_product(optimizer, variables, weights, grads, vector, weight_decay, layout):
    """``(dw'/dg)^T vector``, all packed by ``layout`` (as ``next_packed``'s): ``-lr *
    vector`` for plain SGD.

    The step is elementwise in the gradient, so its Jacobian is diagonal and one reverse
    pass gives the product. For SGD the diagonal is one number, written out here
    (``-lr``, ``-lr * (1 + mu)`` with Nesterov): one multiply instead of a differentiated
    copy of the step.
    """
    if isinstance(optimizer, keras.optimizers.SGD):
        lr = optimizer.learning_rate
        factor = -lr * (1.0 + optimizer.momentum) if optimizer.nesterov else -lr
        return packing.map_parts(lambda v: tf.cast(factor, v.dtype) * v, vector)
    with tf.GradientTape() as tape:
        tape.watch(grads)
        stepped = next_packed(optimizer, variables, weights, grads, weight_decay, layout)
    return tuple(tape.gradient(stepped, list(grads), output_gradients=list(vector)))


def _sgd(optimizer, w, g, lr, m=None):
    if not optimizer.momentum:
        return w - g * lr
    # Keras SGD: m <- mu * m - lr * g; w <- w + m (sign and lr folded into m).
    mu = keras.ops.cast(optimizer.momentum, w.dtype)
    m = mu * m - g * lr
    return w + (mu * m - g * lr if optimizer.nesterov else m)


def _adam(optimizer, w, g, lr, m, v, v_hat=None):
    dtype = w.dtype
    step = keras.ops.cast(optimizer.iterations + 1, dtype)
    beta_1_power = keras.ops.power(keras.ops.cast(optimizer.beta_1, dtype), step)
    beta_2_power = keras.ops.power(keras.ops.cast(optimizer.beta_2, dtype), step)
    alpha = lr * keras.ops.sqrt(1 - beta_2_power) / (1 - beta_1_power)
    m = m + (g - m) * (1 - optimizer.beta_1)
    v = v + (tf.square(g) - v) * (1 - optimizer.beta_2)
    if optimizer.amsgrad:
        v = tf.maximum(v_hat, v)
    return w - (m * alpha) / (_sqrt_zero_safe(v) + optimizer.epsilon)


def _sqrt_zero_safe(x):
    """``sqrt(x)`` whose derivative at 0 is 0, not inf (a weight whose gradient and second
    moment are both 0 would otherwise make the product NaN)."""
    positive = x > 0
    return tf.where(positive, tf.sqrt(tf.where(positive, x, tf.ones_like(x))), tf.zeros_like(x))

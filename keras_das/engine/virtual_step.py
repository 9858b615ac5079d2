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
    learning_rate = optimizer.learning_rate
    out = []
    for variable, w, g in zip(variables, weights, grads):
        if g is None:
            out.append(w)
            continue
        lr = tf.cast(learning_rate, w.dtype)
        g = g + weight_decay * w
        if optimizer.weight_decay and optimizer._use_weight_decay(variable):
            w = w - w * tf.cast(optimizer.weight_decay, w.dtype) * lr  # decoupled, first
        step = _sgd if isinstance(optimizer, keras.optimizers.SGD) else _adam
        out.append(step(optimizer, optimizer._get_variable_index(variable), w, g, lr))
    return out


def step_vector_product(optimizer, variables, weights, grads, vector, weight_decay: float):
    """``(dw'/dg)^T vector`` per variable: ``-lr * vector`` for plain SGD.

    The step is elementwise in the gradient, so its Jacobian is diagonal and one reverse
    pass gives the product. For SGD the diagonal is one number, written out here
    (``-lr``, ``-lr * (1 + mu)`` with Nesterov): a multiply per variable instead of a
    differentiated copy of the step (about 30 graph ops per variable). Variables without a
    gradient get zeros.
    """
    if isinstance(optimizer, keras.optimizers.SGD):
        lr = optimizer.learning_rate
        factor = -lr * (1.0 + optimizer.momentum) if optimizer.nesterov else -lr
        factors = {}
        out = []
        for w, g, v in zip(weights, grads, vector):
            if g is None or v is None:
                out.append(tf.zeros_like(w))
                continue
            if w.dtype not in factors:
                factors[w.dtype] = tf.cast(factor, w.dtype)
            out.append(factors[w.dtype] * v)
        return out
    present = [i for i, g in enumerate(grads) if g is not None]
    watched = [grads[i] for i in present]
    with tf.GradientTape() as tape:
        tape.watch(watched)
        stepped = next_weights(
            optimizer,
            [variables[i] for i in present],
            [weights[i] for i in present],
            watched,
            weight_decay,
        )
    vector = [tf.zeros_like(weights[i]) if vector[i] is None else vector[i] for i in present]
    products = tape.gradient(stepped, watched, output_gradients=vector)
    out = [tf.zeros_like(w) for w in weights]
    for i, p in zip(present, products):
        out[i] = tf.zeros_like(weights[i]) if p is None else p
    return out


def _sgd(optimizer, index, w, g, lr):
    if not optimizer.momentum:
        return w - g * lr
    # Keras SGD: m <- mu * m - lr * g; w <- w + m (sign and lr folded into m).
    mu = keras.ops.cast(optimizer.momentum, w.dtype)
    m = mu * tf.cast(optimizer.momentums[index], w.dtype) - g * lr
    return w + (mu * m - g * lr if optimizer.nesterov else m)


def _adam(optimizer, index, w, g, lr):
    dtype = w.dtype
    step = keras.ops.cast(optimizer.iterations + 1, dtype)
    beta_1_power = keras.ops.power(keras.ops.cast(optimizer.beta_1, dtype), step)
    beta_2_power = keras.ops.power(keras.ops.cast(optimizer.beta_2, dtype), step)
    alpha = lr * keras.ops.sqrt(1 - beta_2_power) / (1 - beta_1_power)
    m = tf.cast(optimizer._momentums[index], dtype)
    v = tf.cast(optimizer._velocities[index], dtype)
    m = m + (g - m) * (1 - optimizer.beta_1)
    v = v + (tf.square(g) - v) * (1 - optimizer.beta_2)
    if optimizer.amsgrad:
        v = tf.maximum(tf.cast(optimizer._velocity_hats[index], dtype), v)
    return w - (m * alpha) / (_sqrt_zero_safe(v) + optimizer.epsilon)


def _sqrt_zero_safe(x):
    """``sqrt(x)`` whose derivative at 0 is 0, not inf (a weight whose gradient and second
    moment are both 0 would otherwise make the product NaN)."""
    positive = x > 0
    return tf.where(positive, tf.sqrt(tf.where(positive, x, tf.ones_like(x))), tf.zeros_like(x))

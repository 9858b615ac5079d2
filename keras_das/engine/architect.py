"""Hypergradients of the validation loss with respect to the architecture parameters.

The architect never assigns a network weight: losses at other weights (the virtual step
``w'``, the finite-difference points ``w +- eps * v``) are computed by calling the model
inside a ``keras.StatelessScope`` that maps its variables to tensors. The weights are
therefore bit-identical before and after an architecture step, and each replica of a
``tf.distribute`` strategy computes the same perturbed weights from all-reduced gradients.
Batch-norm statistics and random-generator states that change inside those calls are
discarded: the architecture step moves alphas and nothing else.

Every gradient is the gradient of the *global* batch's mean loss: each replica's loss is
scaled by ``1 / num_replicas`` (as Keras losses are) and gradients are summed across replicas.

- ``first_order``: ``dL_val(w, a) / da``.
- ``second_order`` (DARTS eq. 7-8): the virtual step ``w' = w - xi * (momentum + dL_train/dw
  + wd * w)`` taken exactly as the Keras weight optimizer would take its next step, then
  ``dL_val(w', a)/da - xi * H v`` with the Hessian-vector product ``H v`` by central finite
  differences at ``w +- eps * v``, ``v = dL_val(w', a)/dw'``, ``eps = 0.01 / ||v||``.
- ``exact``: differentiates ``L_val(w'(a), a)`` through the virtual step with nested tapes
  (the ground truth the finite-difference estimate approaches).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from keras_das.engine.updates import all_reduce_sum
from keras_das.space import primitives

ARCHITECTS = ("first_order", "second_order", "exact")


def check_architect(name: str) -> str:
    if name not in ARCHITECTS:
        raise ValueError(f"Unknown architect {name!r}; expected one of {list(ARCHITECTS)}")
    return name


def global_norm(tensors):
    return tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(t)) for t in tensors]))


class Architect:
    """Computes the architecture gradient for a ``SearchModel``.

    Args:
        search_model: the ``SearchModel`` whose supernet, loss, weight optimizer and weight
            decay define the losses and the virtual step.
        method: one of ``ARCHITECTS``.
        fd_epsilon: ``eps = fd_epsilon / ||v||`` for ``second_order`` (0.01 in DARTS).
    """

    def __init__(self, search_model, method: str = "first_order", fd_epsilon: float = 0.01):
        self.search_model = search_model
        self.method = check_architect(method)
        if not fd_epsilon > 0:
            raise ValueError(f"fd_epsilon must be > 0, got {fd_epsilon!r}")
        self.fd_epsilon = fd_epsilon

    # -- the model at given weights -----------------------------------------------------

    def loss_at(self, values, x, y, with_penalty=True):
        """The scaled loss (and predictions) with the supernet's trainable variables set
        to ``values``, without changing any variable."""
        sm = self.search_model
        mapping = list(zip(sm.supernet.trainable_variables, values))
        with (
            keras.StatelessScope(state_mapping=mapping, collect_losses=True) as scope,
            primitives.discarding_batch_norm_statistics(),  # updates in the scope: discarded
        ):
            y_pred = sm.supernet(x, training=True)
            loss = sm.total_loss(y, y_pred, scope.losses, with_penalty)
        return loss, y_pred

    def gradients(self, values, wrt, x, y, with_penalty=True):
        """All-reduced gradients of the loss at ``values`` w.r.t. ``values[i] for i in wrt``."""
        with tf.GradientTape() as tape:
            tape.watch([values[i] for i in wrt])
            loss, y_pred = self.loss_at(values, x, y, with_penalty)
        grads = tape.gradient(loss, [values[i] for i in wrt])
        return all_reduce_sum(grads), loss, y_pred

    def virtual_step(self, weights, grads):
        """``w'``: where the weight optimizer's next step (before clipping) would take ``w``."""
        sm = self.search_model
        optimizer = sm.weight_optimizer
        xi = tf.cast(optimizer.learning_rate, weights[0].dtype)
        stepped = []
        for variable, w, g in zip(sm.weight_vars, weights, grads):
            g = g + sm.weight_decay * w
            if isinstance(optimizer, keras.optimizers.SGD) and optimizer.momentum:
                # Keras SGD: m <- mu * m - lr * g; w <- w + m (sign and lr folded into m).
                # mu is cast as Keras casts it (through float32), so the steps agree exactly.
                mu = keras.ops.cast(optimizer.momentum, w.dtype)
                m = optimizer.momentums[optimizer._get_variable_index(variable)]
                m_next = mu * tf.cast(m, w.dtype) - xi * g
                stepped.append(w + (mu * m_next - xi * g if optimizer.nesterov else m_next))
            else:
                stepped.append(w - xi * g)
        return stepped, xi

    # -- architects -------------------------------------------------------------------------

    def __call__(self, train_batch, val_batch):
        """Returns ``(grads for the arch variables, val loss (scaled), val predictions)``."""
        return getattr(self, self.method)(train_batch, val_batch)

    def current_values(self):
        """The supernet's trainable variables, read as tensors."""
        return [v.value for v in self.search_model.supernet.trainable_variables]

    def _split(self):
        sm = self.search_model
        return self.current_values(), sm.weight_index, sm.arch_index

    def first_order(self, train_batch, val_batch):
        del train_batch
        values, _, arch = self._split()
        return self.gradients(values, arch, *val_batch)

    def second_order_terms(self, train_batch, val_batch):
        """The pieces of the DARTS estimate, for inspection and tests.

        Returns a dict with ``d_alpha`` (dL_val(w', a)/da), ``grad_plus`` and ``grad_minus``
        (dL_train/da at ``w +- eps * v``), ``eps``, ``xi``, and the val loss and predictions.
        """
        values, weight, arch = self._split()
        w = [values[i] for i in weight]
        g_train, _, _ = self.gradients(values, weight, *train_batch, with_penalty=False)
        w_virtual, xi = self.virtual_step(w, g_train)
        virtual = _replace(values, weight, w_virtual)
        g_val, val_loss, val_pred = self.gradients(virtual, weight + arch, *val_batch)
        v, d_alpha = g_val[: len(weight)], g_val[len(weight) :]
        eps = self.fd_epsilon / global_norm(v)
        plus = _replace(values, weight, [wi + eps * vi for wi, vi in zip(w, v)])
        minus = _replace(values, weight, [wi - eps * vi for wi, vi in zip(w, v)])
        g_plus, _, _ = self.gradients(plus, arch, *train_batch, with_penalty=False)
        g_minus, _, _ = self.gradients(minus, arch, *train_batch, with_penalty=False)
        return dict(
            d_alpha=d_alpha,
            grad_plus=g_plus,
            grad_minus=g_minus,
            eps=eps,
            xi=xi,
            val_loss=val_loss,
            val_pred=val_pred,
        )

    def second_order(self, train_batch, val_batch):
        t = self.second_order_terms(train_batch, val_batch)
        grads = [
            d - t["xi"] * (gp - gm) / (2.0 * t["eps"])
            for d, gp, gm in zip(t["d_alpha"], t["grad_plus"], t["grad_minus"])
        ]
        return grads, t["val_loss"], t["val_pred"]

    def exact(self, train_batch, val_batch):
        values, weight, arch = self._split()
        alphas = [values[i] for i in arch]
        with tf.GradientTape() as outer:
            outer.watch(alphas)
            w = [values[i] for i in weight]
            g_train, _, _ = self.gradients(values, weight, *train_batch, with_penalty=False)
            w_virtual, _ = self.virtual_step(w, g_train)
            val_loss, val_pred = self.loss_at(_replace(values, weight, w_virtual), *val_batch)
        grads = all_reduce_sum(outer.gradient(val_loss, alphas))
        return grads, val_loss, val_pred


def _replace(values, indices, replacements):
    out = list(values)
    for i, r in zip(indices, replacements):
        out[i] = r
    return out

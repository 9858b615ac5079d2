"""Hypergradients of the validation loss with respect to the architecture parameters.

The architect never assigns a network weight: losses at other weights (the virtual step
``w'``, the finite-difference points) are computed by calling the model inside a
``keras.StatelessScope`` that maps its variables to tensors. The weights are therefore
bit-identical before and after an architecture step, and each replica of a
``tf.distribute`` strategy computes the same perturbed weights from all-reduced gradients.
Batch-norm statistics updates inside those calls are discarded; random-generator states
move on after each call, so every pass (train, val, ``w +- eps * u``, then the weight step)
draws fresh Gumbel noise and dropout masks, as SNAS and GDAS do.

Every loss is the weight step's: the data loss plus ``supernet.losses`` (kernel regularisers
included). Every gradient is the gradient of the *global* batch's mean loss: each replica's
loss is scaled by ``1 / num_replicas`` (as Keras losses are) and gradients are summed across
replicas.

- ``first_order``: ``dL_val(w, a) / da``.
- ``second_order`` (DARTS eq. 7-8): the virtual step ``w'`` taken exactly as the Keras
  weight optimizer (SGD, Adam, AdamW; see ``virtual_step``) would take its next step, then
  ``dL_val(w', a)/da + d/da (dL_train/dw . u)`` with ``u = (dw'/dg)^T v`` (``-xi * v`` for
  plain SGD), ``v = dL_val(w', a)/dw'``, the Hessian-vector product by central finite
  differences at ``w +- eps * u``, ``eps = 0.01 / ||u||``.
- ``exact``: the same formula with ``d/da (dL_train/dw . u)`` differentiated exactly
  (forward mode over the training gradient): ``dL_val(w'(a), a)/da`` through the
  virtual step, the ground truth the finite-difference estimate approaches.
"""

from __future__ import annotations

import weakref

import keras
import tensorflow as tf

from keras_das.engine import moments
from keras_das.engine import packing
from keras_das.engine.updates import all_reduce_sum
from keras_das.engine.updates import num_replicas
from keras_das.engine.virtual_step import next_packed
from keras_das.engine.virtual_step import next_weights
from keras_das.engine.virtual_step import step_vector_product
from keras_das.space import gradients
from keras_das.space import primitives

ARCHITECTS = ("first_order", "second_order", "exact")


def check_architect(name: str) -> str:
    if name not in ARCHITECTS:
        raise ValueError(f"Unknown architect {name!r}; expected one of {list(ARCHITECTS)}")
    return name


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
        self._pass = None  # the traced pass of evaluate, made at its first call

    # -- the model at given weights -----------------------------------------------------

    def loss_at(self, values, x, y, with_penalty=True):
        """The scaled loss (and predictions) with the supernet's trainable variables set
        to ``values``, without changing any of them.

        The loss is the weight step's: the data loss plus ``supernet.losses`` (kernel
        regularisers and ``add_loss`` terms, here at ``values``). Random-generator states
        move on after each pass (Gumbel noise and dropout are fresh in every pass, and
        deterministic given the seeds); batch-norm statistics updates are discarded.
        """
        states = self.random_states()
        with primitives.discarding_batch_norm_statistics():  # updates in the scope: discarded
            loss, y_pred, advanced = self._scoped_loss(values, x, y, with_penalty, states)
        for state, value in zip(states, advanced):
            if value is not None:
                state.assign(value)
        return loss, y_pred

    def _scoped_loss(self, values, x, y, with_penalty, states, fixed=()):
        """The loss and predictions at ``values`` in a ``keras.StatelessScope``, and the
        values ``states`` would have been assigned there (``None``: not assigned).
        ``fixed``: more ``(variable, value)`` pairs the scope reads instead."""
        sm = self.search_model
        mapping = [*zip(sm.supernet.trainable_variables, values), *fixed]
        with keras.StatelessScope(state_mapping=mapping, collect_losses=True) as scope:
            y_pred = sm.supernet(x, training=True)
            loss = sm.total_loss(y, y_pred, sm.supernet.losses, with_penalty)
            return loss, y_pred, [scope.get_current_value(v) for v in states]

    def random_states(self):
        """The supernet's random-generator states (``SeedGenerator``s of Gumbel and dropout)."""
        supernet = self.search_model.supernet
        weights = {id(v) for v in supernet.weights}
        return [v for v in supernet.variables if id(v) not in weights]

    def state_variables(self):
        """The supernet's variables that a pass may assign: its non-trainable weights (batch
        norms' moving statistics) and its random-generator states."""
        supernet = self.search_model.supernet
        trainable = {id(v) for v in supernet.trainable_variables}
        return [v for v in supernet.variables if id(v) not in trainable]

    def evaluate(self, values, x, y, with_penalty=True, keep_statistics=False):
        """The scaled loss, predictions and gradients with respect to every trainable
        variable (``None`` where the loss does not reach it; not summed over replicas),
        with the trainable variables at ``values``, without changing any of them.

        Every pass of a step (the architect's at ``w``, ``w'`` and ``w +- eps * u``, and
        the weight step's) is this one traced function called with other values, so a
        step's graph is traced once per pass kind instead of once per call (the
        second-order step calls it five times), and the gradients a caller does not use
        are pruned from the graph the function is inlined into. Random-generator states
        move on after each call; the batch norms' moving statistics are assigned only with
        ``keep_statistics`` (the weight step), discarded otherwise.
        """
        penalised = bool(with_penalty and self.search_model.arch_penalties)
        if self._pass is None:
            # The pass reads no variable (values and states come in as tensors, read in the
            # caller's graph, which orders those reads after its writes) and assigns none
            # (it returns the states' new values): it needs no automatic control
            # dependencies, whose bookkeeping over every op of the pass was ~10% of a
            # step's tracing. Reading a state inside instead would leave that read
            # unordered against the caller's assignment once the call is inlined: the
            # next pass could draw its Gumbel noise from the old seed.
            self._pass = tf.function(
                self._traced_pass, autograph=False, experimental_attributes={"_disable_acd": True}
            )
        # Eagerly (run_eagerly, tests) the pass runs in place, as it does with several
        # replicas: the synchronised batch norms' all-reduce (a merge_call) cannot run
        # inside a nested tf.function.
        in_place = tf.executing_eagerly() or num_replicas() > 1
        traced_pass = self._traced_pass if in_place else self._pass
        # As tensors (variables would be traced as other arguments than computed values).
        values = [tf.convert_to_tensor(v) for v in values]
        variables, random = self.state_variables(), {id(v) for v in self.random_states()}
        # The states' values: the random-generator states read now (every pass moves them
        # on), the statistics read once per traced graph and then handed from pass to pass
        # (only a pass that keeps them changes them; a second-order step makes six passes,
        # some 700 variable reads each at size D). They are kept on the graph, per
        # architect, so they go with it (a dictionary keyed by graphs would keep each graph
        # alive through the tensors it holds).
        graph = None if in_place else tf.compat.v1.get_default_graph()
        handed = None if graph is None else _graph_attribute(graph, "_keras_das_statistics")
        known = handed.get(self, {}) if handed is not None else {}
        current = [
            known[id(v)] if id(v) in known else tf.convert_to_tensor(v.value) for v in variables
        ]
        loss, y_pred, grads, states = traced_pass(values, current, x, y, penalised)
        kept = {}
        for variable, now, value in zip(variables, current, states):
            if value is not None and (keep_statistics or id(variable) in random):
                variable.assign(value)
            if id(variable) not in random:
                kept[id(variable)] = value if value is not None and keep_statistics else now
        if handed is not None:
            handed[self] = kept
        return loss, y_pred, grads

    def _traced_pass(self, values, current, x, y, with_penalty):
        """``evaluate``'s pass; ``current``: the state variables' values."""
        variables = self.state_variables()
        with tf.GradientTape() as tape:
            tape.watch(values)
            loss, y_pred, states = self._scoped_loss(
                values, x, y, with_penalty, variables, fixed=list(zip(variables, current))
            )
        # A state the pass did not assign is its value read in: None, nothing to assign.
        states = [None if s is c else s for s, c in zip(states, current)]
        return loss, y_pred, tape.gradient(loss, values), states

    def gradients(self, values, wrt, x, y, with_penalty=True):
        """All-reduced gradients of the loss at ``values`` w.r.t. ``values[i] for i in wrt``
        (one ``evaluate`` pass)."""
        loss, y_pred, grads = self.evaluate(values, x, y, with_penalty)
        return all_reduce_sum(_dense([grads[i] for i in wrt])), loss, y_pred

    def virtual_step(self, weights, grads):
        """``w'``: where the weight optimizer's next step (before clipping) would take ``w``."""
        sm = self.search_model
        return next_weights(sm.weight_optimizer, sm.weight_vars, weights, grads, sm.weight_decay)

    # -- architects -------------------------------------------------------------------------

    def __call__(self, train_batch, val_batch, values=None):
        """Returns ``(grads for the arch variables, val loss (scaled), val predictions)``.

        ``values``: ``current_values()``, where the caller has read them already.
        """
        return getattr(self, self.method)(train_batch, val_batch, values)

    def current_values(self, weights=None):
        """The supernet's trainable variables, read as tensors; with ``weights`` (the
        values of ``search_model.weight_vars``, read before), only the others are read."""
        sm = self.search_model
        known = {} if weights is None else dict(zip(sm.weight_index, weights, strict=True))
        return [
            known[i] if i in known else tf.convert_to_tensor(v.value)
            for i, v in enumerate(sm.supernet.trainable_variables)
        ]

    def _split(self, values=None):
        sm = self.search_model
        values = self.current_values() if values is None else list(values)
        return values, sm.weight_index, sm.arch_index

    def first_order(self, train_batch, val_batch, values=None):
        del train_batch
        values, _, arch = self._split(values)
        return self.gradients(values, arch, *val_batch)

    def _virtual_pass(self, split, train_batch, val_batch):
        """What the second-order and exact architects share: the training gradient at
        ``w``, the virtual step ``w'``, the validation pass there, and ``u``.

        ``split`` is ``_split()``'s. Returns a dict with ``d_alpha`` (dL_val(w', a)/da),
        the val loss and predictions, and, packed by ``layout`` (a ``packing.Packing``)
        over the weights the training loss reaches (``moved``: their indices in the
        values; the others stay where they are and their ``u`` is 0), ``w`` and ``u``
        (``(dw'/dg)^T v``, ``v = dL_val(w', a)/dw'``).
        """
        sm = self.search_model
        values, weight, arch = split
        g_train, _, _ = self.gradients(values, weight, *train_batch, with_penalty=False)
        moved = [k for k, g in enumerate(g_train) if g is not None]
        weight_vars = sm.weight_vars  # a property that walks the layers: read once
        variables = [weight_vars[k] for k in moved]
        moved = [weight[k] for k in moved]
        layout = packing.Packing([values[i] for i in moved])
        w = layout.pack([values[i] for i in moved])
        g_train = layout.pack([g for g in g_train if g is not None])
        stepped = next_packed(sm.weight_optimizer, variables, w, g_train, sm.weight_decay, layout)
        virtual = _replace(values, moved, layout.unpack(stepped))
        g_val, val_loss, val_pred = self.gradients(virtual, moved + arch, *val_batch)
        v = layout.pack(_zeros_for_none(g_val[: len(moved)], moved, values))
        d_alpha = _zeros_for_none(g_val[len(moved) :], arch, values)
        u = step_vector_product(
            sm.weight_optimizer, variables, w, g_train, v, sm.weight_decay, layout
        )
        return dict(
            d_alpha=d_alpha,
            layout=layout,
            moved=moved,
            w=w,
            u=u,
            val_loss=val_loss,
            val_pred=val_pred,
        )

    def second_order_terms(self, train_batch, val_batch, values=None):
        """The pieces of the DARTS estimate, for inspection and tests.

        With ``u = (dw'/dg)^T v`` (``-xi * v`` for plain SGD, as in DARTS), the
        hypergradient is ``d_alpha + d/da (g_train . u)``, the second term by central
        differences at ``w +- eps * u``, ``eps = fd_epsilon / ||u||`` (DARTS's points).

        Returns a dict with ``d_alpha`` (dL_val(w', a)/da), ``grad_plus`` and ``grad_minus``
        (dL_train/da at ``w +- eps * u``), ``eps``, and the val loss and predictions.
        """
        values, _, arch = split = self._split(values)
        t = self._virtual_pass(split, train_batch, val_batch)
        layout, moved = t["layout"], t["moved"]
        eps = self.fd_epsilon / packing.global_norm(t["u"])
        step = packing.map_parts(lambda u: tf.cast(eps, u.dtype) * u, t["u"])
        plus = packing.map_parts(tf.add, t["w"], step)
        g_plus, _, _ = self.gradients(
            _replace(values, moved, layout.unpack(plus)), arch, *train_batch, with_penalty=False
        )
        # One pass after the other: run side by side (nothing in their inputs orders them),
        # both passes' activations are alive at once.
        minus = _after(g_plus, packing.map_parts(tf.subtract, t["w"], step))
        g_minus, _, _ = self.gradients(
            _replace(values, moved, layout.unpack(minus)), arch, *train_batch, with_penalty=False
        )
        return dict(
            d_alpha=t["d_alpha"],
            grad_plus=_zeros_for_none(g_plus, arch, values),
            grad_minus=_zeros_for_none(g_minus, arch, values),
            eps=eps,
            val_loss=t["val_loss"],
            val_pred=t["val_pred"],
        )

    def second_order(self, train_batch, val_batch, values=None):
        t = self.second_order_terms(train_batch, val_batch, values)
        grads = [
            d + (gp - gm) / (2.0 * t["eps"])
            for d, gp, gm in zip(t["d_alpha"], t["grad_plus"], t["grad_minus"])
        ]
        return grads, t["val_loss"], t["val_pred"]

    def exact(self, train_batch, val_batch, values=None):
        """``dL_val(w'(a), a)/da`` exactly: ``d_alpha + d/da (g_train . u)``, the second
        term differentiated exactly instead of by finite differences.

        That term is the mixed second derivative of the training loss applied to ``u``:
        the derivative of ``dL_train/da`` as ``w`` moves along ``u``. It is taken forward
        over reverse: the training pass and its gradient w.r.t. ``a`` under a forward
        accumulator whose tangent is ``u``. Against differentiating ``g_train . u`` by a
        second tape (reverse over reverse, which also differentiates the weights'
        gradients), the D exact step measured 19% shorter and its peak memory 21% lower;
        the ops' forward derivatives are written out (``jvp_rules``), which took its first
        step from 119-123 to 90 s (see benchmarks/README.md). With several replicas it is
        that second tape (``_mixed_reverse``).

        The training pass is taken twice: once for ``w'`` (the validation pass follows),
        then again under the accumulator with the same noise (its scope reads the random
        states the first pass started from, and its own advances are discarded), so that
        it is the same function of ``a``, after the validation pass, whose activations
        are then freed.
        """
        # The states' values now (copies, not the variables), for the nested pass.
        replay = [(s, tf.identity(s.value)) for s in self.random_states()]
        values, _, arch = split = self._split(values)
        t = self._virtual_pass(split, train_batch, val_batch)
        # After the validation pass (u comes from it): run beside it, the nested pass's
        # activations would add to its own.
        values = _after(t["u"], values)
        alphas = [values[i] for i in arch]
        weights = [values[i] for i in t["moved"]]  # u is 0 for the others
        u = t["layout"].unpack(t["u"])
        # Keras's moments stop a gradient that second derivatives need (see moments.py).
        with moments.exact_second_derivatives(), primitives.discarding_batch_norm_statistics():
            mixed = (_mixed_reverse if num_replicas() > 1 else _mixed_forward)(
                lambda: self._scoped_loss(values, *train_batch, False, [], replay)[0],
                alphas,
                weights,
                u,
            )
        # This replica's share; summed over replicas, as gradients are.
        mixed = _zeros_for_none(all_reduce_sum(mixed), arch, values)
        grads = [d + m for d, m in zip(t["d_alpha"], mixed)]
        return grads, t["val_loss"], t["val_pred"]


def _mixed_forward(loss_fn, alphas, weights, u):
    """``d/da (dL/dw . u)``: the derivative of ``dL/da`` as ``weights`` move along ``u``
    (a forward accumulator over the gradient)."""
    with gradients.forward_accumulator(weights, u) as accumulator:
        with tf.GradientTape() as tape:
            tape.watch(alphas)
            loss = loss_fn()
        d_alpha = tape.gradient(loss, alphas)
    return [None if d is None else accumulator.jvp(d) for d in d_alpha]


def _mixed_reverse(loss_fn, alphas, weights, u):
    """``_mixed_forward``'s derivative by nested tapes (reverse over reverse), for several
    replicas: a forward accumulator's tangents do not pass a traced all-reduce (the
    synchronised batch norms'), whose derivative TensorFlow defines for tapes only."""
    with tf.GradientTape() as outer:
        outer.watch(alphas)
        with tf.GradientTape() as inner:
            inner.watch(weights)
            loss = loss_fn()
        g = _dense(inner.gradient(loss, weights))
        product = tf.add_n([tf.reduce_sum(gi * ui) for gi, ui in zip(g, u) if gi is not None])
    return outer.gradient(product, alphas)


def _after(tensors, values):
    """``values``, computed only once ``tensors`` are: in a step's graph, ops run as soon as
    their inputs are ready, so two passes with no data between them may run at once.

    Through one barrier op: each value depending on each tensor directly made
    ``len(tensors) * len(values)`` control edges (260,000 at DARTS size D, exact, where
    ``u`` has a tensor per weight), which the graph optimiser and executor then walked."""
    if tf.executing_eagerly():
        return list(values)  # ops run in program order
    barrier = tf.group([t for t in tensors if t is not None])
    with tf.control_dependencies([barrier]):
        return [tf.identity(v) for v in values]


def _zeros_for_none(grads, indices, values):
    """Gradients with ``None`` (a variable the loss does not reach) as zeros."""
    return [tf.zeros_like(values[i]) if g is None else g for g, i in zip(grads, indices)]


def _dense(grads):
    """Sparse gradients (an Embedding's IndexedSlices) as dense tensors: the virtual step
    is elementwise in them and differentiated with respect to them."""
    return [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g for g in grads]


def _graph_attribute(graph, name):
    """A ``WeakKeyDictionary`` stored on ``graph`` as ``name`` (made at first use; graphs
    take attributes but have no ``__dict__`` to ``setdefault`` in)."""
    if not hasattr(graph, name):
        setattr(graph, name, weakref.WeakKeyDictionary())
    return getattr(graph, name)


def _replace(values, indices, replacements):
    out = list(values)
    for i, r in zip(indices, replacements):
        out[i] = r
    return out

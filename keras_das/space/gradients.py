"""Derivatives that keep traced graphs small.

``custom_gradient`` is ``tf.custom_gradient`` without its copies of the arguments (see
its docstring); ``concatenate`` is a concatenation whose gradient is one split;
``forward_accumulator`` is ``tf.autodiff.ForwardAccumulator`` with written-out per-op
derivatives (``jvp_rules``) and a faster lookup of TensorFlow's when tracing.
"""

from __future__ import annotations

import contextlib
import functools

import tensorflow as tf
from keras import ops

from keras_das.space import jvp_rules

try:  # the tape's recording, which tf.custom_gradient itself calls (not a public API)
    from tensorflow.python.eager import record as _tape_record
except ImportError:  # pragma: no cover - another TensorFlow layout: tf.custom_gradient
    _tape_record = None

try:  # ForwardAccumulator's per-op JVPs and their registration (not a public API)
    from tensorflow.python import pywrap_tfe as _pywrap_tfe
    from tensorflow.python.eager import forwardprop as _forwardprop

    _jvp_helper = _forwardprop._jvp_helper
    _jvp_dispatch = _forwardprop._jvp_dispatch
    _register_jvp = _pywrap_tfe.TFE_Py_RegisterJVPFunction
except (ImportError, AttributeError):  # pragma: no cover - TensorFlow's own lookup
    _register_jvp = None


def custom_gradient(f):
    """``tf.custom_gradient`` for a function of tensors, recorded without copies of them.

    In a traced function ``tf.custom_gradient`` passes the arguments through an
    ``IdentityN`` beside the results and records that op, so a tape differentiating
    through it makes zeros for every argument's copy (a ``Fill`` and two constants per
    feature map), which the gradient never reads (for a twice-differentiated batch norm
    the exact architect once used, 7,700 of a D step's 70,600 graph ops). Here ``f`` runs
    unrecorded and only its results are recorded, as functions of its arguments, with the
    same gradient function; a forward accumulator differentiates that gradient function
    (``concatenate``'s: tested). Eagerly (or where TensorFlow lacks the module) it is
    ``tf.custom_gradient``, which records no copies there.
    """

    @functools.wraps(f)
    def decorated(*args):
        if _tape_record is None or tf.executing_eagerly():
            return tf.custom_gradient(f)(*args)
        args = [tf.convert_to_tensor(a) for a in args]
        with _tape_record.stop_recording():
            result, grad = f(*args)

        def backward(*output_grads):
            grads = grad(*output_grads)
            return list(grads) if isinstance(grads, (list, tuple)) else [grads]

        _tape_record.record_operation(f.__name__, tf.nest.flatten(result), args, backward)
        return result

    return decorated


def concatenate(tensors, axis=-1):
    """``ops.concatenate(tensors, axis)`` whose gradient is one split of static sizes.

    TensorFlow's gradient of a traced concatenation of up to 16 tensors is a
    ``ConcatOffset`` and a slice per input (with their shape constants), and the gradient
    of each slice (second derivatives) builds its paddings in some ten ops more; a split's
    gradient is one concatenation. Sizes along ``axis`` unknown when tracing: the plain op.
    """
    tensors = list(tensors)
    if len(tensors) == 1:
        return tensors[0]
    sizes = [t.shape[axis] for t in tensors]
    if None in sizes:
        return ops.concatenate(tensors, axis=axis)

    @custom_gradient
    def concatenated(*parts):
        def grad(dy):
            return tf.split(dy, sizes, axis=axis)

        return tf.concat(parts, axis), grad

    return concatenated(*tensors)


@contextlib.contextmanager
def forward_accumulator(primals, tangents):
    """``tf.autodiff.ForwardAccumulator(primals, tangents)``, whose per-op derivatives
    take less tracing and fewer graph nodes.

    For each op it watches, the accumulator calls a function TensorFlow traces per op
    type, attributes and input shapes (the op's gradient, transposed), found again through
    the generic ``tf.function`` cache: matching a call's signature against every function
    traced so far took a quarter of the tracing of the exact architect's step at size S
    (3,058 lookups). Here, within this context and when tracing, an op with a written-out
    JVP (``jvp_rules``: the convolutions and their gradients, products, reshapes, pools,
    ReLUs, ...) gets it in place, a few ops instead of a function call; the others get
    TensorFlow's functions, kept in a dictionary keyed by that signature. Eagerly, or where
    TensorFlow lacks those internals, it is the accumulator alone.
    """
    cached = _register_jvp is not None and not tf.executing_eagerly()
    if cached:
        _register_jvp(_Jvps())
    try:
        with tf.autodiff.ForwardAccumulator(primals, tangents) as accumulator:
            yield accumulator
    finally:
        if cached:
            _register_jvp(_jvp_dispatch)


class _Jvps:
    """TensorFlow's JVP dispatch (``forwardprop._jvp_dispatch``'s signature): the written
    rule where there is one, in place or (the batch norm's, some fifty ops) as a function
    traced once per op signature; else TensorFlow's traced function. The functions are
    kept in a dictionary; calls it cannot key (batched tangents, non-tensor arguments,
    attributes that do not hash) go to TensorFlow's."""

    def __init__(self):
        self._functions = {}

    def __call__(self, op_name, attr_tuple, inputs, outputs, tangents, use_batch=False):
        arguments = (op_name, attr_tuple, inputs, outputs, tangents, use_batch)
        if use_batch or not all(isinstance(t, tf.Tensor) for t in (*inputs, *outputs)):
            return _jvp_dispatch(*arguments)
        helper = _jvp_helper
        op = outputs[0].op if outputs else None
        found = None if op is None else jvp_rules.find(op, tangents)
        if found is not None:
            rule, nonzero, traced = found
            if not traced:
                written = rule(op, list(inputs), nonzero)
                if written is not None:
                    return written
            else:  # a larger rule: traced once per signature
                tangents = nonzero

                def helper(op_name, attr_tuple, inputs, outputs, tangents):
                    return rule(op, inputs, tangents)

        given = [i for i, t in enumerate(tangents) if t is not None]
        key = (
            helper is _jvp_helper,
            op_name,
            _hashable(attr_tuple),
            tuple(_signature(t) for t in inputs),
            tuple(_signature(t) for t in outputs),
            tuple((i, _signature(tangents[i])) for i in given),
        )
        try:
            function = self._functions.get(key)
        except TypeError:  # an attribute value that does not hash
            return _jvp_dispatch(*arguments)
        flat = [*inputs, *outputs, *(tangents[i] for i in given)]
        if function is None:
            n_in, n_out = len(inputs), len(outputs)

            def jvp(*flat):
                spread = [None] * len(tangents)
                for i, t in zip(given, flat[n_in + n_out :]):
                    spread[i] = t
                ins, outs = list(flat[:n_in]), list(flat[n_in : n_in + n_out])
                return helper(op_name, attr_tuple, ins, outs, spread)

            specs = [tf.TensorSpec(t.shape, t.dtype) for t in flat]
            function = tf.function(jvp, autograph=False).get_concrete_function(*specs)
            self._functions[key] = function
        return function(*flat)


def _signature(t):
    return t.dtype, tuple(t.shape)


def _hashable(value):
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    return value

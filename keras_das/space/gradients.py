"""Custom gradients that keep traced graphs small.

``custom_gradient`` is ``tf.custom_gradient`` without its copies of the arguments (see
its docstring); ``concatenate`` is a concatenation whose gradient is one split.
"""

from __future__ import annotations

import functools

import tensorflow as tf
from keras import ops

try:  # the tape's recording, which tf.custom_gradient itself calls (not a public API)
    from tensorflow.python.eager import record as _tape_record
except ImportError:  # pragma: no cover - another TensorFlow layout: tf.custom_gradient
    _tape_record = None


def custom_gradient(f):
    """``tf.custom_gradient`` for a function of tensors, recorded without copies of them.

    In a traced function ``tf.custom_gradient`` passes the arguments through an
    ``IdentityN`` beside the results and records that op, so a tape differentiating
    through it makes zeros for every argument's copy (a ``Fill`` and two constants per
    feature map), which the gradient never reads: without them (and the ``IdentityN``s)
    the exact architect's step at size D traces 62,899 graph ops instead of 70,614. Here
    ``f`` runs unrecorded and only its results are recorded, as functions of its
    arguments, with the same gradient function. Eagerly (or where TensorFlow lacks the
    module) it is ``tf.custom_gradient``, which records no copies there.
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

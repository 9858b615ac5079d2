"""Written-out forward derivatives (JVPs) of the ops a search network's pass and its
gradient are made of, for ``gradients.forward_accumulator`` while it traces.

TensorFlow's own JVP of an op is the transpose of its gradient: per op signature it traces
a function that builds the op's gradient and differentiates that again with respect to
the cotangent, and calls it; the graph optimiser then inlines each call and prunes the
half it does not use. For the exact architect at size S that was 800 traced functions and
2,960 calls, 16 of the step's 28 s of tracing. Most of those ops are linear in their
float inputs (a reshape, a pad, a sum), linear in each of them (a convolution, its two
gradients, an einsum, a product), or route a cotangent the way their gradient does (the
ReLU's and the max pool's); for these the JVP is the same op again on the tangents, a few
ops written into the graph where the op is. The batch norm's (some fifty ops) is traced
once per op signature and called. Each rule gives what TensorFlow's transposed gradient
gives (``tests/test_gradients.py`` compares them op by op), and its ops are recorded on
tapes as TensorFlow's are (a tape outside the accumulator differentiates the JVP); ops
without a rule, or with a tangent on an input a rule holds constant, keep TensorFlow's
function.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

try:  # what every generated op wrapper calls: records an op on the active tapes
    from tensorflow.python.eager.execute import record_gradient as _record_gradient
except ImportError:  # pragma: no cover - another TensorFlow layout: TensorFlow's JVPs
    _record_gradient = None


def find(op: tf.Operation, tangents):
    """``(rule, tangents, traced)`` for ``op``, or ``None`` where no rule is written:
    ``rule(op, inputs, tangents)`` gives the outputs' tangents (``None`` where it does not
    apply to these inputs); ``traced`` says it is better traced once per op signature and
    called (the batch norm's: some fifty ops, hundreds of calls, few signatures; it reads
    only ``op``'s attributes).

    The accumulator hands zeros (a constant or a fill) for the inputs that have no
    tangent; the rule gets ``None`` there and leaves those terms out, and an op whose
    tangents are all zeros gets none."""
    in_function = _RULES_IN_FUNCTIONS.get(op.type)
    if _record_gradient is None or (op.type not in _RULES and in_function is None):
        return None
    tangents = [None if _zeros(t) else t for t in tangents]
    if all(t is None for t in tangents):
        return _no_tangents, tangents, False
    if in_function is None:
        return _RULES[op.type], tangents, False
    applies, rule = in_function
    return (rule, tangents, True) if applies(op, tangents) else None


def _zeros(t) -> bool:
    """Whether ``t`` is, by its construction, all zeros."""
    if t is None:
        return True
    op = t.op
    if op.type == "ZerosLike":
        return True
    if op.type == "Fill":
        op = op.inputs[1].op
    if op.type != "Const":
        return False
    value = tf.get_static_value(op.outputs[0])
    return value is not None and not np.any(value)


def _again(op: tf.Operation, inputs) -> list:
    """``op`` again, the same node with its attributes, on other (flat) ``inputs``;
    recorded as a generated op wrapper records it, so that a tape outside the accumulator
    differentiates the JVP (reverse over forward), as it does TensorFlow's."""
    inputs = list(inputs)
    node = op.graph.create_op(
        op.type, inputs, [t.dtype for t in op.outputs], attrs=dict(op.node_def.attr)
    )
    attrs = tuple(x for a in op.op_def.attr for x in (a.name, node.get_attr(a.name)))
    _record_gradient(op.type, inputs, attrs, node.outputs)
    return list(node.outputs)


def _linear(positions=None):
    """For ops linear in the inputs at ``positions`` together (all inputs when ``None``;
    the others: shapes, axes, paddings): the op applied to the tangents, zeros where an
    input has none."""

    def rule(op, inputs, tangents):
        where = range(len(inputs)) if positions is None else positions
        if _tangent_outside(tangents, where):
            return None
        given = [i for i in where if tangents[i] is not None]
        if op.type == "AddV2" and len(given) == 1:
            return [_to_output_shape(op, tangents[given[0]])]
        args = list(inputs)
        for i in where:
            args[i] = tf.zeros_like(inputs[i]) if tangents[i] is None else tangents[i]
        return _again(op, args)

    return rule


def _multilinear(positions):
    """For ops linear in each input at ``positions`` (a product, a convolution and its
    gradients, an einsum): the sum over those inputs of the op with that input's tangent
    in its place."""

    def rule(op, inputs, tangents):
        where = range(len(inputs)) if positions is None else positions
        if _tangent_outside(tangents, where):
            return None
        terms = []
        for i in where:
            if tangents[i] is not None:
                args = list(inputs)
                args[i] = tangents[i]
                terms.append(_again(op, args)[0])
        return [_sum(terms)]

    return rule


def _tangent_outside(tangents, positions) -> bool:
    return any(t is not None for i, t in enumerate(tangents) if i not in positions)


def _to_output_shape(op, t):
    shape = op.outputs[0].shape
    return t if t.shape == shape else tf.broadcast_to(t, shape)


def _add_n(op, inputs, tangents):
    return [_sum(tangents)]


def _concat(op, inputs, tangents):
    return _linear(range(len(inputs) - 1))(op, inputs, tangents)


def _sub(op, inputs, tangents):
    dx, dy = tangents
    if dy is None:
        return [_to_output_shape(op, dx)]
    if dx is None:
        return [_to_output_shape(op, tf.negative(dy))]
    return [dx - dy]


def _real_div(op, inputs, tangents):
    """``d(x / y) = (dx - (x / y) dy) / y``; ``DivNoNan`` keeps its zeros where y = 0."""
    y, (dx, dy), z = inputs[1], tangents, op.outputs[0]
    numerator = dx if dy is None else (-z * dy if dx is None else dx - z * dy)
    divide = tf.math.divide_no_nan if op.type == "DivNoNan" else tf.math.truediv
    return [_to_output_shape(op, divide(numerator, y))]


def _relu(op, inputs, tangents):
    # TensorFlow's gradient masks by the output (y > 0), and so does this.
    return [tf.raw_ops.ReluGrad(gradients=tangents[0], features=op.outputs[0])]


def _relu_grad(op, inputs, tangents):
    # Linear in the cotangent; the mask's derivative is zero (as TensorFlow's).
    if tangents[0] is None:
        return [None]
    return [tf.raw_ops.ReluGrad(gradients=tangents[0], features=inputs[1])]


def _pool_attrs(op):
    return {k: op.get_attr(k) for k in ("ksize", "strides", "padding", "data_format")}


def _max_pool(op, inputs, tangents):
    # Each output's tangent is its input's at the position the gradient routes to.
    if tangents[0] is None:
        return [None]
    return [
        tf.raw_ops.MaxPoolGradGrad(
            orig_input=inputs[0], orig_output=op.outputs[0], grad=tangents[0], **_pool_attrs(op)
        )
    ]


def _max_pool_grad(op, inputs, tangents):
    # Linear in the cotangent; TensorFlow's gradient for the two inputs is zero.
    if tangents[2] is None:
        return [None]
    return _again(op, [inputs[0], inputs[1], tangents[2]])


def _training_nhwc(op, tangents, constant):
    """Whether a batch-norm rule applies: training mode, channels last, and no tangent on
    the inputs at ``constant`` (the offset and statistics, or the reserve spaces, whose
    derivatives TensorFlow's gradients leave out)."""
    return (
        op.get_attr("is_training")
        and op.get_attr("data_format") in (b"NHWC", "NHWC")
        and not any(tangents[i] is not None for i in constant)
    )


def _normalized(op, x):
    """The statistics of a training-mode batch norm of channels-last ``x``, computed
    again (as TensorFlow's second derivative does: its reserve spaces hold the variance on
    CPUs and its inverse square root under cuDNN): ``x`` normalised and ``1 / std``."""
    mean = tf.reduce_mean(x, _AXES)
    centred = x - mean
    inv = tf.math.rsqrt(tf.reduce_mean(tf.square(centred), _AXES) + op.get_attr("epsilon"))
    return centred * inv, inv


def _normalized_tangent(x_hat, inv, dx):
    """The tangent of ``x_hat`` (statistics included) along ``dx``, and the variance's
    share ``k = mean(x_hat dx)``: ``d inv = -inv^2 k``."""
    k = tf.reduce_mean(x_hat * dx, _AXES)
    return inv * (dx - tf.reduce_mean(dx, _AXES) - x_hat * k), k


def _fused_batch_norm_applies(op, tangents):
    return _training_nhwc(op, tangents, (2, 3, 4))


def _fused_batch_norm(op, inputs, tangents):
    """``y = s x_hat``: ``dy = s d(x_hat) + ds x_hat``. The mean, variance and reserve
    outputs get none (TensorFlow's gradient reads only ``y``'s cotangent)."""
    (x, s), (dx, ds) = inputs[:2], tangents[:2]
    x_hat, inv = _normalized(op, x)
    dy = _sum(
        [
            None if dx is None else s * _normalized_tangent(x_hat, inv, dx)[0],
            None if ds is None else ds * x_hat,
        ]
    )
    return [dy] + [None] * (len(op.outputs) - 1)


def _fused_batch_norm_grad_applies(op, tangents):
    return _training_nhwc(op, tangents, (3, 4)) and op.inputs[1].shape.is_fully_defined()


def _fused_batch_norm_grad(op, inputs, tangents):
    """The kernel's gradient, ``gx = s inv r`` with ``r = g - mean(g) - x_hat m`` and
    ``m = mean(g x_hat)``, ``gs = n m``, ``go = sum(g)``, differentiated along
    ``dg, dx, ds``: ``d gx = s inv dr + (ds inv + s d inv) r``."""
    (g, x, s), (dg, dx, ds) = inputs[:3], tangents[:3]
    n = float(np.prod(x.shape[:-1]))
    x_hat, inv = _normalized(op, x)
    m = tf.reduce_mean(g * x_hat, _AXES)
    dr, dm, d_inv = [], [], None
    if dg is not None:
        dr.append(dg - tf.reduce_mean(dg, _AXES))
        dm.append(tf.reduce_mean(dg * x_hat, _AXES))
    if dx is not None:
        dx_hat, k = _normalized_tangent(x_hat, inv, dx)
        dr.append(-dx_hat * m)
        dm.append(tf.reduce_mean(g * dx_hat, _AXES))
        d_inv = -inv * inv * k
    dm = _sum(dm)
    d_factor = _sum([None if ds is None else ds * inv, None if d_inv is None else s * d_inv])
    d_gx = _sum(
        [
            None if dm is None else s * inv * tf.add_n([*dr, -x_hat * dm]),
            None if d_factor is None else d_factor * (g - tf.reduce_mean(g, _AXES) - x_hat * m),
        ]
    )
    d_gs = None if dm is None else n * dm
    d_go = None if dg is None else tf.reduce_sum(dg, _AXES)
    return [d_gx, d_gs, d_go] + [None] * (len(op.outputs) - 3)


def _sum(terms):
    """The sum of the terms that are not ``None`` (``None`` if none is)."""
    terms = [t for t in terms if t is not None]
    return None if not terms else terms[0] if len(terms) == 1 else tf.add_n(terms)


_AXES = (0, 1, 2)


def _no_tangents(op, inputs, tangents):
    return [None] * len(op.outputs)


_RULES = {
    # Linear in the data input(s); the others are shapes, axes, paddings, multiples.
    **{
        name: _linear([0])
        for name in (
            "Reshape",
            "Squeeze",
            "ExpandDims",
            "Tile",
            "Pad",
            "Slice",
            "StridedSlice",
            "SpaceToBatchND",
            "BatchToSpaceND",
            "Sum",
            "Mean",
            "AvgPool",
            "SplitV",
            "Transpose",
            "Neg",
        )
    },
    "Split": _linear([1]),
    "AvgPoolGrad": _linear([1]),
    "AddV2": _linear(),
    "AddN": _add_n,
    "Pack": _linear(),
    "ConcatV2": _concat,
    "Sub": _sub,
    # Linear in each of these inputs.
    "Mul": _multilinear([0, 1]),
    "MatMul": _multilinear([0, 1]),
    "BatchMatMulV2": _multilinear([0, 1]),
    "Einsum": _multilinear(None),
    "Conv2D": _multilinear([0, 1]),
    "Conv2DBackpropInput": _multilinear([1, 2]),
    "Conv2DBackpropFilter": _multilinear([0, 2]),
    "DepthwiseConv2dNative": _multilinear([0, 1]),
    "DepthwiseConv2dNativeBackpropInput": _multilinear([1, 2]),
    "DepthwiseConv2dNativeBackpropFilter": _multilinear([0, 2]),
    "RealDiv": _real_div,
    "DivNoNan": _real_div,
    "Relu": _relu,
    "ReluGrad": _relu_grad,
    "MaxPool": _max_pool,
    "MaxPoolGrad": _max_pool_grad,
    "Shape": _no_tangents,
    "ShapeN": _no_tangents,
}
_RULES_IN_FUNCTIONS = {
    "FusedBatchNorm": (_fused_batch_norm_applies, _fused_batch_norm),
    "FusedBatchNormGrad": (_fused_batch_norm_grad_applies, _fused_batch_norm_grad),
}

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
ops written into the graph where the op is. Each rule gives what TensorFlow's transposed
gradient gives (``tests/test_gradients.py`` compares them op by op); ops without a rule,
or with a tangent on an input a rule holds constant, keep TensorFlow's function.
"""

from __future__ import annotations

import tensorflow as tf


def jvp(op: tf.Operation, inputs, tangents):
    """The tangents of ``op``'s outputs, or ``None`` where no rule here applies."""
    rule = _RULES.get(op.type)
    return None if rule is None else rule(op, list(inputs), list(tangents))


def again(op: tf.Operation, inputs) -> list:
    """``op`` again, the same node with its attributes, on other (flat) ``inputs``."""
    node = op.graph.create_op(
        op.type, list(inputs), [t.dtype for t in op.outputs], attrs=dict(op.node_def.attr)
    )
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
        return again(op, args)

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
                terms.append(again(op, args)[0])
        if not terms:
            return [None]
        return [terms[0] if len(terms) == 1 else tf.add_n(terms)]

    return rule


def _tangent_outside(tangents, positions) -> bool:
    return any(t is not None for i, t in enumerate(tangents) if i not in positions)


def _to_output_shape(op, t):
    shape = op.outputs[0].shape
    return t if t.shape == shape else tf.broadcast_to(t, shape)


def _add_n(op, inputs, tangents):
    given = [t for t in tangents if t is not None]
    return [given[0] if len(given) == 1 else tf.add_n(given)]


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
    return again(op, [inputs[0], inputs[1], tangents[2]])


def _no_float_outputs(op, inputs, tangents):
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
    "Shape": _no_float_outputs,
    "ShapeN": _no_float_outputs,
}

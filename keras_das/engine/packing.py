"""Many tensors as one vector: a step's per-variable arithmetic in a few graph ops.

The DARTS supernet at size D has 513 trainable variables in 39 shapes. Elementwise work
over all of them written per variable (the weight update's clipping and decay, the
virtual step, ``u``, its norm and the finite-difference points) is a graph op per
variable per operation: counted in the traced D second-order step, some 12,000 of its
33,000 ops, each paid for in tracing and graph optimisation before the first step.
Packed, an operation is one op on one vector, and packing or unpacking a list is about
three ops per shape (a stack, a reshape and its shape; a split, reshapes and unstacks).
The values are the same: packing only moves them.
"""

from __future__ import annotations

import math

import tensorflow as tf


class Packing:
    """Lays tensors shaped as ``like``'s end to end: one vector per dtype.

    Tensors of one shape and dtype are stacked together, so the op count grows with the
    number of distinct shapes, not of tensors. ``pack`` returns a tuple of vectors (one
    per dtype, in order of first appearance in ``like``; one for the usual float32
    model), on which elementwise work is ``map_parts``; ``unpack`` returns the list in
    ``like``'s order and shapes.

    Args:
        like: tensors or variables with fully defined shapes.
    """

    def __init__(self, like):
        self.size = len(like)
        layout: dict = {}
        for i, t in enumerate(like):
            shape = tuple(t.shape)
            if any(d is None for d in shape):
                raise ValueError(f"Packing needs fully defined shapes; tensor {i}: {shape}")
            groups = layout.setdefault(tf.as_dtype(t.dtype), {})
            groups.setdefault(shape, []).append(i)
        # [(dtype, [(shape, indices), ...]), ...]
        self._layout = [(dtype, list(groups.items())) for dtype, groups in layout.items()]

    @property
    def dtypes(self):
        return tuple(dtype for dtype, _ in self._layout)

    def pack(self, tensors) -> tuple:
        """``tensors`` (in ``like``'s order and shapes; cast to its dtypes) as vectors."""
        if len(tensors) != self.size:
            raise ValueError(f"Packing of {self.size} tensors given {len(tensors)}")
        parts = []
        for dtype, groups in self._layout:
            pieces = []
            for _, indices in groups:
                members = [tf.cast(tensors[i], dtype) for i in indices]
                block = members[0] if len(members) == 1 else tf.stack(members)
                pieces.append(tf.reshape(block, [-1]))
            parts.append(pieces[0] if len(pieces) == 1 else tf.concat(pieces, 0))
        return tuple(parts)

    def unpack(self, parts) -> list:
        """``pack``'s inverse: the list of tensors, in ``like``'s order and shapes."""
        out = [None] * self.size
        for (_, groups), vector in zip(self._layout, parts, strict=True):
            sizes = [len(indices) * math.prod(shape) for shape, indices in groups]
            pieces = [vector] if len(groups) == 1 else tf.split(vector, sizes)
            for (shape, indices), piece in zip(groups, pieces):
                if len(indices) == 1:
                    out[indices[0]] = tf.reshape(piece, shape)
                    continue
                for i, member in zip(indices, tf.unstack(tf.reshape(piece, (-1,) + shape))):
                    out[i] = member
        return out

    def spread(self, numbers) -> tuple:
        """A packed tensor whose elements of tensor ``i`` all equal ``numbers[i]`` (a mask,
        per-variable factors), built from two small constants at run time."""
        if len(numbers) != self.size:
            raise ValueError(f"Packing of {self.size} tensors given {len(numbers)} numbers")
        parts = []
        for dtype, groups in self._layout:
            order = [i for _, indices in groups for i in indices]
            counts = [math.prod(shape) for shape, indices in groups for _ in indices]
            values = tf.constant([numbers[i] for i in order], dtype)
            parts.append(tf.repeat(values, tf.constant(counts, tf.int64)))
        return tuple(parts)


def map_parts(fn, *packed) -> tuple:
    """``fn`` applied part by part (dtype by dtype) to packed tensors."""
    return tuple(fn(*parts) for parts in zip(*packed, strict=True))


def global_norm(packed):
    """The Euclidean norm of all of a packed tensor's elements (float32 or wider)."""
    squares = [tf.reduce_sum(tf.square(p)) for p in packed]
    dtype = max((s.dtype for s in squares), key=lambda d: d.size)
    return tf.sqrt(tf.add_n([tf.cast(s, dtype) for s in squares]))

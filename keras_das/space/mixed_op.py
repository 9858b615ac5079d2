"""MixedOp: a weighted mix of candidate operations, the unit of differentiable search."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Mapping

import keras
import numpy as np
from keras import layers

from keras_das.space import primitives
from keras_das.space import relaxations
from keras_das.space import variables


@keras.saving.register_keras_serializable(package="keras_das")
class MixedOp(layers.Layer):
    """Continuous relaxation over candidate operations.

    Computes ``sum_i w_i * adapter_i(op_i(x))`` where ``w = relax(alpha / T)``. Candidates
    are registered op names (see ``keras_das.space.primitives.OPS``), Keras layers, or both. When the
    candidates' outputs differ in width, each narrower output goes through a learnable
    1x1 projection (a channel adapter) to a common width, so every mix is defined.

    A MixedOp used alone owns its architecture parameters (``alpha``, made in ``build``).
    Many MixedOps can share one alpha instead: built with ``owns_alpha=False``, they are
    called with the ``mixing_weights`` their owner computed (the DARTS cells do this).

    Args:
        candidates: op names and/or Keras layers, at least two.
        relaxation: ``softmax``, ``sigmoid``, ``gumbel``, ``gumbel_hard`` or ``gate`` (two
            candidates, one parameter); see ``keras_das.space.relaxations``.
        temperature: divides alpha before the relaxation. Held in a non-trainable variable
            that schedules may assign without retracing.
        channels: the width the named ops produce and the adapters project to. Default:
            the input width for named ops, the widest candidate for the adapters.
        strides: the stride of the named ops (1 or 2).
        affine: whether the named ops' batch norms learn scale and offset (DARTS search: no).
        pool_batch_norm: follow named pooling ops with a batch norm, as the DARTS search
            network does.
        owns_alpha: create ``alpha`` here, or expect ``mixing_weights`` at call time.
        alpha_initializer: initializer of ``alpha``; default ``1e-3 * N(0, 1)`` as in DARTS.
        seed: seeds alpha's initializer and the Gumbel noise.
        partial_channels: PC-DARTS's K: only the first 1/K of the input channels go through
            the candidates; the rest bypass them (max-pooled 2x2 at stride 2), and the two
            parts are channel-shuffled together. Needs an output as wide as the input.

    Example:
        >>> gate = MixedOp(["max_pool_3x3", "avg_pool_3x3"], relaxation="gate")
        >>> mix = MixedOp([layers.Conv2D(16, 3, padding="same"),
        ...                layers.Conv2D(32, 5, padding="same")])   # adapters to 32
    """

    def __init__(
        self,
        candidates,
        relaxation="softmax",
        temperature=1.0,
        channels=None,
        strides=1,
        affine=False,
        pool_batch_norm=True,
        owns_alpha=True,
        alpha_initializer=None,
        seed=None,
        partial_channels=1,
        **kwargs,
    ):
        super().__init__(**kwargs)
        candidates = list(candidates)
        if len(candidates) < 2:
            raise ValueError(f"MixedOp needs at least 2 candidates, got {len(candidates)}")
        for candidate in candidates:
            if isinstance(candidate, str):
                primitives.check_op_names([candidate])
            elif not isinstance(candidate, layers.Layer):
                raise TypeError(
                    f"A candidate must be an op name or a keras Layer, got {candidate!r}"
                )
        relaxations.check_relaxation(relaxation, len(candidates))
        if not isinstance(partial_channels, int) or partial_channels < 1:
            raise ValueError(f"partial_channels must be a positive int, got {partial_channels!r}")
        if channels is not None and (not isinstance(channels, int) or channels < 1):
            raise ValueError(f"channels must be a positive int or None, got {channels!r}")
        if strides not in (1, 2):
            raise ValueError(f"strides must be 1 or 2, got {strides!r}")
        self.candidates = candidates
        self.relaxation = relaxation
        self.initial_temperature = relaxations.check_temperature(temperature)
        self.channels = channels
        self.strides = strides
        self.affine = affine
        self.pool_batch_norm = pool_batch_norm
        self.owns_alpha = owns_alpha
        self.alpha_initializer = keras.initializers.get(alpha_initializer)
        self.seed = seed
        self.partial_channels = partial_channels
        self.candidate_names = tuple(c if isinstance(c, str) else c.name for c in candidates)
        self.seed_generator = (
            keras.random.SeedGenerator(seed)
            if owns_alpha and relaxation.startswith("gumbel")
            else None
        )
        self.alpha = None
        self.temperature = None

    # -- construction -------------------------------------------------------------------

    def _named_op(self, name, width):
        # Named ops on this layer's dtype policy; candidates passed as layers keep theirs.
        dtype = self.dtype_policy
        op = primitives.make_op(name, width, self.strides, self.affine, dtype=dtype)
        if self.pool_batch_norm and isinstance(op, primitives.Pool):
            op = primitives.PoolBN(op.pool_type, strides=self.strides, dtype=dtype)
        return op

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        channels = self.channels  # the width the candidates are brought to
        full_channels = input_shape[-1]
        if self.partial_channels > 1:
            k = self.partial_channels
            if full_channels % k or channels not in (None, full_channels):
                raise ValueError(
                    f"MixedOp {self.name!r}: partial_channels={k} needs input channels divisible "
                    f"by it and an output as wide as the input (input {full_channels}, "
                    f"channels={channels})"
                )
            # The candidates see (and produce) the first 1/k of the channels.
            input_shape = input_shape[:-1] + (full_channels // k,)
            channels = full_channels // k
        width = channels or input_shape[-1]
        ops = [None] * len(self.candidates)
        shapes = [None] * len(self.candidates)
        for i, candidate in enumerate(self.candidates):
            if candidate == "none":
                continue  # sized once the common width is known
            op = self._named_op(candidate, width) if isinstance(candidate, str) else candidate
            if not op.built:
                op.build(input_shape)
            ops[i] = op
            shapes[i] = tuple(op.compute_output_shape(input_shape))
        known = [(n, s) for n, s in zip(self.candidate_names, shapes) if s is not None]
        spatial = {s[1:-1] for _, s in known}
        if len(spatial) > 1:
            detail = ", ".join(f"{n}: {s}" for n, s in known)
            raise ValueError(
                f"MixedOp {self.name!r}: candidates disagree on spatial shape ({detail}); "
                "channel adapters fix widths only"
            )
        self.output_channels = channels or max(s[-1] for _, s in known)
        self.ops, self.adapters = self._complete(ops, shapes, input_shape)
        if self.owns_alpha:
            size = relaxations.alpha_size(self.relaxation, len(self.candidates))
            initializer = self.alpha_initializer
            if initializer is None:
                initializer = keras.initializers.RandomNormal(
                    stddev=variables.ALPHA_STDDEV, seed=self.seed
                )
            self.alpha = variables.add_arch_weight(self, "alpha", (size,), initializer)
            self.temperature = variables.add_temperature(self, self.initial_temperature)

    def _complete(self, ops, shapes, input_shape):
        """Zeros for the ``none`` candidates (``ops[i]`` None), and the channel adapters of
        the narrower outputs (None where an output has the common width)."""
        dtype = self.dtype_policy
        adapters = []
        for i in range(len(self.candidates)):
            if ops[i] is None:
                ops[i] = primitives.Zero(self.output_channels, self.strides, dtype=dtype)
                shapes[i] = tuple(ops[i].compute_output_shape(input_shape))
                ops[i].build(input_shape)
            adapter = None
            if shapes[i][-1] != self.output_channels:
                adapter = _channel_adapter(self.output_channels, len(shapes[i]), dtype)
                adapter.build(shapes[i])
            adapters.append(adapter)
        return ops, adapters

    def compute_output_shape(self, input_shape):
        """The candidates' common output shape for ``input_shape`` (from the first built
        candidate, else the stride), at the mix's width."""
        input_shape = tuple(input_shape)
        k = self.partial_channels
        if k > 1:  # the candidates see and make 1/k of the channels; the rest bypass them
            width, op_input = input_shape[-1], input_shape[:-1] + (input_shape[-1] // k,)
        elif self.channels is not None or self.built:
            width, op_input = self.channels or self.output_channels, input_shape
        else:
            raise ValueError(
                f"MixedOp {self.name!r} with channels=None knows its width once built "
                "(the widest candidate's)"
            )
        if self.built:
            shape = tuple(self.ops[0].compute_output_shape(op_input))
        else:
            shape = primitives.strided_shape(input_shape, self.strides, width)
        return shape[:-1] + (width,)

    # -- forward --------------------------------------------------------------------------

    def compute_mixing_weights(self, training=False):
        """Mixing weights from this op's own alpha (a tensor of shape ``[n]``)."""
        if not self.owns_alpha:
            raise ValueError(
                f"MixedOp {self.name!r} shares its owner's alpha (owns_alpha=False); "
                "its owner computes the mixing weights"
            )
        self._check_built()
        return relaxations.mixing_weights(
            self.alpha, self.relaxation, self.temperature, training, self.seed_generator
        )

    def named_mixing_weights(self, training=False):
        """``{name: mixing weights}`` of the alphas this layer owns (see ``arch_owners``)."""
        return {self.name: self.compute_mixing_weights(training)}

    def call(self, inputs, mixing_weights=None, training=None):
        if mixing_weights is None:
            mixing_weights = getattr(_overrides, "weights", {}).get(id(self))
        if mixing_weights is None:
            mixing_weights = self.compute_mixing_weights(bool(training))
        mixing_weights = keras.ops.cast(mixing_weights, self.compute_dtype)
        if self.partial_channels > 1:
            return partial_channel_mix(
                inputs,
                self.partial_channels,
                self.strides,
                lambda x: self._mix(x, mixing_weights, training),
            )
        return self._mix(inputs, mixing_weights, training)

    def _mix(self, inputs, mixing_weights, training):
        out = None
        for i, (op, adapter) in enumerate(zip(self.ops, self.adapters)):
            if getattr(op, "is_zero", False):
                continue  # contributes w * 0
            y = op(inputs, training=training)
            if adapter is not None:
                y = adapter(y)
            term = mixing_weights[..., i] * y
            out = term if out is None else out + term
        if out is None:
            out = self.ops[0](inputs)
        return out

    # -- reporting ------------------------------------------------------------------------

    def _check_built(self):
        if not self.built:
            raise ValueError(f"MixedOp {self.name!r} has not been built yet; call it on an input")

    def get_mixing_weights(self, mixing_weights=None) -> np.ndarray:
        """Current (noise-free) mixing weights as a numpy array ``[n]``."""
        if mixing_weights is None:
            mixing_weights = self.compute_mixing_weights(training=False)
        return keras.ops.convert_to_numpy(mixing_weights)

    def chosen_index(self, mixing_weights=None) -> int:
        """Index of the strongest candidate, ``none`` excluded as in DARTS."""
        weights = np.array(self.get_mixing_weights(mixing_weights), dtype=np.float64)
        weights[[n == "none" for n in self.candidate_names]] = -np.inf
        return int(np.argmax(weights))

    def chosen_name(self, mixing_weights=None) -> str:
        return self.candidate_names[self.chosen_index(mixing_weights)]

    def get_config(self):
        return {
            **super().get_config(),
            "candidates": [
                c if isinstance(c, str) else keras.layers.serialize(c) for c in self.candidates
            ],
            "relaxation": self.relaxation,
            "temperature": self.initial_temperature,
            "channels": self.channels,
            "strides": self.strides,
            "affine": self.affine,
            "pool_batch_norm": self.pool_batch_norm,
            "owns_alpha": self.owns_alpha,
            "alpha_initializer": keras.initializers.serialize(self.alpha_initializer)
            if self.alpha_initializer is not None
            else None,
            "seed": self.seed,
            "partial_channels": self.partial_channels,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["candidates"] = [
            c if isinstance(c, str) else keras.layers.deserialize(c) for c in config["candidates"]
        ]
        return cls(**config)


def channel_shuffle(x, groups: int):
    """Interleaves ``groups`` equal channel groups (ShuffleNet; PyTorch's view-transpose)."""
    shape = keras.ops.shape(x)
    c = x.shape[-1]
    x = keras.ops.reshape(x, (-1, shape[1], shape[2], groups, c // groups))
    x = keras.ops.transpose(x, (0, 1, 2, 4, 3))
    return keras.ops.reshape(x, (-1, shape[1], shape[2], c))


def partial_channel_mix(inputs, k: int, strides: int, mix):
    """PC-DARTS: ``mix`` the first 1/k of the channels, bypass the rest, shuffle.

    The bypassed channels are max-pooled 2x2 at stride 2 so that both parts agree in size.
    """
    c = inputs.shape[-1]
    mixed = mix(inputs[..., : c // k])
    rest = inputs[..., c // k :]
    if strides == 2:
        rest = keras.ops.max_pool(rest, 2, 2, padding="same")
    return channel_shuffle(keras.ops.concatenate([mixed, rest], axis=-1), k)


def _channel_adapter(width: int, rank: int, dtype) -> layers.Layer:
    """A learnable 1x1 projection to ``width`` channels (Dense on the last axis off images)."""
    if rank == 4:
        return layers.Conv2D(width, 1, use_bias=False, dtype=dtype)
    return layers.Dense(width, use_bias=False, dtype=dtype)


def alpha_owning_mixed_ops(model: keras.layers.Layer) -> list[MixedOp]:
    """The MixedOps of ``model`` that own their alpha (each makes its own choice), in the
    order Keras tracks them; MixedOps sharing an owner's alpha are left out."""
    return [
        layer
        for layer in model._flatten_layers(include_self=False)
        if isinstance(layer, MixedOp) and layer.owns_alpha
    ]


_overrides = threading.local()


@contextlib.contextmanager
def override_mixing_weights(weights: Mapping[MixedOp, object]):
    """Within the block, each MixedOp in ``weights`` mixes its candidates with the given
    weights (``[n]``) instead of its alpha's, wherever the model calls it (a call that
    passes ``mixing_weights`` itself still wins). Inside a ``tf.function`` the weights may be
    the function's arguments, so one trace serves every set of weights.

    DARTS-PT's selection on a user's model (``keras_das.engine.selection``) uses it to take
    one candidate out of one MixedOp at a time.
    """
    previous = getattr(_overrides, "weights", {})
    _overrides.weights = {**previous, **{id(mix): w for mix, w in weights.items()}}
    try:
        yield
    finally:
        _overrides.weights = previous

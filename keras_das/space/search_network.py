"""The DARTS search space: a cell of MixedOps over a DAG, and the supernet of such cells."""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np
from keras import layers

from keras_das.space import fused_cell
from keras_das.space import genotype as genotype_lib
from keras_das.space import primitives
from keras_das.space import relaxations
from keras_das.space import topology
from keras_das.space import variables
from keras_das.space.mixed_op import MixedOp

CELL_IMPLEMENTATIONS = ("auto", "fused", "per_edge")


def reduction_layers(num_cells: int) -> tuple[int, ...]:
    """Cells that halve the resolution: at 1/3 and 2/3 of the depth, as in DARTS."""
    return tuple(sorted({num_cells // 3, 2 * num_cells // 3}))


def preprocess(channels: int, reduction_prev: bool, affine: bool, dtype=None) -> layers.Layer:
    """How a cell reads the output of the cell two back and of the cell before."""
    if reduction_prev:
        return primitives.FactorizedReduce(channels, affine=affine, dtype=dtype)
    return primitives.ReLUConvBN(channels, 1, affine=affine, dtype=dtype)


def stem(channels: int, dtype=None) -> list[layers.Layer]:
    """The first layers of a network: 3x3 convolution to ``channels``, batch norm."""
    return [
        layers.Conv2D(channels, 3, padding="same", use_bias=False, dtype=dtype),
        primitives.batch_norm(affine=True, dtype=dtype),
    ]


@keras.saving.register_keras_serializable(package="keras_das")
class SearchCell(layers.Layer):
    """A DARTS search cell: 2 inputs, ``steps`` nodes, a MixedOp on every edge.

    Node ``i`` sums a MixedOp over every earlier node (the two inputs included); the cell
    outputs the concatenation of its last ``multiplier`` nodes. In a reduction cell the
    edges from the inputs have stride 2. The MixedOps share the mixing weights the network
    passes in (``[num_edges, num_ops]``).

    Call with ``cell([s0, s1], mixing_weights)``; optionally ``edge_weights`` (``[num_edges]``,
    PC-DARTS's edge normalisation: each edge's output is scaled by its weight) and
    ``aux_skip_beta`` (DARTS-: every stride-1 edge also adds ``beta * input``).
    ``partial_channels`` is PC-DARTS's K (see ``MixedOp``).
    """

    def __init__(
        self,
        channels,
        reduction=False,
        reduction_prev=False,
        op_names=primitives.DARTS_OPS,
        steps=4,
        multiplier=4,
        partial_channels=1,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.partial_channels = partial_channels
        self.channels = channels
        self.reduction = reduction
        self.reduction_prev = reduction_prev
        self.op_names = primitives.check_op_names(op_names)
        self.steps = steps
        self.multiplier = multiplier
        dtype = self.dtype_policy
        self.preprocess0 = preprocess(channels, reduction_prev, affine=False, dtype=dtype)
        self.preprocess1 = preprocess(channels, False, affine=False, dtype=dtype)
        self.edges = []
        for node in range(steps):
            for j in range(2 + node):
                strides = 2 if reduction and j < 2 else 1
                self.edges.append(
                    MixedOp(
                        self.op_names,
                        channels=channels,
                        strides=strides,
                        affine=False,
                        owns_alpha=False,
                        partial_channels=partial_channels,
                        name=f"edge_{node}_{j}",
                        dtype=dtype,
                    )
                )

    def build(self, input_shape):
        s0_shape, s1_shape = (tuple(s) for s in input_shape)
        self.preprocess0.build(s0_shape)
        self.preprocess1.build(s1_shape)
        state = tuple(self.preprocess1.compute_output_shape(s1_shape))
        node_shape = primitives.strided_shape(state, 2, self.channels) if self.reduction else state
        edge = 0
        for node in range(self.steps):
            for j in range(2 + node):
                self.edges[edge].build(state if j < 2 else node_shape)
                edge += 1

    def compute_output_shape(self, input_shape):
        return topology.cell_output_shape(
            input_shape, self.channels, self.reduction, self.multiplier
        )

    def call(self, inputs, mixing_weights, edge_weights=None, aux_skip_beta=None, training=None):
        s0, s1 = inputs
        states = [self.preprocess0(s0, training=training), self.preprocess1(s1, training=training)]
        edge = 0
        for _ in range(self.steps):
            total = None
            for j, h in enumerate(states):
                out = self.edges[edge](h, mixing_weights=mixing_weights[edge], training=training)
                if aux_skip_beta is not None and not (self.reduction and j < 2):
                    out = out + keras.ops.cast(aux_skip_beta, out.dtype) * h
                if edge_weights is not None:
                    out = keras.ops.cast(edge_weights[edge], out.dtype) * out
                total = out if total is None else total + out
                edge += 1
            states.append(total)
        return keras.ops.concatenate(states[-self.multiplier :], axis=-1)

    def get_config(self):
        return {
            **super().get_config(),
            "channels": self.channels,
            "reduction": self.reduction,
            "reduction_prev": self.reduction_prev,
            "op_names": list(self.op_names),
            "steps": self.steps,
            "multiplier": self.multiplier,
            "partial_channels": self.partial_channels,
        }


def edge_normalization_weights(betas, steps: int):
    """PC-DARTS's edge weights: a softmax over each node's incoming edges' betas."""
    parts = []
    start = 0
    for node in range(steps):
        parts.append(keras.ops.softmax(betas[start : start + 2 + node], axis=-1))
        start += 2 + node
    return keras.ops.concatenate(parts, axis=0)


@keras.saving.register_keras_serializable(package="keras_das")
class SearchNetwork(keras.Model):
    """The DARTS supernet: stem, search cells, global pool, classifier.

    All normal cells share ``alpha_normal`` and all reduction cells ``alpha_reduce``
    (``[num_edges, num_ops]`` each, initialised ``1e-3 * N(0, 1)``).

    Args:
        num_classes: classifier outputs (logits).
        channels: initial channels C; reduction cells double it.
        num_cells: number of cells; reduction cells sit at 1/3 and 2/3 of the depth.
        steps: intermediate nodes per cell.
        multiplier: nodes concatenated into a cell's output.
        stem_multiplier: the stem outputs ``stem_multiplier * channels``.
        op_names: the candidate ops on every edge.
        relaxation: see ``keras_das.space.relaxations``.
        temperature: initial temperature of the relaxation.
        seed: seeds the alphas and the Gumbel noise.
        genotype_max_skips: P-DARTS's cap on skip connections in the derived normal cell
            (None: none), used by ``genotype()``.
        genotype_min_param_ops: every input-to-output path of the derived normal cell
            passes this many parameterised ops (0: no constraint), used by ``genotype()``.
        cell_implementation: ``fused`` (``keras_das.space.fused_cell.FusedSearchCell``: the ops
            of all edges leaving a node computed together, several times fewer graph ops
            and the same numbers), ``per_edge`` (``SearchCell``: a MixedOp per edge, the
            reference) or ``auto`` (fused when every op in ``op_names`` can be fused,
            else per-edge). The attribute and the config hold the resolved choice, so a
            saved network reloads with the variables it was saved with.
    """

    owns_alpha = True  # the cells' MixedOps share its alphas

    def __init__(
        self,
        num_classes=10,
        channels=16,
        num_cells=8,
        steps=4,
        multiplier=4,
        stem_multiplier=3,
        op_names=primitives.DARTS_OPS,
        relaxation="softmax",
        temperature=1.0,
        seed=None,
        cell_implementation="auto",
        genotype_max_skips=None,
        genotype_min_param_ops=0,
        partial_channels=1,
        edge_normalization=False,
        aux_skip=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        for field, value in (
            ("num_classes", num_classes),
            ("channels", channels),
            ("num_cells", num_cells),
            ("steps", steps),
            ("multiplier", multiplier),
            ("stem_multiplier", stem_multiplier),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{field} must be a positive int, got {value!r}")
        if multiplier > steps:
            raise ValueError(f"multiplier={multiplier} exceeds the {steps} nodes of a cell")
        self.num_classes = num_classes
        self.channels = channels
        self.num_cells = num_cells
        self.steps = steps
        self.multiplier = multiplier
        self.stem_multiplier = stem_multiplier
        self.op_names = primitives.check_op_names(op_names)
        self.relaxation = relaxations.check_relaxation(relaxation, len(self.op_names))
        self.initial_temperature = relaxations.check_temperature(temperature)
        self.seed = seed
        self.genotype_max_skips = genotype_max_skips
        self.genotype_min_param_ops = genotype_min_param_ops
        self.partial_channels = topology.check_partial_channels(partial_channels, channels)
        self.edge_normalization = bool(edge_normalization)
        self.aux_skip = bool(aux_skip)
        self.seed_generator = (
            keras.random.SeedGenerator(seed) if relaxation.startswith("gumbel") else None
        )
        self.cell_implementation = _resolve_cell_implementation(cell_implementation, self.op_names)
        dtype = self.dtype_policy
        self.stem = stem(stem_multiplier * channels, dtype)
        self.cells = self._make_cells()
        self.global_pool = layers.GlobalAveragePooling2D(dtype=dtype)
        self.classifier = layers.Dense(num_classes, dtype=dtype)

    def _make_cells(self) -> list[layers.Layer]:
        cell_class = SearchCell
        if self.cell_implementation == "fused":
            cell_class = fused_cell.FusedSearchCell
        cells = []
        c_curr = self.channels
        reduction_prev = False
        for i in range(self.num_cells):
            reduction = i in reduction_layers(self.num_cells)
            if reduction:
                c_curr *= 2
            cells.append(
                cell_class(
                    c_curr,
                    reduction,
                    reduction_prev,
                    self.op_names,
                    self.steps,
                    self.multiplier,
                    partial_channels=self.partial_channels,
                    name=f"cell_{i}",
                    dtype=self.dtype_policy,
                )
            )
            reduction_prev = reduction
        return cells

    def build(self, input_shape):
        shape = tuple(input_shape)
        for layer in self.stem:
            layer.build(shape)
            shape = tuple(layer.compute_output_shape(shape))
        s0 = s1 = shape
        for cell in self.cells:
            cell.build((s0, s1))
            s0, s1 = s1, cell.compute_output_shape((s0, s1))
        self.global_pool.build(s1)
        self.classifier.build((s1[0], s1[-1]))
        size = relaxations.alpha_size(self.relaxation, len(self.op_names))
        edges = topology.num_edges(self.steps)
        seed = self.seed
        self.alpha_normal = variables.add_arch_weight(
            self, "alpha_normal", (edges, size), seed=seed
        )
        self.alpha_reduce = variables.add_arch_weight(
            self, "alpha_reduce", (edges, size), seed=None if seed is None else seed + 1
        )
        self.temperature = variables.add_temperature(self, self.initial_temperature)
        if self.edge_normalization:  # PC-DARTS: one beta per edge, softmax per node
            self.beta_normal = variables.add_arch_weight(self, "beta_normal", (edges,), seed=seed)
            self.beta_reduce = variables.add_arch_weight(self, "beta_reduce", (edges,), seed=seed)
        if self.aux_skip:  # DARTS-: set by keras_das.engine.remedies.AuxiliarySkipSchedule
            self.aux_skip_beta = self.add_weight(
                name="aux_skip_beta", shape=(), initializer="ones", trainable=False
            )

    def compute_mixing_weights(self, training=False):
        """``(normal, reduce)`` mixing weights, ``[num_edges, num_ops]`` each."""
        return tuple(
            relaxations.mixing_weights(
                alpha, self.relaxation, self.temperature, training, self.seed_generator
            )
            for alpha in (self.alpha_normal, self.alpha_reduce)
        )

    def named_mixing_weights(self, training=False):
        """``{"normal": ..., "reduce": ...}`` (see ``keras_das.space.variables.arch_owners``)."""
        return dict(zip(("normal", "reduce"), self.compute_mixing_weights(training)))

    def call(self, inputs, training=None, mixing_weights=None):
        """Logits; ``mixing_weights=(normal, reduce)`` replaces the alphas' weights, e.g.
        ``genotype_weights(g)``: the derived network with the weights it inherits (then
        without edge normalisation or the auxiliary skip, which belong to the mixture)."""
        # Given weights describe a discrete choice: evaluated as such, without PC-DARTS's
        # edge weights or DARTS-'s auxiliary skip.
        mixture = mixing_weights is None
        if mixture:
            mixing_weights = self.compute_mixing_weights(bool(training))
        weights_normal, weights_reduce = mixing_weights
        use_edges = mixture and self.edge_normalization
        edge_normal, edge_reduce = self.edge_weights() if use_edges else (None, None)
        aux_skip_beta = self.aux_skip_beta if mixture and self.aux_skip else None
        x = inputs
        for layer in self.stem:
            x = layer(x, training=training)
        s0 = s1 = x
        for cell in self.cells:
            weights = weights_reduce if cell.reduction else weights_normal
            extras = {}
            if use_edges:
                extras["edge_weights"] = edge_reduce if cell.reduction else edge_normal
            if aux_skip_beta is not None:
                extras["aux_skip_beta"] = aux_skip_beta
            s0, s1 = s1, cell([s0, s1], mixing_weights=weights, training=training, **extras)
        return self.classifier(self.global_pool(s1))

    def get_mixing_weights(self) -> dict[str, np.ndarray]:
        """The current noise-free mixing weights, ``{"normal": ..., "reduce": ...}``."""
        normal, reduce = self.compute_mixing_weights(training=False)
        return {
            "normal": keras.ops.convert_to_numpy(normal),
            "reduce": keras.ops.convert_to_numpy(reduce),
        }

    def edge_weights(self):
        """PC-DARTS edge-normalisation weights ``(normal, reduce)``, ``[num_edges]`` each."""
        return tuple(
            edge_normalization_weights(b, self.steps) for b in (self.beta_normal, self.beta_reduce)
        )

    def genotype_weights(self, genotype: genotype_lib.Genotype):
        """One-hot mixing weights ``(normal, reduce)`` on the (edge, op) pairs ``genotype``
        keeps, zero on every other edge: with them the supernet computes the derived
        network with the weights it inherits."""
        out = []
        for gene in (genotype.normal, genotype.reduce):
            w = np.zeros((topology.num_edges(self.steps), len(self.op_names)), np.float32)
            for position, (op, j) in enumerate(gene):
                node = position // genotype.inputs_per_node
                w[topology.edge_index(node, j), self.op_names.index(op)] = 1.0
            out.append(keras.ops.convert_to_tensor(w, dtype=self.compute_dtype))
        return tuple(out)

    def genotype(
        self, k: int = 2, max_skips=None, min_param_ops=None, weights=None
    ) -> genotype_lib.Genotype:
        """The architecture the current alphas choose, by the DARTS rule.

        ``max_skips`` and ``min_param_ops`` constrain the normal cell (see
        ``keras_das.space.genotype.derive_genotype``); they default to the network's
        ``genotype_max_skips`` / ``genotype_min_param_ops``. ``weights``
        (``{"normal": [edges, ops], "reduce": ...}``) ranks the (edge, op) pairs instead of
        the mixing weights, e.g. ``keras_das.engine.selection``'s perturbation scores.
        """
        if max_skips is None:
            max_skips = self.genotype_max_skips
        if min_param_ops is None:
            min_param_ops = self.genotype_min_param_ops
        given = weights is not None
        weights = dict(weights) if given else self.get_mixing_weights()
        if self.edge_normalization and not given:  # PC-DARTS: op weight times edge weight
            for cell, edge in zip(("normal", "reduce"), self.edge_weights()):
                weights[cell] = weights[cell] * keras.ops.convert_to_numpy(edge)[:, None]
        return genotype_lib.derive_genotype(
            weights["normal"],
            weights["reduce"],
            self.op_names,
            self.steps,
            k,
            concat=range(2 + self.steps - self.multiplier, 2 + self.steps),
            max_skips=max_skips,
            min_param_ops=min_param_ops,
        )

    def get_config(self):
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "channels": self.channels,
            "num_cells": self.num_cells,
            "steps": self.steps,
            "multiplier": self.multiplier,
            "stem_multiplier": self.stem_multiplier,
            "op_names": list(self.op_names),
            "relaxation": self.relaxation,
            "temperature": self.initial_temperature,
            "seed": self.seed,
            "partial_channels": self.partial_channels,
            "edge_normalization": self.edge_normalization,
            "aux_skip": self.aux_skip,
            "genotype_max_skips": self.genotype_max_skips,
            "genotype_min_param_ops": self.genotype_min_param_ops,
            "cell_implementation": self.cell_implementation,
        }


def _resolve_cell_implementation(name: str, op_names: Sequence[str]) -> str:
    """``fused`` or ``per_edge`` for the ``cell_implementation`` argument ``name``.

    Only the ops decide: both cells implement every remedy (partial channels, edge
    normalisation, the auxiliary skip).
    """
    if name not in CELL_IMPLEMENTATIONS:
        raise ValueError(
            f"Unknown cell_implementation {name!r}; expected one of {list(CELL_IMPLEMENTATIONS)}"
        )
    if name == "per_edge":
        return "per_edge"
    if name == "fused":
        fused_cell.check_fusable(op_names)
        return name
    return "per_edge" if fused_cell.unfusable_ops(op_names) else "fused"

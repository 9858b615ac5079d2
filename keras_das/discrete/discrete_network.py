"""The discrete network a genotype describes, for retraining from scratch (DARTS NetworkCIFAR)."""

from __future__ import annotations

import keras
from keras import layers

from keras_das.discrete import training
from keras_das.space import genotype as genotype_lib
from keras_das.space import primitives
from keras_das.space import topology
from keras_das.space.search_network import preprocess
from keras_das.space.search_network import reduction_layers
from keras_das.space.search_network import stem


@keras.saving.register_keras_serializable(package="keras_das")
class DropPath(layers.Layer):
    """Drops a whole op output per example with probability ``rate`` while training.

    Kept outputs are scaled by ``1 / (1 - rate)``. ``rate`` is read from a variable the
    network owns, so a schedule can ramp it per epoch without retracing.
    """

    def __init__(self, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs, rate, training=None):
        if not training:
            return inputs
        keep = 1.0 - keras.ops.cast(rate, inputs.dtype)
        shape = (keras.ops.shape(inputs)[0], 1, 1, 1)
        noise = keras.random.uniform(shape, dtype=inputs.dtype, seed=self.seed_generator)
        mask = keras.ops.cast(noise < keep, inputs.dtype)
        return inputs * mask / keep

    def get_config(self):
        return {**super().get_config(), "seed": self.seed}


@keras.saving.register_keras_serializable(package="keras_das")
class Cell(layers.Layer):
    """A cell built from one half of a genotype (affine batch norms, plain pools).

    Call with ``cell([s0, s1], drop_path_rate)``. Drop-path applies to every op but the
    identity, as in DARTS.
    """

    def __init__(
        self,
        gene,
        concat,
        channels,
        reduction=False,
        reduction_prev=False,
        inputs_per_node=2,
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.gene = tuple((op, int(index)) for op, index in gene)
        self.concat = tuple(int(i) for i in concat)
        self.channels = channels
        self.reduction = reduction
        self.reduction_prev = reduction_prev
        self.inputs_per_node = inputs_per_node
        self.seed = seed
        dtype = self.dtype_policy
        self.preprocess0 = preprocess(channels, reduction_prev, affine=True, dtype=dtype)
        self.preprocess1 = preprocess(channels, False, affine=True, dtype=dtype)
        self.edge_ops = [
            primitives.make_op(op, channels, 2 if reduction and index < 2 else 1, True, dtype)
            for op, index in self.gene
        ]
        self.drop_path = DropPath(seed=seed, dtype=dtype)

    @property
    def steps(self):
        return len(self.gene) // self.inputs_per_node

    def build(self, input_shape):
        s0_shape, s1_shape = (tuple(s) for s in input_shape)
        self.preprocess0.build(s0_shape)
        self.preprocess1.build(s1_shape)
        state = tuple(self.preprocess1.compute_output_shape(s1_shape))
        node_shape = primitives.strided_shape(state, 2, self.channels) if self.reduction else state
        for op, (_, index) in zip(self.edge_ops, self.gene):
            op.build(state if index < 2 else node_shape)

    def compute_output_shape(self, input_shape):
        return topology.cell_output_shape(
            input_shape, self.channels, self.reduction, len(self.concat)
        )

    def call(self, inputs, drop_path_rate=0.0, training=None):
        s0, s1 = inputs
        states = [self.preprocess0(s0, training=training), self.preprocess1(s1, training=training)]
        k = self.inputs_per_node
        for node in range(self.steps):
            total = None
            for e in range(node * k, (node + 1) * k):
                op, index = self.edge_ops[e], self.gene[e][1]
                h = op(states[index], training=training)
                if not getattr(op, "is_identity", False):
                    h = self.drop_path(h, rate=drop_path_rate, training=training)
                total = h if total is None else total + h
            states.append(total)
        return keras.ops.concatenate([states[i] for i in self.concat], axis=-1)

    def get_config(self):
        return {
            **super().get_config(),
            "gene": [list(e) for e in self.gene],
            "concat": list(self.concat),
            "channels": self.channels,
            "reduction": self.reduction,
            "reduction_prev": self.reduction_prev,
            "inputs_per_node": self.inputs_per_node,
            "seed": self.seed,
        }


@keras.saving.register_keras_serializable(package="keras_das")
class AuxiliaryHead(layers.Layer):
    """DARTS's auxiliary classifier on the 8x8 maps after the second reduction cell.

    ReLU, 5x5 average pool stride 3, 1x1 conv to 128, BN, ReLU, 2x2 conv to 768, BN, ReLU,
    dense. On maps smaller than 8x8 the 2x2 conv shrinks to fit (a 1x1 map gets a 1x1 conv).
    """

    def __init__(self, num_classes, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = num_classes
        dtype = self.dtype_policy
        self.conv1 = layers.Conv2D(128, 1, use_bias=False, dtype=dtype)
        self.bn1 = primitives.batch_norm(affine=True, dtype=dtype)
        self.bn2 = primitives.batch_norm(affine=True, dtype=dtype)
        self.classifier = layers.Dense(num_classes, dtype=dtype)

    def build(self, input_shape):
        size = (
            (input_shape[1] - 5) // 3 + 1
            if input_shape[1] is not None and input_shape[1] >= 5
            else 1
        )
        kernel = max(1, min(2, size))
        self.conv2 = layers.Conv2D(768, kernel, use_bias=False, dtype=self.dtype_policy)
        pooled = (input_shape[0], size, size, input_shape[-1])
        self.conv1.build(pooled)
        self.bn1.build(pooled[:-1] + (128,))
        self.conv2.build(pooled[:-1] + (128,))
        out = tuple(self.conv2.compute_output_shape(pooled[:-1] + (128,)))
        self.bn2.build(out)
        self.classifier.build((input_shape[0], 768))

    def call(self, inputs, training=None):
        x = keras.ops.relu(inputs)
        if x.shape[1] is not None and x.shape[1] >= 5:
            x = keras.ops.average_pool(x, 5, 3, padding="valid")
        else:
            x = keras.ops.mean(x, axis=(1, 2), keepdims=True)
        x = keras.ops.relu(self.bn1(self.conv1(x), training=training))
        x = keras.ops.relu(self.bn2(self.conv2(x), training=training))
        return self.classifier(keras.ops.mean(x, axis=(1, 2)))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_classes)

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes}


@keras.saving.register_keras_serializable(package="keras_das")
class DiscreteNetwork(training.DartsUpdates, keras.Model):
    """The network a genotype describes (DARTS ``NetworkCIFAR``), for retraining.

    Args:
        genotype: a ``Genotype``, or its dict / JSON form.
        num_classes: classifier outputs (logits).
        channels: initial channels C (36 in the DARTS CIFAR-10 recipe).
        num_cells: number of cells (20); reduction cells at 1/3 and 2/3 of the depth.
        auxiliary: add the auxiliary head after the second reduction cell. While training
            the model then returns ``(logits, aux_logits)`` and its loss adds
            ``auxiliary_weight`` times the auxiliary loss; at inference it returns logits.
        auxiliary_weight: weight of the auxiliary loss (0.4 in DARTS).
        stem_multiplier: the stem outputs ``stem_multiplier * channels``.
        seed: seeds the drop-path masks.

    ``drop_path_rate`` is a non-trainable variable (0 by default) a callback ramps during
    training, as DARTS ramps it linearly to 0.2 over the epochs.
    """

    def __init__(
        self,
        genotype,
        num_classes=10,
        channels=36,
        num_cells=20,
        auxiliary=False,
        auxiliary_weight=0.4,
        stem_multiplier=3,
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if isinstance(genotype, str):
            genotype = genotype_lib.Genotype.from_json(genotype)
        elif isinstance(genotype, dict):
            genotype = genotype_lib.Genotype.from_dict(genotype)
        genotype.validate_ops()
        self.genotype = genotype
        self.num_classes = num_classes
        self.channels = channels
        self.num_cells = num_cells
        self.auxiliary = auxiliary
        self.auxiliary_weight = auxiliary_weight
        self.stem_multiplier = stem_multiplier
        self.seed = seed
        dtype = self.dtype_policy
        self.stem = stem(stem_multiplier * channels, dtype)
        reductions = reduction_layers(num_cells)
        self.auxiliary_after = reductions[-1]
        self.cells = []
        c_curr = channels
        reduction_prev = False
        for i in range(num_cells):
            reduction = i in reductions
            if reduction:
                c_curr *= 2
            gene, concat = (
                (genotype.reduce, genotype.reduce_concat)
                if reduction
                else (genotype.normal, genotype.normal_concat)
            )
            self.cells.append(
                Cell(
                    gene,
                    concat,
                    c_curr,
                    reduction,
                    reduction_prev,
                    genotype.inputs_per_node,
                    seed=None if seed is None else seed + i,
                    name=f"cell_{i}",
                    dtype=dtype,
                )
            )
            reduction_prev = reduction
        self.auxiliary_head = AuxiliaryHead(num_classes, dtype=dtype) if auxiliary else None
        self.global_pool = layers.GlobalAveragePooling2D(dtype=dtype)
        self.classifier = layers.Dense(num_classes, dtype=dtype)

    def build(self, input_shape):
        shape = tuple(input_shape)
        for layer in self.stem:
            layer.build(shape)
            shape = tuple(layer.compute_output_shape(shape))
        s0 = s1 = shape
        for i, cell in enumerate(self.cells):
            cell.build((s0, s1))
            s0, s1 = s1, cell.compute_output_shape((s0, s1))
            if i == self.auxiliary_after and self.auxiliary_head is not None:
                self.auxiliary_head.build(s1)
        self.global_pool.build(s1)
        self.classifier.build((s1[0], s1[-1]))
        self.drop_path_rate = self.add_weight(
            name="drop_path_rate", shape=(), initializer="zeros", trainable=False
        )

    def call(self, inputs, training=None):
        x = inputs
        for layer in self.stem:
            x = layer(x, training=training)
        s0 = s1 = x
        aux_logits = None
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell([s0, s1], drop_path_rate=self.drop_path_rate, training=training)
            if i == self.auxiliary_after and self.auxiliary_head is not None and training:
                aux_logits = self.auxiliary_head(s1, training=training)
        logits = self.classifier(self.global_pool(s1))
        return logits if aux_logits is None else (logits, aux_logits)

    # The auxiliary head adds to the loss only; metrics see the main logits.
    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        if isinstance(y_pred, (tuple, list)):
            logits, aux_logits = y_pred
            loss = super().compute_loss(x, y, logits, sample_weight, training)
            aux = self._compile_loss(y, aux_logits, sample_weight)
            return loss + keras.ops.cast(self.auxiliary_weight, loss.dtype) * aux
        return super().compute_loss(x, y, y_pred, sample_weight, training)

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        if isinstance(y_pred, (tuple, list)):
            y_pred = y_pred[0]
        return super().compute_metrics(x, y, y_pred, sample_weight)

    def get_config(self):
        return {
            **super().get_config(),
            "genotype": self.genotype.to_dict(),
            "num_classes": self.num_classes,
            "channels": self.channels,
            "num_cells": self.num_cells,
            "auxiliary": self.auxiliary,
            "auxiliary_weight": self.auxiliary_weight,
            "stem_multiplier": self.stem_multiplier,
            "seed": self.seed,
        }

"""Training a network with DARTS's update rule: ``DartsUpdates`` for any Keras model.

``DiscreteNetwork`` mixes it in; ``Retraining`` wraps a plain Keras model (a
``keras_das.discretize`` result, say) so that ``keras_das.train`` retrains it exactly as it
retrains a genotype: coupled L2 weight decay and a global-norm clip of the gradients summed
over replicas (``keras_das.engine.updates``), not Keras's decoupled decay and per-replica
clip.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from keras_das.engine import updates


class DartsUpdates:
    """A ``keras.Model`` mixin: ``compile(weight_decay=..., grad_clip=...)`` and a
    ``train_step`` that applies them as DARTS does (put it before ``keras.Model``)."""

    def compile(self, *args, weight_decay: float = 0.0, grad_clip: float | None = None, **kwargs):
        """``keras.Model.compile`` plus the DARTS update rule.

        Args:
            weight_decay: L2 decay coupled into the gradient (``g + wd * w``, PyTorch SGD's
                ``weight_decay``; 3e-4 in DARTS), not Keras's decoupled ``weight_decay``.
            grad_clip: clip the global norm of the gradients summed over replicas (5 in
                DARTS), not Keras's per-replica ``global_clipnorm``.
        """
        optimizer = kwargs.get("optimizer", args[0] if args else None)
        if isinstance(optimizer, keras.optimizers.Optimizer):
            updates.check_optimizer("optimizer", optimizer)
        self.weight_decay = float(weight_decay)
        self.grad_clip = grad_clip
        super().compile(*args, **kwargs)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Under a tf.distribute strategy Keras pulls one batch from the training iterator
        # (which is then never trained on) to build the model symbolically, and its
        # reduction of that batch fails under MultiWorkerMirroredStrategy. This model is
        # built before it is compiled, so there is nothing to build.
        if self.built and self.compiled:
            return
        super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def get_compile_config(self):
        config = super().get_compile_config()
        if config:
            config.update(weight_decay=self.weight_decay, grad_clip=self.grad_clip)
        return config

    def compile_from_config(self, config):
        # Keras skips models whose compile() is overridden; this one takes Keras's config.
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.built:  # so that the saved optimizer state can be loaded into it
            self.optimizer.build(self.trainable_variables)

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.compute_loss(x, y, y_pred, sample_weight, training=True)
        grads = tape.gradient(loss, self.trainable_variables)
        updates.apply_gradients(
            self.optimizer, grads, self.trainable_variables, self.weight_decay, self.grad_clip
        )
        for metric in self.metrics:  # as in the Keras guide to customising fit()
            if metric.name == "loss":
                metric.update_state(loss * updates.num_replicas())
        return updates.mean_over_replicas(self.compute_metrics(x, y, y_pred, sample_weight))

    def test_step(self, data):
        return updates.mean_over_replicas(super().test_step(data))


@keras.saving.register_keras_serializable(package="keras_das")
class Retraining(DartsUpdates, keras.Model):
    """``network`` trained with DARTS's update rule; save ``network`` itself, which stays a
    plain Keras model.

    Args:
        network: a built Keras model.
    """

    def __init__(self, network: keras.Model, **kwargs):
        super().__init__(**kwargs)
        self.network = network

    def call(self, inputs, training=None):
        return self.network(inputs, training=training)

    def build(self, input_shape):
        if not self.network.built:
            self.network.build(input_shape)
        self.built = True

    def get_config(self):
        return {
            **super().get_config(),
            "network": keras.saving.serialize_keras_object(self.network),
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["network"] = keras.saving.deserialize_keras_object(config["network"])
        return cls(**config)

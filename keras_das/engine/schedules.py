"""Learning-rate schedules of the DARTS recipes."""

from __future__ import annotations

import math

import keras


@keras.saving.register_keras_serializable(package="keras_das")
class EpochCosineDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Cosine annealing stepped per epoch, as PyTorch's ``CosineAnnealingLR`` in DARTS.

    ``lr(e) = lr_min + (lr_max - lr_min) * (1 + cos(pi * e / epochs)) / 2`` for epoch
    ``e = step // steps_per_epoch``: constant within an epoch, ``lr_max`` in the first.

    Args:
        initial_learning_rate: ``lr_max`` (0.025 in DARTS).
        epochs: the cosine's half period (the number of training epochs).
        steps_per_epoch: optimizer steps per epoch.
        min_learning_rate: ``lr_min`` (0.001 in the DARTS search, 0 in retraining).
    """

    def __init__(self, initial_learning_rate, epochs, steps_per_epoch, min_learning_rate=0.0):
        for name, value in (("epochs", epochs), ("steps_per_epoch", steps_per_epoch)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.initial_learning_rate = float(initial_learning_rate)
        self.epochs = epochs
        self.steps_per_epoch = steps_per_epoch
        self.min_learning_rate = float(min_learning_rate)

    def __call__(self, step):
        epoch = keras.ops.floor_divide(keras.ops.cast(step, "int64"), self.steps_per_epoch)
        progress = keras.ops.cast(epoch, "float32") / float(self.epochs)
        cosine = 0.5 * (1.0 + keras.ops.cos(math.pi * progress))
        return (
            self.min_learning_rate + (self.initial_learning_rate - self.min_learning_rate) * cosine
        )

    def get_config(self):
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "epochs": self.epochs,
            "steps_per_epoch": self.steps_per_epoch,
            "min_learning_rate": self.min_learning_rate,
        }

"""Keras callbacks for architecture search."""

from __future__ import annotations

import json

import keras
import numpy as np

from keras_das import io_utils
from keras_das import variables


class MixingWeightsHistory(keras.callbacks.Callback):
    """Records the mixing weights (and the derived genotype) at the end of every epoch.

    After ``fit``, ``history.weights[name]`` is a list with one ``[..., num_ops]`` array per
    epoch for every owner of alphas (``"search_network/normal"``, a MixedOp's name, ...), and
    ``history.genotypes`` the genotype derived each epoch when the supernet has
    ``genotype()`` (a ``SearchNetwork``). With ``path``, the history is also written there
    as JSON after every epoch, atomically, so it survives an interrupted search.

    Args:
        path: optional JSON file to write.
        initial: a history to continue (``MixingWeightsHistory.load(path)``), when resuming.
    """

    def __init__(self, path: str | None = None, initial: dict | None = None):
        super().__init__()
        self.path = path
        initial = initial or {}
        self.epochs = list(initial.get("epochs", []))
        self.weights = {
            k: [np.asarray(w) for w in v] for k, v in initial.get("weights", {}).items()
        }
        self.genotypes = list(initial.get("genotypes", []))

    @property
    def supernet(self):
        return getattr(self.model, "supernet", self.model)

    def on_epoch_end(self, epoch, logs=None):
        # Drop records of epochs being re-run after a resume.
        keep = [i for i, e in enumerate(self.epochs) if e < epoch]
        self.epochs = [self.epochs[i] for i in keep] + [epoch]
        for name, w in variables.mixing_weights(self.supernet).items():
            past = self.weights.get(name, [])
            self.weights[name] = [past[i] for i in keep if i < len(past)] + [
                keras.ops.convert_to_numpy(w)
            ]
        if hasattr(self.supernet, "genotype"):
            self.genotypes = [self.genotypes[i] for i in keep if i < len(self.genotypes)]
            self.genotypes.append(self.supernet.genotype().to_dict())
        if self.path:
            io_utils.atomic_write_text(self.path, json.dumps(self.to_dict()) + "\n")

    def to_dict(self) -> dict:
        return {
            "epochs": self.epochs,
            "weights": {k: [w.tolist() for w in v] for k, v in self.weights.items()},
            "genotypes": self.genotypes,
        }

    @staticmethod
    def load(path: str) -> dict:
        with open(path) as f:
            return json.load(f)

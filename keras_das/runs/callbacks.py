"""Keras callbacks for architecture search."""

from __future__ import annotations

import json
import os

import keras
import numpy as np
import tensorflow as tf

from keras_das import io_utils
from keras_das.runs import plot
from keras_das.space import relaxations
from keras_das.space import topology
from keras_das.space.mixed_op import alpha_owning_mixed_ops


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
        self.genotype = None  # this epoch's Genotype: the one derivation other callbacks read

    @property
    def supernet(self):
        return getattr(self.model, "supernet", self.model)

    def on_epoch_end(self, epoch, logs=None):
        # Drop records of epochs being re-run after a resume.
        keep = [i for i, e in enumerate(self.epochs) if e < epoch]
        self.epochs = [self.epochs[i] for i in keep] + [epoch]
        for name, w in relaxations.model_mixing_weights(self.supernet).items():
            past = self.weights.get(name, [])
            self.weights[name] = [past[i] for i in keep if i < len(past)] + [
                keras.ops.convert_to_numpy(w)
            ]
        if hasattr(self.supernet, "genotype"):
            self.genotypes = [self.genotypes[i] for i in keep if i < len(self.genotypes)]
            self.genotype = self.supernet.genotype()
            self.genotypes.append(self.genotype.to_dict())
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


class NaNGuard(keras.callbacks.Callback):
    """Stops training at the first batch whose loss is NaN or infinite, and remembers where.

    Unlike ``keras.callbacks.TerminateOnNaN`` it records the epoch and step, so that the
    run can fail with a message naming them (``failure``), and checkpoints are not written
    for the failed epoch (``CheckpointEveryEpoch`` checks ``failure``).
    """

    def __init__(self, steps_per_epoch: int | None = None):
        super().__init__()
        self.steps_per_epoch = steps_per_epoch
        self.failure = None
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(float(loss)):
            step = (
                self._epoch * (self.steps_per_epoch or 0) + batch if self.steps_per_epoch else None
            )
            self.failure = {
                "epoch": self._epoch,
                "batch": batch,
                "global_step": step,
                "loss": float(loss),
            }
            self.model.stop_training = True

    def message(self, last_checkpoint: str | None) -> str:
        f = self.failure
        where = f"epoch {f['epoch'] + 1}, step {f['batch'] + 1}"
        if f["global_step"] is not None:
            where += f" (global step {f['global_step'] + 1})"
        kept = (
            f"the last good checkpoint is {last_checkpoint}"
            if last_checkpoint
            else "no checkpoint was written before it"
        )
        return f"The training loss became {f['loss']} at {where}; stopped. {kept}."


class CheckpointEveryEpoch(keras.callbacks.Callback):
    """Saves a ``keras_das.runs.checkpoint.Checkpoint`` after every ``every`` epochs (and the last).

    Skips an epoch that a ``NaNGuard`` stopped, keeping the last good checkpoint.
    """

    def __init__(
        self,
        checkpoint,
        epochs: int,
        every: int = 1,
        nan_guard: NaNGuard | None = None,
    ):
        super().__init__()
        self.checkpoint = checkpoint
        self.epochs = epochs
        self.every = max(1, int(every))
        self.nan_guard = nan_guard

    def on_epoch_end(self, epoch, logs=None):
        if self.nan_guard is not None and self.nan_guard.failure is not None:
            return
        finished = epoch + 1
        last = finished == self.epochs or self.model.stop_training  # e.g. stopped early
        if finished % self.every == 0 or last:
            self.checkpoint.save(finished)


class LearningRateLogger(keras.callbacks.Callback):
    """Adds the current learning rates to the epoch logs (so History and TensorBoard get them).

    Put it before ``keras.callbacks.TensorBoard`` in the callback list.
    """

    def __init__(self, optimizers: dict):
        super().__init__()
        self.optimizers = optimizers

    def on_epoch_begin(self, epoch, logs=None):
        # The rate the epoch trains with (read at its start: a schedule moves at its end).
        self._rates = {
            name: float(keras.ops.convert_to_numpy(optimizer.learning_rate))
            for name, optimizer in self.optimizers.items()
        }

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs.update(self._rates)


class DropPathSchedule(keras.callbacks.Callback):
    """Ramps a network's ``drop_path_rate`` linearly, ``rate * epoch / epochs``, as DARTS."""

    def __init__(self, rate: float, epochs: int):
        super().__init__()
        self.rate = rate
        self.epochs = epochs

    def on_epoch_begin(self, epoch, logs=None):
        self.model.drop_path_rate.assign(self.rate * epoch / self.epochs)


class _Artifacts(keras.callbacks.Callback):
    """What the two artifact writers share: the workdir, the run's history, and a summary
    writer for ``tensorboard_dir`` made on first use."""

    def __init__(
        self, workdir: str, history: MixingWeightsHistory, tensorboard_dir: str | None = None
    ):
        super().__init__()
        self.workdir = workdir
        self.history = history
        self.tensorboard_dir = tensorboard_dir
        self._writer = None

    def _summary_writer(self):
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.tensorboard_dir)
        return self._writer


class SearchArtifacts(_Artifacts):
    """Writes what a DARTS search produces after every epoch, each file atomically.

    - ``genotypes/epoch_NNN.json``, the derivation of the epoch (the history's);
    - ``genotype.png``, a picture of both cells;
    - ``alphas_normal.png`` / ``alphas_reduce.png``: each edge's mixing weights over epochs
      (from a ``MixingWeightsHistory``);
    - TensorBoard scalars ``mixing_weights/<cell>/<edge>/<op>`` under ``tensorboard_dir``.

    Args:
        workdir: the output folder.
        history: the ``MixingWeightsHistory`` of the run.
        tensorboard_dir: where to write the mixing-weight summaries (None: not written).
    """

    def on_epoch_end(self, epoch, logs=None):
        net = self.history.supernet
        genotype = self.history.genotype
        genotype.save(os.path.join(self.workdir, "genotypes", f"epoch_{epoch + 1:03d}.json"))
        plot.plot_genotype(
            genotype, os.path.join(self.workdir, "genotype.png"), title=f"after epoch {epoch + 1}"
        )
        labels = topology.edge_names(net.steps)
        for cell in ("normal", "reduce"):
            weights = self.history.weights.get(f"{net.name}/{cell}")
            if weights:
                plot.plot_weight_history(
                    weights,
                    net.op_names,
                    os.path.join(self.workdir, f"alphas_{cell}.png"),
                    labels,
                    title=f"{cell} cell mixing weights by epoch",
                )
        if self.tensorboard_dir:
            self._write_summaries(epoch + 1, net, labels)

    def _write_summaries(self, step, net, labels):
        with self._summary_writer().as_default():
            for cell, weights in net.get_mixing_weights().items():
                for e, label in enumerate(labels):
                    for o, op in enumerate(net.op_names):
                        tag = f"mixing_weights/{cell}/{label.replace('->', '_to_')}/{op}"
                        tf.summary.scalar(tag, weights[e, o], step=step)
        self._writer.flush()


class MixedOpArtifacts(_Artifacts):
    """Writes what a search of a user's model produces after every epoch, each file
    atomically: ``alphas/<MixedOp>.png`` (each MixedOp's mixing weights over epochs, from a
    ``MixingWeightsHistory``) and the TensorBoard scalars ``mixing_weights/<MixedOp>/<op>``
    under ``tensorboard_dir``.

    Args:
        workdir: the output folder.
        history: the ``MixingWeightsHistory`` of the run.
        tensorboard_dir: where to write the mixing-weight summaries (None: not written).
    """

    def on_epoch_end(self, epoch, logs=None):
        owners = {mix.name: mix for mix in alpha_owning_mixed_ops(self.history.supernet)}
        for name, owner in owners.items():
            weights = self.history.weights.get(name)
            if weights:
                plot.plot_weight_history(
                    [np.reshape(w, (1, -1)) for w in weights],
                    owner.candidate_names,
                    os.path.join(self.workdir, "alphas", f"{name}.png"),
                    [name],
                    title=f"{name}: mixing weights by epoch",
                )
        if self.tensorboard_dir:
            with self._summary_writer().as_default():
                for name, owner in owners.items():
                    for op, w in zip(owner.candidate_names, self.history.weights[name][-1]):
                        tf.summary.scalar(f"mixing_weights/{name}/{op}", w, step=epoch + 1)
            self._writer.flush()

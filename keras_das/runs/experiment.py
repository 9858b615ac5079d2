"""What every binary run shares, an ``Experiment``: the strategy and seeds, the workdir with
its resolved config, checkpoints to resume from, ``fit`` with a NaN stop and per-epoch
checkpoints, and the summary file."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile

import keras
import tensorflow as tf

from keras_das import io_utils
from keras_das.discrete import serving
from keras_das.runs import callbacks as callbacks_lib
from keras_das.runs import checkpoint as checkpoint_lib
from keras_das.runs import determinism
from keras_das.runs import distribution
from keras_das.runs import graph_options


@dataclasses.dataclass
class Experiment:
    """One run of a binary on a workdir (``start`` makes it).

    ``open_workdir`` makes the workdir; ``restore`` sets up the checkpoints and says where
    to resume; ``fit`` trains from there with a NaN stop and a checkpoint after every
    epoch; ``write_summary`` writes the run's summary (the chief's in the workdir, other
    workers' under ``workers/``).
    """

    config: object
    workdir: str
    strategy: tf.distribute.Strategy
    chief: bool
    checkpoint: checkpoint_lib.Checkpoint | None = None
    _shared: checkpoint_lib.Checkpoint | None = None

    @classmethod
    def start(cls, config, workdir: str) -> Experiment:
        """Makes the config's strategy (first: it may split the CPU into devices) and
        seeds; the workdir is untouched until ``open_workdir``."""
        strategy = distribution.make_strategy(config.distribution)
        determinism.set_seeds(config.seed, config.deterministic)
        graph_options.shorten_graph_optimization()  # after determinism's optimizer option
        return cls(config, workdir, strategy, distribution.is_chief(strategy))

    def open_workdir(self) -> None:
        """Makes the workdir and, on the chief, prepares it (``prepare_workdir``)."""
        os.makedirs(self.workdir, exist_ok=True)
        if self.chief:
            prepare_workdir(self.config, self.workdir)

    def restore(self, groups: dict) -> int:
        """Checkpoints ``groups`` (``{name: object with .variables}``) from now on and
        restores the latest checkpoint; returns the epochs it had finished (0: none)."""
        shared_dir = os.path.join(self.workdir, "checkpoints")
        # Non-chief workers of a multi-worker run checkpoint into a scratch folder.
        directory = shared_dir if self.chief else tempfile.mkdtemp()
        os.makedirs(directory, exist_ok=True)
        self.checkpoint = checkpoint_lib.Checkpoint(directory, groups)
        self._shared = checkpoint_lib.Checkpoint(shared_dir, groups)
        initial_epoch = self._shared.restore() or 0
        if initial_epoch:
            logging.info("Resuming %s after epoch %d", self.workdir, initial_epoch)
        return initial_epoch

    def fit(
        self,
        model,
        dataset,
        steps: int,
        initial_epoch: int,
        callbacks,
        *,
        optimizers: dict | None = None,
        checkpoint_every_epochs: int = 1,
        **fit_kwargs,
    ) -> dict:
        """``model.fit`` from ``initial_epoch`` to ``config.epochs``; returns the last
        epoch's metrics.

        ``callbacks``: ``(before, after)``: ``before`` run ahead of the epoch's checkpoint
        (state they set is saved with it), ``after`` behind it and only on the chief.
        ``optimizers`` (``{log name: optimizer}``) have their learning rates logged.

        Raises:
            FloatingPointError: the loss became NaN or infinite (named with its step and
                the last good checkpoint, which is kept).
        """
        before, after = callbacks
        every, epochs = checkpoint_every_epochs, self.config.epochs
        nan_guard = callbacks_lib.NaNGuard(steps)
        callbacks = [
            nan_guard,
            *before,
            callbacks_lib.CheckpointEveryEpoch(self.checkpoint, epochs, every, nan_guard),
            callbacks_lib.LearningRateLogger(optimizers or {}),
            *(after if self.chief else ()),
        ]
        if self.chief:
            tensorboard = os.path.join(self.workdir, "tensorboard")
            callbacks.append(keras.callbacks.TensorBoard(tensorboard, write_graph=False))
        history = model.fit(
            dataset,
            steps_per_epoch=steps,
            epochs=epochs,
            initial_epoch=initial_epoch,
            callbacks=callbacks,
            shuffle=False,  # the pipelines shuffle (deterministically, by epoch)
            **fit_kwargs,
        )
        if nan_guard.failure is not None:
            raise FloatingPointError(nan_guard.message(self._shared.latest()))
        return {k: float(v[-1]) for k, v in history.history.items()}

    def export(self, model, info, version: int | None = None) -> dict:
        """Exports ``model`` (taking the dataset's images) to ``workdir/export/<version>``
        for TF Serving, with TFLite files when ``config.export.tflite``; returns the
        summary's entries. A model TFLite cannot convert (Keras's ``UpSampling2D`` leaves
        TFLite a convolution of unknown height, for one) is exported without them, with a
        warning and the converter's reason under ``tflite_error``: the SavedModel is what
        the run promised, and the trained model must not be lost to the conversion."""
        inputs = getattr(model, "inputs", None)
        if inputs and len(inputs) == 1 and None in tuple(inputs[0].shape)[1:]:
            # A model of any image size (fully convolutional) serves the dataset's size.
            images = keras.Input(info.image_shape)
            model = keras.Model(images, model(images), name=model.name)
        kwargs = dict(version=version, mean=info.mean, std=info.std, overwrite=True)
        export_dir = os.path.join(self.workdir, "export")
        try:
            return {
                "export": serving.export(
                    model, export_dir, tflite=self.config.export.tflite, **kwargs
                )
            }
        except serving.TFLiteConversionError as error:
            reason = str(error.__cause__ or error).strip().splitlines()
            logging.warning(
                "TFLite cannot convert %s (%s); exporting the SavedModel without TFLite "
                "files (--config.export.tflite=False skips the attempt)",
                model.name,
                reason[0] if reason else error,
            )
            path = serving.export(model, export_dir, tflite=False, **kwargs)
            return {"export": path, "tflite_error": "\n".join(reason[:20])}

    def write_summary(self, name: str, summary: dict) -> None:
        """Writes ``summary`` as JSON to ``name`` in the workdir (other workers of a
        multi-worker run: ``workers/<task>/name``)."""
        folder = self.workdir
        if not self.chief:
            folder = os.path.join(self.workdir, "workers", distribution.task_name(self.strategy))
        io_utils.atomic_write_text(os.path.join(folder, name), json.dumps(summary, indent=2) + "\n")


def prepare_workdir(config, workdir: str) -> None:
    """The chief's start on ``workdir``: removes the temporary files that writes of a
    killed earlier run left (never half files), then writes the resolved config."""
    io_utils.remove_stale_temporaries(workdir, skip=("workers",))
    write_config(config, workdir)


def write_config(config, workdir: str) -> None:
    """Writes the resolved config to ``workdir/config.json``; logs what changed on a rerun."""
    path = os.path.join(workdir, "config.json")
    text = config.to_json_best_effort(indent=2, sort_keys=True)
    if os.path.exists(path):
        with open(path) as f:
            previous = f.read()
        if previous.strip() != text.strip():
            old, new = json.loads(previous), json.loads(text)
            changed = sorted(_diff(old, new))
            logging.warning("Resuming in %s with a changed config: %s", workdir, ", ".join(changed))
    io_utils.atomic_write_text(path, text + "\n")


def _diff(old, new, prefix=""):
    keys = set(old) | set(new) if isinstance(old, dict) and isinstance(new, dict) else None
    if keys is None:
        if old != new:
            yield prefix.rstrip(".")
        return
    for key in keys:
        if key not in old or key not in new:
            yield prefix + key
        else:
            yield from _diff(old[key], new[key], prefix + key + ".")

"""Checkpoints of a run: every variable it needs to resume, written atomically.

A checkpoint holds named groups of variables (the network with its alphas, batch-norm
statistics, temperatures and random-generator states; each optimizer's slots and step
counter) and the number of finished epochs, in one ``.npz`` file. The file is renamed
into place only once complete, and ``latest`` names it only after that, so a run killed
at any moment resumes from the last complete checkpoint.

(``tf.train.Checkpoint`` over Keras 3 layers restored trainable variables but not the
batch-norm statistics or the seed-generator states here, so keras_das writes its own.)
"""

from __future__ import annotations

import json
import os
import re

import numpy as np

from keras_das import io_utils

_LATEST = "latest.json"


class Checkpoint:
    """Saves and restores groups of variables under ``directory``.

    Args:
        directory: where the checkpoint files go.
        groups: ``{name: object with .variables}`` (a Keras model, an optimizer).
        max_to_keep: how many checkpoints to keep (the newest).
    """

    def __init__(self, directory: str, groups: dict, max_to_keep: int = 2):
        self.directory = directory
        self.groups = groups
        self.max_to_keep = max_to_keep

    def _variables(self):
        for group, owner in self.groups.items():
            for i, variable in enumerate(owner.variables):
                yield f"{group}/{i:05d}", variable

    def latest(self) -> str | None:
        path = os.path.join(self.directory, _LATEST)
        if not os.path.exists(path):
            return None
        with open(path) as f:
            name = json.load(f)["file"]
        return os.path.join(self.directory, name)

    def save(self, epoch: int) -> str:
        """Writes the variables after ``epoch`` finished epochs; returns the file."""
        arrays = {"__epoch__": np.asarray(epoch)}
        paths = {}
        for key, variable in self._variables():
            arrays[key] = np.asarray(variable.numpy())
            paths[key] = variable.path
        arrays["__paths__"] = np.asarray(json.dumps(paths))
        name = f"ckpt-{epoch:05d}.npz"
        path = os.path.join(self.directory, name)
        with io_utils.atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
        io_utils.atomic_write_text(
            os.path.join(self.directory, _LATEST), json.dumps({"file": name, "epoch": epoch})
        )
        self._prune()
        return path

    def _prune(self):
        files = sorted(f for f in os.listdir(self.directory) if re.fullmatch(r"ckpt-\d+\.npz", f))
        for old in files[: -self.max_to_keep]:
            os.remove(os.path.join(self.directory, old))

    def restore(self, path: str | None = None) -> int | None:
        """Assigns the variables from ``path`` (default: the latest); returns its epoch.

        Returns None when there is no checkpoint. Raises ValueError when the checkpoint
        does not fit the variables (a different model or config).
        """
        path = path or self.latest()
        if path is None:
            return None
        with np.load(path) as data:
            saved_paths = json.loads(str(data["__paths__"]))
            ours = dict(self._variables())
            missing = sorted(set(ours) - set(saved_paths))
            extra = sorted(set(saved_paths) - set(ours))
            if missing or extra:
                raise ValueError(
                    f"Checkpoint {path} does not fit this run: {len(missing)} variables missing "
                    f"(e.g. {missing[:3]}), {len(extra)} unexpected (e.g. {extra[:3]}); was the "
                    "config changed?"
                )
            for key, variable in ours.items():
                value = data[key]
                if tuple(value.shape) != tuple(variable.shape):
                    raise ValueError(
                        f"Checkpoint {path}: {saved_paths[key]} has shape {value.shape}, the "
                        f"run's {variable.path} has {tuple(variable.shape)}; was the config changed?"
                    )
                variable.assign(value)
            return int(data["__epoch__"])

"""Retraining a genotype from scratch (what ``python -m keras_das.train`` runs), or the
architecture of a ``.keras`` model (``--config.model.keras_file``, e.g. the ``chosen.keras``
a search of a user's model wrote) with fresh weights.

Workdir outputs, each written atomically:

    config.json           the resolved config
    genotype.json         the genotype trained, genotype.png its picture (not for a keras_file)
    tensorboard/          losses, accuracies, learning rate
    checkpoints/          everything needed to resume
    model.keras           the final network (keras.models.load_model, with keras_das imported)
    export/<version>/     the final network as a TF Serving SavedModel, and TFLite files
    train_summary.json    test accuracy and loss, parameters, wall time

Running the same command again on the same workdir resumes from the last checkpoint.
"""

from __future__ import annotations

import os
import time

import keras

from keras_das import io_utils
from keras_das.discrete import training
from keras_das.discrete.discrete_network import DiscreteNetwork
from keras_das.engine.schedules import EpochCosineDecay
from keras_das.runs import callbacks as callbacks_lib
from keras_das.runs import config_fields
from keras_das.runs import data
from keras_das.runs import distribution
from keras_das.runs import experiment
from keras_das.runs import gap_report
from keras_das.runs import plot
from keras_das.space import latency as latency_lib
from keras_das.space import variables
from keras_das.space.genotype import Genotype
from keras_das.space.genotype import get_genotype


def load_genotype(config) -> Genotype:
    """The genotype ``config.genotype`` names (or points to), checked against the op registry."""
    try:
        return get_genotype(str(config.genotype)).validate_ops()
    except ValueError as e:
        raise ValueError(f"config.genotype={config.genotype!r}: {e}") from e


def validate_config(config) -> Genotype | None:
    """Raises a ValueError naming the field, the bad value and the valid choices; returns
    the genotype to train (None when ``model.keras_file`` names the architecture)."""
    distribution.check_config(config.distribution)
    config_fields.check_positive(
        config,
        "epochs",
        "data.batch_size",
        "model.channels",
        "model.num_cells",
        "model.stem_multiplier",
    )
    config_fields.check_positive(config, "optimizer.lr", integer=False)
    if not 0.0 <= config.model.drop_path < 1.0:
        raise ValueError(
            f"config.model.drop_path must be in [0, 1), got {config.model.drop_path!r}"
        )
    if not config.model.auxiliary_weight >= 0:
        raise ValueError(
            f"config.model.auxiliary_weight must be >= 0, got {config.model.auxiliary_weight!r}"
        )
    if config.optimizer.grad_clip is not None and not config.optimizer.grad_clip > 0:
        raise ValueError(
            f"config.optimizer.grad_clip must be > 0 or None, got {config.optimizer.grad_clip!r}"
        )
    keras_file = config.model.get("keras_file")
    if keras_file is not None:
        if not (str(keras_file).endswith(".keras") and os.path.isfile(keras_file)):
            raise ValueError(
                f"config.model.keras_file={keras_file!r} must be an existing .keras file "
                "(such as the chosen.keras a search of your model wrote), or None to train "
                "config.genotype"
            )
        return None
    return load_genotype(config)


def run(config, workdir: str, verbose: int | str = "auto") -> dict:
    """Trains the genotype of ``config`` from scratch, writing to ``workdir``; resumes.

    Returns:
        The summary also written to ``train_summary.json`` (``test_accuracy`` among it).
    """
    genotype = validate_config(config)  # None: config.model.keras_file
    exp = experiment.Experiment.start(config, workdir)
    train_data = data.TrainData(config.data, config.seed)  # a bad dataset fails here
    info = train_data.info
    exp.open_workdir()
    if exp.chief and genotype is not None:
        genotype.save(os.path.join(workdir, "genotype.json"))
        plot.plot_genotype(
            genotype, os.path.join(workdir, "genotype.png"), title=str(config.genotype)
        )
    with exp.strategy.scope():
        net, optimizer = build_network(config, genotype, info, train_data.steps_per_epoch)
    initial_epoch = exp.restore({"network": net, "optimizer": optimizer})
    train, test = train_data.streams(initial_epoch, config.epochs)
    start = time.time()
    summary = {
        **(
            {"genotype": genotype.to_dict()}
            if genotype is not None
            else {"keras_file": os.path.abspath(config.model.keras_file)}
        ),
        "epochs": config.epochs,
        "resumed_from_epoch": initial_epoch,
    }
    if initial_epoch < config.epochs:
        summary["final_metrics"] = exp.fit(
            net,
            train,
            train_data.steps_per_epoch,
            initial_epoch,
            (
                [callbacks_lib.DropPathSchedule(config.model.drop_path, config.epochs)]
                if genotype is not None
                else [],
                [],
            ),
            optimizers={"learning_rate": optimizer},
            verbose=verbose,
        )
    summary["train_wall_time_s"] = time.time() - start
    summary.update(evaluate(net, test, info))
    if exp.chief:
        # A retrained keras_file is saved as the plain model it is, not inside its trainer.
        final = net.network if isinstance(net, training.Retraining) else net
        with io_utils.atomic_path(os.path.join(workdir, "model.keras")) as tmp:
            final.save(tmp)  # the temporary name keeps the .keras suffix Keras requires
        if config.export.enabled:
            summary.update(exp.export(final, info))
        exp.write_summary("train_summary.json", summary)
    return summary


def build_network(config, genotype: Genotype | None, info, steps_per_epoch: int):
    """The network and its optimizer, compiled as the config says (call under the strategy):
    the genotype's ``DiscreteNetwork``, or (``genotype`` None) the architecture of
    ``model.keras_file`` with fresh weights, in a ``Retraining``."""
    if genotype is None:
        net = training.Retraining(fresh_copy(config.model.keras_file, info))
    else:
        net = DiscreteNetwork(
            genotype,
            num_classes=info.num_classes,
            channels=config.model.channels,
            num_cells=config.model.num_cells,
            auxiliary=config.model.auxiliary,
            auxiliary_weight=config.model.auxiliary_weight,
            stem_multiplier=config.model.stem_multiplier,
            seed=config.seed,
        )
    net.build((None, *info.image_shape))
    optimizer = keras.optimizers.SGD(
        EpochCosineDecay(
            config.optimizer.lr, config.epochs, steps_per_epoch, config.optimizer.lr_min
        ),
        momentum=config.optimizer.momentum,
    )
    net.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        weight_decay=config.optimizer.weight_decay,
        grad_clip=config.optimizer.grad_clip,
        jit_compile=config.jit_compile,
    )
    optimizer.build(net.trainable_variables)
    return net, optimizer


def fresh_copy(path: str, info) -> keras.Model:
    """The architecture of the ``.keras`` model at ``path``, with newly initialised weights."""
    loaded = keras.models.load_model(path, compile=False)
    info.check_inputs(loaded, f"config.model.keras_file={path!r} takes inputs")
    return keras.models.clone_model(loaded)  # new layers, new initial weights


def evaluate(net, test, info) -> dict:
    """The summary's test figures: accuracy and loss, weights, FLOPs and latency."""
    test_loss, test_accuracy = net.evaluate(test, verbose=0)
    head = getattr(net, "auxiliary_head", None)
    aux = head.trainable_variables if head is not None else []
    return dict(
        test_loss=float(test_loss),
        test_accuracy=float(test_accuracy),
        num_test_examples=info.num_test,
        parameters=variables.count_weights(net.trainable_variables) - variables.count_weights(aux),
        auxiliary_parameters=variables.count_weights(aux),
        flops=gap_report.count_flops(net, info.image_shape),
        latency_ms=latency_lib.network_latency(net, info.image_shape, batch_size=1),
        latency_batch_size=1,
        device=latency_lib.device_key(),
    )

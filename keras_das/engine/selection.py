"""Perturbation-based selection (DARTS-PT): keep the ops the supernet needs, not the largest alphas.

Wang et al. (2021), "Rethinking Architecture Selection in Differentiable NAS", show that an
op's alpha does not measure what it contributes to the supernet (skip connections get large
alphas while the supernet barely uses them), one cause of the discretisation gap. They score
each op on an edge by how much the supernet's validation accuracy drops when that op alone is
removed from the mixture, and keep the op whose removal hurts most.

Here the score is the rise of the supernet's validation loss (smoother than accuracy on the
few batches a CPU can afford), every op measured on the same batches so that the
comparison is paired, in one pass without DARTS-PT's fine-tuning between edge decisions.
The DARTS rule then reads the scores in place of the mixing weights: per edge the op with
the largest score, per node the ``k`` edges whose best op scores highest (with the same
skip cap and parameterised-path constraints as the alphas would get).

Cost: one supernet forward pass per batch for each of 1 + 2 x edges x (ops - 1) mixtures
(197 in the DARTS space).

A user's model with MixedOps (``mixed_op_choices``) is scored the same way, one MixedOp and
one candidate at a time, and each MixedOp keeps the candidate whose removal hurts most. With given mixing weights the supernet runs without PC-DARTS's
edge weights and DARTS-'s auxiliary skip (see ``SearchNetwork.call``), so with those
remedies the scores measure the plain mixture.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from keras_das.space import mixed_op as mixed_op_lib


def perturbation_scores(net, batches, loss_fn) -> dict[str, np.ndarray]:
    """How much removing each (edge, op) raises the supernet's loss on ``batches``.

    Args:
        net: a ``SearchNetwork``.
        batches: a list of ``(images, labels)``; every op is measured on all of them.
        loss_fn: ``loss_fn(labels, logits)`` -> per-batch scalar (e.g. a Keras loss).

    Returns:
        ``{"normal": [edges, ops], "reduce": [edges, ops]}``: mean loss with the op's mixing
        weight set to zero minus the mean loss with the whole mixture; ``-inf`` for
        ``none``, which is never chosen.
    """
    if not batches:
        raise ValueError("perturbation_scores needs at least one validation batch")

    @tf.function(reduce_retracing=True)
    def batch_loss(x, y, normal, reduce):
        return loss_fn(y, net(x, training=False, mixing_weights=(normal, reduce)))

    base = [w.numpy() for w in net.compute_mixing_weights(training=False)]

    def mean_loss(weights) -> float:
        tensors = [tf.constant(w, dtype=net.compute_dtype) for w in weights]
        return float(np.mean([batch_loss(x, y, *tensors).numpy() for x, y in batches]))

    reference = mean_loss(base)
    scores = {}
    for index, cell in enumerate(("normal", "reduce")):
        score = np.full(base[index].shape, -np.inf)
        for edge in range(score.shape[0]):
            for op, name in enumerate(net.op_names):
                if name == "none":
                    continue
                kept, base[index][edge, op] = base[index][edge, op], 0.0
                score[edge, op] = mean_loss(base) - reference
                base[index][edge, op] = kept
        scores[cell] = score
    return scores


def perturbation_genotype(net, batches, loss_fn):
    """The genotype the perturbation scores choose (see the module docstring)."""
    scores = perturbation_scores(net, batches, loss_fn)
    # The rule ranks by value; shift the scores to positive weights, keeping their order.
    finite = np.concatenate([s[np.isfinite(s)] for s in scores.values()])
    low = finite.min() - 1.0
    weights = {cell: np.where(np.isfinite(s), s - low, 0.0) for cell, s in scores.items()}
    return net.genotype(weights=weights)


def mixed_op_scores(model, batches, loss_fn) -> dict[str, np.ndarray]:
    """How much removing each candidate of each MixedOp (that owns its alpha) raises the
    loss of ``model`` on ``batches``: ``{MixedOp name: [candidates]}``, ``-inf`` for
    ``none``. The other MixedOps keep their mixtures."""
    if not batches:
        raise ValueError("mixed_op_scores needs at least one validation batch")
    mixes = mixed_op_lib.alpha_owning_mixed_ops(model)
    if not mixes:
        raise ValueError(f"Model {model.name!r} has no MixedOp with its own alpha to score")

    @tf.function(reduce_retracing=True)
    def batch_loss(x, y, weights):
        with mixed_op_lib.override_mixing_weights(dict(zip(mixes, weights))):
            return loss_fn(y, model(x, training=False))

    base = [mix.get_mixing_weights().astype(np.float64) for mix in mixes]

    def mean_loss(weights) -> float:
        tensors = [tf.constant(w, dtype=mix.compute_dtype) for w, mix in zip(weights, mixes)]
        return float(np.mean([batch_loss(x, y, tensors).numpy() for x, y in batches]))

    reference = mean_loss(base)
    scores = {}
    for index, mix in enumerate(mixes):
        score = np.full(base[index].shape, -np.inf)
        for op, name in enumerate(mix.candidate_names):
            if name == "none":
                continue
            kept, base[index][op] = base[index][op], 0.0
            score[op] = mean_loss(base) - reference
            base[index][op] = kept
        scores[mix.name] = score
    return scores


def mixed_op_choices(model, batches, loss_fn) -> dict[str, int]:
    """Each MixedOp's candidate by DARTS-PT (``mixed_op_scores``), as ``discretize`` takes
    ``choices``: ``{MixedOp name: candidate index}``."""
    return {
        name: int(np.argmax(score))
        for name, score in mixed_op_scores(model, batches, loss_fn).items()
    }

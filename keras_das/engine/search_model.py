"""SearchModel: the bilevel DARTS search as a Keras model, so ``fit`` runs the search."""

from __future__ import annotations

import types
from collections.abc import Callable
from collections.abc import Sequence

import keras
import tensorflow as tf

# Whether a layer's build is Layer's own (which builds no sublayer); Keras exports no name.
from keras.src.utils.python_utils import is_default

from keras_das.engine import updates
from keras_das.engine import virtual_step
from keras_das.engine.architect import Architect
from keras_das.engine.architect import check_architect
from keras_das.space import primitives
from keras_das.space import relaxations
from keras_das.space import variables

_ACCURACY_NAMES = ("accuracy", "acc")


def pair_datasets(train: tf.data.Dataset, val: tf.data.Dataset):
    """Pairs a training and a validation dataset for ``SearchModel.fit``.

    Both streams are repeated and zipped into ``((x_train, y_train), (x_val, y_val))``
    elements, so one iterator serves the whole search: the validation stream goes on where
    it stopped instead of restarting each step or each epoch. Pass ``steps_per_epoch``.

    Returns:
        ``(paired_dataset, steps_per_epoch)`` where ``steps_per_epoch`` is the length of
        ``train`` in batches (``None`` when it is infinite or unknown).
    """
    cardinality = int(train.cardinality())
    steps = cardinality if cardinality > 0 else None
    paired = tf.data.Dataset.zip((train.repeat(), val.repeat()))
    return paired.prefetch(tf.data.AUTOTUNE), steps


@keras.saving.register_keras_serializable(package="keras_das")
class SearchModel(keras.Model):
    """Runs differentiable architecture search on any Keras model that contains alphas.

    Each training step is DARTS's: an architecture step on a validation batch (alphas
    only, by the chosen architect), then a weight step on a training batch (weights only).
    ``fit`` consumes ``((x_train, y_train), (x_val, y_val))`` elements; build them with
    ``pair_datasets``. Callbacks, progress bars, History and ``tf.distribute`` strategies
    work as for any Keras model.

    Example:
        >>> search = SearchModel(keras_das.SearchNetwork(num_classes=10))
        >>> search.build((None, 32, 32, 3))
        >>> search.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        ...                metrics=["accuracy"], architect="second_order")
        >>> data, steps = keras_das.pair_datasets(train, val)
        >>> search.fit(data, steps_per_epoch=steps, epochs=50)

    Args:
        supernet: a Keras model with architecture parameters (``SearchNetwork``, or any
            model holding ``MixedOp`` layers at any depth).
    """

    def __init__(self, supernet: keras.Model, **kwargs):
        super().__init__(**kwargs)
        self.supernet = supernet

    def build(self, input_shape):
        """Builds the supernet, tracing its ``call`` when ``build`` leaves sublayers unbuilt.

        Keras marks a subclassed model without a ``build`` method as built without building
        its sublayers (MixedOps and their alphas included); a symbolic call builds them.
        """
        net = self.supernet
        if not net.built and not is_default(net.build):
            net.build(input_shape)
        if not net.built or _unbuilt_layers(net):
            net(keras.tree.map_shape_structure(keras.KerasTensor, input_shape))
        self.built = True

    def call(self, inputs, training=None):
        return self.supernet(inputs, training=training)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Under a tf.distribute strategy Keras pulls one batch from the training iterator
        # (which is then never trained on) to build the model symbolically, and its
        # reduction of that batch fails under MultiWorkerMirroredStrategy. This model is
        # built before it is compiled, so there is nothing to build.
        if self.built and self.compiled:
            return
        super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def fit(self, *args, shuffle=False, **kwargs):
        # Paired streams are shuffled by their pipelines; Keras cannot shuffle them.
        return super().fit(*args, shuffle=shuffle, **kwargs)

    # -- compile ------------------------------------------------------------------------

    def compile(
        self,
        weight_optimizer: keras.optimizers.Optimizer | None = None,
        arch_optimizer: keras.optimizers.Optimizer | None = None,
        loss="sparse_categorical_crossentropy",
        metrics: Sequence = (),
        architect: str = "first_order",
        weight_decay: float = 3e-4,
        arch_weight_decay: float = 1e-3,
        grad_clip: float | None = 5.0,
        fd_epsilon: float = 0.01,
        arch_penalties: Sequence[Callable] = (),
        sync_batch_norm: bool = True,
        freezable_arch: bool = False,
        jit_compile: bool = False,
        steps_per_execution: int = 1,
    ):
        """Configures the search. The defaults are DARTS's.

        Args:
            weight_optimizer: for the network weights; default SGD(0.025, momentum 0.9).
                Without clipping or weight decay of its own (``AdamW``'s decoupled decay
                excepted). Not a ``LossScaleOptimizer``: ``mixed_float16`` is refused;
                ``mixed_bfloat16`` needs no loss scaling.
                Give it a learning-rate schedule (``keras_das.engine.schedules.EpochCosineDecay``)
                for DARTS's cosine annealing.
            arch_optimizer: for the alphas; default Adam(3e-4, beta_1=0.5, beta_2=0.999,
                epsilon=1e-8), PyTorch's Adam settings in DARTS.
            loss: a Keras loss (or its name) on the model's outputs. With logits, use e.g.
                ``SparseCategoricalCrossentropy(from_logits=True)``.
            metrics: Keras metrics (or names) reported on the training batches and, with an
                ``arch_val_`` prefix, on the validation batches of the architecture step.
                ``"accuracy"`` means sparse categorical accuracy (integer labels).
            architect: ``first_order``, ``second_order`` (DARTS finite differences) or
                ``exact`` (differentiates through the virtual step). The last two take the
                weight optimizer's next step themselves: it must be a Keras ``SGD`` (any
                momentum, Nesterov), ``Adam`` or ``AdamW``.
            weight_decay: L2 weight decay coupled into the weight gradients (``g + wd * w``),
                as PyTorch's SGD in DARTS; Keras's own ``weight_decay`` is decoupled.
            arch_weight_decay: the same for the alphas (1e-3 in DARTS).
            grad_clip: clip the weight gradients to this global norm (None: no clipping).
            fd_epsilon: finite-difference scale of ``second_order``.
            arch_penalties: callables ``f(supernet) -> scalar`` added to the validation loss
                the alphas minimise (sparsity, latency, ...). They read the supernet's
                variables, so they see the weights the architect evaluates at.
            sync_batch_norm: under a strategy with several replicas, make the supernet's
                batch norms use global-batch statistics (so the search does not depend on
                the number of replicas).
            freezable_arch: compile the step so that ``arch_enabled`` (a variable) can freeze
                the alphas, as warm-up epochs do (``keras_das.engine.remedies.ArchWarmup``).
            jit_compile: compile steps with XLA (off by default: on CPU it made the DARTS
                weight step several times slower, see ``benchmarks/README.md``).
            steps_per_execution: steps per compiled call.
        """
        if not self.supernet.built:
            raise ValueError(
                "Build the supernet before compiling the SearchModel, e.g. "
                "search_model.build((None, 32, 32, 3)) or call it on a batch"
            )
        self.built = True
        self._split_variables()
        if weight_optimizer is None:
            weight_optimizer = keras.optimizers.SGD(0.025, momentum=0.9)
        if arch_optimizer is None:
            arch_optimizer = keras.optimizers.Adam(3e-4, beta_1=0.5, beta_2=0.999, epsilon=1e-8)
        _check_setup(self.supernet, weight_optimizer, arch_optimizer, architect, grad_clip)
        self.weight_optimizer = weight_optimizer
        self.arch_optimizer = arch_optimizer
        self.weight_optimizer.build(self.weight_vars)
        self.arch_optimizer.build(self.arch_vars)
        if sync_batch_norm and updates.num_replicas() > 1:
            primitives.synchronize_batch_norm(self.supernet)
        self.loss_fn = keras.losses.get(loss)
        self.weight_decay = float(weight_decay)
        self.arch_weight_decay = float(arch_weight_decay)
        self.grad_clip = grad_clip
        self.arch_penalties = tuple(arch_penalties)
        self.architect = Architect(self, architect, fd_epsilon)

        # Held outside Keras's attribute tracking (compile may follow build); resumed runs
        # set it again (keras_das.engine.remedies.ArchWarmup at each epoch's start).
        self.freezable_arch = freezable_arch
        self._arch_enabled = types.SimpleNamespace(variable=tf.Variable(True, trainable=False))
        self._search_metrics = types.SimpleNamespace(
            loss=keras.metrics.Mean(name="loss"),
            arch_loss=keras.metrics.Mean(name="arch_val_loss"),
            entropy=keras.metrics.Mean(name="entropy"),
            train=[_make_metric(m) for m in metrics],
            val=[_make_metric(m, prefix="arch_val_") for m in metrics],
        )
        # The base class gets the weight optimizer (for `model.optimizer`, learning-rate
        # logging callbacks) but no loss or metrics: this class computes them.
        super().compile(
            optimizer=self.weight_optimizer,
            jit_compile=jit_compile,
            steps_per_execution=steps_per_execution,
        )

    def _split_variables(self):
        trainable = self.supernet.trainable_variables
        self.arch_index = [i for i, v in enumerate(trainable) if variables.is_arch_variable(v)]
        self.weight_index = [
            i for i, v in enumerate(trainable) if not variables.is_arch_variable(v)
        ]
        if not self.arch_index:
            raise ValueError(_no_alphas_message(self.supernet))

    # Views into the supernet's variables (indices, not copies, so nothing is tracked twice).
    @property
    def weight_vars(self):
        trainable = self.supernet.trainable_variables
        return [trainable[i] for i in self.weight_index]

    @property
    def arch_vars(self):
        trainable = self.supernet.trainable_variables
        return [trainable[i] for i in self.arch_index]

    @property
    def arch_enabled(self) -> tf.Variable:
        """Whether the architecture step runs (needs ``compile(freezable_arch=True)``)."""
        return self._arch_enabled.variable

    @property
    def metrics(self):
        m = getattr(self, "_search_metrics", None)
        return [] if m is None else [m.loss, *m.train, m.arch_loss, *m.val, m.entropy]

    # -- the step -----------------------------------------------------------------------

    def total_loss(self, y, y_pred, regularization_losses, with_penalty=True):
        """Data loss + layer regularisation (+ architecture penalties), scaled per replica."""
        loss = self.loss_fn(y, y_pred)
        extra = list(regularization_losses)
        if with_penalty:
            extra += [penalty(self.supernet) for penalty in self.arch_penalties]
        if extra:
            loss = loss + tf.add_n([tf.cast(e, loss.dtype) for e in extra]) / updates.num_replicas()
        return loss

    def arch_step(self, train_batch, val_batch, values=None):
        """One architecture step; ``values``: ``architect.current_values()``, if read."""
        grads, val_loss, val_pred = self.architect(train_batch, val_batch, values)
        updates.apply_gradients(
            self.arch_optimizer, grads, self.arch_vars, self.arch_weight_decay, reduced=True
        )
        return val_loss, val_pred

    def weight_step(self, x, y, weights=None):
        """One weight step; ``weights``: the weights' current values, if read."""
        # The architect's traced pass at the current weights, keeping the batch-norm
        # statistics: the step's graph then holds one traced forward and backward pass.
        architect = self.architect
        values = architect.current_values(weights)
        loss, y_pred, grads = architect.evaluate(
            values, x, y, with_penalty=False, keep_statistics=True
        )
        updates.apply_gradients(
            self.weight_optimizer,
            [grads[i] for i in self.weight_index],
            self.weight_vars,
            self.weight_decay,
            self.grad_clip,
            values=[values[i] for i in self.weight_index],  # the weights, read once
        )
        return loss, y_pred

    def train_step(self, data):
        (x_train, y_train), (x_val, y_val) = data
        # Read once for both steps: the architecture step assigns no weight (a read is a
        # graph op per variable, some 500 at size D); the weight step reads the alphas
        # again, after their step.
        values = self.architect.current_values()
        if self.freezable_arch:
            # Warm-up (PC-DARTS): while frozen, only evaluate the validation batch.
            val_loss, val_pred = tf.cond(
                self.arch_enabled,
                lambda: self.arch_step((x_train, y_train), (x_val, y_val), values),
                lambda: self.architect.loss_at(values, x_val, y_val),
            )
        else:
            val_loss, val_pred = self.arch_step((x_train, y_train), (x_val, y_val), values)
        loss, y_pred = self.weight_step(x_train, y_train, [values[i] for i in self.weight_index])

        m = self._search_metrics
        # Losses are scaled by 1 / replicas (as Keras losses are); report the batch mean.
        m.loss.update_state(loss * updates.num_replicas())
        m.arch_loss.update_state(val_loss * updates.num_replicas())
        for metric in m.train:
            metric.update_state(y_train, y_pred)
        for metric in m.val:
            metric.update_state(y_val, val_pred)
        m.entropy.update_state(self.mixing_entropy())
        return updates.mean_over_replicas({metric.name: metric.result() for metric in self.metrics})

    def test_step(self, data):
        x, y = data[:2]
        y_pred = self.supernet(x, training=False)
        m = self._search_metrics
        m.loss.update_state(self.loss_fn(y, y_pred) * updates.num_replicas())
        for metric in m.train:
            metric.update_state(y, y_pred)
        return updates.mean_over_replicas(
            {metric.name: metric.result() for metric in [m.loss, *m.train]}
        )

    def mixing_entropy(self):
        """Mean entropy of the current mixing weights over all owners of alphas."""
        weights = list(relaxations.model_mixing_weights(self.supernet).values())
        return tf.add_n([relaxations.entropy(w) for w in weights]) / len(weights)

    def get_config(self):
        return {
            **super().get_config(),
            "supernet": keras.saving.serialize_keras_object(self.supernet),
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["supernet"] = keras.saving.deserialize_keras_object(config["supernet"])
        return cls(**config)


def _make_metric(spec, prefix=""):
    if isinstance(spec, str):
        if spec in _ACCURACY_NAMES:
            return keras.metrics.SparseCategoricalAccuracy(name=prefix + "accuracy")
        metric = keras.metrics.get(spec)
        if not isinstance(metric, keras.metrics.Metric):
            metric = keras.metrics.MeanMetricWrapper(metric, name=spec)
        config = metric.get_config()
    elif isinstance(spec, keras.metrics.Metric):
        config = spec.get_config()
        metric = spec
    else:
        raise TypeError(f"A metric must be a name or a keras.metrics.Metric, got {spec!r}")
    config["name"] = prefix + config["name"]
    return metric.__class__.from_config(config)


def _unbuilt_layers(model) -> list:
    return [layer for layer in model._flatten_layers(include_self=False) if not layer.built]


def _no_alphas_message(net) -> str:
    layer_names = [layer.name for layer in net._flatten_layers(include_self=False)]
    unbuilt = [layer.name for layer in _unbuilt_layers(net)]
    paths = [v.path for v in net.trainable_variables]
    return (
        f"Model {net.name!r} has no architecture parameters: found {len(layer_names)} layers "
        f"{layer_names[:12]}, {len(unbuilt)} of them unbuilt {unbuilt[:12]}, and "
        f"{len(paths)} trainable variables {paths[:12]}, none an alpha. Add MixedOp layers "
        "(or use keras_das.SearchNetwork); if it has them unbuilt, build it with "
        "SearchModel.build(input_shape) or by calling the model on a batch"
    )


def _check_setup(net, weight_optimizer, arch_optimizer, architect, grad_clip) -> None:
    """Refuses what the search would get silently wrong (see ``SearchModel.compile``)."""
    updates.check_optimizer(
        "weight_optimizer",
        weight_optimizer,
        allow_weight_decay=isinstance(weight_optimizer, keras.optimizers.AdamW),
    )
    updates.check_optimizer("arch_optimizer", arch_optimizer)
    if check_architect(architect) != "first_order":
        virtual_step.check_optimizer(weight_optimizer, architect)
    if grad_clip is not None and not grad_clip > 0:
        raise ValueError(f"grad_clip must be > 0 or None, got {grad_clip!r}")
    for layer in net._flatten_layers(include_self=True):
        if layer.compute_dtype == "float16":
            raise ValueError(
                f"Layer {layer.name!r} of {net.name!r} computes in float16 (dtype policy "
                f"{layer.dtype_policy.name!r}); SearchModel does not loss-scale its steps, "
                "and float16 gradients (second-order ones first) underflow. Use "
                "keras.mixed_precision.set_dtype_policy('mixed_bfloat16') or float32"
            )

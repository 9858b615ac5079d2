"""tf.distribute strategies from the ``distribution`` section of a config."""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

import ml_collections
import tensorflow as tf

from keras_das.runs import config_fields

STRATEGIES = ("none", "mirrored", "multi_worker", "tpu")
AUTO_THREADS = -1
CPU_ALLOCATORS = ("auto", "bfc", "default")
CPU_KERNELS = ("auto", "onednn", "portable")
# TensorFlow reads this once, while it is imported: a process cannot switch kernel sets.
_ONEDNN = "TF_ENABLE_ONEDNN_OPTS"
# TensorFlow reads these when it makes its CPU allocator (at its first op), not later.
_USE_BFC = "TF_CPU_ALLOCATOR_USE_BFC"
_BFC_LIMIT = "TF_CPU_BFC_MEM_LIMIT_IN_MB"


def default_config(**overrides: Any) -> ml_collections.ConfigDict:
    """The ``distribution`` config section: one device (the default strategy).

    Args:
        **overrides: fields to change, e.g. ``strategy="mirrored", cpu_devices=2``.

    Returns:
        A ConfigDict with every field ``make_strategy`` reads.
    """
    return config_fields.config_section(
        {
            "strategy": "none",  # none, mirrored, multi_worker, tpu
            "tpu_address": "",
            "devices": (),  # mirrored: device names; () = every GPU, else the CPU
            "cpu_devices": 0,  # split the CPU into N logical devices (testing without GPUs)
            # TensorFlow's thread pools: ops run at once, threads per op. -1: keras_das's
            # choice (see set_threads), 0: TensorFlow's, N > 0: N.
            "inter_op_threads": AUTO_THREADS,
            "intra_op_threads": AUTO_THREADS,
            # The CPU tensors' allocator: auto (keras_das's choice, see set_cpu_allocator),
            # bfc (TensorFlow's pooling allocator) or default (TensorFlow's default).
            "cpu_allocator": "auto",
            # TensorFlow's CPU kernels: auto (keras_das's choice, see chosen_cpu_kernels),
            # onednn or portable. The binaries restart themselves to apply it.
            "cpu_kernels": "auto",
        },
        **overrides,
    )


def check_strategy(name: str) -> str:
    if name not in STRATEGIES:
        raise ValueError(
            f"Unknown distribution.strategy {name!r}; expected one of {list(STRATEGIES)}"
        )
    return name


def check_config(distribution_config) -> None:
    """Checks the section's fields; a ValueError names the field, the value and the choices."""
    config_fields.check_field("distribution.strategy", check_strategy, distribution_config.strategy)
    for field in ("inter_op_threads", "intra_op_threads"):
        config_fields.check_field(
            f"distribution.{field}",
            check_threads,
            distribution_config.get(field, AUTO_THREADS),
        )
    config_fields.check_field(
        "distribution.cpu_allocator",
        check_cpu_allocator,
        distribution_config.get("cpu_allocator", "auto"),
    )
    config_fields.check_field(
        "distribution.cpu_kernels",
        check_cpu_kernels,
        distribution_config.get("cpu_kernels", "auto"),
    )


def make_strategy(distribution_config) -> tf.distribute.Strategy:
    """Builds the strategy a config names.

    - ``none``: the default strategy (one device).
    - ``mirrored``: ``MirroredStrategy`` over every local GPU (or the CPU when there is
      none), or over ``distribution.devices`` when that field is set. With
      ``distribution.cpu_devices = N`` the CPU is first split into N logical devices.
    - ``multi_worker``: ``MultiWorkerMirroredStrategy``; each worker's ``TF_CONFIG``
      environment variable names the cluster and its own task (see ``launch/``).
    - ``tpu``: ``TPUStrategy`` on ``distribution.tpu_address`` (empty: the local TPU).

    Global batch sizes stay global: Keras splits each batch across the replicas.
    """
    name = check_strategy(distribution_config.strategy)
    set_cpu_allocator(distribution_config.get("cpu_allocator", "auto"))
    set_threads(
        distribution_config.get("inter_op_threads", AUTO_THREADS),
        distribution_config.get("intra_op_threads", AUTO_THREADS),
    )
    split_cpu(distribution_config.get("cpu_devices", 0))
    if name == "none":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        devices = tuple(distribution_config.get("devices", ()) or ()) or None
        return tf.distribute.MirroredStrategy(devices)
    if name == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise ValueError(
                "distribution.strategy='multi_worker' needs the TF_CONFIG environment "
                "variable (the cluster and this worker's task); launch/multi_worker.py sets it"
            )
        try:
            json.loads(os.environ["TF_CONFIG"])
        except json.JSONDecodeError as e:
            raise ValueError(f"TF_CONFIG is not valid JSON: {e}") from e
        return tf.distribute.MultiWorkerMirroredStrategy()
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(
        tpu=distribution_config.tpu_address or ""
    )
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)


def check_cpu_allocator(name) -> str:
    if name not in CPU_ALLOCATORS:
        raise ValueError(f"expected one of {list(CPU_ALLOCATORS)}, got {name!r}")
    return name


def check_cpu_kernels(name) -> str:
    if name not in CPU_KERNELS:
        raise ValueError(f"expected one of {list(CPU_KERNELS)}, got {name!r}")
    return name


def check_threads(count) -> int:
    if isinstance(count, bool) or not isinstance(count, int) or count < AUTO_THREADS:
        raise ValueError(
            f"expected an int: {AUTO_THREADS} (keras_das's choice), 0 (TensorFlow's) or a "
            f"thread count > 0, got {count!r}"
        )
    return count


def usable_cpus() -> int:
    """The processors this process may run on (its affinity mask, e.g. under taskset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def chosen_threads(inter_op: int = AUTO_THREADS, intra_op: int = AUTO_THREADS):
    """``(inter_op, intra_op)`` with ``AUTO_THREADS`` resolved (0: TensorFlow's choice).

    TensorFlow sizes both of its pools to the processors: on 2 of them it runs two ops at
    once and splits each over two threads, four busy threads on two processors. A search
    step is many mid-sized ops, so there one thread per op (``intra_op = 1``) measured
    7-11% faster per step with the portable CPU kernels and 27% with oneDNN's (DARTS sizes
    S and D; see ``benchmarks/README.md``), for 0.2-0.3 GB more peak memory at size D. With
    more processors each op needs its threads, and that was not measured: TensorFlow's
    choice there, on hosts with a GPU (whose ops the step runs there), and for
    ``inter_op`` everywhere.
    """
    if inter_op == AUTO_THREADS:
        inter_op = 0
    if intra_op == AUTO_THREADS:
        intra_op = 1 if usable_cpus() <= 2 and not _gpus() else 0
    return inter_op, intra_op


def _gpus() -> list:
    """The GPUs TensorFlow sees (listing them does not start TensorFlow's runtime)."""
    return tf.config.list_physical_devices("GPU")


def set_threads(inter_op: int = AUTO_THREADS, intra_op: int = AUTO_THREADS) -> tuple[int, int]:
    """Sizes TensorFlow's thread pools (``chosen_threads``); returns the sizes asked for.

    Must run before TensorFlow executes any op; after that the pools keep their sizes and
    a warning says so (results do not depend on them, only speed).
    """
    chosen = chosen_threads(check_threads(inter_op), check_threads(intra_op))
    for name, count in zip(("inter_op", "intra_op"), chosen):
        current = getattr(tf.config.threading, f"get_{name}_parallelism_threads")()
        if current == count:
            continue
        try:
            getattr(tf.config.threading, f"set_{name}_parallelism_threads")(count)
        except RuntimeError:
            logging.warning(
                "distribution.%s_threads: %d not applied, TensorFlow was initialised with %d "
                "(0: its own choice) before the run started",
                name,
                count,
                current,
            )
    logging.info("TensorFlow threads: inter_op %d, intra_op %d (0: its choice)", *chosen)
    return chosen


def chosen_cpu_allocator(name: str = "auto") -> str:
    """``"bfc"`` or ``"default"``, with ``"auto"`` resolved.

    TensorFlow's default CPU allocator takes each tensor from malloc and gives it back
    when freed; glibc maps large blocks (over 32 MB at most) afresh each time and unmaps
    them on free, so every step the kernel zeroes its pages again: 22.6% of a size D
    exact search's CPU time was the kernel's ``clear_page`` (perf, portable kernels, two
    cores). TensorFlow's BFC allocator keeps what it took and reuses it: the steps after
    the first took 27.3 s instead of 38.0 s there (see ``benchmarks/README.md``). It is
    keras_das's choice where no GPU is visible; on GPU hosts the steps' tensors live on the
    GPU, and TensorFlow's choice stays (not measured there).
    """
    if check_cpu_allocator(name) == "auto":
        return "default" if _gpus() else "bfc"
    return name


def set_cpu_allocator(name: str = "auto") -> str:
    """Makes TensorFlow's CPU allocator ``chosen_cpu_allocator(name)``; returns it.

    The allocator is TensorFlow's BFC allocator, switched on by the environment variable
    it reads when its runtime starts; its size limit (64 GB by TensorFlow's default) is
    set to the machine's memory. A ``TF_CPU_ALLOCATOR_USE_BFC`` the user set stays as it
    is. Must run before TensorFlow executes any op; later it changes nothing and a warning
    says so (results do not depend on it, only speed).
    """
    chosen = chosen_cpu_allocator(name)
    if _USE_BFC in os.environ:
        logging.info("CPU allocator: %s=%s, as set", _USE_BFC, os.environ[_USE_BFC])
        return chosen
    if chosen == "bfc":
        if _runtime_started():
            logging.warning(
                "distribution.cpu_allocator: bfc not applied, TensorFlow was initialised "
                "with its default allocator before the run started"
            )
            return chosen
        os.environ[_USE_BFC] = "true"
        memory_mb = _physical_memory_mb()
        if memory_mb and _BFC_LIMIT not in os.environ:
            os.environ[_BFC_LIMIT] = str(memory_mb)
    logging.info("CPU allocator: %s", chosen)
    return chosen


def _physical_memory_mb() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    except (AttributeError, ValueError, OSError):  # not POSIX
        return None


def _runtime_started() -> bool:
    """Whether TensorFlow's eager runtime (and with it its CPU allocator) exists yet
    (False where this TensorFlow does not say: setting the variable is harmless then)."""
    from tensorflow.python.eager import context

    return getattr(context.context(), "_context_handle", None) is not None


def split_cpu(count: int) -> None:
    """Splits the CPU into ``count`` logical devices (0 or 1: leave it whole).

    Lets multi-device code (``mirrored`` over ``/cpu:0``, ``/cpu:1``, ...) run and be tested
    on a machine without accelerators. Must run before TensorFlow executes any op.
    """
    if not isinstance(count, int) or count < 0:
        raise ValueError(f"distribution.cpu_devices must be an int >= 0, got {count!r}")
    if count <= 1:
        return
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * count
        )
    except RuntimeError as e:
        if len(tf.config.list_logical_devices("CPU")) != count:
            raise ValueError(
                f"distribution.cpu_devices={count}: TensorFlow was initialised before the CPU "
                "could be split; set it at the start of the process"
            ) from e


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes the workdir (worker 0 of a multi-worker cluster)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    return resolver.task_type in (None, "chief") or (
        resolver.task_type == "worker"
        and resolver.task_id == 0
        and "chief" not in resolver.cluster_spec().as_dict()
    )


def task_name(strategy: tf.distribute.Strategy) -> str:
    """``worker_1``-style name of this process's task (``chief`` when not distributed)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or resolver.task_type is None:
        return "chief"
    return f"{resolver.task_type}_{resolver.task_id}"


def onednn_enabled() -> bool:
    """Whether this process runs TensorFlow's oneDNN CPU kernels (fixed at its import)."""
    from tensorflow.python.util import _pywrap_util_port

    return bool(_pywrap_util_port.IsMklEnabled())


def _running_kernels() -> str:
    return "onednn" if onednn_enabled() else "portable"


def _x86() -> bool:
    from tensorflow.python.util import _pywrap_util_port

    return bool(_pywrap_util_port.IsX86Available())


def chosen_cpu_kernels(name: str = "auto") -> str:
    """``"onednn"`` or ``"portable"``, with ``"auto"`` resolved.

    TensorFlow's x86 builds carry oneDNN's CPU kernels but turn them on by default only on
    CPUs with AVX-512 VNNI/BF16 or AMX. On a 2-core AVX2 AMD EPYC they ran the size D
    search step 1.76x (first order) and 1.62x (second order) faster than the portable
    kernels TensorFlow picks there (``benchmarks/README.md``), with the same results
    (both paths are tested). ``auto`` is therefore oneDNN's kernels on x86 hosts with no
    GPU; where the user set ``TF_ENABLE_ONEDNN_OPTS``, on GPU hosts and on other CPUs
    (ARM, whose oneDNN build TensorFlow enables where it has measured it), TensorFlow's
    choice stays.
    """
    name = check_cpu_kernels(name)
    if name != "auto":
        return name
    if _ONEDNN in os.environ or not _x86() or _gpus():
        return _running_kernels()
    return "onednn"


def use_cpu_kernels(distribution_config, execve=os.execve) -> str:
    """Makes this binary run ``chosen_cpu_kernels(distribution.cpu_kernels)``; returns it.

    For the binaries' ``main`` only (it may replace the process). TensorFlow fixes its
    kernel set while it is imported, so a process whose set differs from the chosen one
    starts again with the same command line and ``TF_ENABLE_ONEDNN_OPTS`` set, before it
    has done anything else (a few seconds: the imports). If TensorFlow ignored the
    variable (a build without oneDNN), the run goes on with the kernels it has and a
    warning says so. API users set the variable before they import TensorFlow.
    """
    name = config_fields.check_field(
        "distribution.cpu_kernels",
        check_cpu_kernels,
        distribution_config.get("cpu_kernels", "auto"),
    )
    chosen, current = chosen_cpu_kernels(name), _running_kernels()
    if chosen == current:
        logging.info("CPU kernels: %s", chosen)
        return chosen
    wanted = "1" if chosen == "onednn" else "0"
    if os.environ.get(_ONEDNN) == wanted or os.name != "posix":
        logging.warning(
            "distribution.cpu_kernels: %s not applied, TensorFlow runs its %s kernels (%s=%s)",
            chosen,
            current,
            _ONEDNN,
            os.environ.get(_ONEDNN, "unset"),
        )
        return current
    logging.info(
        "CPU kernels: %s; starting again with %s=%s (TensorFlow reads it when imported)",
        chosen,
        _ONEDNN,
        wanted,
    )
    sys.stdout.flush()
    sys.stderr.flush()
    execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, _ONEDNN: wanted})
    return chosen  # reached only with a test's execve

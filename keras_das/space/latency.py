"""Latency tables: how long each candidate op takes, on this device, at the shape it sees.

``LatencyTable`` measures an op (inference, batch ``batch_size``) the first time it is
asked for it and caches the milliseconds in a JSON file keyed by the device and the op's
name, input shape, stride and output channels, so a search pays for each measurement once
per machine. A table measured elsewhere (on a phone, say) can be supplied as a JSON file
of the same form instead.

The expected-latency penalty that uses these tables is ``keras_das.engine.remedies.latency_penalty``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time

import numpy as np
import tensorflow as tf

from keras_das import io_utils
from keras_das.space import primitives
from keras_das.space import topology
from keras_das.space.search_network import reduction_layers

CACHE_DIR_ENV = "KERAS_DAS_CACHE_DIR"


def device_key() -> str:
    """Names this machine's compute device: CPU model (or GPU name), cores, TF version."""
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        name = f"gpu-{details.get('device_name', 'unknown')}"
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        name = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        name = f"cpu-{name}-{os.cpu_count()}cores"
    return f"{name}-tf{tf.__version__}".replace(" ", "_").replace("/", "_")


def default_cache_path() -> str:
    base = os.environ.get(CACHE_DIR_ENV) or os.path.join(
        os.path.expanduser("~"), ".cache", "keras_das"
    )
    return os.path.join(base, "latency", f"{device_key()}.json")


def _key(op: str, input_shape, strides: int, channels: int) -> str:
    return f"{op}|{'x'.join(str(d) for d in input_shape)}|s{strides}|c{channels}"


def measure(layer_fn, input_shape, repeats: int = 30, warmup: int = 5) -> float:
    """Median milliseconds of one inference of ``layer_fn()`` on a batch of ``input_shape``."""
    layer = layer_fn()
    x = tf.random.stateless_normal(input_shape, seed=(0, 0))
    layer(x, training=False)
    call = tf.function(lambda t: layer(t, training=False))
    for _ in range(warmup):
        call(x).numpy()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call(x).numpy()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


class LatencyTable:
    """Milliseconds per (op, input shape, stride, channels), measured once and cached.

    Args:
        path: the JSON cache (default: ``~/.cache/keras_das/latency/<device>.json``, or under
            ``$KERAS_DAS_CACHE_DIR``). A user-supplied table is a file of this form:
            ``{"device": ..., "batch_size": 1, "ms": {"sep_conv_3x3|1x32x32x16|s1|c16": 0.21}}``.
        batch_size: the batch the ops are timed at (1: the latency of one request).
        measure_missing: time ops the table lacks (False: a missing entry is an error, for
            tables measured on another device).
        repeats: timed runs per op (the median is kept).
    """

    def __init__(
        self,
        path: str | None = None,
        batch_size: int = 1,
        measure_missing: bool = True,
        repeats: int = 30,
    ):
        self.path = path or default_cache_path()
        self.batch_size = batch_size
        self.measure_missing = measure_missing
        self.repeats = repeats
        self.entries = {}
        self.measured = 0
        if os.path.exists(self.path):
            with open(self.path) as f:
                data = json.load(f)
            if data.get("batch_size", batch_size) != batch_size:
                raise ValueError(
                    f"latency table {self.path} was measured at batch {data['batch_size']}, not {batch_size}"
                )
            self.entries = dict(data.get("ms", {}))

    def lookup(
        self, op: str, input_shape, strides: int, channels: int, pool_batch_norm: bool = True
    ) -> float:
        """Milliseconds of op ``op`` on an input of ``input_shape`` (H, W, C), batch included."""
        shape = (self.batch_size, *tuple(int(d) for d in input_shape[-3:]))
        key = _key(op, shape, strides, channels)
        if key not in self.entries:
            if not self.measure_missing:
                raise ValueError(f"latency table {self.path} has no entry {key!r}")
            if op == "none":
                self.entries[key] = 0.0
            else:

                def build():
                    layer = primitives.make_op(op, channels, strides, affine=False)
                    if pool_batch_norm and isinstance(layer, primitives.Pool):
                        layer = primitives.PoolBN(layer.pool_type, strides=strides)
                    return layer

                self.entries[key] = measure(build, shape, self.repeats)
            self.measured += 1
        return self.entries[key]

    def save(self) -> None:
        io_utils.atomic_write_text(
            self.path,
            json.dumps(
                {"device": device_key(), "batch_size": self.batch_size, "ms": self.entries},
                indent=1,
                sort_keys=True,
            )
            + "\n",
        )


def search_network_tables(net, table: LatencyTable, input_shape) -> dict:
    """Per cell type, ``[num_edges, num_ops]`` milliseconds summed over the cells of that type.

    ``input_shape`` is the image shape (H, W, C). Keys match
    ``keras_das.space.relaxations.model_mixing_weights(net)`` (``"<net name>/normal"``, ``".../reduce"``).
    """
    h, w = int(input_shape[0]), int(input_shape[1])
    out = {
        f"{net.name}/normal": np.zeros((topology.num_edges(net.steps), len(net.op_names))),
        f"{net.name}/reduce": np.zeros((topology.num_edges(net.steps), len(net.op_names))),
    }
    channels = net.channels
    for i in range(net.num_cells):
        reduction = i in reduction_layers(net.num_cells)
        if reduction:
            channels *= 2
        key = f"{net.name}/{'reduce' if reduction else 'normal'}"
        edge = 0
        for node in range(net.steps):
            for j in range(2 + node):
                strides = 2 if reduction and j < 2 else 1
                size = (h, w) if j < 2 or not reduction else ((h + 1) // 2, (w + 1) // 2)
                for o, op in enumerate(net.op_names):
                    out[key][edge, o] += table.lookup(op, (*size, channels), strides, channels)
                edge += 1
        if reduction:
            h, w = (h + 1) // 2, (w + 1) // 2
    return out


def network_latency(model, input_shape, batch_size: int = 1, repeats: int = 50) -> float:
    """Median milliseconds of one inference of ``model`` on a batch of ``input_shape``."""
    return measure(lambda: model, (batch_size, *tuple(input_shape)), repeats)

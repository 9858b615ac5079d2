import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from keras_das.space import kernels

pytestmark = pytest.mark.kernel_path


def _reference(x, kernel, groups):
    """Per-group 1x1 convolutions, in NumPy float64."""
    c = kernel.shape[-2]
    d = kernel.shape[-1] // groups
    outs = [
        np.einsum(
            "nhwc,cd->nhwd", x[..., g * c : (g + 1) * c], kernel[0, 0, :, g * d : (g + 1) * d]
        )
        for g in range(groups)
    ]
    return np.concatenate(outs, axis=-1)


def _paths():
    """The formulations this machine can run: block-diagonal always, grouped where
    TensorFlow differentiates it."""
    return [False, True] if kernels.grouped_conv_gradient_supported() else [False]


@pytest.mark.parametrize("groups,c,d", [(4, 3, 3), (3, 2, 5), (1, 4, 2)])
def test_grouped_pointwise_matches_per_group_convolutions(monkeypatch, groups, c, d):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 6, groups * c))
    kernel = rng.normal(size=(1, 1, c, groups * d))
    expected = _reference(x, kernel, groups)
    for grouped in _paths():
        monkeypatch.setattr(kernels, "grouped_conv_gradient_supported", lambda g=grouped: g)
        y = kernels.grouped_pointwise(tf.constant(x, tf.float32), tf.constant(kernel, tf.float32))
        np.testing.assert_allclose(y.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_grouped_pointwise_first_and_second_derivatives(monkeypatch):
    """Gradients and a Hessian-vector product agree with the per-group formulation
    (the architects differentiate through the pointwise convolutions twice): the
    block-diagonal matmul in float64, TensorFlow's grouped kernel (where it can be
    differentiated; its CPU kernel is float32-only) in float32."""
    rng = np.random.default_rng(1)
    groups, c, d = 3, 2, 4
    arrays = [rng.normal(size=s) for s in ((2, 4, 4, groups * c), (1, 1, c, groups * d))]
    v_array = rng.normal(size=(1, 1, c, groups * d))

    def per_group(x, kernel):
        xs = tf.split(x, groups, axis=-1)
        ks = tf.split(kernel, groups, axis=-1)
        return tf.concat([tf.nn.conv2d(a, k, 1, "VALID") for a, k in zip(xs, ks)], -1)

    def derivatives(f, dtype):
        x, kernel = (tf.constant(a, dtype) for a in arrays)
        with tf.GradientTape() as outer:
            outer.watch([x, kernel])
            with tf.GradientTape() as inner:
                inner.watch([x, kernel])
                loss = tf.reduce_sum(tf.sin(f(x, kernel)))
            gx, gk = inner.gradient(loss, [x, kernel])
            directional = tf.reduce_sum(gk * tf.constant(v_array, dtype))
        hx, hk = outer.gradient(directional, [x, kernel])
        return [t.numpy() for t in (gx, gk, hx, hk)]

    for grouped in _paths():
        dtype, tolerance = (tf.float32, 1e-4) if grouped else (tf.float64, 1e-10)
        expected = derivatives(per_group, tf.float64)
        monkeypatch.setattr(kernels, "grouped_conv_gradient_supported", lambda g=grouped: g)
        for got, want in zip(derivatives(kernels.grouped_pointwise, dtype), expected):
            np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("onednn", ["0", "1"])
def test_probe_runs_in_a_fresh_process_on_either_kernel_path(onednn):
    """The probe answers (never raises) with oneDNN off and on; with it on, TensorFlow's
    grouped kernel is differentiable on x86 CPUs."""
    code = (
        "from keras_das.space import kernels\n"
        "import tensorflow as tf\n"
        "ok = kernels.grouped_conv_gradient_supported()\n"
        "@tf.function\n"
        "def traced():\n"
        "    return kernels.grouped_conv_gradient_supported()\n"
        "assert traced() == ok\n"
        "print(kernels.onednn_enabled())\n"
        "print(ok)\n"
    )
    env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": onednn, "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    enabled, answer = out.stdout.strip().splitlines()[-2:]
    assert answer in ("True", "False")
    # The variable decides the kernel path whatever the CPU (x86 builds have oneDNN).
    if onednn == "0":
        assert enabled == "False"
    if onednn == "1" and os.uname().machine == "x86_64":
        assert answer == "True" and enabled == "True"

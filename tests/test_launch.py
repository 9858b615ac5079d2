"""The launchers: multi-worker for real on loopback, and the TF Serving client's request."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.binaries import ROOT
from tests.test_search_lib import TINY


@pytest.mark.e2e
def test_two_workers_on_loopback_finish_a_search_and_agree(tmp_path):
    workdir = str(tmp_path / "search")
    command = [
        sys.executable,
        os.path.join(ROOT, "launch", "multi_worker.py"),
        "--num_workers=2",
        "--",
        sys.executable,
        "-m",
        "keras_das.search",
        "--config=configs/cifar.py:smoke",
        f"--workdir={workdir}",
        *TINY,
        "--config.epochs=1",
    ]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-6000:]
    chief = json.load(open(os.path.join(workdir, "search_summary.json")))
    other = json.load(open(os.path.join(workdir, "workers", "worker_1", "search_summary.json")))
    assert chief["alphas"].keys() == other["alphas"].keys()
    for name in chief["alphas"]:
        np.testing.assert_allclose(chief["alphas"][name], other["alphas"][name], rtol=0, atol=1e-6)
        assert np.abs(np.asarray(chief["alphas"][name])).max() > 0
    assert chief["genotype"] == other["genotype"]
    assert os.path.exists(os.path.join(workdir, "genotype.json"))


def test_multi_worker_launcher_needs_a_command():
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "launch", "multi_worker.py"), "--num_workers=2"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "give the command" in result.stderr


def test_serving_client_request_matches_the_exported_signature(tmp_path):
    """The client's REST body carries the signature's input name and a uint8 batch."""
    sys.path.insert(0, os.path.join(ROOT, "launch", "serving"))
    try:
        import client
    finally:
        sys.path.pop(0)
    images = np.random.default_rng(0).integers(0, 256, size=(2, 4, 4, 3), dtype=np.uint8)
    body = json.loads(client.request_body(images))
    assert body["signature_name"] == "serving_default"
    np.testing.assert_array_equal(np.asarray(body["inputs"]["images"], dtype=np.uint8), images)
    with pytest.raises(ValueError, match="uint8"):
        client.request_body(images.astype(np.float32))


def test_serving_client_describes_classes_per_image_and_per_pixel():
    sys.path.insert(0, os.path.join(ROOT, "launch", "serving"))
    try:
        import client
    finally:
        sys.path.pop(0)
    per_image = {"classes": np.array([1, 0]), "probabilities": np.array([[0.2, 0.8], [0.6, 0.4]])}
    assert client.describe(per_image) == ["0: class 1 (p=0.800)", "1: class 0 (p=0.600)"]
    per_pixel = {
        "classes": np.array([[[0, 2], [2, 2]]]),
        "probabilities": np.full((1, 2, 2, 3), 1 / 3),
    }
    assert client.describe(per_pixel) == [
        "0: pixels by class: class 0: 25.0%, class 1: 0.0%, class 2: 75.0%"
    ]

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# Tests read the real CIFAR-10 from the prepared copy beside the checkout when there is one
# (TFDS cannot download here); the package itself only knows TFDS's own TFDS_DATA_DIR.
_SHARED_TFDS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "tfds")
if "TFDS_DATA_DIR" not in os.environ and os.path.isdir(_SHARED_TFDS):
    os.environ["TFDS_DATA_DIR"] = os.path.abspath(_SHARED_TFDS)

import keras  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    """Each test starts from a cleared Keras session and fixed seeds."""
    keras.backend.clear_session()
    keras.utils.set_random_seed(1234)
    yield

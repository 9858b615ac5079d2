"""Architecture search: ``python -m keras_das.search --config=configs/cifar.py --workdir=DIR``.

The logic lives in ``keras_das.runs.search_lib``; this file only reads flags.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from keras_das.runs import distribution
from keras_das.runs import search_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Search configuration.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where outputs and checkpoints go.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError("Too many command-line arguments.")
    search_lib.validate_config(_CONFIG.value)  # a bad config fails first
    # Before any work: it may start the process again with other TensorFlow kernels.
    distribution.use_cpu_kernels(_CONFIG.value.distribution)
    search_lib.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)

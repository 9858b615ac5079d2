"""Export for serving: ``python -m keras_das.export --model=M.keras --export_dir=DIR``.

The logic lives in ``keras_das.discrete.serving``; this file only reads flags.
"""

from absl import app
from absl import flags
from absl import logging

from keras_das.discrete import serving

flags.DEFINE_string("model", None, "The .keras model to export.", required=True)
flags.DEFINE_string("export_dir", None, "Base directory (TF Serving layout).", required=True)
flags.DEFINE_integer("version", None, "Version to write; default: the next one.")
flags.DEFINE_boolean("overwrite", False, "Replace an existing version directory.")
flags.DEFINE_enum(
    "signature",
    "image",
    serving.SIGNATURES,
    "image: uint8 images in, probabilities and classes out; model: the model's own inputs "
    "and outputs.",
)
flags.DEFINE_list("mean", None, "image only: per-channel mean of pixels/255; default CIFAR-10's.")
flags.DEFINE_list("std", None, "image only: per-channel std of pixels/255; default CIFAR-10's.")
flags.DEFINE_boolean("from_logits", True, "image only: the model outputs logits.")
flags.DEFINE_boolean("tflite", True, "Also write the float and dynamic-range TFLite files.")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError("Too many command-line arguments.")
    path = serving.export(
        FLAGS.model,
        FLAGS.export_dir,
        FLAGS.version,
        signature=FLAGS.signature,
        mean=None if FLAGS.mean is None else [float(v) for v in FLAGS.mean],
        std=None if FLAGS.std is None else [float(v) for v in FLAGS.std],
        from_logits=FLAGS.from_logits,
        tflite=FLAGS.tflite,
        overwrite=FLAGS.overwrite,
    )
    logging.info("Exported %s to %s", FLAGS.model, path)


if __name__ == "__main__":
    app.run(main)

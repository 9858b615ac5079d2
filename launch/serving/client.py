"""A TF Serving REST client for a keras_das export: uint8 images in, classes out (one per
image for a classifier, one per pixel for a per-pixel model such as a segmentation).

    python launch/serving/client.py --server=http://localhost:8501 --images=batch.npy

``batch.npy`` holds raw images, uint8 ``[N, H, W, C]``; the request uses the exported
``serving_default`` signature (input ``images``; outputs ``probabilities``, ``classes``).
Standard library only, so it runs on any client machine.
"""

from __future__ import annotations

import argparse
import json
import urllib.request

import numpy as np


def request_body(images: np.ndarray) -> bytes:
    """The REST ``predict`` request for a uint8 batch (columnar ``inputs`` format)."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 [N, H, W, C], got {images.dtype} {images.shape}")
    return json.dumps(
        {"signature_name": "serving_default", "inputs": {"images": images.tolist()}}
    ).encode()


def predict(
    server: str, images: np.ndarray, model: str = "keras_das", timeout: float = 30.0
) -> dict:
    url = f"{server.rstrip('/')}/v1/models/{model}:predict"
    request = urllib.request.Request(
        url, data=request_body(images), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        outputs = json.load(response)["outputs"]
    return {
        "classes": np.asarray(outputs["classes"]),
        "probabilities": np.asarray(outputs["probabilities"]),
    }


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--server", default="http://localhost:8501")
    parser.add_argument("--model", default="keras_das")
    parser.add_argument("--images", required=True, help=".npy file of uint8 [N, H, W, C]")
    args = parser.parse_args()
    result = predict(args.server, np.load(args.images), args.model)
    print("\n".join(describe(result)))


def describe(result: dict) -> list[str]:
    """One line per image: its class and probability, or its pixels' classes by count."""
    lines = []
    for i, (c, p) in enumerate(zip(result["classes"], result["probabilities"])):
        if np.ndim(c) == 0:
            lines.append(f"{i}: class {int(c)} (p={float(p[int(c)]):.3f})")
        else:
            counts = np.bincount(np.ravel(c).astype(int), minlength=np.shape(p)[-1])
            share = ", ".join(f"class {k}: {n / np.size(c):.1%}" for k, n in enumerate(counts))
            lines.append(f"{i}: pixels by class: {share}")
    return lines


if __name__ == "__main__":
    main()

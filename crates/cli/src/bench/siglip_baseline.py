"""Baseline of `pg2 bench data`: the same decode + resize + normalise with transformers'
SigLIP image processor (PIL + numpy backend), single-threaded, on the same files.

Usage: python3 siglip_baseline.py RES[,RES...] FILE...
Prints one JSON object per resolution: {"resolution": R, "images_per_s": X}.
"""
import json
import os
import sys
import time

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = "1"

from PIL import Image  # noqa: E402

try:  # transformers 5: the PIL + numpy backend has its own class
    from transformers import SiglipImageProcessorPil as Processor
except ImportError:  # transformers 4: SiglipImageProcessor is PIL + numpy
    from transformers import SiglipImageProcessor as Processor


def main():
    resolutions = [int(r) for r in sys.argv[1].split(",")]
    files = sys.argv[2:]
    for res in resolutions:
        # big_vision's preprocessing: bilinear, square, [-1, 1].
        processor = Processor(size={"height": res, "width": res}, resample=Image.BILINEAR,
                              image_mean=[0.5] * 3, image_std=[0.5] * 3)
        start = time.perf_counter()
        for path in files:
            with Image.open(path) as img:
                processor(img.convert("RGB"), return_tensors="np")
        elapsed = time.perf_counter() - start
        print(json.dumps({"resolution": res, "images_per_s": len(files) / elapsed}), flush=True)


if __name__ == "__main__":
    main()

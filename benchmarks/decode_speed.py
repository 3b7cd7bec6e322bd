"""CPU cost of turning one image file into the model's uint8 input, per image.

    python benchmarks/decode_speed.py [--n 3000] [--sizes 112,224] [--repeats 5]

Writes --n Fashion-MNIST test images (apt-get install dataset-fashion-mnist) twice, as gray PNGs and
as RGB PNGs of the same pixels, and times (process CPU time, best of --repeats passes) per image:

  rgb-first   ``to_uint8_array(source.load_image(i), spec)``: decoded to RGB, then resized/cropped
  pixels      ``to_uint8_array(source.load_pixels(i), spec)``: what extraction runs (gray images
              are resized and cropped on their one channel, RGB last)
  view        the same for an augmented view (``--views 2 --augment standard``) of every image

for every --sizes model input (bicubic, shorter side to size + 32, like EfficientNet-Lite), and checks
that both paths give the same pixels.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from extract_throughput import write_images  # noqa: E402


def per_image_us(load, indices, spec, repeats: int) -> float:
    """Fastest pass's CPU µs per image of ``to_uint8_array(load(i), spec)`` over ``indices``."""
    from embedcache.models.preprocess import to_uint8_array

    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        for i in indices:
            to_uint8_array(load(i), spec)
        best = min(best, time.process_time() - start)
    return best / len(indices) * 1e6


def main() -> None:
    from embedcache.models.preprocess import PreprocessSpec, to_uint8_array
    from embedcache.sources.open import open_source
    from embedcache.sources.views import ViewSource
    from embedcache.splits import Split

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3000, help="images (default 3000)")
    parser.add_argument("--sizes", default="112,224", help="comma-separated model input sizes")
    parser.add_argument("--repeats", type=int, default=5, help="passes; the fastest is printed")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sources = {}
        for form in ("gray", "rgb"):
            write_images(Path(tmp) / form, args.n, synthetic=False, rgb=form == "rgb")
            sources[form] = open_source(Path(tmp) / form)
        print(f"{args.n} Fashion-MNIST PNGs (28x28), CPU µs per image, best of {args.repeats}")
        for size in (int(s) for s in args.sizes.split(",")):
            spec = PreprocessSpec(resize_size=size + 32, crop_size=size, interpolation="bicubic")
            for form, source in sources.items():
                rows = range(len(source))
                first = [to_uint8_array(source.load_image(i), spec) for i in rows]
                same = all(np.array_equal(a, to_uint8_array(source.load_pixels(i), spec))
                           for i, a in zip(rows, first, strict=True))
                if not same:
                    raise SystemExit(f"{form} PNGs at {size} px: load_pixels gave other pixels than load_image")
                source.assign_splits(np.full(len(source), Split.TRAIN, np.uint8))
                views = ViewSource(source, 2, "standard")
                extra = range(len(source), len(views))
                cases = {"rgb-first": (source.load_image, rows), "pixels": (source.load_pixels, rows),
                         "view rgb-first": (views.load_image, extra), "view pixels": (views.load_pixels, extra)}
                line = ", ".join(f"{name} {per_image_us(load, indices, spec, args.repeats):.0f}"
                                 for name, (load, indices) in cases.items())
                print(f"  {size} px, {form} PNGs: {line}")


if __name__ == "__main__":
    main()

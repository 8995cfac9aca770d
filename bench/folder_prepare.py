"""How fast a folder of images is decoded into its stored copy (`dataset.name="folder"`,
dino_jax/data/folder_cache.py), by number of decoding threads.

    python -m bench.folder_prepare                          # 3,000 synthetic 64 px JPEGs, to 64 px
    python -m bench.folder_prepare --count=120 --side=2048 --image_size=96   # 3-megapixel photos
    python -m bench.folder_prepare --dir=tiny-imagenet-200/train --threads=2   # a real folder

Synthetic images are smooth colour ramps with a little noise, saved as JPEG quality 90 (`--side`
is the width; height is 3/4 of it for photos, equal for sides up to 64). Each thread count builds
the copy afresh in a temporary directory; the last row reopens the stored copy (what a second run
pays). Prints one line per measurement and, last, one JSON object of images per second.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import numpy as np

from dino_jax.data import folder_cache


def synthetic_folder(root: str, count: int, side: int) -> None:
    from PIL import Image

    height = side if side <= 64 else side * 3 // 4
    y, x = np.mgrid[0:height, 0:side]
    ramps = np.stack([x * 255 // side, y * 255 // height, (x + y) * 255 // (side + height)], -1).astype(
        np.uint8
    )
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "images"))
    for i in range(count):
        noisy = ramps ^ rng.integers(0, 24, ramps.shape, dtype=np.uint8)
        Image.fromarray(noisy).save(os.path.join(root, "images", f"{i:06d}.jpg"), quality=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="", help="a folder of images; default: synthetic ones")
    parser.add_argument("--count", type=int, default=3000, help="synthetic images")
    parser.add_argument("--side", type=int, default=64, help="synthetic image width, px")
    parser.add_argument("--image_size", type=int, default=64, help="stored size, px")
    parser.add_argument("--threads", default=f"1,{os.cpu_count()}", help="comma-separated counts")
    args = parser.parse_args()

    scratch = tempfile.mkdtemp(prefix="folder_prepare-")
    try:
        folder = args.dir
        if not folder:
            folder = os.path.join(scratch, "folder")
            synthetic_folder(folder, args.count, args.side)
        results = {}
        cache_root = os.path.join(scratch, "cache")
        for threads in [int(t) for t in args.threads.split(",")]:
            shutil.rmtree(cache_root, ignore_errors=True)
            started = time.perf_counter()
            source = folder_cache.open_folder(
                folder, image_size=args.image_size, cache_root=cache_root, workers=threads, log=lambda _: None
            )
            rate = len(source) / (time.perf_counter() - started)
            results[f"threads_{threads}_images_per_s"] = rate
            print(f"{len(source):,} images, {threads} thread(s): {rate:,.0f} images/s (listing included)")
        started = time.perf_counter()
        folder_cache.open_folder(folder, image_size=args.image_size, cache_root=cache_root, log=print)
        results["reopen_s"] = time.perf_counter() - started
        print(f"reopening the stored copy: {results['reopen_s']:.2f} s")
        print(json.dumps(results))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()

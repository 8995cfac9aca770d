"""A user's own image files (`--images` of `launch.py --mode=embed|visualize`): finding them in
folders, reading them as uint8 RGB, and a random-access source of them for `pipeline.eval_batches`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class ImageFileError(ValueError):
    """A file given as an image that cannot be read as one."""


def image_files(image_paths: str | Sequence[str]) -> list[str]:
    """Files as given, and the image files of any folder (recursively, sorted)."""
    if isinstance(image_paths, str):
        image_paths = [image_paths]
    files = []
    for path in image_paths:
        if os.path.isdir(path):
            found = sorted(
                os.path.join(root, name)
                for root, _, names in os.walk(path)
                for name in names
                if name.lower().endswith(IMAGE_SUFFIXES)
            )
            if not found:
                raise FileNotFoundError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {path}")
            files += found
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise FileNotFoundError(f"image {path} does not exist")
    return files


def load_image(path: str, size: int | tuple[int, int] | None = None) -> np.ndarray:
    """An image file as uint8 RGB `(H, W, 3)`, resized (bicubic) to `size` (int: square) if given
    and not already that size."""
    from PIL import Image, UnidentifiedImageError  # only the file-based entry points need PIL

    try:
        image = Image.open(path)
    except UnidentifiedImageError as error:
        raise ImageFileError(f"{path} is not an image file that PIL can read") from error
    with image:
        image = image.convert("RGB")
        if size is not None:
            height, width = (size, size) if isinstance(size, int) else size
            image = image.resize((width, height), Image.Resampling.BICUBIC)
        return np.asarray(image, np.uint8)


class ImageFileSource:
    """`files` as a random-access source of `{"image": uint8 (size, size, 3), "label": 0}`,
    each image read when it is asked for."""

    def __init__(self, files: Sequence[str], size: int):
        self.files, self.size = list(files), size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        return {"image": load_image(self.files[index], self.size), "label": 0}

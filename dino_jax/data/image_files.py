"""A user's own image files (`--images` of `launch.py --mode=embed|visualize`, and the images of a
folder dataset, `data/image_folder.py`): finding them in folders, checking them, reading them as
uint8 RGB, and a random-access source of them for `pipeline.eval_batches`.

Every problem is reported as `path: what is wrong`, one line per file: `image_files` checks every
path and header before anything is decoded (missing, unreadable, not an image, too many pixels, a
folder with no images), `load_image` reports a file whose data stops or is damaged. Grey, palette,
RGBA and 16-bit images are converted to 8-bit RGB.
"""

from __future__ import annotations

import contextlib
import os
import struct
import warnings
from collections.abc import Sequence

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# What PIL raises while decoding data that stops early or is damaged (it varies by format).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error)


class ImageFileError(ValueError):
    """Files given as images that cannot be read as images; one line per file."""


def is_image_name(name: str) -> bool:
    """An image file by its name: an image suffix, not hidden (a Mac's `._x.JPEG` resource files
    and `.ipynb_checkpoints` copies are not images)."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES)


def images_below(folder: str, problems: list[str]) -> list[str]:
    """Image files at any depth below `folder` (hidden folders skipped), relative to it,
    "/"-separated, sorted; a subfolder that cannot be read goes into `problems`."""
    found = []
    unreadable: list[OSError] = []
    for current, subfolders, names in os.walk(folder, onerror=unreadable.append):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        relative = os.path.relpath(current, folder)
        prefix = "" if relative == "." else relative.replace(os.sep, "/") + "/"
        found += [prefix + name for name in names if is_image_name(name)]
    problems += [f"{error.filename}: cannot read this folder ({error.strerror})" for error in unreadable]
    return sorted(found)


def image_files(image_paths: str | Sequence[str]) -> list[str]:
    """Files as given, and the image files of any folder (recursively, sorted, hidden ones
    skipped), each checked (`check_image_file`). Raises ImageFileError listing every path that
    cannot be used."""
    if isinstance(image_paths, str):
        image_paths = [image_paths]
    files, problems = [], []
    for path in image_paths:
        if os.path.isdir(path):
            unreadable: list[str] = []
            found = [os.path.join(path, name) for name in images_below(path, unreadable)]
            problems += unreadable
            if not found and not unreadable:
                problems.append(f"{path}: a folder with no image files ({', '.join(IMAGE_SUFFIXES)})")
            files += found
        elif os.path.exists(path):
            files.append(path)
        else:
            problems.append(f"{path}: no such file or folder")
    for path in files:
        try:
            check_image_file(path)
        except ImageFileError as error:
            problems.append(str(error))
    if len(problems) == 1:
        raise ImageFileError(problems[0])
    if problems:
        raise ImageFileError(f"{len(problems)} image inputs cannot be used:\n  " + "\n  ".join(problems))
    return files


@contextlib.contextmanager
def _opened(path: str):
    """The PIL image of `path`, header read, data not yet decoded; ImageFileError if it is not
    one. An image of more pixels than PIL's decompression-bomb guard allows is refused here, from
    its header; one above PIL's warning threshold only is read (a large photo, not an attack)."""
    from PIL import Image, UnidentifiedImageError  # only the file-based entry points need PIL

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except UnidentifiedImageError as error:
        raise ImageFileError(f"{path}: not an image file that PIL can read") from error
    except Image.DecompressionBombError as error:
        raise ImageFileError(
            f"{path}: too large, more than {2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} million pixels "
            f"(PIL's guard against decompression bombs); resize it first"
        ) from error
    except OSError as error:  # missing, unreadable, a folder, an I/O error
        raise ImageFileError(f"{path}: cannot be read ({error.strerror or error})") from error
    with image:
        yield image


def check_image_file(path: str) -> tuple[int, int]:
    """`(height, width)` of an image file from its header; ImageFileError if it cannot be used."""
    with _opened(path) as image:
        return image.height, image.width


def _as_rgb(image):
    """Any PIL image as 8-bit RGB. Alpha is dropped, as torchvision's loader does; 16-bit grey is
    scaled to 8 bits (PIL's own conversion would clip it at 255, a white image)."""
    from PIL import Image

    if image.mode.startswith("I;16") or image.mode == "I":
        grey = np.clip(np.rint(np.asarray(image, np.float64) / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # what PIL asks for, instead of warning
    return image.convert("RGB")


def _decoded_rgb(image, path: str):
    """`image` (opened by `_opened`) decoded and converted to 8-bit RGB; ImageFileError naming
    `path` if its data stops early or is damaged."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
    except _DECODE_ERRORS as error:
        raise ImageFileError(f"{path}: the file is truncated or damaged ({error})") from error
    return _as_rgb(image)


def load_image(path: str, size: int | tuple[int, int] | None = None) -> np.ndarray:
    """An image file as uint8 RGB `(H, W, 3)`, resized (bicubic) to `size` (int: square) if given
    and not already that size. ImageFileError naming the file if it cannot be read or decoded."""
    from PIL import Image

    with _opened(path) as image:
        image = _decoded_rgb(image, path)
    if size is not None:
        height, width = (size, size) if isinstance(size, int) else size
        image = image.resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(image, np.uint8)


def load_square_image(path: str, size: int) -> np.ndarray:
    """An image file as uint8 RGB `(size, size, 3)`: the largest centred square of the image,
    resized to `size` (bicubic, antialiased; smaller images are scaled up). Nothing is stretched:
    the sides of a wider or taller image are cut off, as a centre crop does. ImageFileError naming
    the file if it cannot be read or decoded; the same modes as `load_image` are converted.

    A JPEG is decoded at 1/2, 1/4 or 1/8 scale where its square still has at least `size` pixels
    (PIL's `draft`, done by the JPEG decoder itself): a 12-megapixel photo stored at 96 px then
    decodes several times faster, which is what makes preparing a folder of photos take minutes.
    """
    from PIL import Image

    with _opened(path) as image:
        side = min(image.width, image.height)
        if side > 0:
            scale = size / side  # the smallest decoded size that still covers `size` on the short side
            image.draft("RGB", (max(1, int(image.width * scale)), max(1, int(image.height * scale))))
        image = _decoded_rgb(image, path)
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    square = image.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))
    return np.asarray(square, np.uint8)


class ImageFileSource:
    """`files` as a random-access source of `{"image": uint8 (size, size, 3), "label": 0}`,
    each image read when it is asked for."""

    def __init__(self, files: Sequence[str], size: int):
        self.files, self.size = list(files), size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        return {"image": load_image(self.files[index], self.size), "label": 0}

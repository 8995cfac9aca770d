"""Inputs a user can get wrong, given to `launch.py --mode=embed|visualize|eval`: each is named in
one line of `error: ...` (or converted, where a user expects it), never a traceback.

`launch` runs the command line's own flag parsing and `main` (dino_jax/cli.py) in this process, as
`python launch.py ...` would (a user error leaves through `sys.exit("error: ...")`, anything else would raise here), so
the cases cost no interpreter start-up; only file permissions need a process of their own. The
checkpoint is a tiny random backbone written as .safetensors."""

import importlib.util
import os
import pathlib
import shutil
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from absl import flags
from flax import nnx
from PIL import Image

from dino_jax import cli
from dino_jax.interop import torch_convert, torch_io
from dino_jax.models.vit import VisionTransformer, ViTConfig
from tests.test_launch import FAST_COMPILE, ROOT

pytestmark = pytest.mark.usefixtures("fast_compilation")

EVAL_FLAGS = ["--mode=eval", "--config=configs/digits.py:smoke"]


def launch(*args) -> str:
    """What `python launch.py *args` prints as its error (the argument of its `sys.exit`), or ""
    when it succeeds."""
    flags.FLAGS.unparse_flags()
    try:
        cli.main(cli.parse_flags(["launch.py", *args]))
    except SystemExit as stop:
        assert isinstance(stop.code, str), f"exit status {stop.code} without a message"
        return stop.code
    return ""


def assert_error(message, *expected):
    """`message` is an `error: ...` naming each of `expected` on one of its lines."""
    assert message.startswith("error: "), message
    lines = message.splitlines()
    for text in expected:
        assert any(text in line for line in lines), f"{text!r} not in {lines}"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random 64-d, 1-block ViT at 32 pixels, patch 4, as the reference's backbone state dict."""
    config = ViTConfig(image_size=32, patch_size=4, embed_dim=64, depth=1, num_heads=1)
    _, params = nnx.split(VisionTransformer(config, rngs=nnx.Rngs(0)))
    path = str(tmp_path_factory.mktemp("checkpoint") / "backbone.safetensors")
    torch_io.save_checkpoint_file(torch_convert.backbone_to_torch(params, config), path)
    return path


def save(path, pixels, **options):
    Image.fromarray(pixels).save(path, **options)
    return str(path)


def truncated(path, source):
    data = pathlib.Path(source).read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return str(path)


def png_claiming(path, width, height):
    """A tiny PNG file whose header claims width x height pixels: a decompression bomb's header."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )
    return str(path)


def test_grey_palette_rgba_and_16_bit_images_are_embedded_as_rgb(checkpoint, tmp_path, capsys):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (24, 20), dtype=np.uint8)
    palette = Image.fromarray(rgb).quantize(16)
    palette.save(tmp_path / "palette.png")
    palette.save(tmp_path / "palette_transparent.png", transparency=0)
    files = [
        save(tmp_path / "rgb.png", rgb),
        save(tmp_path / "rgba.png", np.dstack([rgb, rng.integers(0, 256, (24, 20), dtype=np.uint8)])),
        save(tmp_path / "grey.png", grey),
        save(tmp_path / "grey16.png", grey.astype(np.uint16) * 257),  # 16-bit: 255 -> 65535
        save(tmp_path / "grey_as_rgb.png", np.repeat(grey[..., None], 3, axis=-1)),
        str(tmp_path / "palette.png"),
        str(tmp_path / "palette_transparent.png"),
        save(tmp_path / "palette_as_rgb.png", np.asarray(palette.convert("RGB"))),
    ]
    assert Image.open(files[3]).mode == "I;16"
    out = tmp_path / "e.npz"
    assert (
        launch("--mode=embed", f"--checkpoint={checkpoint}", f"--images={','.join(files)}", f"--out={out}")
        == ""
    )
    assert "Warning" not in capsys.readouterr().err
    features = dict(zip((os.path.basename(p)[:-4] for p in files), np.load(out)["features"]))
    for name, same_as in (
        ("rgba", "rgb"),  # alpha dropped, as torchvision's loader does
        ("grey", "grey_as_rgb"),
        ("grey16", "grey_as_rgb"),  # scaled to 8 bits, not clipped at 255
        ("palette", "palette_as_rgb"),
        ("palette_transparent", "palette_as_rgb"),
    ):
        np.testing.assert_allclose(features[name], features[same_as], atol=1e-6, err_msg=name)
    assert not np.allclose(features["grey"], features["rgb"], atol=1e-3)


def test_every_unusable_image_path_is_named_before_the_checkpoint_is_read(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "photos").mkdir()
    notes = tmp_path / "photos" / "notes.jpg"
    notes.write_text("not pixels")
    (tmp_path / "photos" / "._photo.jpg").write_text("a Mac's resource file: hidden, not an image")
    inputs = [
        save(tmp_path / "fine.png", np.zeros((8, 8, 3), np.uint8)),
        str(tmp_path / "missing.png"),
        str(tmp_path / "empty"),
        str(tmp_path / "photos"),
        png_claiming(tmp_path / "huge.png", 20000, 20000),
    ]
    out = tmp_path / "e.npz"
    for mode_flags in (["--mode=embed", f"--out={out}"], ["--mode=visualize", f"--workdir={tmp_path}"]):
        message = launch(*mode_flags, "--checkpoint=/nowhere.pth", f"--images={','.join(inputs)}")
        assert_error(
            message,
            "4 image inputs cannot be used",
            f"{tmp_path / 'missing.png'}: no such file or folder",
            f"{tmp_path / 'empty'}: a folder with no image files",
            f"{notes}: not an image file",
            f"{tmp_path / 'huge.png'}: too large, more than 179 million pixels",
        )
        assert len(message.splitlines()) == 5
    assert not out.exists() and not (tmp_path / "attention").exists()


def test_a_truncated_image_is_named_when_it_is_decoded_and_a_huge_photo_is_scaled_down(
    checkpoint, tmp_path, capsys
):
    rng = np.random.default_rng(1)
    photo = save(tmp_path / "photo.jpg", rng.integers(0, 256, (40, 36, 3), dtype=np.uint8))
    smooth = np.linspace(0, 255, 1200 * 900 * 3).reshape(900, 1200, 3).astype(np.uint8)
    large = save(tmp_path / "large.jpg", smooth)
    cut_jpeg = truncated(tmp_path / "cut.jpg", photo)
    cut_png = truncated(tmp_path / "cut.png", save(tmp_path / "whole.png", np.asarray(Image.open(photo))))
    message = launch(
        "--mode=embed",
        f"--checkpoint={checkpoint}",
        f"--images={photo},{cut_png}",
        f"--out={tmp_path / 'e.npz'}",
    )
    assert_error(message, f"error: {cut_png}: the file is truncated or damaged")
    message = launch(
        "--mode=visualize",
        f"--checkpoint={checkpoint}",
        f"--images={large},{cut_jpeg}",
        f"--workdir={tmp_path}",
    )
    assert_error(message, f"error: {cut_jpeg}: the file is truncated or damaged")
    # 1200 x 900 pixels is 67,500 patches of 4: attention over them all would need 18 GB.
    assert f"note: {large} holds more than 4096 patches of 4 pixels" in capsys.readouterr().err
    assert Image.open(tmp_path / "attention" / "large" / "img.png").size == (292, 220)


def test_unreadable_files_and_folders_are_named(checkpoint, tmp_path):
    image = save(tmp_path / "locked.png", np.zeros((8, 8, 3), np.uint8))
    folder = tmp_path / "locked_folder"
    folder.mkdir()
    save(folder / "inside.png", np.zeros((8, 8, 3), np.uint8))
    locked_checkpoint = tmp_path / "locked.safetensors"
    locked_checkpoint.write_bytes(pathlib.Path(checkpoint).read_bytes())
    # Root reads any file; in a process of its own it can give that up (util-linux's setpriv).
    prefix = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("run as root, and no setpriv to drop the right to read any file")
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]
    commands = [
        [
            "--mode=embed",
            f"--checkpoint={checkpoint}",
            f"--images={image},{folder}",
            f"--out={tmp_path / 'e.npz'}",
        ],
        [*EVAL_FLAGS, f"--checkpoint={locked_checkpoint}", f"--workdir={tmp_path / 'eval'}"],
    ]
    locked = [image, str(folder), str(locked_checkpoint)]
    for path in locked:
        os.chmod(path, 0)
    try:
        processes = [
            subprocess.Popen(
                [*prefix, sys.executable, "launch.py", *args],
                cwd=ROOT,
                env=dict(os.environ, **FAST_COMPILE),
                stderr=subprocess.PIPE,
                text=True,
            )
            for args in commands
        ]
        errors = [process.communicate(timeout=300)[1] for process in processes]
    finally:
        for path in locked:
            os.chmod(path, 0o755)
    assert all(process.returncode == 1 for process in processes) and "Traceback" not in "".join(errors), (
        errors
    )
    embed, evaluate = (error.strip().splitlines() for error in errors)
    assert embed[-3:] == [
        "error: 2 image inputs cannot be used:",
        f"  {folder}: cannot read this folder (Permission denied)",
        f"  {image}: cannot be read (Permission denied)",
    ]
    assert evaluate[-1] == f"error: checkpoint {locked_checkpoint} cannot be read: permission denied"


def test_an_output_that_is_a_folder_or_a_file_fails_before_any_work(checkpoint, tmp_path):
    image = save(tmp_path / "a.png", np.zeros((8, 8, 3), np.uint8))
    a_file = tmp_path / "notes.txt"
    a_file.write_text("")
    assert_error(
        launch("--mode=embed", f"--checkpoint={checkpoint}", f"--images={image}", f"--out={tmp_path}"),
        f"error: cannot write the embeddings to {tmp_path}: it is a folder; expected a file name",
    )
    assert_error(
        launch("--mode=visualize", f"--checkpoint={checkpoint}", f"--images={image}", f"--workdir={a_file}"),
        f"error: cannot write the attention maps into the folder {a_file}/attention: {a_file} is a file",
    )
    assert_error(
        launch(*EVAL_FLAGS, f"--checkpoint={checkpoint}", f"--workdir={a_file}"),
        f"error: cannot write the results into the folder {a_file}: it is a file",
    )


def test_eval_names_a_checkpoint_it_cannot_read(checkpoint, tmp_path):
    data = pathlib.Path(checkpoint).read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    (tmp_path / "folder.pth").mkdir()
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").write_text("")
    cases = {
        tmp_path / "missing.pth": "does not exist",
        cut: "cannot be read as a safetensors checkpoint: the file is truncated, damaged or in another format",
        tmp_path
        / "folder.pth": "is a directory with neither model.json (a converted checkpoint) nor config.json",
        tmp_path / "empty": "is a directory with neither model.json (a converted checkpoint) nor config.json",
        tmp_path
        / "notes": "expected a .pth/.safetensors file, a converted checkpoint directory or a training",
    }
    if importlib.util.find_spec("torch") is not None:  # a .pth file is read by torch
        (tmp_path / "notes.pth").write_text("not a checkpoint")
        cases[tmp_path / "notes.pth"] = (
            "cannot be read as a PyTorch checkpoint: the file is truncated, damaged"
        )
        cases[tmp_path / "cut.pth"] = cases[tmp_path / "notes.pth"]
        (tmp_path / "cut.pth").write_bytes(_half_of_a_pth_file())
    for path, expected in cases.items():
        message = launch(*EVAL_FLAGS, f"--checkpoint={path}", f"--workdir={tmp_path / 'eval'}")
        assert_error(message, str(path), expected)
        assert len(message.splitlines()) == 1


def _half_of_a_pth_file() -> bytes:
    import io

    import torch

    buffer = io.BytesIO()
    torch.save({"pos_embed": torch.zeros(1, 5, 8)}, buffer)
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]

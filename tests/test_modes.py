"""The convert and embed modes (dino_jax/modes/) on PyTorch files, converted checkpoints and
training workdirs."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dino_jax.data import image_files
from dino_jax.data.normalize import IMAGENET_MEAN, IMAGENET_STD, normalize_images
from dino_jax.interop import load, torch_convert
from dino_jax.models.dino import DINO
from dino_jax.modes import convert, embed

from tests.optional_torch import ref, torch
from tests.test_interop import (  # the reference checkpoint writer and comparisons
    EMBED,
    assert_same_tensors,
    numpy_state,
    reference_training_checkpoint,
    reference_wrapper,
)

pytestmark = [pytest.mark.usefixtures("fast_compilation"), pytest.mark.torch]


def restart_like_the_reference(path, network, *, teacher_in_ddp=False):
    """Resumes from our exported `path` as the reference's main_dino.py does (its
    `restart_from_checkpoint`, with PyTorch's default `torch.load`): `network()` builds the model,
    the student inside DDP. Checks that the student, teacher and center are found and every key
    matches (the reference loads with strict=False, which would let a renamed key pass) and that the
    file also loads with an explicit `weights_only=True`. Returns the restored objects and epoch."""
    student = ref.DistributedWrapper(network())
    teacher = ref.DistributedWrapper(network()) if teacher_in_ddp else network()
    dino_loss = ref.DINOLoss(student.module.head.last_layer.weight_v.shape[0], 4, 0.04, 0.04, 0, 2)
    optimizer = torch.optim.AdamW(ref.get_params_groups(student))
    run_variables = {"epoch": 0}
    messages = ref.restart_from_checkpoint(
        path, run_variables, student=student, teacher=teacher, optimizer=optimizer, dino_loss=dino_loss
    )
    for name in ("student", "teacher", "dino_loss"):
        assert messages[name] != "not found", name
        assert not messages[name].missing_keys and not messages[name].unexpected_keys, (name, messages[name])
    assert messages["optimizer"] == "not found"  # we export no optimizer state; the reference starts afresh
    args = torch.load(path, weights_only=True)["args"]
    assert all(isinstance(value, (str, int, float, bool)) for value in args.values()), args
    return {"student": student, "teacher": teacher, "dino_loss": dino_loss, **run_variables}


def test_convert_both_ways_and_embed(tmp_path):
    source = str(tmp_path / "checkpoint.pth")
    student, teacher, _ = reference_training_checkpoint(source)
    converted = str(tmp_path / "converted")
    assert "converted" in convert.run(source, converted)
    loaded = load.load_checkpoint(converted)
    assert loaded.vit_config.embed_dim == EMBED and loaded.epoch == 2
    # Ours -> the reference's training layout again, and the backbone-only form.
    back = str(tmp_path / "back.pth")
    convert.run(converted, back)
    written = torch.load(back, weights_only=True)
    assert_same_tensors({k: v.numpy() for k, v in written["teacher"].items()}, numpy_state(teacher))
    restarted = restart_like_the_reference(back, lambda: reference_wrapper(7))
    assert restarted["epoch"] == 2
    assert_same_tensors(numpy_state(restarted["student"].module), numpy_state(student))
    assert_same_tensors(numpy_state(restarted["teacher"]), numpy_state(teacher))
    backbone = str(tmp_path / "backbone.safetensors")
    convert.run(converted, backbone, backbone_only=True)
    from safetensors.numpy import load_file

    assert_same_tensors(load_file(backbone), numpy_state(teacher.backbone))

    # Embeddings of image files: one of the model's size, one resized.
    from PIL import Image

    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(folder / "b.png")
    out = str(tmp_path / "features.npz")
    result = embed.run(source, str(folder), out, batch_size=4)
    stored = np.load(out)
    assert [os.path.basename(p) for p in stored["paths"]] == ["a.png", "b.png"]
    pixels = np.stack([image_files.load_image(str(folder / name), 16) for name in ("a.png", "b.png")])
    with torch.no_grad():
        expected = teacher.backbone(
            torch.from_numpy(
                normalize_images(pixels, IMAGENET_MEAN, IMAGENET_STD).transpose(0, 3, 1, 2).copy()
            )
        ).numpy()
    np.testing.assert_allclose(stored["features"], expected, atol=1e-4)
    np.testing.assert_array_equal(result["features"], stored["features"])


def test_training_workdir_exports_to_reference(tmp_path):
    from configs import digits
    from dino_jax import checkpointing, config as config_lib
    from dino_jax.state import TrainState

    config = digits.get_config("smoke")
    config.model.dtype = "float32"  # what a run's config.json records (never "auto")
    vit_config = config_lib.vit_config(config, drop_path=False)
    head_config = config_lib.head_config(config, vit_config.embed_dim)
    _, params = nnx.split(DINO(vit_config, head_config, rngs=nnx.Rngs(0)), nnx.Param)
    teacher = jax.tree.map(lambda x: x * 0.5, params)
    state = TrainState(
        step=jnp.asarray(7),
        student=params,
        teacher=teacher,
        opt_state=(),
        center=jnp.full((1, head_config.out_dim), 0.25),
        rng=jax.random.key(0),
    )
    workdir = tmp_path / "run"
    checkpointer = checkpointing.Checkpointer(str(workdir / "checkpoints"))
    checkpointer.save(7, state, force=True)
    checkpointer.close()
    (workdir / "config.json").write_text(config.to_json_best_effort())

    out = str(tmp_path / "run.pth")
    convert.run(str(workdir), out)
    # BatchNorm head: the reference wraps the teacher in DDP too, hence `module.` on both.
    restarted = restart_like_the_reference(
        out,
        lambda: ref.MultiCropWrapper(
            ref.VisionTransformer(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2),
            ref.DINOHead(32, 256, use_bn=True, hidden_dim=64, bottleneck_dim=32),
        ),
        teacher_in_ddp=True,
    )
    np.testing.assert_array_equal(restarted["dino_loss"].center.numpy(), 0.25)
    expected = torch_convert.dino_to_torch(teacher, vit_config, head_config)
    assert_same_tensors(numpy_state(restarted["teacher"].module), expected)

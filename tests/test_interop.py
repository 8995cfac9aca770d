"""PyTorch checkpoint import/export: layouts, round trips, files, errors (dino_jax/interop/)."""

import argparse
import dataclasses
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dino_jax.interop import load, torch_convert, torch_io, torch_keys
from dino_jax.models.dino import DINO
from dino_jax.models.head import HeadConfig
from dino_jax.models.vit import ViTConfig, VisionTransformer, interpolate_pos_embed

from tests.optional_torch import ref, torch

EMBED = 64  # one head of 64: the default head count the importer infers


pytestmark = [pytest.mark.usefixtures("fast_compilation"), pytest.mark.torch]


def reference_wrapper(seed=0, use_bn=False, nlayers=3, parametrized=False, norm_last_layer=True):
    torch.manual_seed(seed)
    return ref.MultiCropWrapper(
        ref.VisionTransformer(img_size=16, patch_size=4, embed_dim=EMBED, depth=2, num_heads=1),
        ref.DINOHead(
            EMBED,
            32,
            use_bn=use_bn,
            norm_last_layer=norm_last_layer,
            nlayers=nlayers,
            hidden_dim=48,
            bottleneck_dim=16,
            parametrized=parametrized,
        ),
    )


def numpy_state(module):
    return {key: value.detach().numpy().copy() for key, value in module.state_dict().items()}


def assert_same_tensors(got, expected):
    assert sorted(got) == sorted(expected)
    for key in expected:
        np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(expected[key]), err_msg=key)


def reference_training_checkpoint(path, *, use_bn=False, norm_last_layer=False):
    """A checkpoint.pth as the reference's main_dino.py writes it (one GPU, fp16 off)."""
    student = reference_wrapper(1, use_bn=use_bn, norm_last_layer=norm_last_layer)
    teacher = reference_wrapper(2, use_bn=use_bn)
    teacher.load_state_dict(student.state_dict())
    optimizer = torch.optim.AdamW(ref.get_params_groups(student))
    loss = ref.DINOLoss(32, 4, 0.04, 0.04, 0, 2)
    crops = [
        torch.randn(2, 3, 16, 16),
        torch.randn(2, 3, 16, 16),
        torch.randn(2, 3, 8, 8),
        torch.randn(2, 3, 8, 8),
    ]
    schedule = np.full(4, 1e-3)
    ref.train_iteration(
        student,
        teacher,
        loss,
        optimizer,
        crops,
        it=0,
        epoch=1,
        lr_schedule=schedule,
        wd_schedule=schedule,
        momentum_schedule=schedule,
        clip_grad=3.0,
        freeze_last_layer=1,
    )
    args = argparse.Namespace(
        arch="vit_custom",
        patch_size=4,
        out_dim=32,
        norm_last_layer=norm_last_layer,
        use_bn_in_head=use_bn,
        lr=5e-4,
        global_crops_scale=(0.4, 1.0),
        data_path="/data/train",
    )
    teacher_prefix = "module." if use_bn else ""
    torch.save(
        {
            "student": {"module." + k: v for k, v in student.state_dict().items()},
            "teacher": {teacher_prefix + k: v for k, v in teacher.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "epoch": 2,
            "args": args,
            "dino_loss": loss.state_dict(),
        },
        path,
    )
    return student, teacher, loss


@pytest.mark.parametrize("use_bn", [False, True])
def test_reference_training_checkpoint_loads_completely(tmp_path, use_bn):
    path = str(tmp_path / "checkpoint.pth")
    student, teacher, loss = reference_training_checkpoint(path, use_bn=use_bn)
    imported = load.import_checkpoint(path)
    assert imported.vit_config == ViTConfig(
        image_size=16, patch_size=4, embed_dim=EMBED, depth=2, num_heads=1
    )
    assert imported.head_config == HeadConfig(
        in_dim=EMBED, out_dim=32, hidden_dim=48, bottleneck_dim=16, use_bn=use_bn, norm_last_layer=False
    )
    assert imported.epoch == 2 and imported.args["lr"] == 5e-4 and "state" in imported.optimizer
    np.testing.assert_array_equal(imported.center, loss.center.numpy())
    for params, module in ((imported.student, student), (imported.teacher, teacher)):
        exported = torch_convert.dino_to_torch(params, imported.vit_config, imported.head_config)
        expected = numpy_state(module)
        for key in list(expected):
            if key.rsplit(".", 1)[-1] in torch_keys.BN_BUFFERS:  # not kept: DINO never reads them
                del expected[key], exported[key]
        assert_same_tensors(exported, expected)  # every parameter used, values unchanged


def test_round_trip_pytorch_ours_pytorch_is_exact_and_loads_strict(tmp_path):
    path = str(tmp_path / "checkpoint.pth")
    student, teacher, _ = reference_training_checkpoint(path)
    imported = load.import_checkpoint(path)
    exported = torch_convert.training_checkpoint(
        imported.student,
        imported.teacher,
        imported.center,
        imported.vit_config,
        imported.head_config,
        epoch=imported.epoch,
    )
    out = str(tmp_path / "exported.pth")
    torch_io.save_checkpoint_file(exported, out)
    written = torch.load(out)  # PyTorch's default loader: weights-only since 2.6
    assert written["epoch"] == 2 and written["args"]["norm_last_layer"] is False
    assert_same_tensors(
        {k: v.numpy() for k, v in written["student"].items()},
        {"module." + k: v for k, v in numpy_state(student).items()},
    )
    assert_same_tensors({k: v.numpy() for k, v in written["teacher"].items()}, numpy_state(teacher))
    # The reference's own model definitions accept both, strictly.
    fresh = reference_wrapper(5, norm_last_layer=False)
    fresh.load_state_dict({k[len("module.") :]: v for k, v in written["student"].items()}, strict=True)
    reference_wrapper(6).load_state_dict(written["teacher"], strict=True)


@pytest.mark.parametrize(
    "use_bn, nlayers, parametrized", [(False, 3, False), (True, 3, False), (False, 1, True)]
)
def test_round_trip_ours_pytorch_ours_is_exact(use_bn, nlayers, parametrized):
    vit_config = ViTConfig(image_size=16, patch_size=4, embed_dim=EMBED, depth=2, num_heads=1)
    head_config = HeadConfig(
        in_dim=EMBED, out_dim=32, hidden_dim=48, bottleneck_dim=16, nlayers=nlayers, use_bn=use_bn
    )
    _, params = nnx.split(DINO(vit_config, head_config, rngs=nnx.Rngs(4)))
    state_dict = torch_convert.dino_to_torch(params, vit_config, head_config, parametrized=parametrized)
    # The same keys as the reference's module, and it loads them strictly.
    wrapper = reference_wrapper(use_bn=use_bn, nlayers=nlayers, parametrized=parametrized)
    assert sorted(state_dict) == sorted(wrapper.state_dict())
    wrapper.load_state_dict({k: torch.tensor(v) for k, v in state_dict.items()}, strict=True)
    back_vit, back_head, back = torch_convert.dino_from_torch(
        {"module." + k: v for k, v in state_dict.items()}
    )
    if nlayers == 1:  # no hidden layer, so no hidden width to read back
        back_head = dataclasses.replace(back_head, hidden_dim=head_config.hidden_dim)
    assert (back_vit, back_head) == (vit_config, head_config)
    for (path, original), (_, restored) in zip(nnx.to_flat_state(params), nnx.to_flat_state(back)):
        np.testing.assert_array_equal(restored.get_value(), original.get_value(), err_msg=str(path))


def test_backbone_only_export_matches_released_layout():
    config = ViTConfig(image_size=16, patch_size=4, embed_dim=EMBED, depth=2, num_heads=1)
    _, params = nnx.split(VisionTransformer(config, rngs=nnx.Rngs(1)))
    state_dict = torch_convert.backbone_to_torch(params, config)
    model = ref.VisionTransformer(img_size=16, patch_size=4, embed_dim=EMBED, depth=2, num_heads=1)
    model.load_state_dict({k: torch.tensor(v) for k, v in state_dict.items()}, strict=True)
    assert state_dict["patch_embed.proj.weight"].shape == (EMBED, 3, 4, 4)
    assert state_dict["blocks.1.attn.qkv.weight"].shape == (3 * EMBED, EMBED)
    # Through the `module.backbone.` prefixes of a training checkpoint, and back.
    config_back, back = torch_convert.backbone_from_torch(
        {"module.backbone." + k: v for k, v in state_dict.items()}
    )
    assert config_back == config
    assert_same_tensors(torch_convert.backbone_to_torch(back, config), state_dict)


def test_inferred_variants_and_head_count():
    torch.manual_seed(0)
    tiny = ref.vit("tiny", patch_size=8, img_size=32)
    config = torch_keys.infer_vit_config(numpy_state(tiny))
    assert (
        config.embed_dim,
        config.depth,
        config.num_heads,
        config.patch_size,
        config.image_size,
        config.mlp_ratio,
        config.qkv_bias,
    ) == (192, 12, 3, 8, 32, 4.0, True)
    with pytest.raises(torch_io.CheckpointFormatError, match="pass num_heads"):
        torch_keys.infer_vit_config(
            {**numpy_state(tiny), "patch_embed.proj.weight": np.zeros((100, 3, 8, 8), np.float32)}
        )


def test_one_error_lists_missing_unexpected_and_misshaped_keys():
    state_dict = numpy_state(reference_wrapper())
    del state_dict["backbone.blocks.1.mlp.fc2.bias"]
    state_dict["backbone.blocks.1.extra.weight"] = np.zeros(3, np.float32)
    state_dict["backbone.blocks.0.attn.proj.weight"] = np.zeros((EMBED, EMBED + 1), np.float32)
    with pytest.raises(torch_io.CheckpointFormatError) as error:
        torch_convert.dino_from_torch(state_dict)
    message = str(error.value)
    assert "missing keys (1): backbone.blocks.1.mlp.fc2.bias" in message
    assert "unexpected keys (1): backbone.blocks.1.extra.weight" in message
    assert (
        f"backbone.blocks.0.attn.proj.weight: got ({EMBED}, {EMBED + 1}), expected "
        f"({EMBED}, {EMBED})" in message
    )


class _RunsCodeWhenUnpickled:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_pickle_with_code_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "code_ran"
    path = str(tmp_path / "evil.pth")
    torch.save({"cls_token": torch.zeros(1, 1, 4), "payload": _RunsCodeWhenUnpickled(str(marker))}, path)
    with pytest.raises(torch_io.UnsafeCheckpointError, match="refused to load .*evil.pth"):
        load.import_checkpoint(path)
    assert not marker.exists()


def test_safetensors_round_trip_without_torch(tmp_path, monkeypatch):
    state_dict = numpy_state(reference_wrapper(3))
    path = str(tmp_path / "dino.safetensors")
    tree = {"teacher": state_dict, "dino_loss": {"center": np.ones((1, 32), np.float32)}}
    torch_io.save_checkpoint_file(tree, path)
    monkeypatch.setitem(sys.modules, "torch", None)  # any `import torch` now fails
    imported = load.import_checkpoint(path)
    assert imported.student is None and imported.head_config.out_dim == 32
    np.testing.assert_array_equal(imported.center, 1.0)
    assert_same_tensors(
        torch_convert.dino_to_torch(imported.teacher, imported.vit_config, imported.head_config), state_dict
    )


def test_resolution_change_resizes_pos_embed_like_the_reference():
    torch.manual_seed(0)
    model = ref.VisionTransformer(img_size=16, patch_size=4, embed_dim=EMBED, depth=2, num_heads=1)
    state_dict = numpy_state(model)
    config, params = torch_convert.backbone_from_torch(state_dict, image_size=24)
    assert config.image_size == 24 and params["pos_embed"].shape == (1, 37, EMBED)
    expected = interpolate_pos_embed(jnp.asarray(state_dict["pos_embed"]), 6, 6)
    np.testing.assert_array_equal(params["pos_embed"].get_value(), expected)
    images = np.random.default_rng(0).standard_normal((2, 24, 24, 3)).astype(np.float32)
    model_ours = nnx.merge(
        nnx.split(nnx.eval_shape(lambda: VisionTransformer(config, rngs=nnx.Rngs(0))))[0], params
    )
    with torch.no_grad():  # the reference interpolates at run time, to the same values
        expected_cls = model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
    np.testing.assert_allclose(jax.jit(model_ours)(images), expected_cls, atol=2e-5)

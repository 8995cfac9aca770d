"""Continuing training from a reference (PyTorch) training checkpoint: `train.init_from`
(dino_jax/interop/resume.py)."""

import json

import numpy as np
import pytest

from dino_jax import config as config_lib, train
from dino_jax.interop import load, resume, torch_keys
from tests import train_helpers as th

torch = pytest.importorskip("torch")
from tests import test_interop, torch_reference as ref  # noqa: E402  (the reference checkpoint writer)


def matching_config(path, data_dir):
    # The model test_interop.reference_wrapper builds: 64-d, 2 blocks, 1 head, patch 4, 16 px,
    # head 48 -> 16 -> 32 without BN, weight_g trained.
    return th.tiny_config(
        **{
            "dataset.data_dir": data_dir,
            "model.embed_dim": 64,
            "model.depth": 2,
            "model.num_heads": 1,
            "model.patch_size": 4,
            "augment.global_crop_size": 16,
            "augment.local_crop_size": 8,
            "head.out_dim": 32,
            "head.hidden_dim": 48,
            "head.bottleneck_dim": 16,
            "head.use_bn": False,
            "head.norm_last_layer": False,
            "train.init_from": path,
            "train.epochs": 3,
            "train.max_steps": 180,
            "train.log_every_steps": 1,
        }
    )


def test_training_continues_from_a_reference_checkpoint(tmp_path):
    path = str(tmp_path / "checkpoint.pth")
    test_interop.reference_training_checkpoint(path)  # epoch 2, one AdamW step taken
    config = matching_config(path, str(tmp_path / "tfds"))
    trainer = train.Trainer(config, str(tmp_path / "run"))
    start = trainer.restore_if_any()
    assert start == 2 * trainer.plan.steps_per_epoch == int(trainer.state.step)

    reference = torch.load(path, weights_only=False)
    np.testing.assert_array_equal(
        np.asarray(trainer.state.center), reference["dino_loss"]["center"].numpy().reshape(1, -1)
    )
    cls_ours = np.asarray(trainer.state.teacher["backbone"]["cls_token"][...])
    np.testing.assert_array_equal(cls_ours, reference["teacher"]["backbone.cls_token"].numpy())

    metrics = trainer.train()
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [start + 1, start + 2]
    # The schedules continue at the reference's epoch, not from step 0.
    assert rows[0]["lr"] == pytest.approx(float(trainer.schedules.lr[start]), rel=1e-6)
    assert np.isfinite(metrics["loss"])


def test_a_checkpoint_of_another_model_is_named_in_the_error(tmp_path):
    path = str(tmp_path / "checkpoint.pth")
    test_interop.reference_training_checkpoint(path)
    config = matching_config(path, str(tmp_path / "tfds"))
    config.head.out_dim = 64
    trainer = train.Trainer(config, str(tmp_path / "run"))
    with pytest.raises(config_lib.ConfigError, match="does not match config.model/config.head"):
        trainer.restore_if_any()


@pytest.mark.usefixtures("fast_compilation")
def test_reference_adam_moments_fill_our_optimizer(tmp_path):
    from dino_jax import optim

    path = str(tmp_path / "checkpoint.pth")
    student, _, _ = test_interop.reference_training_checkpoint(path)  # one step, last layer not frozen
    imported = load.import_checkpoint(path)
    moments = resume.torch_adam_moments(imported.optimizer, imported.vit_config, imported.head_config)
    tx = optim.make_optimizer(
        lr_fn=lambda count: 1e-3,
        weight_decay_fn=lambda count: 0.04,
        clip_grad=3.0,
        freeze_last_layer_steps=0,
        norm_last_layer=False,
    )
    opt_state = resume.fill_adam_moments(tx.init(imported.student), moments)
    ours = resume.adam_moments(opt_state)
    table = {e.torch: e for e in torch_keys.dino_key_table(imported.vit_config, imported.head_config)}
    # The reference's own resume path; the file was written by this test, so full unpickling.
    reference = torch.optim.AdamW(ref.get_params_groups(student))
    reference.load_state_dict(torch.load(path, weights_only=False)["optimizer"])
    for key, param in student.named_parameters():
        state = reference.state[param]
        first, second, count = ours[table[key].name]
        assert count == int(state["step"]) == 1
        layout = table[key].layout
        np.testing.assert_array_equal(
            torch_keys.to_torch_layout(first, layout), state["exp_avg"].numpy(), err_msg=key
        )
        np.testing.assert_array_equal(
            torch_keys.to_torch_layout(second, layout), state["exp_avg_sq"].numpy(), err_msg=key
        )

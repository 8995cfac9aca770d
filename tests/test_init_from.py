"""Continuing training from a reference (PyTorch) training checkpoint: `train.init_from`
(dino_jax/interop/resume.py)."""

import json

import numpy as np
import pytest

from bench import torch_baseline
from dino_jax import config as config_lib, sharding, train
from dino_jax.data.normalize import normalize_images
from dino_jax.interop import load, resume, torch_convert, torch_keys
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


def reference_run_at(path, config, plan):
    """The reference resuming `path` as its own restart_from_checkpoint does: student, teacher,
    AdamW state and center from the file, its schedules built from `config` as main_dino.py
    builds them."""
    checkpoint = torch.load(path, weights_only=False)  # written by this test
    unprefixed = lambda d: {k.removeprefix("module."): v for k, v in d.items()}  # noqa: E731
    student = test_interop.reference_wrapper(norm_last_layer=config.head.norm_last_layer)
    teacher = test_interop.reference_wrapper()
    student.load_state_dict(unprefixed(checkpoint["student"]))
    teacher.load_state_dict(unprefixed(checkpoint["teacher"]))
    for param in teacher.parameters():
        param.requires_grad = False
    optimizer = torch.optim.AdamW(ref.get_params_groups(student))
    optimizer.load_state_dict(checkpoint["optimizer"])
    loss, schedules = torch_baseline.build_loss_and_schedules(ref, config, plan)
    loss.center = checkpoint["dino_loss"]["center"].clone()
    return student, teacher, optimizer, loss, schedules


def test_a_step_from_the_imported_state_is_the_references_step_at_that_iteration(tmp_path):
    # Weight decay large enough that applying step 0's value instead of the checkpoint step's (the
    # bug this guards against) moves the update far beyond rounding.
    path = str(tmp_path / "checkpoint.pth")
    test_interop.reference_training_checkpoint(path)
    config = matching_config(path, str(tmp_path / "tfds"))
    config.train.weight_decay, config.train.weight_decay_end = 0.5, 5.0
    trainer = train.Trainer(config, str(tmp_path / "run"))
    start = trainer.restore_if_any()
    student, teacher, optimizer, loss, schedules = reference_run_at(path, config, trainer.plan)
    vit_config = config_lib.vit_config(config, drop_path=True)
    head_config = config_lib.head_config(config, vit_config.embed_dim)

    def ours(which):
        return torch_convert.dino_to_torch(getattr(trainer.state, which), vit_config, head_config)

    # Imported where they belong: student to student, teacher to teacher (the file's differ).
    before = {which: ours(which) for which in ("student", "teacher")}
    for which, network in (("student", student), ("teacher", teacher)):
        for key, value in network.state_dict().items():
            np.testing.assert_array_equal(before[which][key], value.numpy(), err_msg=f"{which} {key}")
    assert not np.array_equal(
        before["student"]["backbone.cls_token"], before["teacher"]["backbone.cls_token"]
    )

    batch = th.fixed_batch(config, seed=3)
    trainer.state, metrics = trainer.step_fn(trainer.state, sharding.to_global_batch(batch, trainer.mesh))
    crops = [
        torch.from_numpy(
            normalize_images(batch[group][:, view], config.dataset.mean, config.dataset.std)
            .transpose(0, 3, 1, 2)
            .copy()
        )
        for group in ("global_crops", "local_crops")
        for view in range(batch[group].shape[1])
    ]
    reference_loss = ref.train_iteration(
        student,
        teacher,
        loss,
        optimizer,
        crops,
        it=start,
        epoch=start // trainer.plan.steps_per_epoch,
        clip_grad=config.train.clip_grad,
        freeze_last_layer=config.train.freeze_last_layer,
        **schedules,
    )
    assert float(metrics["loss"]) == pytest.approx(reference_loss, rel=1e-5)
    # The student's applied update of every tensor, decay included, relative to its size.
    after = ours("student")
    for key, value in student.state_dict().items():
        theirs, mine = value.numpy() - before["student"][key], after[key] - before["student"][key]
        scale = np.linalg.norm(theirs)
        if scale == 0:
            np.testing.assert_array_equal(mine, 0.0, err_msg=key)
            continue
        error = np.linalg.norm(mine - theirs) / scale
        assert error < 1e-3, f"student {key}: update differs by {error:.3g} of its norm"
    # The teacher moves by (1 - m) of the gap at m near 1, below float32 resolution of a
    # difference: compared by value, after the EMA with the updated student.
    after = ours("teacher")
    for key, value in teacher.state_dict().items():
        theirs = value.numpy()
        error = np.linalg.norm(after[key] - theirs) / max(np.linalg.norm(theirs), 1e-30)
        assert error < 1e-6, f"teacher {key}: differs by {error:.3g} of its norm"


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

"""Numerical parity with the PyTorch reference (tests/torch_reference.py), CPU, float32.

Every comparison is `max |ours - torch| <= tol * max |torch|` on the compared tensor, with the
tolerance written at the call site.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dino_jax import losses, optim, schedules as schedules_lib, train_step as train_step_lib
from dino_jax.data.normalize import IMAGENET_MEAN, IMAGENET_STD, normalize_images
from dino_jax.interop import resume, torch_convert, torch_keys
from dino_jax.models.dino import DINO
from dino_jax.models.head import HeadConfig
from dino_jax.models.vit import ViTConfig, VisionTransformer
from dino_jax.state import TrainState
from tests.optional_torch import ref, torch

pytestmark = pytest.mark.torch


def assert_close(ours, expected, tol, what):
    ours, expected = np.asarray(ours, np.float64), np.asarray(expected, np.float64)
    assert ours.shape == expected.shape, f"{what}: shape {ours.shape} vs {expected.shape}"
    scale = max(np.abs(expected).max(), 1e-30)
    error = np.abs(ours - expected).max()
    assert error <= tol * scale, f"{what}: max |diff| {error:.3g} > {tol} x scale {scale:.3g}"


def nchw(images_NHWC):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(images_NHWC).transpose(0, 3, 1, 2)))


def random_images(seed, batch, height, width=None):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, height, width or height, 3)).astype(np.float32)


def merge(build, params):
    return nnx.merge(nnx.split(nnx.eval_shape(build))[0], params)


def forward_outputs(config, params, images):
    @jax.jit
    def run(params, images):
        model = merge(lambda: VisionTransformer(config, rngs=nnx.Rngs(0)), params)
        return model(images), model.last_self_attention(images), model.intermediate_layers(images, 2)

    return jax.device_get(run(params, images))


@pytest.mark.parametrize(
    "variant, patch, size, batch, extra_sizes",
    [
        # Local-crop size, a non-square input, and two that are neither square nor multiples of
        # the patch: the conv floors both to the trained 8 x 8 grid, yet the reference resamples
        # the position embedding (it decides on pixels: `npatch == N and w == h`).
        ("tiny", 4, 32, 2, [(16, 16), (32, 24), (32, 35), (34, 32)]),
        ("small", 16, 224, 1, []),
    ],
)
def test_vit_forward_matches_reference(variant, patch, size, batch, extra_sizes):
    torch.manual_seed(0)
    torch_model = ref.vit(variant, patch_size=patch, img_size=size).eval()
    config, params = torch_convert.backbone_from_torch(torch_model.state_dict())
    assert (config.embed_dim, config.patch_size, config.image_size) == (ref.VARIANTS[variant][0], patch, size)
    for height, width in [(size, size)] + extra_sizes:
        images = random_images(height + width, batch, height, width)
        cls, attention, layers = forward_outputs(config, params, jnp.asarray(images))
        with torch.no_grad():
            x = nchw(images)
            expected_cls = torch_model(x).numpy()
            expected_attention = torch_model.get_last_selfattention(x).numpy()
            expected_layers = [layer.numpy() for layer in torch_model.get_intermediate_layers(x, 2)]
        where = f"{variant}/{patch} at {height}x{width}"
        assert_close(cls, expected_cls, 1e-5, f"CLS features, {where}")
        assert_close(attention, expected_attention, 1e-5, f"last attention, {where}")
        for index, (layer, expected) in enumerate(zip(layers, expected_layers)):
            assert_close(layer, expected, 1e-5, f"intermediate layer {index}, {where}")


@pytest.mark.parametrize(
    "use_bn, nlayers, parametrized", [(False, 3, False), (True, 3, True), (False, 1, False)]
)
def test_dino_logits_match_reference(use_bn, nlayers, parametrized):
    torch.manual_seed(1)
    wrapper = ref.MultiCropWrapper(
        ref.VisionTransformer(img_size=16, patch_size=4, embed_dim=64, depth=2, num_heads=1),
        ref.DINOHead(
            64,
            96,
            use_bn=use_bn,
            nlayers=nlayers,
            hidden_dim=48,
            bottleneck_dim=16,
            parametrized=parametrized,
        ),
    )
    vit_config, head_config, params = torch_convert.dino_from_torch(wrapper.state_dict(), num_heads=1)
    assert (head_config.use_bn, head_config.nlayers) == (use_bn, nlayers)
    model = merge(lambda: DINO(vit_config, head_config, rngs=nnx.Rngs(0)), params)
    globals_, locals_ = random_images(0, 4, 16), random_images(1, 6, 8)
    logits = jax.jit(lambda a, b: model([a, b]))(globals_, locals_)
    with torch.no_grad():  # train mode: BatchNorm uses the batch statistics, as in DINO
        expected = wrapper(
            [nchw(globals_[:2]), nchw(globals_[2:]), nchw(locals_[:3]), nchw(locals_[3:])]
        ).numpy()
    assert_close(logits, expected, 1e-5, "head logits")


def test_dino_loss_and_center_match_reference():
    rng = np.random.default_rng(2)
    batch, crops, dim = 3, 6, 40
    student = rng.standard_normal((crops * batch, dim)).astype(np.float32)
    teacher = rng.standard_normal((2 * batch, dim)).astype(np.float32)
    center = 0.3 * rng.standard_normal((1, dim)).astype(np.float32)
    torch_loss = ref.DINOLoss(dim, crops, 0.04, 0.07, 3, 5)
    torch_loss.center = torch.from_numpy(center.copy())
    expected = torch_loss(torch.from_numpy(student), torch.from_numpy(teacher), epoch=1).item()
    loss, _ = losses.dino_loss(
        jnp.asarray(student),
        jnp.asarray(teacher),
        jnp.asarray(center),
        num_crops=crops,
        student_temperature=0.1,
        teacher_temperature=torch_loss.teacher_temp_schedule[1],
    )
    assert_close(loss, expected, 1e-6, "DINO loss")
    assert_close(
        losses.update_center(jnp.asarray(center), jnp.asarray(teacher), 0.9),
        torch_loss.center.numpy(),
        1e-6,
        "center",
    )


# ---------------------------------------------------------------------------------------------
# Training steps.


@dataclasses.dataclass(frozen=True)
class StepSetup:
    use_bn: bool
    norm_last_layer: bool
    steps_per_epoch: int = 2
    epochs: int = 3
    freeze_last_layer: int = 1  # epochs
    warmup_epochs: int = 1
    batch: int = 4
    local_crops: int = 2
    lr: float = 2e-3
    clip_grad: float = 3.0
    momentum_teacher: float = 0.9  # low, so the EMA moves the teacher visibly in three steps


def build_ours(setup: StepSetup):
    vit_config = ViTConfig(image_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    head_config = HeadConfig(
        in_dim=32,
        out_dim=64,
        hidden_dim=48,
        bottleneck_dim=16,
        use_bn=setup.use_bn,
        norm_last_layer=setup.norm_last_layer,
    )
    graphdef, params = nnx.split(DINO(vit_config, head_config, rngs=nnx.Rngs(3)), nnx.Param)
    schedules = schedules_lib.build_schedules(
        lr=setup.lr,
        min_lr=1e-5,
        warmup_epochs=setup.warmup_epochs,
        weight_decay=0.04,
        weight_decay_end=0.4,
        momentum_teacher=setup.momentum_teacher,
        warmup_teacher_temp=0.04,
        teacher_temp=0.07,
        warmup_teacher_temp_epochs=2,
        epochs=setup.epochs,
        steps_per_epoch=setup.steps_per_epoch,
    )
    tx = optim.make_optimizer(
        lr_fn=lambda count: schedules_lib.lookup(schedules.lr, count),
        weight_decay_fn=lambda count: schedules_lib.lookup(schedules.weight_decay, count),
        clip_grad=setup.clip_grad,
        freeze_last_layer_steps=setup.freeze_last_layer * setup.steps_per_epoch,
        norm_last_layer=setup.norm_last_layer,
    )
    state = TrainState(
        step=jnp.zeros([], jnp.int32),
        student=params,
        teacher=jax.tree.map(jnp.copy, params),
        opt_state=tx.init(params),
        center=jnp.zeros((1, 64), jnp.float32),
        rng=jax.random.key(0),
    )
    step = jax.jit(
        train_step_lib.make_train_step(
            graphdef,
            tx,
            schedules,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            student_temp=0.1,
            center_momentum=0.9,
        )
    )
    return vit_config, head_config, state, step


def build_reference(setup, vit_config, head_config, params, dtype):
    def network(norm_last_layer):
        return ref.MultiCropWrapper(
            ref.VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2),
            ref.DINOHead(
                32,
                64,
                use_bn=setup.use_bn,
                norm_last_layer=norm_last_layer,
                nlayers=3,
                hidden_dim=48,
                bottleneck_dim=16,
            ),
        )

    weights = {
        key: torch.tensor(value)
        for key, value in torch_convert.dino_to_torch(params, vit_config, head_config).items()
    }
    student, teacher = network(setup.norm_last_layer), network(True)
    for net in (student, teacher):
        net.load_state_dict(weights, strict=True)
        net.to(dtype)
    for param in teacher.parameters():
        param.requires_grad = False
    optimizer = torch.optim.AdamW(ref.get_params_groups(student))
    loss = ref.DINOLoss(64, 2 + setup.local_crops, 0.04, 0.07, 2, setup.epochs)
    spe, epochs = setup.steps_per_epoch, setup.epochs
    schedules = dict(
        lr_schedule=ref.cosine_scheduler(setup.lr, 1e-5, epochs, spe, setup.warmup_epochs),
        wd_schedule=ref.cosine_scheduler(0.04, 0.4, epochs, spe),
        momentum_schedule=ref.cosine_scheduler(setup.momentum_teacher, 1.0, epochs, spe),
    )
    return dict(
        student=student, teacher=teacher, optimizer=optimizer, loss=loss, schedules=schedules, dtype=dtype
    )


def make_batch(setup, seed):
    rng = np.random.default_rng(seed)
    return {
        "global_crops": rng.integers(0, 256, (setup.batch, 2, 16, 16, 3), dtype=np.uint8),
        "local_crops": rng.integers(0, 256, (setup.batch, setup.local_crops, 8, 8, 3), dtype=np.uint8),
    }


def torch_crops(batch, dtype=None):
    dtype = dtype or torch.float32
    crops = []
    for name in ("global_crops", "local_crops"):
        for view in range(batch[name].shape[1]):
            normalized = normalize_images(batch[name][:, view], IMAGENET_MEAN, IMAGENET_STD)
            crops.append(nchw(normalized).to(dtype))
    return crops


def reference_step(run, setup, batch, it):
    return ref.train_iteration(
        run["student"],
        run["teacher"],
        run["loss"],
        run["optimizer"],
        torch_crops(batch, run["dtype"]),
        it=it,
        epoch=it // setup.steps_per_epoch,
        clip_grad=setup.clip_grad,
        freeze_last_layer=setup.freeze_last_layer,
        **run["schedules"],
    )


def zero_gradient_entries(key, shape, setup, embed_dim=32):
    """Entries whose exact gradient is 0, so float rounding alone decides their Adam step (which
    Adam then scales to about +-lr, in PyTorch as here). None if the tensor has none."""
    mask = np.zeros(shape, bool)
    if key.endswith("attn.qkv.bias"):
        # A key bias adds q.b_k to every logit of a softmax row, which softmax ignores.
        mask[embed_dim : 2 * embed_dim] = True
    elif setup.use_bn and key in ("head.mlp.0.bias", "head.mlp.3.bias", "backbone.norm.bias"):
        mask[...] = True  # a per-feature constant before BatchNorm is subtracted out again
    return mask if mask.any() else None


def reference_tensors(run):
    """name -> numpy for parameters, Adam moments (sqrt of the second, to keep gradient units),
    and the center, of one reference run; moments absent while a tensor was never stepped."""
    out = {"center": run["loss"].center.double().numpy()}
    for which in ("student", "teacher"):
        for key, param in run[which].named_parameters():
            out[f"{which} {key}"] = param.detach().double().numpy()
    for key, param in run["student"].named_parameters():
        state = run["optimizer"].state.get(param)
        if state:
            out[f"adam mu {key}"] = state["exp_avg"].double().numpy()
            out[f"adam sqrt(nu) {key}"] = np.sqrt(state["exp_avg_sq"].double().numpy())
    return out


def our_tensors(state, vit_config, head_config):
    out = {"center": np.asarray(state.center, np.float64)}
    table = torch_keys.dino_key_table(vit_config, head_config)
    for which, params in (("student", state.student), ("teacher", state.teacher)):
        exported = torch_convert.dino_to_torch(params, vit_config, head_config)
        for entry in table:  # parameters only: BatchNorm buffers are not trained state
            out[f"{which} {entry.torch}"] = exported[entry.torch].astype(np.float64)
    moments = resume.adam_moments(state.opt_state)
    for entry in table:
        if entry.name in moments:
            first, second, count = moments[entry.name]
            if count:
                out[f"adam mu {entry.torch}"] = torch_keys.to_torch_layout(first, entry.layout)
                out[f"adam sqrt(nu) {entry.torch}"] = np.sqrt(
                    torch_keys.to_torch_layout(second, entry.layout).astype(np.float64)
                )
            else:  # held (last layer during the freeze): PyTorch has no state for it yet
                assert not first.any() and not second.any(), f"{entry.torch} moved while held"
    return out


# 2e-5: a first Adam step is about +-lr whatever the gradient's size, so an entry whose exact
# gradient is within rounding of zero takes the sign the rounding gives it. The order of a float32
# sum decides which few entries flip: the heads-major attention (2026-11-28) left the raw gradient
# as close to float64 as before (relative L2 1.96e-7 against 1.95e-7 over a 2-block ViT) but
# moved one qkv bias of this test from under 1e-5 to 1.46e-5 after step 1 (PyTorch's own: 4.1e-6).
STEP_TOLERANCE = 2e-5


def compare_to_exact(ours, float32_run, exact_run, setup, lr_so_far, when):
    """Per tensor, relative L2 error against the reference run in float64 ("exact"):
    ||ours - exact|| / ||exact|| <= max(STEP_TOLERANCE, 2 x the same for PyTorch's float32 run).

    Why relative L2 and not max-abs: Adam divides the first moment by the root of the second, so
    for an entry whose successive gradients nearly cancel, float32 rounding is amplified into its
    update; a few entries then differ by 1e-3 of the learning rate, in PyTorch's own float32 run as
    in ours, and with a BatchNorm head PyTorch float32 lands 1.1e-5 (relative L2) from exact after
    3 steps, hence the allowance of twice PyTorch's own error. Real mistakes (a learning rate or
    weight decay off by 1%, a wrong clip, freeze or EMA) show up as 1e-4 or more.
    """
    assert set(ours) == set(exact_run), (
        f"tensors differ {when}: only ours {sorted(set(ours) - set(exact_run))}, only reference "
        f"{sorted(set(exact_run) - set(ours))}"
    )
    for name, exact in exact_run.items():
        mine, theirs, exact = ours[name].copy(), float32_run[name].copy(), exact.copy()
        noise = zero_gradient_entries(name.rsplit(" ", 1)[-1], exact.shape, setup)
        if noise is not None:
            if not name.startswith("adam"):  # rounding-driven steps: bounded by the learning rate
                assert np.abs(mine - exact)[noise].max() <= 1.01 * lr_so_far + 1e-12, f"{name} {when}"
            mine[noise] = theirs[noise] = exact[noise] = 0.0
        norm = np.linalg.norm(exact)
        if norm == 0:
            continue
        error = np.linalg.norm(mine - exact) / norm
        reference_error = np.linalg.norm(theirs - exact) / norm
        bound = max(STEP_TOLERANCE, 2 * reference_error)
        assert error <= bound, (
            f"{name} {when}: relative L2 error {error:.3g} > {bound:.3g} (PyTorch float32 is "
            f"{reference_error:.3g} from exact)"
        )


@pytest.mark.parametrize(
    "setup, num_steps",
    [
        # One step at full learning rate, last layer free from the start.
        (StepSetup(use_bn=False, norm_last_layer=True, warmup_epochs=0, freeze_last_layer=0), 1),
        # LR warm-up from 0; steps 0-1 hold the last layer, step 2 releases it (its Adam starts
        # then); weight_g trains; BatchNorm head; teacher temperature changes between epochs.
        (StepSetup(use_bn=True, norm_last_layer=False), 3),
    ],
)
def test_training_steps_match_reference(setup, num_steps):
    vit_config, head_config, state, step = build_ours(setup)
    runs = {
        dtype: build_reference(setup, vit_config, head_config, state.student, dtype)
        for dtype in (torch.float32, torch.float64)
    }
    lr_so_far = 0.0
    for it in range(num_steps):
        batch = make_batch(setup, seed=it)
        state, metrics = step(state, batch)
        losses_ = {dtype: reference_step(run, setup, batch, it) for dtype, run in runs.items()}
        lr_so_far += runs[torch.float64]["schedules"]["lr_schedule"][it]
        assert_close(metrics["loss"], losses_[torch.float32], 1e-6, f"loss at step {it}")
        compare_to_exact(
            our_tensors(state, vit_config, head_config),
            reference_tensors(runs[torch.float32]),
            reference_tensors(runs[torch.float64]),
            setup,
            lr_so_far,
            f"after step {it}",
        )


def test_adam_bias_correction_like_reference():
    # Updates are compared directly (not parameters) so float32 parameter rounding cannot hide
    # the difference; PyTorch runs in float64 here.
    params = {"w": np.zeros((1, 4), np.float32)}
    grads = {"w": np.array([[1e-3, -2e-2, 3e-1, -4.0]], np.float32)}
    tx = optim.make_optimizer(
        lr_fn=lambda count: 1e-3,
        weight_decay_fn=lambda count: 0.0,
        clip_grad=0.0,
        freeze_last_layer_steps=0,
        norm_last_layer=True,
    )
    state = tx.init(params)
    weight = torch.nn.Parameter(torch.zeros((1, 4), dtype=torch.float64))
    adamw = torch.optim.AdamW([weight], lr=1e-3, weight_decay=0.0)
    for step in range(3):
        updates, state = tx.update(grads, state, params)
        before = weight.detach().clone()
        weight.grad = torch.tensor(grads["w"], dtype=torch.float64)
        adamw.step()
        assert_close(updates["w"], (weight.detach() - before).numpy(), 1e-6, f"Adam step {step}")


# ---------------------------------------------------------------------------------------------
# Linear probe.


def test_one_linear_probe_epoch_matches_torch_sgd():
    """One epoch of `eval.linear` (70 rows in minibatches of 16: the last has 6 rows and 10 padded
    ones) against the reference's classifier and optimiser written in torch: nn.Linear, SGD with
    momentum 0.9 and no weight decay, CosineAnnealingLR stepped per epoch, from the same weights and
    in the same minibatch order, in float64."""
    from dino_jax.eval import linear

    rng = np.random.default_rng(0)
    num_train, dim, classes, batch, epochs = 70, 64, 10, 16, 4
    train_x = rng.standard_normal((num_train, dim)).astype(np.float32)
    train_y = rng.integers(0, classes, num_train)
    learning_rate = linear.scaled_learning_rate(batch, 2.0)  # large, so that every step shows
    rates = jnp.asarray([learning_rate], jnp.float32)
    (params, opt_state), shuffle_key = linear._initial_state(
        jax.random.key(0), rates, dim=dim, num_classes=classes, epochs=epochs, steps_per_epoch=5
    )
    kernel, bias = np.asarray(params["kernel"][0]), np.asarray(params["bias"][0])
    # The reference's initialisation: weight N(0, 0.01), bias 0 (640 draws: std within 10%).
    assert kernel.std() == pytest.approx(0.01, rel=0.1) and abs(kernel.mean()) < 1e-3
    assert not bias.any()
    (params, _), _ = linear._train_epoch(
        (params, opt_state),
        jnp.asarray(train_x),
        jnp.asarray(train_y),
        jnp.asarray(train_x[:5]),
        jnp.asarray(train_y[:5]),
        shuffle_key,
        jnp.asarray(0, jnp.int32),
        rates,
        num_classes=classes,
        epochs=epochs,
        batch_size=batch,
    )

    layer = torch.nn.Linear(dim, classes).double()
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(kernel.T.astype(np.float64)))
        layer.bias.zero_()
    sgd = torch.optim.SGD(layer.parameters(), lr=learning_rate, momentum=0.9, weight_decay=0)
    annealing = torch.optim.lr_scheduler.CosineAnnealingLR(sgd, T_max=epochs, eta_min=0)
    order = torch.from_numpy(np.array(linear.minibatch_order(shuffle_key, 0, num_train)))
    x, y = torch.from_numpy(train_x.astype(np.float64)), torch.from_numpy(train_y)
    for rows in order.split(batch):  # the last minibatch is short, as the reference's loader keeps it
        sgd.zero_grad()
        torch.nn.functional.cross_entropy(layer(x[rows]), y[rows]).backward()
        sgd.step()
    annealing.step()
    assert_close(
        np.asarray(params["kernel"][0]) - kernel,
        layer.weight.detach().numpy().T - kernel,
        2e-6,  # float32 rounding: 2e-7; a weight decay of 1e-4 would show as 5e-5
        "kernel update after one epoch",
    )
    assert_close(params["bias"][0], layer.bias.detach().numpy(), 2e-6, "bias after one epoch")

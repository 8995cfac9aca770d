"""model.dtype="auto" (dino_jax/precision.py): the dtype each kind of device gets, with devices
faked; a run that names no dtype says what it picked and records it; a resumed run keeps the dtype
its workdir records; an explicit dtype wins."""

import json
import types

import jax
import pytest

from dino_jax import config as config_lib, config_validation
from dino_jax import precision, train
from dino_jax.configs import base
from tests import train_helpers as th

pytestmark = pytest.mark.usefixtures("fast_compilation")


def device(platform, kind, capability=None):
    """What `precision` reads of a `jax.Device`: CUDA devices also have `compute_capability`."""
    fields = {"platform": platform, "device_kind": kind}
    if capability is not None:
        fields["compute_capability"] = capability
    return types.SimpleNamespace(**fields)


TPU_V5E = device("tpu", "TPU v5 lite")
A100 = device("gpu", "NVIDIA A100-SXM4-40GB", "8.0")
H100 = device("gpu", "NVIDIA H100 80GB HBM3", "9.0")
T4 = device("gpu", "Tesla T4", "7.5")
V100 = device("gpu", "Tesla V100-SXM2-16GB", "7.0")
P100 = device("gpu", "Tesla P100-PCIE-16GB", "6.0")
ROCM = device("gpu", "AMD Instinct MI250X")  # no compute_capability: unknown
CPU = device("cpu", "cpu")


@pytest.mark.parametrize(
    "devices,expected",
    [
        ([TPU_V5E] * 8, "bfloat16"),
        ([A100], "bfloat16"),
        ([H100] * 8, "bfloat16"),
        ([T4], "float16"),
        ([V100] * 4, "float16"),
        ([CPU], "float32"),
        ([P100], "float32"),
        ([ROCM], "float32"),
        ([A100, T4], "float16"),  # what every device runs well
        ([H100, CPU], "float32"),
        ([], "float32"),
    ],
)
def test_auto_picks_the_fastest_safe_dtype_of_the_devices(devices, expected):
    assert precision.auto_dtype(devices) == expected
    assert precision.resolve("auto", devices).dtype == expected


def test_the_line_names_the_dtype_the_setting_and_the_device():
    assert (
        precision.resolve("auto", [H100] * 8).line
        == "compute dtype: bfloat16 (model.dtype=auto on NVIDIA H100 80GB HBM3, compute capability 9.0)"
    )
    assert precision.resolve("auto", [T4]).line == (
        "compute dtype: float16 with dynamic loss scaling "
        "(model.dtype=auto on Tesla T4, compute capability 7.5)"
    )
    assert (
        precision.resolve("auto", [TPU_V5E]).line
        == "compute dtype: bfloat16 (model.dtype=auto on TPU v5 lite)"
    )
    assert (
        precision.resolve("auto", jax.devices()).line
        == "compute dtype: float32 (model.dtype=auto on the CPU)"
    )


def test_an_explicit_dtype_wins_over_the_device_and_the_record():
    for dtype in ("float32", "bfloat16", "float16"):
        for devices in ([CPU], [H100], [T4]):
            assert precision.resolve(dtype, devices).dtype == dtype
    switched = precision.resolve("bfloat16", [H100], recorded="float32")
    assert switched.dtype == "bfloat16"
    assert (
        switched.line
        == "compute dtype: bfloat16 (model.dtype=bfloat16; this workdir's run started in float32)"
    )


def test_auto_keeps_the_dtype_the_workdir_records():
    kept = precision.resolve("auto", [A100], recorded="float16")  # started on a T4, resumed on an A100
    assert kept.dtype == "float16"
    assert kept.line == (
        "compute dtype: float16 with dynamic loss scaling (model.dtype=auto: kept as this workdir's run "
        "started (its config.json); a new run on NVIDIA A100-SXM4-40GB, compute capability 8.0 would "
        "get bfloat16)"
    )
    assert precision.resolve("auto", [T4], recorded="float32").dtype == "float32"
    assert precision.resolve("auto", [T4], recorded="auto").dtype == "float16"  # no record in effect


def test_only_a_change_into_or_out_of_float16_cannot_resume():
    for requested, recorded in [("float32", "bfloat16"), ("bfloat16", "float32"), ("auto", "float16")]:
        precision.check_resumable(precision.resolve(requested, [H100], recorded), "ckpt")
    for requested, recorded in [("float16", "float32"), ("bfloat16", "float16"), ("float32", "float16")]:
        with pytest.raises(config_lib.ConfigError, match=f"written by a {recorded} run") as error:
            precision.check_resumable(precision.resolve(requested, [H100], recorded), "ckpt")
        assert f"model.dtype=auto or {recorded}" in str(error.value)


def test_auto_is_a_valid_setting_but_never_reaches_a_model():
    config = th.tiny_config(**{"model.dtype": "auto"})  # validates
    assert base.get_config().model.dtype == config_lib.AUTO_DTYPE == "auto"  # the default
    with pytest.raises(config_lib.ConfigError, match="model.dtype = 'auto': a model needs a concrete"):
        config_lib.vit_config(config, drop_path=False)
    config.model.dtype = "float64"
    with pytest.raises(config_lib.ConfigError, match="config.model.dtype = 'float64': expected 'auto'"):
        config_validation.validate(config)


def test_the_resolved_config_is_a_copy():
    config = th.tiny_config(**{"model.dtype": "auto"})
    resolved, resolution = precision.resolved_config(config, devices=[T4])
    assert resolved.model.dtype == resolution.dtype == "float16" and config.model.dtype == "auto"
    assert resolved.is_locked == config.is_locked


def test_pallas_kernels_are_turned_off_on_gpus_older_than_ampere_and_said_where_unused():
    config = th.tiny_config(**{"model.dtype": "float16", "model.pallas_kernels": True})
    kept, line = precision.pallas_kernels_for(config, [T4])
    assert kept.model.pallas_kernels is False and config.model.pallas_kernels is True  # a copy
    assert line.startswith("pallas kernels: off (Tesla T4, compute capability 7.5: XLA compiles")
    bf16 = th.tiny_config(**{"model.dtype": "bfloat16", "model.pallas_kernels": True})
    assert precision.pallas_kernels_for(bf16, [H100]) == (
        bf16,
        "pallas kernels: on (NVIDIA H100 80GB HBM3, compute capability 9.0)",
    )
    for devices, dtype in (([CPU], "bfloat16"), ([H100] * 2, "bfloat16"), ([A100], "float32")):
        config = th.tiny_config(**{"model.dtype": dtype, "model.pallas_kernels": True})
        same, line = precision.pallas_kernels_for(config, devices)
        assert same is config and "used only on one GPU in bfloat16/float16" in line
    off = th.tiny_config()
    assert precision.pallas_kernels_for(off, [T4]) == (off, None)


def quick_run_config(**overrides):
    """The tiny model on synthetic digits, one step, the smallest evaluation: a whole `train.run`."""
    return th.tiny_config(
        **{
            "dataset.synthetic": True,
            "train.max_steps": 1,
            "train.log_to": (),
            "eval.random_init_knn": False,
            "eval.monitor_every_epochs": 0,
            "eval.attention_every_steps": 0,
            "eval.evaluators": ("knn",),
            "eval.transfer": (),
            "eval.knn_ks": (1,),
            "eval.report": False,
            **overrides,
        }
    )


def saved_dtype(workdir) -> str:
    with open(workdir / config_lib.CONFIG_FILE) as f:
        return json.load(f)["model"]["dtype"]


def test_a_run_naming_no_dtype_computes_in_float32_on_the_cpu_says_so_and_records_it(tmp_path, capsys):
    config = quick_run_config(**{"model.dtype": "auto"})
    train.run(config, str(tmp_path))
    assert "compute dtype: float32 (model.dtype=auto on the CPU)\n" in capsys.readouterr().err
    assert saved_dtype(tmp_path) == "float32"
    assert config.model.dtype == "auto"  # the caller's config is left as it was
    # What evaluation, report and resume of the workdir read: a concrete dtype.
    assert config_lib.load_run_config(str(tmp_path)).model.dtype == "float32"


def workdir_started_in(tmp_path, dtype: str):
    """A workdir as a run in `dtype` leaves it: config.json and a checkpoint of its state at step 0."""
    workdir = tmp_path / f"started_in_{dtype}"
    trainer = train.Trainer(quick_run_config(**{"model.dtype": dtype}), str(workdir))
    config_lib.save_run_config(trainer.config, str(workdir))
    trainer.checkpointer.save(0, trainer.state, trainer.data_iterator, force=True)
    trainer.checkpointer.close()
    return workdir


def test_a_resumed_auto_run_keeps_the_float16_it_started_in_and_restores_its_loss_scale(tmp_path, capsys):
    workdir = workdir_started_in(tmp_path, "float16")  # as on a T4
    trainer = train.Trainer(quick_run_config(**{"model.dtype": "auto"}), str(workdir))  # on the CPU
    assert trainer.config.model.dtype == "float16"
    said = capsys.readouterr().err
    assert (
        "compute dtype: float16 with dynamic loss scaling (model.dtype=auto: kept as this workdir's" in said
    )
    assert trainer.restore_if_any() == 0
    assert float(trainer.state.loss_scale.scale) == 2.0**16
    trainer.checkpointer.close()


def test_an_explicit_dtype_wins_on_resume_where_the_state_allows_and_is_refused_where_not(tmp_path, capsys):
    workdir = workdir_started_in(tmp_path, "float32")
    trainer = train.Trainer(quick_run_config(**{"model.dtype": "bfloat16"}), str(workdir))
    assert trainer.config.model.dtype == "bfloat16"
    said = capsys.readouterr().err
    assert "compute dtype: bfloat16 (model.dtype=bfloat16; this workdir's run started in float32)" in said
    assert trainer.restore_if_any() == 0 and trainer.state.loss_scale is None
    trainer.checkpointer.close()
    # float16's state has a loss scale the checkpoint lacks: refused before any restore, naming both.
    with pytest.raises(config_lib.ConfigError, match="written by a float32 run .* a float16 train state"):
        train.Trainer(quick_run_config(**{"model.dtype": "float16"}), str(workdir))
    # With a fresh workdir, the same explicit dtype simply runs in it (no record, no refusal).
    fresh = train.Trainer(quick_run_config(**{"model.dtype": "float16"}), str(tmp_path / "fresh"))
    assert fresh.config.model.dtype == "float16" and fresh.state.loss_scale is not None
    fresh.checkpointer.close()

"""install.sh's choice of JAX build, and the trainer's backend warning, on faked machines."""

import collections
import json
import os
import re
import subprocess
import sys

import pytest

from dino_jax import accelerator as acc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PINNED_JAX = acc.pinned_jax_version(os.path.join(ROOT, "requirements.txt"))


def nvidia_smi(driver: str, cuda: str, gpu: str = "Tesla T4") -> str:
    """The head of `nvidia-smi`'s table, as drivers 525-580 print it."""
    return (
        "+-----------------------------------------------------------------------------------------+\n"
        f"| NVIDIA-SMI {driver:<22} Driver Version: {driver:<14} CUDA Version: {cuda:<9}|\n"
        "|-----------------------------------------+------------------------+----------------------+\n"
        f"|   0  {gpu:<34} Off |   00000000:00:04.0 Off |                    0 |\n"
    )


def gpu_machine(driver: str, cuda: str, compute_cap: str = "7.5") -> acc.MachineProbe:
    return acc.MachineProbe(
        nvidia_smi=nvidia_smi(driver, cuda),
        nvidia_compute_caps=f"{compute_cap}\n",
        nvidia_proc_version=f"NVRM version: NVIDIA UNIX x86_64 Kernel Module  {driver}  Release Build\n",
        nvidia_device_files=("/dev/nvidia0",),
    )


NO_ACCELERATOR = acc.MachineProbe()
T4_CUDA_12_4 = gpu_machine("550.54.15", "12.4")


def no_runtime_probe():
    raise AssertionError("the installed JAX was probed, but this plan should not need it")


def plan(args, probe, runtime=no_runtime_probe):
    return acc.plan_install(args, probe, runtime, PINNED_JAX)


# ----------------------------------------------------------------------------------- detection


@pytest.mark.parametrize(
    "driver, cuda, compute_cap, build",
    [
        ("535.104.05", "12.2", "8.0", "cuda12"),
        ("570.86.15", "12.8", "9.0", "cuda12"),
        ("580.65.06", "13.0", "7.5", "cuda13"),
        # CUDA 13 dropped GPUs older than compute capability 7.5: a V100 keeps the CUDA 12 build.
        ("580.65.06", "13.0", "7.0", "cuda12"),
    ],
)
def test_the_driver_cuda_version_picks_the_cuda_build(driver, cuda, compute_cap, build):
    detected = acc.detect(gpu_machine(driver, cuda, compute_cap))
    assert (detected.accelerator, detected.build, detected.problem) == ("gpu", build, None)
    assert detected.found == f"NVIDIA driver {driver}, CUDA {cuda}"
    assert plan([], gpu_machine(driver, cuda, compute_cap), lambda: None).pip_args == [
        "-r",
        f"requirements-{build}.txt",
    ]


# Captured on an H100 machine (nvidia-smi's head, its compute_cap query and /proc/driver/nvidia/version).
H100_NVIDIA_SMI = """\
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 580.159.04             Driver Version: 580.159.04     CUDA Version: 13.0     |
+-----------------------------------------+------------------------+----------------------+
| GPU  Name                 Persistence-M | Bus-Id          Disp.A | Volatile Uncorr. ECC |
| Fan  Temp   Perf          Pwr:Usage/Cap |           Memory-Usage | GPU-Util  Compute M. |
|                                         |                        |               MIG M. |
|=========================================+========================+======================|
|   0  NVIDIA H100 80GB HBM3          On  |   00000000:00:06.0 Off |                    0 |
"""
H100_PROC_VERSION = (
    "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.159.04  Release Build  (nixbld@)  \n"
    "GCC version:  gcc version 15.3.0 (GCC) \n"
)


def test_the_outputs_of_a_real_h100_machine_parse():
    h100 = acc.MachineProbe(
        nvidia_smi=H100_NVIDIA_SMI,
        nvidia_compute_caps="9.0\n",
        nvidia_proc_version=H100_PROC_VERSION,
        nvidia_device_files=("/dev/nvidia0",),
    )
    assert acc.parse_nvidia(h100) == acc.NvidiaDriver("580.159.04", (13, 0), ((9, 0),))
    assert acc.detect(h100).build == "cuda13"
    without_smi = acc.MachineProbe(
        nvidia_proc_version=H100_PROC_VERSION, nvidia_device_files=("/dev/nvidia0",)
    )
    assert acc.parse_nvidia(without_smi) == acc.NvidiaDriver("580.159.04", None, ())
    assert acc.detect(without_smi).build == "cuda13"


def test_a_driver_too_old_for_cuda_12_installs_the_cpu_build_and_says_to_update_the_driver():
    old = gpu_machine("470.82.01", "11.4")
    detected = acc.detect(old)
    assert (detected.accelerator, detected.build) == ("gpu", "cpu")
    installed = plan([], old)
    assert installed.pip_args == ["-r", "requirements.txt"]
    assert "CUDA >= 12.0" in installed.notes[0] and "525.60.13" in installed.notes[0]
    assert "update the NVIDIA driver" in installed.notes[0]


def test_without_nvidia_smi_the_driver_version_from_proc_decides():
    # Some containers get the device files and the kernel driver but no nvidia-smi binary.
    for proc_line, build in [
        ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024", "cuda12"),
        ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build", "cuda13"),
        ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  525.60.11  Wed Nov 23 23:04:03 UTC 2022", "cpu"),
    ]:
        probe = acc.MachineProbe(nvidia_proc_version=proc_line + "\n", nvidia_device_files=("/dev/nvidia0",))
        assert acc.detect(probe).build == build, proc_line


def test_a_container_given_no_gpu_on_a_gpu_host_is_a_cpu_machine():
    # /proc/driver/nvidia is the host's, but no /dev/nvidia* was passed in and nvidia-smi fails.
    probe = acc.MachineProbe(
        nvidia_proc_version="NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Release Build\n"
    )
    assert acc.detect(probe) == acc.Detected(None, "cpu", "no NVIDIA GPU or TPU")


def test_no_accelerator_installs_the_cpu_pins_as_ci_does_without_probing_the_installed_jax():
    assert plan([], NO_ACCELERATOR).pip_args == ["-r", "requirements.txt"]
    assert plan(["dev"], NO_ACCELERATOR).pip_args == ["-r", "requirements.txt", "-r", "requirements-dev.txt"]


@pytest.mark.parametrize(
    "probe, found",
    [
        (acc.MachineProbe(tpu_pci_devices=("0x0063",) * 4), "4 x TPU v5e on the PCI bus"),
        (acc.MachineProbe(tpu_device_files=("/dev/accel0", "/dev/accel1")), "/dev/accel0 /dev/accel1"),
        (acc.MachineProbe(tpu_env_vars=("TPU_ACCELERATOR_TYPE",)), "TPU_ACCELERATOR_TYPE"),
    ],
)
def test_tpu_chips_device_files_or_environment_pick_the_tpu_build(probe, found):
    detected = acc.detect(probe)
    assert (detected.accelerator, detected.build) == ("tpu", "tpu")
    assert found in detected.found
    assert plan(["dev"], probe, lambda: None).pip_args == [
        "-r",
        "requirements-tpu.txt",
        "-r",
        "requirements-dev.txt",
    ]


# ----------------------------------------------------------------------------------- a runtime's own JAX


def test_a_colab_like_runtime_whose_jax_runs_on_its_gpu_keeps_it():
    colab = acc.RuntimeJax(jax_version="0.10.1", jaxlib_version="0.10.1", backend="gpu")
    installed = plan(["dev"], T4_CUDA_12_4, lambda: colab)
    # No jax file: the libraries, the test extras, and the installed versions pinned so pip keeps them.
    assert installed.pip_args == [
        "-r",
        "requirements-libs.txt",
        "-r",
        "requirements-dev.txt",
        "jax==0.10.1",
        "jaxlib==0.10.1",
    ]
    assert "keeping it" in installed.notes[0]


def test_a_colab_like_tpu_runtime_keeps_its_jax():
    colab = acc.RuntimeJax(jax_version=PINNED_JAX, jaxlib_version=PINNED_JAX, backend="tpu")
    installed = plan([], acc.MachineProbe(tpu_device_files=("/dev/accel0",)), lambda: colab)
    assert installed.pip_args[:2] == ["-r", "requirements-libs.txt"]


def test_a_runtime_jax_of_another_minor_release_or_on_the_cpu_is_replaced_by_the_pinned_build():
    too_old = acc.RuntimeJax(jax_version="0.7.2", jaxlib_version="0.7.2", backend="gpu")
    installed = plan([], T4_CUDA_12_4, lambda: too_old)
    assert installed.pip_args == ["-r", "requirements-cuda12.txt"]
    assert (
        "0.7.2" in installed.notes[0]
        and f"needs {'.'.join(PINNED_JAX.split('.')[:2])}.x" in installed.notes[0]
    )
    # The pinned version, but the CPU-only jaxlib: on a GPU machine that is what must be fixed.
    cpu_only = acc.RuntimeJax(jax_version=PINNED_JAX, jaxlib_version=PINNED_JAX, backend="cpu")
    assert plan([], T4_CUDA_12_4, lambda: cpu_only).pip_args == ["-r", "requirements-cuda12.txt"]
    assert plan([], T4_CUDA_12_4, lambda: None).pip_args == ["-r", "requirements-cuda12.txt"]


def test_a_runtime_jax_newer_than_the_pin_is_replaced_by_the_pinned_build_for_its_accelerator():
    # What the notebooks' set-up cell meets on a Colab runtime that ships a newer JAX.
    newer = ".".join([PINNED_JAX.split(".")[0], str(int(PINNED_JAX.split(".")[1]) + 1), "0"])
    on_gpu = acc.RuntimeJax(jax_version=newer, jaxlib_version=newer, backend="gpu")
    installed = plan([], T4_CUDA_12_4, lambda: on_gpu)
    assert installed.pip_args == ["-r", "requirements-cuda12.txt"]
    assert f"JAX {newer} runs on it, but dino_jax needs" in installed.notes[0]
    on_tpu = acc.RuntimeJax(jax_version=newer, jaxlib_version=newer, backend="tpu")
    tpu = acc.MachineProbe(tpu_device_files=("/dev/accel0",))
    assert plan([], tpu, lambda: on_tpu).pip_args == ["-r", "requirements-tpu.txt"]


# ----------------------------------------------------------------------------------- forcing


def test_a_forced_build_overrides_detection_and_keeps_no_runtime_jax():
    assert plan(["cpu"], T4_CUDA_12_4).pip_args == ["-r", "requirements.txt"]
    assert plan(["cuda13", "dev"], NO_ACCELERATOR).pip_args == [
        "-r",
        "requirements-cuda13.txt",
        "-r",
        "requirements-dev.txt",
    ]
    assert plan(["dev", "tpu"], T4_CUDA_12_4).pip_args[:2] == ["-r", "requirements-tpu.txt"]


def test_forcing_cuda13_on_a_cuda_12_driver_warns_that_jax_will_not_start_on_the_gpu():
    notes = plan(["cuda13"], T4_CUDA_12_4).notes
    assert any("CUDA >= 13.0" in note and "will not start on the GPU" in note for note in notes)
    assert len(plan(["cuda12"], T4_CUDA_12_4).notes) == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["cuda11"],
            "unknown argument 'cuda11': expected 'dev' (test extras) and/or one of cpu, cuda12, cuda13, tpu",
        ),
        (["gpu"], "unknown argument 'gpu'"),
        (["cpu", "cuda12"], "two builds asked for, 'cpu' and 'cuda12'"),
    ],
)
def test_a_wrong_argument_says_what_is_expected(args, message):
    with pytest.raises(acc.InstallError, match=re.escape(message)):
        plan(args, NO_ACCELERATOR)


# ----------------------------------------------------------------------------------- install.sh


def install_sh(*args):
    return subprocess.run(
        ["bash", "install.sh", "--dry-run", *args],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_install_sh_passes_its_arguments_to_the_module_and_prints_the_pip_commands():
    out = install_sh("dev", "cuda12")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[:2] == [
        "python -m pip install -q --upgrade pip",
        "python -m pip install -q -r requirements-cuda12.txt -r requirements-dev.txt",
    ]
    assert "installing JAX's CUDA 12 build as asked" in out.stderr


def test_install_sh_dev_puts_libtpu_in_the_private_folder_the_tpu_compiles_read():
    from dino_jax import aot

    folder = os.path.expanduser(aot.LIBTPU_CACHE_DIR)
    command = f"python -m pip install -q --no-deps --upgrade --target {folder} libtpu=={aot.LIBTPU_VERSION}"
    out = install_sh("dev", "cpu")
    assert out.returncode == 0, out.stderr
    assert any(
        line.startswith(command + "  # only if `import libtpu` fails") for line in out.stdout.splitlines()
    )
    assert "libtpu" not in install_sh("cpu").stdout  # the runtime set alone does not compile for TPUs


def test_install_sh_stops_on_a_wrong_argument_before_installing_anything():
    out = install_sh("cuda11")
    assert out.returncode == 2
    assert out.stdout == ""
    assert "install.sh: error: unknown argument 'cuda11'" in out.stderr


def test_the_module_runs_before_jax_is_installed():
    # install.sh runs it first on a fresh machine: it (and dino_jax/__init__.py) must import no
    # third-party package.
    code = "import json, sys, dino_jax.accelerator; print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert not {"jax", "jaxlib", "numpy", "flax"} & set(json.loads(out.stdout))


def read_pins(name):
    with open(os.path.join(ROOT, name)) as f:
        return [line.split("#")[0].strip() for line in f if line.split("#")[0].strip()]


def test_the_requirement_files_pin_each_plugin_at_the_jax_version():
    assert read_pins("requirements.txt") == [
        f"jax=={PINNED_JAX}",
        f"jaxlib=={PINNED_JAX}",
        "-r requirements-libs.txt",
    ]
    for cuda in ("cuda12", "cuda13"):
        assert read_pins(f"requirements-{cuda}.txt") == [
            "-r requirements.txt",
            f"jax-{cuda}-plugin[with-cuda]=={PINNED_JAX}",
            f"jax-{cuda}-pjrt=={PINNED_JAX}",
        ]
    tpu = read_pins("requirements-tpu.txt")
    assert tpu[:2] == ["-r requirements.txt", f"jax[tpu]=={PINNED_JAX}"]
    assert re.fullmatch(r"libtpu==[\d.]+", tpu[2])
    # A runtime that keeps its own JAX installs these two: neither may bring another JAX.
    for name in ("requirements-libs.txt", "requirements-dev.txt"):
        assert not [p for p in read_pins(name) if re.match(r"(jax|jaxlib)\b|-r ", p)], name


# ----------------------------------------------------------------------------------- the trainer's check


def warning(backend, probe, plugins=None, environ=None):
    return acc.backend_warning(backend, probe, plugins or {}, environ or {})


def test_a_visible_gpu_with_jax_on_the_cpu_names_the_install_command():
    message = warning("cpu", T4_CUDA_12_4)
    assert message.startswith("WARNING: an NVIDIA GPU is visible (NVIDIA driver 550.54.15, CUDA 12.4)")
    assert "`bash install.sh cuda12`" in message and "`bash install.sh dev cuda12`" in message
    assert "`bash install.sh cuda13`" in warning("cpu", gpu_machine("580.65.06", "13.0"))


def test_an_installed_plugin_that_did_not_start_is_named():
    message = warning("cpu", T4_CUDA_12_4, plugins={"cuda12": "0.10.2"})
    assert "jax-cuda12-plugin 0.10.2 is installed but JAX did not start it" in message
    assert "jax.devices('gpu')" in message


def test_a_visible_tpu_with_jax_on_the_cpu_names_the_tpu_install():
    message = warning("cpu", acc.MachineProbe(tpu_pci_devices=("0x006f",)))
    assert message.startswith("WARNING: a TPU is visible (1 x TPU v6e on the PCI bus)")
    assert "`bash install.sh tpu`" in message


def test_a_gpu_whose_driver_is_too_old_asks_for_a_driver_update():
    message = warning("cpu", gpu_machine("470.82.01", "11.4"))
    assert "update the NVIDIA driver" in message and "install.sh cuda" not in message


def test_no_warning_when_jax_uses_the_accelerator_there_is_none_or_the_cpu_was_asked_for():
    assert warning("gpu", T4_CUDA_12_4) is None
    assert warning("tpu", acc.MachineProbe(tpu_device_files=("/dev/accel0",))) is None
    assert warning("cpu", NO_ACCELERATOR) is None
    assert warning("cpu", T4_CUDA_12_4, environ={"JAX_PLATFORMS": "cpu"}) is None
    assert warning("cpu", T4_CUDA_12_4, environ={"JAX_PLATFORMS": "cuda,cpu"}) is not None


def test_the_device_line_counts_devices_by_kind():
    Device = collections.namedtuple("Device", "device_kind")
    devices = [Device("NVIDIA H100 80GB HBM3")] * 8
    assert (
        acc.device_line("gpu", devices, 2)
        == "JAX backend gpu: 8 device(s) (8 x NVIDIA H100 80GB HBM3) in 2 process(es)"
    )

"""Which JAX build this machine needs (CPU, CUDA 12, CUDA 13 or TPU), and whether JAX runs on it.

`bash install.sh` runs `python -m dino_jax.accelerator [dev] [cpu|cuda12|cuda13|tpu]` *before* JAX is
installed, so this module imports nothing beyond the standard library. It prints the arguments of
the `pip install` to run on stdout, and what it found and chose on stderr. The trainer calls
`describe_backend` to print the devices it runs on, with a warning when a GPU or TPU is visible but
JAX runs on the CPU.

Looking at the machine (`probe_machine`: subprocesses, /proc, /sys, /dev) is kept apart from
deciding: every decision is a function of a `MachineProbe` of raw text, so tests fake machines.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import os
import re
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence

BUILDS = ("cpu", "cuda12", "cuda13", "tpu")
BUILD_NAMES = {"cpu": "CPU", "cuda12": "CUDA 12", "cuda13": "CUDA 13", "tpu": "TPU"}
REQUIREMENTS = {
    "cpu": "requirements.txt",
    "cuda12": "requirements-cuda12.txt",
    "cuda13": "requirements-cuda13.txt",
    "tpu": "requirements-tpu.txt",
}
# Everything but JAX itself: what a runtime that keeps its own JAX gets.
LIBS_REQUIREMENTS = "requirements-libs.txt"
DEV_REQUIREMENTS = "requirements-dev.txt"
# The JAX build each pinned plugin package belongs to (a plugin that is installed but not loaded
# explains a GPU/TPU that JAX does not use).
PLUGIN_PACKAGES = {"cuda12": "jax-cuda12-plugin", "cuda13": "jax-cuda13-plugin", "tpu": "libtpu"}

# jax 0.10.2's Requires-Python; on 3.10 pip would only say "no matching distribution for jax".
MIN_PYTHON = (3, 11)
# The CUDA version the driver must support for each CUDA build (JAX's installation guide: driver
# >= 525 for CUDA 12, >= 580 for CUDA 13). nvidia-smi prints it as "CUDA Version: 12.4"; when only
# the driver version is known (no nvidia-smi), the driver version is compared instead.
MIN_DRIVER_CUDA = {"cuda13": (13, 0), "cuda12": (12, 0)}
MIN_DRIVER_VERSION = {"cuda13": (580, 0, 0), "cuda12": (525, 60, 13)}
# CUDA 13 dropped GPUs older than Turing: a V100 (7.0) with a new driver still needs the CUDA 12 build.
CUDA13_MIN_COMPUTE_CAPABILITY = (7, 5)

# Google's PCI vendor id, and the device ids of its TPUs (the table JAX's own hardware_utils uses;
# the same vendor id also covers Google's virtual NIC, so the device id must match too).
GOOGLE_PCI_VENDOR = "0x1ae0"
TPU_PCI_DEVICE_IDS = {
    "0x0027": "TPU v2/v3",
    "0x0056": "TPU",
    "0x005e": "TPU v4",
    "0x0062": "TPU v5p",
    "0x0063": "TPU v5e",
    "0x006f": "TPU v6e",
    "0x0076": "TPU7x",
}
# Variables that TPU hosts set (GKE TPU pods, Colab's older TPU runtime): a weaker sign than chips on
# the PCI bus or TPU device files, so they are looked at last.
TPU_ENV_VARS = ("TPU_ACCELERATOR_TYPE", "TPU_NAME", "TPU_WORKER_ID", "COLAB_TPU_ADDR")
# JAX_PLATFORMS names under which JAX would use each accelerator.
JAX_PLATFORM_NAMES = {"gpu": ("cuda", "gpu"), "tpu": ("tpu",)}


class InstallError(ValueError):
    """A wrong install.sh argument or an unsupported Python; the message says what was expected."""


@dataclasses.dataclass(frozen=True)
class MachineProbe:
    """What the machine shows, unparsed. The defaults describe a machine with no accelerator."""

    nvidia_smi: str | None = None  # `nvidia-smi` output; None when it is missing or fails
    nvidia_compute_caps: str | None = None  # `nvidia-smi --query-gpu=compute_cap --format=csv,noheader`
    nvidia_proc_version: str | None = None  # /proc/driver/nvidia/version: the kernel driver's version
    # /dev/nvidia0...: a GPU this process may use. /proc/driver is not namespaced, so a container on a
    # GPU host shows the driver even when it was given no GPU; the device files are what it was given.
    nvidia_device_files: tuple[str, ...] = ()
    tpu_pci_devices: tuple[str, ...] = ()  # PCI device ids of Google TPU chips, one per chip
    tpu_device_files: tuple[str, ...] = ()  # /dev/accel0...: the TPU driver's chips
    tpu_env_vars: tuple[str, ...] = ()  # which of TPU_ENV_VARS are set


@dataclasses.dataclass(frozen=True)
class NvidiaDriver:
    version: str | None  # "550.54.15" (as printed: "580.65.06" is not "580.65.6")
    cuda: tuple[int, int] | None  # the newest CUDA the driver supports, (12, 4)
    compute_capabilities: tuple[tuple[int, int], ...]  # one per GPU, (7, 5); empty when not reported

    def describe(self) -> str:
        version = self.version or "of unknown version"
        cuda = f", CUDA {self.cuda[0]}.{self.cuda[1]}" if self.cuda else ""
        return f"NVIDIA driver {version}{cuda}"

    def supports(self, build: str) -> bool:
        if self.cuda is not None:
            return self.cuda >= MIN_DRIVER_CUDA[build]
        if self.version is not None:
            return _version_tuple(self.version) >= MIN_DRIVER_VERSION[build]
        return build == "cuda12"  # a driver that says nothing: try the build that asks least of it


@dataclasses.dataclass(frozen=True)
class Detected:
    """The accelerator found (`None`, "gpu" or "tpu", as JAX names its backend) and the build for it."""

    accelerator: str | None
    build: str  # one of BUILDS; "cpu" also for a GPU whose driver is too old for any CUDA build
    found: str  # what was found, for the user: "NVIDIA driver 550.54.15, CUDA 12.4"
    problem: str | None = None  # why the accelerator cannot be used, when it cannot


@dataclasses.dataclass(frozen=True)
class RuntimeJax:
    """The JAX already installed in this Python environment, and the backend it starts on."""

    jax_version: str
    jaxlib_version: str
    backend: str  # jax.default_backend(): "cpu", "gpu" or "tpu"


@dataclasses.dataclass(frozen=True)
class InstallPlan:
    pip_args: list[str]  # for `python -m pip install`
    notes: list[str]  # what was found and chosen, for the user


# ----------------------------------------------------------------------------------- the machine


def _run(command: Sequence[str]) -> str | None:
    # nvidia-smi answers in well under a second; one stuck on a broken driver must not stall training.
    try:
        done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def probe_machine(environ: Mapping[str, str] = os.environ) -> MachineProbe:
    """Looks at this machine (about 0.1 s; nothing here loads a GPU or TPU runtime)."""
    tpu_pci_devices = []
    for vendor_path in sorted(glob.glob("/sys/bus/pci/devices/*/vendor")):
        if (_read(vendor_path) or "").strip() == GOOGLE_PCI_VENDOR:
            device_id = (_read(os.path.join(os.path.dirname(vendor_path), "device")) or "").strip()
            if device_id in TPU_PCI_DEVICE_IDS:
                tpu_pci_devices.append(device_id)
    nvidia_smi = _run(["nvidia-smi"])
    compute_caps_query = ["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"]
    return MachineProbe(
        nvidia_smi=nvidia_smi,
        nvidia_compute_caps=_run(compute_caps_query) if nvidia_smi is not None else None,
        nvidia_proc_version=_read("/proc/driver/nvidia/version"),
        nvidia_device_files=tuple(sorted(glob.glob("/dev/nvidia[0-9]*"))),
        tpu_pci_devices=tuple(tpu_pci_devices),
        # /dev/accel0 (not /dev/accel/accel0, which is Intel's NPU driver). /dev/vfio/N is not
        # evidence by itself: hosts that pass GPUs or NICs to VMs have it too; TPUs behind vfio
        # (v5e, v6e) show up on the PCI bus above.
        tpu_device_files=tuple(sorted(glob.glob("/dev/accel[0-9]*"))),
        tpu_env_vars=tuple(name for name in TPU_ENV_VARS if environ.get(name)),
    )


def probe_runtime_jax() -> RuntimeJax | None:
    """The installed JAX's versions and default backend, from a fresh interpreter (starting a GPU or
    TPU backend can hang or crash; that must not take install.sh down). None: no working JAX."""
    code = (
        "import jax, jaxlib; print(jax.__version__); print(jaxlib.__version__); print(jax.default_backend())"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = done.stdout.split()
    if done.returncode != 0 or len(lines) < 3:
        return None
    return RuntimeJax(*lines[-3:])


def installed_plugins() -> dict[str, str]:
    """Build -> version of its JAX plugin package, for those installed."""
    import importlib.metadata

    versions = {}
    for build, package in PLUGIN_PACKAGES.items():
        try:
            versions[build] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


# ----------------------------------------------------------------------------------- deciding


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text))


def parse_nvidia(probe: MachineProbe) -> NvidiaDriver | None:
    """The NVIDIA driver, when this process can use a GPU through it; None otherwise."""
    smi = probe.nvidia_smi if probe.nvidia_smi and "Driver Version" in probe.nvidia_smi else None
    if smi is None and not probe.nvidia_device_files:
        return None
    version = cuda = None
    if smi is not None:
        match = re.search(r"Driver Version:\s*(\d+(?:\.\d+)*)", smi)
        version = match.group(1) if match else None
        match = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", smi)
        cuda = (int(match.group(1)), int(match.group(2))) if match else None
    if version is None and probe.nvidia_proc_version:
        # "NVRM version: NVIDIA UNIX [Open Kernel Module for] x86_64  550.54.15  Release Build ..."
        match = re.search(r"Kernel Module.*?\s(\d+\.\d+(?:\.\d+)?)\s", probe.nvidia_proc_version)
        version = match.group(1) if match else None
    capabilities = tuple(
        (int(major), int(minor))
        for major, minor in re.findall(r"^\s*(\d+)\.(\d+)\s*$", probe.nvidia_compute_caps or "", re.MULTILINE)
    )
    return NvidiaDriver(version, cuda, capabilities)


def parse_tpu(probe: MachineProbe) -> str | None:
    """What shows a TPU, for the user ("4 x TPU v5e on the PCI bus"); None when nothing does."""
    if probe.tpu_pci_devices:
        chips = collections.Counter(TPU_PCI_DEVICE_IDS[d] for d in probe.tpu_pci_devices)
        return ", ".join(f"{n} x {name}" for name, n in chips.items()) + " on the PCI bus"
    if probe.tpu_device_files:
        return "TPU device files " + " ".join(probe.tpu_device_files)
    if probe.tpu_env_vars:
        return "TPU environment variables " + " ".join(probe.tpu_env_vars)
    return None


def detect(probe: MachineProbe) -> Detected:
    """The accelerator on this machine and the JAX build that uses it. A GPU wins over a TPU
    (no machine is known to have both)."""
    driver = parse_nvidia(probe)
    if driver is not None:
        found = driver.describe()
        if driver.supports("cuda13") and all(
            c >= CUDA13_MIN_COMPUTE_CAPABILITY for c in driver.compute_capabilities
        ):
            return Detected("gpu", "cuda13", found)
        if driver.supports("cuda12"):
            return Detected("gpu", "cuda12", found)
        major, minor = MIN_DRIVER_CUDA["cuda12"]
        return Detected(
            "gpu",
            "cpu",
            found,
            problem=f"JAX's CUDA builds need a driver that supports CUDA >= {major}.{minor} (driver >= "
            f"{'.'.join(map(str, MIN_DRIVER_VERSION['cuda12']))}): update the NVIDIA driver, then run "
            "`bash install.sh` again",
        )
    tpu = parse_tpu(probe)
    if tpu is not None:
        return Detected("tpu", "tpu", tpu)
    return Detected(None, "cpu", "no NVIDIA GPU or TPU")


def same_minor_release(version: str, pinned: str) -> bool:
    """JAX's minor releases break APIs and its patch releases do not; the pinned libraries (flax
    0.12.8: jax >= 0.10.0) accept any patch release of the pinned minor one."""
    return _version_tuple(version)[:2] == _version_tuple(pinned)[:2]


def parse_install_args(args: Sequence[str]) -> tuple[bool, str | None]:
    """install.sh's arguments -> (test extras wanted, forced build or None), in any order."""
    dev, forced = False, None
    for arg in args:
        if arg == "dev":
            dev = True
        elif arg in BUILDS:
            if forced is not None and forced != arg:
                raise InstallError(
                    f"two builds asked for, {forced!r} and {arg!r}: name one of {', '.join(BUILDS)}"
                )
            forced = arg
        else:
            raise InstallError(
                f"unknown argument {arg!r}: expected 'dev' (test extras) and/or one of {', '.join(BUILDS)} "
                "(force a JAX build; default: the one this machine's GPU/TPU needs), or --dry-run"
            )
    return dev, forced


def plan_install(
    args: Sequence[str],
    probe: MachineProbe,
    runtime_jax: Callable[[], RuntimeJax | None],
    pinned_jax: str,
) -> InstallPlan:
    """What `bash install.sh ARGS` installs. Without a forced build: the build for the accelerator
    found, except that a runtime whose own JAX already runs on that accelerator (Colab) keeps it when
    it is a release of the pinned minor version (`runtime_jax` is only called then)."""
    dev, forced = parse_install_args(args)
    extras = ["-r", DEV_REQUIREMENTS] if dev else []
    detected = detect(probe)
    if forced is not None:
        notes = [f"{detected.found} found; installing JAX's {BUILD_NAMES[forced]} build as asked"]
        driver = parse_nvidia(probe)
        if forced.startswith("cuda") and driver is not None and not driver.supports(forced):
            major, minor = MIN_DRIVER_CUDA[forced]
            notes.append(
                f"warning: the {BUILD_NAMES[forced]} build needs a driver that supports CUDA >= "
                f"{major}.{minor}; "
                f"with {driver.describe()} JAX will not start on the GPU"
            )
        return InstallPlan(["-r", REQUIREMENTS[forced], *extras], notes)

    build = detected.build
    if detected.problem is not None:
        note = f"{detected.found} found, but {detected.problem}; installing JAX's CPU build meanwhile"
    elif detected.accelerator is None:
        note = f"{detected.found} found: installing JAX's CPU build"
    else:
        runtime = runtime_jax()
        runs_here = runtime is not None and runtime.backend == detected.accelerator
        if runs_here and same_minor_release(runtime.jax_version, pinned_jax):
            note = (
                f"{detected.found} found; this environment's JAX {runtime.jax_version} already runs on it: "
                f"keeping it (`bash install.sh {build}` installs the pinned {pinned_jax} instead)"
            )
            # Naming the installed versions keeps pip from swapping them while it resolves the rest.
            pins = [f"jax=={runtime.jax_version}", f"jaxlib=={runtime.jaxlib_version}"]
            return InstallPlan(["-r", LIBS_REQUIREMENTS, *extras, *pins], [note])
        note = f"{detected.found} found: installing JAX {pinned_jax} with its {BUILD_NAMES[build]} build"
        if runs_here:
            pinned_minor = ".".join(pinned_jax.split(".")[:2])
            note += (
                f" (this environment's JAX {runtime.jax_version} runs on it, but dino_jax needs "
                f"{pinned_minor}.x)"
            )
    return InstallPlan(["-r", REQUIREMENTS[build], *extras], [note])


def pinned_jax_version(requirements_path: str) -> str:
    with open(requirements_path) as f:
        match = re.search(r"^jax==(\S+)", f.read(), re.MULTILINE)
    if match is None:
        raise InstallError(f"{requirements_path} pins no jax version (expected a line 'jax==X.Y.Z')")
    return match.group(1)


# ----------------------------------------------------------------------------------- training


def device_line(backend: str, devices: Sequence, process_count: int) -> str:
    """'JAX backend gpu: 8 device(s) (8 x NVIDIA H100 80GB HBM3) in 1 process(es)'. `devices` are
    jax.devices() (anything with a `device_kind`)."""
    kinds = collections.Counter(device.device_kind for device in devices)
    kinds_text = ", ".join(f"{n} x {kind}" for kind, n in kinds.items())
    return f"JAX backend {backend}: {len(devices)} device(s) ({kinds_text}) in {process_count} process(es)"


def backend_warning(
    backend: str, probe: MachineProbe, plugins: Mapping[str, str], environ: Mapping[str, str]
) -> str | None:
    """A warning when this machine has a GPU or TPU but JAX's backend is the CPU, naming the command
    that fixes it; None when JAX uses what the machine has, or when JAX_PLATFORMS asked for the CPU."""
    detected = detect(probe)
    if backend != "cpu" or detected.accelerator is None:
        return None
    asked = environ.get("JAX_PLATFORMS", "")
    if asked and not any(name in asked.split(",") for name in JAX_PLATFORM_NAMES[detected.accelerator]):
        return None
    what = "an NVIDIA GPU" if detected.accelerator == "gpu" else "a TPU"
    head = f"WARNING: {what} is visible ({detected.found}) but JAX runs on the CPU, which is far slower"
    if detected.problem is not None:
        return f"{head}.\nWARNING: {detected.problem}."
    fix = f"`bash install.sh {detected.build}` (`bash install.sh dev {detected.build}` adds the test extras)"
    build = detected.build
    if build in plugins:
        return (
            f"{head}.\nWARNING: {PLUGIN_PACKAGES[build]} {plugins[build]} is installed but JAX did not start "
            f"it; `python -c \"import jax; jax.devices('{detected.accelerator}')\"` shows why. Reinstall the "
            f"pinned build: {fix}."
        )
    return f"{head}.\nWARNING: JAX's {BUILD_NAMES[build]} build is not installed. Install it: {fix}."


def describe_backend(backend: str, devices: Sequence, process_count: int) -> str:
    """The trainer's first line about hardware: the device line, and the warning when there is one."""
    warning = backend_warning(backend, probe_machine(), installed_plugins(), os.environ)
    line = device_line(backend, devices, process_count)
    return line if warning is None else f"{line}\n{warning}"


def main(argv: Sequence[str]) -> int:
    """`python -m dino_jax.accelerator [dev] [BUILD]`: the pip arguments on stdout, notes on stderr."""
    try:
        if sys.version_info < MIN_PYTHON:
            raise InstallError(
                f"Python {sys.version_info.major}.{sys.version_info.minor} is too old: the pinned JAX needs "
                f"Python >= {MIN_PYTHON[0]}.{MIN_PYTHON[1]}"
            )
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        pinned = pinned_jax_version(os.path.join(root, REQUIREMENTS["cpu"]))
        plan = plan_install(argv, probe_machine(), probe_runtime_jax, pinned)
    except InstallError as error:
        print(f"install.sh: error: {error}", file=sys.stderr)
        return 2
    for note in plan.notes:
        print(f"install.sh: {note}", file=sys.stderr)
    print(" ".join(plan.pip_args))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

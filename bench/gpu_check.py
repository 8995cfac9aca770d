"""Everything one accelerator can tell us about training speed, in one command (bench/gpu_check.sh).

    bash bench/gpu_check.sh OUT_DIR            # on a GPU machine: at most ~8 minutes
    bash bench/gpu_check.sh OUT_DIR --cpu      # the same flow on a CPU with a tiny model (a test runs it)

For each variant (recipe x augmentation place x compute dtype x batch) the real trainer
(`train.Trainer`, synthetic data shaped like the dataset, `dataset.synthetic=True`) runs a few
dozen steps in its own process, and we record:
- end-to-end images/s in the steady state (the trainer's own progress figures after the warm-up
  steps: input pipeline, host->device transfer, step and logging together), and the jitted step
  alone on one batch already on the device;
- FLOPs per step from XLA's cost analysis of the step as lowered (before optimisation: after it,
  GPU matrix products are library calls the analysis does not count), and model FLOP utilisation
  = FLOPs x steps/s / the chip's dense bf16 peak (its datasheet figure, named in the output);
- compile time, peak device memory, and the projected wall time of the recipe's full run;
- the PyTorch reference on the same machine (bench/torch_baseline.py: its multi-crop in a
  DataLoader with one worker per core, its step in float32 and with fp16 autocast), end to end,
  and ours / reference.

Each variant's process lowers and compiles the trainer's step itself (timed; the trainer's jit
then reuses the executable). Compiling several variants side by side was tried and was slower:
on an H200, eight concurrent compilations of the CIFAR step each took over 167 s, one alone ~60 s.
Variants run in priority order and each result is written as soon as it exists
(`gpu_check.json`, `gpu_check.md` in OUT_DIR), so a run cut short still reports what it measured;
`--budget-s` skips what would no longer fit.

The last line of stdout is one JSON object of the figures (`_s`, `_per_s`, `_speedup` keys).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Dense bf16 peak FLOP/s per chip, from vendor datasheets (SXM parts for H100/H200/A100).
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L4": 121e12,
    "A10": 125e12,
    "V100": 125e12,  # fp16: V100 has no bf16
    "T4": 65e12,  # fp16: T4 has no bf16
    "TPU v6": 918e12,
    "TPU v5p": 459e12,
    "TPU v5": 197e12,  # v5e / v5 lite
    "TPU v4": 275e12,
    "TPU v3": 123e12,
    "TPU v2": 45e12,
}


def peak_flops(device_kind: str) -> tuple[str, float] | None:
    """(table key, peak) for a `jax.Device.device_kind` such as 'NVIDIA H100 80GB HBM3'."""
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
        if key.lower() in device_kind.lower():
            return key, PEAK_BF16_FLOPS[key]
    return None


@dataclasses.dataclass(frozen=True)
class Variant:
    recipe: str  # cifar100 | tiny_imagenet (configs/<recipe>.py)
    augment: str  # device | host
    dtype: str  # float32 | bfloat16
    batch: int  # 0: the recipe's
    pallas: bool = False  # model.pallas_kernels (the MLP and norms' Pallas kernels)

    @property
    def name(self) -> str:
        dtype = {"float32": "fp32", "bfloat16": "bf16"}[self.dtype]
        return f"{self.recipe}_{self.augment}_{dtype}_b{self.batch}" + ("_pallas" if self.pallas else "")

    @classmethod
    def parse(cls, name: str) -> Variant:
        pallas = name.endswith("_pallas")
        recipe, augment, dtype, batch = name.removesuffix("_pallas").rsplit("_", 3)
        return cls(recipe, augment, {"fp32": "float32", "bf16": "bfloat16"}[dtype], int(batch[1:]), pallas)


@dataclasses.dataclass(frozen=True)
class TorchVariant:
    recipe: str
    precision: str  # fp32 | amp
    batch: int

    @property
    def name(self) -> str:
        return f"torch_{self.recipe}_{self.precision}_b{self.batch}"


def default_plan(cpu: bool) -> list[Variant | TorchVariant]:
    """What to measure, most important first (a run cut short keeps the head of the list)."""
    if cpu:
        return [
            Variant("cifar100", "device", "float32", 32),
            Variant("cifar100", "host", "float32", 32),
            TorchVariant("cifar100", "fp32", 32),
        ]
    return [
        Variant("cifar100", "device", "bfloat16", 256),
        TorchVariant("cifar100", "amp", 256),
        Variant("cifar100", "device", "bfloat16", 256, pallas=True),
        TorchVariant("cifar100", "fp32", 256),
        Variant("cifar100", "device", "float32", 256),
        Variant("tiny_imagenet", "device", "bfloat16", 256),
        TorchVariant("tiny_imagenet", "amp", 256),
        Variant("cifar100", "host", "bfloat16", 256),
        Variant("cifar100", "device", "bfloat16", 1024),
        Variant("tiny_imagenet", "device", "float32", 256),
        Variant("tiny_imagenet", "host", "bfloat16", 256),
        Variant("tiny_imagenet", "device", "bfloat16", 1024),
        Variant("cifar100", "host", "float32", 256),
        TorchVariant("tiny_imagenet", "fp32", 256),
    ]


def recipe(name: str, *, smoke: bool = False, batch: int = 0):
    """configs/<name>.py on synthetic data (its `:smoke` shrink with `smoke`), at `batch`."""
    from configs import cifar100, tiny_imagenet

    config = {"cifar100": cifar100, "tiny_imagenet": tiny_imagenet}[name].get_config(
        "smoke" if smoke else None
    )
    config.dataset.synthetic = True
    if batch:
        config.train.batch_size = batch
    config.train.max_steps = 0
    # Throughput only: no pauses for the kNN monitor, its attention panels or the report.
    config.eval.attention_every_steps = 0
    config.eval.monitor_every_epochs = 0
    config.eval.report = False
    return config


def variant_config(variant: Variant, *, smoke: bool, steps: int, log_every: int, workers: int):
    config = recipe(variant.recipe, smoke=smoke, batch=variant.batch)
    config.model.dtype = variant.dtype
    config.model.pallas_kernels = variant.pallas
    config.augment.on = variant.augment
    config.augment.num_workers = workers if variant.augment == "host" else 0
    config.train.max_steps = steps
    config.train.log_every_steps = log_every
    config.train.checkpoint_every_steps = 10**9  # only the final save
    config.train.compilation_cache_dir = ""  # compile time is one of the figures
    return config


# ----------------------------------------------------------------------------------------------
# Workers: each variant runs in its own process (fresh memory statistics, no cross-talk).


def cost_flops(lowered) -> float | None:
    try:
        analysis = lowered.cost_analysis()
    except Exception:  # Not every backend analyses unoptimised modules.
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    return float(analysis["flops"]) if analysis and "flops" in analysis else None


def run_worker(variant: Variant, args) -> dict:
    """Trains `args.warmup + args.steps` steps with the real trainer; reads its own figures."""
    import jax

    from dino_jax import aot, config as config_lib, train
    from dino_jax.data import sources

    steps = args.warmup + args.steps
    config = variant_config(
        variant, smoke=args.cpu, steps=steps, log_every=args.log_every, workers=host_workers(args)
    )
    with tempfile.TemporaryDirectory(dir=scratch_dir()) as workdir:
        started = time.perf_counter()
        trainer = train.Trainer(config, workdir)
        built_s = time.perf_counter() - started
        # Compiled here, timed; jit keeps the executable, so the trainer's first step reuses it.
        lowered = trainer.step_fn.lower(trainer.state, aot.abstract_batch(config, trainer.mesh))
        started = time.perf_counter()
        compiled = lowered.compile()
        compile_s = time.perf_counter() - started
        temp_bytes = getattr(compiled.memory_analysis(), "temp_size_in_bytes", None)
        launched_ops = count_launched_ops(compiled.as_text())
        trainer.train()
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        steady = [row["images_per_s"] for row in rows if row["step"] > args.warmup]
        # Equal-length intervals: total images / total time is the harmonic mean of their rates.
        images_per_s = len(steady) / sum(1.0 / r for r in steady)
        # The jitted step alone, on one batch already on the device (no input pipeline).
        batch = trainer.next_batch()
        state, metrics = trainer.step_fn(trainer.state, batch)
        jax.block_until_ready(metrics)
        step_started = time.perf_counter()
        for _ in range(args.steps):
            state, metrics = trainer.step_fn(state, batch)
        jax.block_until_ready((state, metrics))
        step_only_s = (time.perf_counter() - step_started) / args.steps
        if args.profile and args.profile in variant.name:
            save_profile(trainer.step_fn, state, batch, args, variant.name, compiled.as_text())
        trainer.checkpointer.close()
    full = config_lib.plan_steps(
        recipe(variant.recipe, smoke=args.cpu, batch=variant.batch),
        sources.DATASETS[variant.recipe].num_train,
    )
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return {
        "batch": config.train.batch_size,
        "build_s": round(built_s, 2),
        "compile_s": round(compile_s, 2),
        "flops_per_step": cost_flops(lowered),
        "compiled_temp_gib": round(temp_bytes / 2**30, 3) if temp_bytes is not None else None,
        "launched_ops_per_step": launched_ops,
        # The first logged interval: starting the input pipeline and the first steps.
        "first_interval_s": round(args.log_every * config.train.batch_size / rows[0]["images_per_s"], 2),
        "images_per_s": round(images_per_s, 1),
        "step_s": round(config.train.batch_size / images_per_s, 5),
        "step_only_s": round(step_only_s, 5),
        "step_only_images_per_s": round(config.train.batch_size / step_only_s, 1),
        "peak_memory_gib": round(peak / 2**30, 3) if peak else None,
        "loss_finite": all(abs(row["loss"]) < float("inf") for row in rows),
        "full_run_steps": full.train_steps,
    }


# Top-level HLO instructions that launch no kernel.
_NO_KERNEL_OPS = ("parameter", "constant", "tuple", "get-tuple-element", "bitcast", "after-all")


def count_launched_ops(optimised_hlo: str) -> int:
    """Instructions of the optimised entry computation that launch work (fusions, library calls,
    copies...): about the kernels one step launches, which bounds a small model's step from below
    by their launch latency. Loop bodies, if any, count once."""
    entry = optimised_hlo[optimised_hlo.index("\nENTRY") :]
    body = entry[: entry.index("\n}")]
    count = 0
    for line in body.splitlines()[1:]:
        if "=" not in line:
            continue
        # `%name = <shape, maybe a tuple in parentheses> opcode(operands), attributes`
        opcode = re.search(r"\s([a-z][a-z0-9-]*)\(", line.split("=", 1)[1])
        count += bool(opcode) and opcode.group(1) not in _NO_KERNEL_OPS
    return count


def save_profile(step_fn, state, batch, args, name: str, optimised_hlo: str) -> None:
    """A `jax.profiler` trace of 5 steps (`<name>.xplane.pb`, for TensorBoard's profile plugin or
    xprof) and the optimised HLO (`<name>.hlo.txt.gz`), into `--out`."""
    import glob
    import gzip
    import shutil

    import jax

    trace_dir = tempfile.mkdtemp(dir=scratch_dir())
    with jax.profiler.trace(trace_dir):
        for _ in range(5):
            state, metrics = step_fn(state, batch)
        jax.block_until_ready((state, metrics))
    for path in glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True):
        shutil.copy(path, os.path.join(args.out, f"{name}.xplane.pb"))
    with gzip.open(os.path.join(args.out, f"{name}.hlo.txt.gz"), "wt") as f:
        f.write(optimised_hlo)


def host_workers(args) -> int:
    return max(1, min(len(os.sched_getaffinity(0)), 2 if args.cpu else 64))


def scratch_dir() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


# ----------------------------------------------------------------------------------------------
# The orchestrator.


def worker_env(args, *, torch_worker: bool) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # The JAX workers get JAX's usual memory pool; the orchestrator (which imported jax) and
    # torch only take what they use.
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "true" if not torch_worker else "false"
    if args.cpu:
        env["JAX_PLATFORMS"] = "cpu"
        env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"  # tiny model: compile time dominates
    return env


def start_worker(variant, args, out_path: str) -> subprocess.Popen:
    if isinstance(variant, TorchVariant):
        command = [
            sys.executable,
            os.path.join(ROOT, "bench", "torch_baseline.py"),
            f"--config={variant.recipe}",
            f"--precision={variant.precision}",
            f"--batch={variant.batch}",
            f"--warmup={args.torch_warmup}",
            f"--steps={args.torch_steps}",
            f"--json-out={out_path}",
        ]
        if args.cpu:
            command += ["--smoke", "--workers=2", "--step-only-steps=2"]
    else:
        command = [sys.executable, os.path.abspath(__file__), "--worker", f"--variant={variant.name}"]
        command += [f"--json-out={out_path}", f"--warmup={args.warmup}", f"--steps={args.steps}"]
        command += [f"--log-every={args.log_every}", f"--out={args.out}"] + (["--cpu"] if args.cpu else [])
        command += [f"--profile={args.profile}"] if args.profile else []
    log = open(out_path + ".log", "w")
    env = worker_env(args, torch_worker=isinstance(variant, TorchVariant))
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def finish(process: subprocess.Popen, out_path: str, timeout_s: float) -> dict:
    try:
        process.wait(timeout=max(timeout_s, 1))
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return {"error": f"timed out after {timeout_s:.0f} s"}
    if process.returncode != 0 or not os.path.exists(out_path):
        with open(out_path + ".log") as f:
            tail = f.read()[-1500:]
        return {"error": f"exit code {process.returncode}", "log_tail": tail}
    with open(out_path) as f:
        return json.load(f)


def short(result: dict) -> str:
    if "error" in result:
        return "ERROR " + result["error"] + ("\n" + result["log_tail"] if "log_tail" in result else "")
    return ", ".join(f"{k} {v}" for k, v in result.items() if isinstance(v, (int, float)))


def environment() -> dict:
    # This process only looks at the device; the workers need its memory.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax

    device = jax.devices()[0]
    info = {
        "platform": device.platform,
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "host_cores": len(os.sched_getaffinity(0)),
        "jax_version": jax.__version__,
    }
    for package in ("flax", "optax", "orbax.checkpoint", "grain", "torch", "torchvision"):
        try:
            module = __import__(package, fromlist=["__version__"])
            info[f"{package.split('.')[0]}_version"] = getattr(module, "__version__", "?")
        except ImportError:
            info[f"{package.split('.')[0]}_version"] = None
    peak = peak_flops(device.device_kind)
    info["peak_bf16_flops"] = peak[1] if peak else None
    info["peak_source"] = f"datasheet dense bf16 of {peak[0]}" if peak else "unknown chip: no MFU"
    return info


def derive(report: dict) -> dict:
    """MFU, projected run time and ours / reference ratios from the raw figures."""
    peak = report["environment"]["peak_bf16_flops"]
    for name, row in report["jax"].items():
        if "images_per_s" not in row:
            continue
        steps_per_s = row["images_per_s"] / row["batch"]
        if row.get("flops_per_step") and peak:
            row["mfu"] = round(row["flops_per_step"] * steps_per_s / peak, 4)
            row["step_only_mfu"] = round(row["flops_per_step"] / row["step_only_s"] / peak, 4)
        row["projected_full_run_s"] = round(
            row["full_run_steps"] / steps_per_s + (row.get("compile_s") or 0), 1
        )
    for name, row in report["torch"].items():
        if "images_per_s" in row:
            row["projected_full_run_s"] = round(row["full_run_steps"] * row["batch"] / row["images_per_s"], 1)
    ratios = {}
    for name, row in report["jax"].items():
        variant = Variant.parse(name)
        precision = "amp" if variant.dtype == "bfloat16" else "fp32"
        baseline = report["torch"].get(TorchVariant(variant.recipe, precision, variant.batch).name, {})
        if "images_per_s" in row and "images_per_s" in baseline:
            ratios[f"{name}_vs_torch_{precision}_speedup"] = round(
                row["images_per_s"] / baseline["images_per_s"], 2
            )
    report["ratios"] = ratios
    return report


def markdown(report: dict, command: str) -> str:
    env = report["environment"]
    lines = [
        f"Command: `{command}`",
        "",
        f"Device: {env['device_count']} x {env['device_kind']} ({env['platform']}), {env['host_cores']} host "
        f"cores; jax {env['jax_version']}, flax {env['flax_version']}, torch {env['torch_version']}. "
        f"MFU against {env['peak_source']}"
        + (f" ({env['peak_bf16_flops'] / 1e12:.0f} TFLOP/s)." if env["peak_bf16_flops"] else "."),
        "",
        "| variant | batch | end-to-end img/s | step alone img/s | MFU (e2e / step) | compile s | peak GiB "
        "| launched ops / step | projected full run | vs reference |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def fmt(value, spec="{:.0f}"):
        return "-" if value is None else spec.format(value)

    for name, row in report["jax"].items():
        if "error" in row:
            lines.append(f"| {name} | | error: {row['error']} | | | | | | | |")
            continue
        ratio = next((v for k, v in report["ratios"].items() if k.startswith(name + "_vs")), None)
        mfu = f"{fmt(row.get('mfu'), '{:.1%}')} / {fmt(row.get('step_only_mfu'), '{:.1%}')}"
        lines.append(
            f"| {name} | {row['batch']} | {fmt(row['images_per_s'])} | {fmt(row['step_only_images_per_s'])} | "
            f"{mfu} | {fmt(row.get('compile_s'), '{:.1f}')} | {fmt(row.get('peak_memory_gib'), '{:.2f}')} | "
            f"{fmt(row.get('launched_ops_per_step'))} | {fmt(row['projected_full_run_s'] / 60, '{:.1f}')} min | "
            f"{fmt(ratio, '{:.2f}x')} |"
        )
    for name, row in report["torch"].items():
        if "error" in row:
            lines.append(f"| {name} (PyTorch reference) | | error: {row['error']} | | | | | | | |")
            continue
        lines.append(
            f"| {name} (PyTorch reference, {row['loader_workers']} loader workers) | {row['batch']} | "
            f"{fmt(row['images_per_s'])} | {fmt(row['step_only_images_per_s'])} | | | "
            f"{fmt(row.get('peak_memory_gib'), '{:.2f}')} | | {fmt(row['projected_full_run_s'] / 60, '{:.1f}')} min | 1 |"
        )
    for name in report["skipped"]:
        lines.append(f"| {name} | | skipped: over the time budget | | | | | | | |")
    return "\n".join(lines) + "\n"


def flat_figures(report: dict) -> dict:
    """The one-line JSON: every timing and throughput, named by variant."""
    figures = {k: report["environment"][k] for k in ("device_kind", "jax_version")}
    for group in ("jax", "torch"):
        for name, row in report[group].items():
            for key in (
                "images_per_s",
                "step_only_images_per_s",
                "step_s",
                "mfu",
                "compile_s",
                "peak_memory_gib",
                "projected_full_run_s",
            ):
                if row.get(key) is not None:
                    figures[f"{name}_{key}"] = row[key]
    figures.update(report["ratios"])
    return figures


def orchestrate(args) -> dict:
    started = time.monotonic()
    deadline = started + args.budget_s
    os.makedirs(args.out, exist_ok=True)
    args.work = tempfile.mkdtemp(prefix="gpu_check_", dir=scratch_dir())

    def log(message):
        print(f"[gpu_check {time.monotonic() - started:5.0f} s] {message}", file=sys.stderr, flush=True)

    plan = default_plan(args.cpu)
    if args.only:
        plan = [v for v in plan if any(token in v.name for token in args.only.split(","))]
    report = {"environment": environment(), "jax": {}, "torch": {}, "skipped": [], "ratios": {}}
    log(f"environment: {report['environment']}")
    command = "bash bench/gpu_check.sh OUT_DIR" + (" --cpu" if args.cpu else "")
    if args.only:
        command += f" --only={args.only}"

    def write():
        derive(report)
        with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
            json.dump(report, f, indent=2)
        with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
            f.write(markdown(report, command))

    for variant in plan:
        remaining = deadline - time.monotonic()
        expected = args.expect_torch_s if isinstance(variant, TorchVariant) else args.expect_run_s
        if remaining < expected:
            report["skipped"].append(variant.name)
            log(f"skipped {variant.name}: {remaining:.0f} s left, about {expected:.0f} s needed")
            continue
        path = os.path.join(args.work, f"run_{variant.name}.json")
        result = finish(start_worker(variant, args, path), path, remaining)
        report["torch" if isinstance(variant, TorchVariant) else "jax"][variant.name] = result
        log(f"{variant.name}: {short(result)}")
        write()
    write()
    return report


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--cpu", action="store_true", help="CPU mode: tiny model, few steps (the test)")
    parser.add_argument("--only", help="comma-separated substrings of the variant names to run")
    parser.add_argument("--budget-s", type=float, default=0, help="0: 420 s (GPU), 240 s (--cpu)")
    parser.add_argument("--warmup", type=int, default=0, help="untimed steps per variant (0: 20; --cpu 2)")
    parser.add_argument("--steps", type=int, default=0, help="timed steps per variant (0: 80; --cpu 4)")
    parser.add_argument("--log-every", type=int, default=0, help="(0: 10; --cpu 2)")
    parser.add_argument("--torch-warmup", type=int, default=0, help="(0: 10; --cpu 1)")
    parser.add_argument("--torch-steps", type=int, default=0, help="(0: 40; --cpu 2)")
    parser.add_argument("--expect-run-s", type=float, default=0, help="skip a JAX run with less time left")
    parser.add_argument(
        "--expect-torch-s", type=float, default=0, help="skip a torch run with less time left"
    )
    parser.add_argument(
        "--profile",
        help="variants whose name contains this also save a profiler trace and their HLO in --out",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--json-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    cpu = args.cpu
    defaults = dict(
        budget_s=240 if cpu else 420,
        warmup=2 if cpu else 20,
        steps=4 if cpu else 80,
        log_every=2 if cpu else 10,
        torch_warmup=1 if cpu else 10,
        torch_steps=2 if cpu else 40,
        # Measured on an H200: a JAX variant ~80 s (its compilation ~60 s), a torch one ~35 s.
        expect_run_s=20 if cpu else 75,
        expect_torch_s=20 if cpu else 35,
    )
    for key, value in defaults.items():
        if not getattr(args, key):
            setattr(args, key, value)
    if args.warmup % args.log_every or args.steps % args.log_every:
        parser.error(f"--warmup {args.warmup} and --steps {args.steps} must be multiples of --log-every")

    if args.worker:
        result = run_worker(Variant.parse(args.variant), args)
        with open(args.json_out, "w") as f:
            json.dump(result, f)
        return
    if not args.out:
        parser.error("--out is required")
    report = orchestrate(args)
    with open(os.path.join(args.out, "gpu_check.md")) as f:
        print(f.read())
    print(json.dumps(flat_figures(report)))


if __name__ == "__main__":
    main()

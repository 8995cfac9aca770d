"""The real train step compiled for an H100 and for TPUs that are not here: kernels, bytes moved,
memory and a roofline bound of the step, measured on a machine without a GPU or TPU.

    python -m bench.gpu_aot                                  # H100 and v5e-1/v6e-1/v2-8, both recipes
    python -m bench.gpu_aot --targets=h100 --recipes=cifar100 --dtypes=bfloat16 --top=20

Needs a Python environment with JAX's CUDA 12 plugin and libtpu besides the project's own packages
(`pip install -r requirements-aot.txt` in a virtual environment of its own: the CUDA wheels are ~5 GB;
README, "Benchmarks"). No GPU or TPU: XLA compiles for the described devices (dino_jax/aot.py).

Each row is one compilation, in a child process of its own (a fresh XLA dump to read, memory
returned after it). For the GPU, the kernels are read from XLA's thunk sequence (what the executable
launches, loops counted per iteration) and each is matched to its HLO instruction for the bytes it
reads and writes (operand and result buffers), its matrix FLOPs and the line of our code it comes
from (bench/hlo_kernels.py says what these estimates leave out). The roofline bound is the sum over
kernels of max(bytes / bandwidth, FLOPs / peak, launch floor): a floor on the step's time on the
chip, not a prediction (no autotuning without the GPU, so matrix kernels are XLA's default
tilings). TPU rows report what a TPU program shows without one: compile time, memory against the
chip's, top-level kernels and their bytes.

The last line of stdout is one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import time

from bench import hlo_kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = ("cifar100", "tiny_imagenet")
DTYPES = ("bfloat16", "float32")
DEFAULT_TARGETS = ("h100", "v5e-1", "v6e-1", "v2-8")
LAUNCH_FLOOR_S = 2e-6  # least GPU time of a kernel inside a CUDA graph (a few microseconds each)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default=",".join(DEFAULT_TARGETS), help="h100, a100, l4, v5e-1, v6e-1, v2-8")
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--batch", type=int, default=0, help="0: the recipe's")
    parser.add_argument("--smoke", action="store_true", help="the recipes' :smoke shrink (a quick check)")
    parser.add_argument("--scan-blocks", action="store_true", help="model.scan_blocks=True (compile time)")
    parser.add_argument(
        "--pallas", action="store_true", help="model.pallas_kernels=True (Pallas MLP and norms)"
    )
    parser.add_argument("--top", type=int, default=10, help="largest kernels and sources to list")
    parser.add_argument("--launch-floor-us", type=float, default=LAUNCH_FLOOR_S * 1e6)
    parser.add_argument("--timeout-s", type=float, default=1800, help="per compilation")
    parser.add_argument("--out", default="", help="also write gpu_aot.json and gpu_aot.md here")
    parser.add_argument("--keep-dump", default="", help="keep each row's XLA dump under this folder")
    parser.add_argument("--row", default="", help=argparse.SUPPRESS)  # target/recipe/dtype: child mode
    return parser.parse_args(argv)


def row_config(
    recipe: str, dtype: str, *, batch: int, smoke: bool, scan_blocks: bool = False, pallas: bool = False
):
    from dino_jax.configs import cifar100, tiny_imagenet

    config = {"cifar100": cifar100, "tiny_imagenet": tiny_imagenet}[recipe].get_config(
        "smoke" if smoke else None
    )
    config.model.dtype = dtype
    if scan_blocks:
        config.model.scan_blocks = True
    config.model.pallas_kernels = pallas
    config.augment.on = "device"
    if batch:
        config.train.batch_size = batch
    return config


def measure_row(target_name: str, recipe: str, dtype: str, args) -> dict:
    """Child process: compile one row and read its figures (XLA_FLAGS already names the dump)."""
    import jax

    jax.config.update("jax_platforms", "cpu")  # the plugins still describe their devices
    from dino_jax import aot
    from dino_jax.data import sources

    spec = aot.target(target_name)
    config = row_config(
        recipe, dtype, batch=args.batch, smoke=args.smoke, scan_blocks=args.scan_blocks, pallas=args.pallas
    )
    step = aot.compile_train_step(config, spec, sources.DATASETS[recipe].num_train)
    memory = step.memory
    text = step.compiled.as_text()
    module = hlo_kernels.parse_module(text)
    if spec.platform == "cuda":
        kernels = _thunk_kernels(module)
    else:
        kernels = hlo_kernels.kernels_from_hlo(module)
    chip = hlo_kernels.Chip(
        spec.memory_bandwidth, spec.peak_bf16_flops, spec.peak_fp32_flops, args.launch_floor_us * 1e-6
    )
    summary = hlo_kernels.summarise(kernels, chip, top=args.top)
    return {
        "target": target_name,
        "recipe": recipe,
        "dtype": dtype,
        "batch": config.train.batch_size,
        "scan_blocks": bool(config.model.get("scan_blocks", False)),
        "pallas": bool(config.model.get("pallas_kernels", False)),
        "devices": step.num_devices,
        "compile_s": round(step.compile_s, 1),
        "lower_s": round(step.lower_s, 1),
        "temp_gib": round(memory.temp_size_in_bytes / 2**30, 3),
        "device_gib": round(step.device_bytes() / 2**30, 3),
        "hbm_gib": round(spec.hbm_bytes / 2**30, 1),
        "fits": step.fits(),
        "integer_bit_ops": _top_level_bit_ops(module),
        **summary,
    }


def _thunk_kernels(module) -> list:
    dump = os.environ["DINO_JAX_AOT_DUMP"]
    (metadata,) = glob.glob(os.path.join(dump, "*jit_train_step*.thunk_metadata.txt"))
    prefix = metadata[: -len(".thunk_metadata.txt")]
    sequence = prefix + ".thunk_sequence_after_thunk_passes.txt"
    if not os.path.exists(sequence):
        sequence = prefix + ".thunk_sequence.txt"
    with open(sequence) as f, open(metadata) as g:
        return hlo_kernels.kernels_from_thunks(module, f.read(), hlo_kernels.thunk_annotations(g.read()))


def _top_level_bit_ops(module) -> int:
    """Unfused xor/shift/or instructions at the top level: on TPU, the threefry random-bit
    generator's rounds left outside any fusion."""
    bit_ops = {"xor", "or", "shift-left", "shift-right-logical", "shift-right-arithmetic"}
    return sum(ins.opcode in bit_ops for ins in module.computations[module.entry].values())


def run_child(target: str, recipe: str, dtype: str, args) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        dump = os.path.join(args.keep_dump, f"{target}_{recipe}_{dtype}") if args.keep_dump else scratch
        os.makedirs(dump, exist_ok=True)
        env = dict(os.environ)
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_dump_to={dump}".strip()
        env["DINO_JAX_AOT_DUMP"] = dump
        env["JAX_PLATFORMS"] = "cpu"
        argv = [sys.executable, "-m", "bench.gpu_aot", f"--row={target}/{recipe}/{dtype}"]
        argv += [f"--batch={args.batch}", f"--top={args.top}", f"--launch-floor-us={args.launch_floor_us}"]
        argv += ["--smoke"] if args.smoke else []
        argv += ["--scan-blocks"] if args.scan_blocks else []
        argv += ["--pallas"] if args.pallas else []
        started = time.perf_counter()
        try:
            done = subprocess.run(
                argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout_s
            )
        except subprocess.TimeoutExpired:
            return {
                "target": target,
                "recipe": recipe,
                "dtype": dtype,
                "error": f"timed out after {args.timeout_s:.0f} s",
            }
        wall_s = time.perf_counter() - started
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        return {
            "target": target,
            "recipe": recipe,
            "dtype": dtype,
            "error": _error_line(done.stderr or done.stdout),
        }
    row = json.loads(lines[-1])
    row["wall_s"] = round(wall_s, 1)
    return row


def _error_line(output: str) -> str:
    """The line that says what failed (the exception's), not the traceback's last frame."""
    lines = [line.strip() for line in output.strip().splitlines() if line.strip()]
    named = [
        line
        for line in lines
        if re.match(r"^[\w.]+(Error|Exception|Exhausted)\b", line) or "RESOURCE_EXHAUSTED" in line
    ]
    return (named[-1] if named else (lines[-1] if lines else "no output"))[:600]


def _gb(n) -> str:
    return f"{n / 1e9:.2f}"


def markdown(rows: list[dict], command: str) -> str:
    out = [f"Command: `{command}`", ""]
    gpu = [r for r in rows if _on_gpu(r) and "error" not in r]
    if gpu:
        out += [
            "| GPU row | batch | kernels | tiny (<= 1,024 threads) | copies | cuDNN/cuBLAS calls | bytes read+written | matrix TFLOP | roofline bound | of it: bytes at the HBM's bandwidth | launch floor | temporaries | compile |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in gpu:
            out.append(
                f"| {r['target']} {r['recipe']} {r['dtype']}{_variant(r)} | {r['batch']} | {r['kernels']:,} | {r['tiny_kernels']} | {r['copies']} | "
                f"{r['library_calls']} | {_gb(r['bytes'])} GB | {r['matrix_flops'] / 1e12:.2f} | "
                f"{r['bound_s'] * 1e3:.1f} ms | {r['bytes_bound_s'] * 1e3:.1f} ms | {r['launch_floor_s'] * 1e3:.1f} ms | "
                f"{r['temp_gib']:.2f} GiB | {r['compile_s']:.0f} s |"
            )
        out.append("")
    tpu = [r for r in rows if not _on_gpu(r) and "error" not in r]
    if tpu:
        out += [
            "| TPU row | devices | batch | fits | device memory / HBM | temporaries | top-level kernels | bytes read+written | unfused bit ops | compile |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in tpu:
            out.append(
                f"| {r['target']} {r['recipe']} {r['dtype']} | {r['devices']} | {r['batch']} | {'yes' if r['fits'] else '**no**'} | "
                f"{r['device_gib']:.2f} / {r['hbm_gib']:.0f} GiB | {r['temp_gib']:.2f} GiB | {r['kernels']:,} | "
                f"{_gb(r['bytes'])} GB | {r['integer_bit_ops']} | {r['compile_s']:.0f} s |"
            )
        out.append("")
    for r in rows:
        if "error" in r:
            out.append(f"- {r['target']} {r['recipe']} {r['dtype']}: failed: {r['error']}")
    # The details of the headline row: the first GPU row (the H100's CIFAR-100 bf16 by default).
    for r in gpu[:1]:
        out += ["", f"Largest kernels of {r['recipe']} {r['dtype']} (bytes read+written):", ""]
        out += [f"- {_gb(k['bytes'])} GB `{k['kind']}` x{k['launches']}: {k['source']}" for k in r["largest"]]
        out += ["", f"Where the bytes of {r['recipe']} {r['dtype']} come from (by source line):", ""]
        out += [f"- {_gb(s['bytes'])} GB in {s['kernels']} kernels: {s['source']}" for s in r["by_source"]]
        kinds = ", ".join(f"{k} {n}" for k, n in list(r["by_kind"].items())[:12])
        out += ["", f"Kernels by kind: {kinds}"]
    return "\n".join(out)


def _on_gpu(row: dict) -> bool:
    from dino_jax import aot

    return aot.target(row["target"]).platform == "cuda"


def _variant(row: dict) -> str:
    return (" (scan)" if row.get("scan_blocks") else "") + (" (Pallas)" if row.get("pallas") else "")


def flat_figures(rows: list[dict]) -> dict:
    figures = {}
    for r in rows:
        if "error" in r:
            continue
        key = f"{r['target'].replace('-', '')}_{r['recipe']}_{'bf16' if r['dtype'] == 'bfloat16' else 'fp32'}"
        key += "_scan" if r.get("scan_blocks") else ""
        key += "_pallas" if r.get("pallas") else ""
        figures[f"{key}_kernels"] = r["kernels"]
        figures[f"{key}_tiny_kernels"] = r["tiny_kernels"]
        figures[f"{key}_gb_moved"] = round(r["bytes"] / 1e9, 2)
        figures[f"{key}_temp_gib"] = r["temp_gib"]
        figures[f"{key}_compile_s"] = r["compile_s"]
        if _on_gpu(r):
            figures[f"{key}_roofline_bound_s"] = round(r["bound_s"], 5)
        else:
            # No bound for a TPU: its HLO's products are not read right by hlo_kernels' FLOP
            # count (v5e-1's CIFAR step came out at 234 TFLOP where ~9 are expected).
            figures[f"{key}_fits"] = r["fits"]
    return figures


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.row:
        target, recipe, dtype = args.row.split("/")
        print(json.dumps(measure_row(target, recipe, dtype, args)))
        return
    rows = []
    for target in args.targets.split(","):
        for recipe in args.recipes.split(","):
            for dtype in args.dtypes.split(","):
                print(f"gpu_aot: compiling {recipe} {dtype} for {target} ...", file=sys.stderr, flush=True)
                row = run_child(target, recipe, dtype, args)
                rows.append(row)
                status = row.get("error") or (
                    f"{row['kernels']:,} kernels, {_gb(row['bytes'])} GB, {row['temp_gib']:.2f} GiB temporaries, "
                    f"compiled in {row['compile_s']:.0f} s"
                )
                print(f"gpu_aot:   {status}", file=sys.stderr, flush=True)
    command = "python -m bench.gpu_aot " + " ".join(argv if argv is not None else sys.argv[1:])
    table = markdown(rows, command.strip())
    print(table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "gpu_aot.json"), "w") as f:
            json.dump(rows, f, indent=1)
        with open(os.path.join(args.out, "gpu_aot.md"), "w") as f:
            f.write(table + "\n")
    print(json.dumps(flat_figures(rows)))


if __name__ == "__main__":
    main()

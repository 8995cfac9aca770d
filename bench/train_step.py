"""Benchmark of one DINO training step: our jitted, donated step against the PyTorch reference's.

    python -m bench.train_step                   # all rows with their phases, ~20-30 minutes on a 2-core CPU
    python -m bench.train_step --only cifar      # the two CIFAR rows
    python -m bench.train_step --only digits --steps 5 --warmup 1 --phase-reps 0   # a smoke run

Ours: `training_parts.build_training(config, ...)`'s `step_fn` (jit, state donated) on uint8 crops already
placed on the device, exactly what `Trainer.train` calls once per step. Baseline:
`tests/torch_reference.train_iteration` (teacher and student forward, DINO loss with centering,
backward, per-tensor gradient clipping, AdamW with the reference's two parameter groups and
per-step lr / weight decay, EMA teacher, center update; fp16 off), on the same crops already
normalised into NCHW float tensors (the reference's data loader hands it those). Both sides start
from the same weights: ours are initialised, exported with `torch_convert.dino_to_torch` and loaded
into the reference's `MultiCropWrapper`s (student and teacher), as `tests/test_parity.py` does.

Configs:
1. `digits`: `configs/digits.py` as it is (96-d, 4 blocks, 3 heads, patch 4, head 1024/256/2048
   with BatchNorm, batch 64, 2x32 + 6x16 crops).
2. `cifar`: `configs/cifar100.py` (ViT-Tiny/4, 192-d, 12 blocks, out_dim 65536, 2x32 + 8x16 crops)
   at batch `--cifar-batch` (64), with the crops made on the host so that both sides get the same
   ones (the recipe crops on the device, inside the step; augmentation is not timed here).
3. `cifar_k4096`: the same with out_dim 4096 (`--cifar-out-dims` picks the CIFAR rows), where the
   backbone weighs more than the 65536-wide last layer.

Two changes to both recipes, applied to both sides: `train.freeze_last_layer = 0`, so every timed
step updates the last layer (the steady state of a run; the freeze lasts one epoch of 100-200),
and with `--no-drop-path` stochastic depth is off. With drop path on (the default, as in the
recipes) the two sides draw different masks, so their losses differ by more than rounding.

Crops are random uint8 noise, a fresh batch per step, the same for both sides. The steps are
interleaved (ours, torch, torch, ours, ...) so that a change in the machine's load hits both alike.
The reference runs in a child process that this one drives step by step (one side runs at a time):
in one process the two disturb each other. After a reference step, glibc keeps the ~6 GB the
reference freed in its heap, and our next step (whose XLA:CPU temp buffer, ~6 GB at CIFAR batch 64,
is mapped afresh at every execution) spent 5-7 s instead of 2.6 s of system time faulting in pages
(`--torch-in-process` keeps the old arrangement).
The first `--warmup` steps of each side (the first includes our compilation) are reported apart;
step times are medians over the next `--steps`. Threads: `--threads N` pins the process to N cores
(XLA sizes its thread pool from the cores it may use; for N = 1 its Eigen pool is also switched
off) and sets torch's intra-op threads to N.

Phases (`--phase-reps` > 0): after the steps, the pieces of one step are timed apart on the inputs
of the last step, interleaved ours / torch, median of `--phase-reps` calls (ours compiled first):
ours jits `train_step`'s own functions one at a time (`teacher_forward`, `student_loss`, its
`value_and_grad`, the optimiser's `update` + `apply_updates`, `optim.ema`, `losses.update_center`,
`norm_metrics`); the reference times the same statements of `train_iteration` (teacher forward;
student forward + loss; zero_grad + forward + loss + backward; clip + freeze + `optimizer.step`;
`ema_teacher`; `update_center`; it computes no metrics). A piece jitted alone cannot fuse with its
neighbours, so ours' phases need not add up to its step.

The last line of stdout is one JSON object: times in seconds (`_s`), throughputs (`_per_s`),
`_speedup` = torch step time / our step time, and `_loss_max_rel_diff`, the largest
|ours - torch| / |torch| of the per-step loss over all steps; phases as `<row>_<side>_<phase>_s`.
A table of the phases is printed to stdout before it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

CONFIG_NAMES = ("digits", "cifar")
RECIPE_CIFAR_OUT_DIM = 65536  # the row named plain `cifar`; other out_dims are `cifar_k<out_dim>`
NUM_TRAIN_EXAMPLES = {"digits": 1437, "cifar": 50000}  # sets steps per epoch, hence the schedules
PHASES = (
    "teacher_forward",
    "student_forward_loss",
    "student_forward_backward",
    "optimizer",
    "ema",
    "center",
    "metrics",
)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=0, help="cores / threads per side (default: all)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per config and side")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps (>= 1: compilation)")
    parser.add_argument("--only", choices=CONFIG_NAMES, help="run one config (cifar: all its rows)")
    parser.add_argument("--cifar-batch", type=int, default=64)
    parser.add_argument(
        "--cifar-out-dims", default="65536,4096", help="comma-separated head out_dims, one CIFAR row each"
    )
    parser.add_argument(
        "--phase-reps", type=int, default=3, help="timed calls per phase and side (0: no phase breakdown)"
    )
    parser.add_argument("--no-drop-path", action="store_true", help="stochastic depth off on both sides")
    parser.add_argument(
        "--torch-in-process",
        action="store_true",
        help="run the reference in this process instead of a child process (the two then disturb each other)",
    )
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 1:
        parser.error(f"--warmup {args.warmup} / --steps {args.steps}: expected at least 1 each")
    args.cifar_out_dims = [int(d) for d in args.cifar_out_dims.split(",")]
    return args


def row_names(args) -> list[tuple[str, str, int | None]]:
    """(row name, config name, head out_dim override) of every row to run, in order."""
    rows = []
    for name in (args.only,) if args.only else CONFIG_NAMES:
        if name != "cifar":
            rows.append((name, name, None))
            continue
        for out_dim in args.cifar_out_dims:
            row = "cifar" if out_dim == RECIPE_CIFAR_OUT_DIM else f"cifar_k{out_dim}"
            rows.append((row, name, out_dim))
    return rows


def limit_threads(threads: int) -> int:
    """Pins the process to `threads` cores before jax is imported; returns the count in force."""
    cores = sorted(os.sched_getaffinity(0))
    if not threads or threads >= len(cores):
        return len(cores)
    os.sched_setaffinity(0, cores[:threads])
    if threads == 1:
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        )
    return threads


def make_config(name: str, args, out_dim: int | None = None):
    from configs import cifar100, digits
    from dino_jax import config_validation

    if name == "digits":
        config = digits.get_config()
    else:
        config = cifar100.get_config()
        config.augment.on = "host"
        config.train.batch_size = args.cifar_batch
    if out_dim is not None:
        config.head.out_dim = out_dim
    config.train.freeze_last_layer = 0
    config.model.dtype = "float32"  # beside the reference's float32 step, whatever model.dtype=auto picks
    if args.no_drop_path:
        config.model.drop_path_rate = 0.0
    config_validation.validate(config)
    return config


def random_batches(config, count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    a, b = config.augment, config.train.batch_size
    return [
        {
            "global_crops": rng.integers(0, 256, (b, 2, a.global_crop_size, a.global_crop_size, 3), np.uint8),
            "local_crops": rng.integers(
                0, 256, (b, a.num_local_crops, a.local_crop_size, a.local_crop_size, 3), np.uint8
            ),
        }
        for _ in range(count)
    ]


def reference_crops(batch, mean, std) -> list[np.ndarray]:
    """The reference's input: one normalised NCHW float32 array per view, global views first."""
    from dino_jax.data.normalize import normalize_images

    crops = []
    for name in ("global_crops", "local_crops"):
        for view in range(batch[name].shape[1]):
            normalized = normalize_images(batch[name][:, view], mean, std)
            crops.append(np.ascontiguousarray(normalized.transpose(0, 3, 1, 2)))
    return crops


class TorchReference:
    """Student, teacher, AdamW, loss and schedules of the reference, from our initial weights."""

    def __init__(self, torch, ref, config, plan, weights: dict[str, np.ndarray]):
        from bench import torch_baseline

        self.student, self.teacher = torch_baseline.build_networks(torch, config, weights)
        for net in (self.student, self.teacher):
            net.train()
        self.optimizer = torch.optim.AdamW(ref.get_params_groups(self.student))
        self.loss, self.schedules = torch_baseline.build_loss_and_schedules(ref, config, plan)
        t, spe = config.train, plan.steps_per_epoch
        self.ref, self.steps_per_epoch = ref, spe
        self.clip_grad, self.freeze_last_layer = t.clip_grad, t.freeze_last_layer

    def step(self, crops, it: int) -> float:
        """One `train_iteration` on NCHW float tensors (the loader's output); returns the loss."""
        return self.ref.train_iteration(
            self.student,
            self.teacher,
            self.loss,
            self.optimizer,
            crops,
            it=it,
            epoch=it // self.steps_per_epoch,
            clip_grad=self.clip_grad,
            freeze_last_layer=self.freeze_last_layer,
            **self.schedules,
        )


def our_phases(parts, config, state, batch) -> dict[str, object]:
    """Each piece of our step, jitted alone: phase -> a callable without arguments that runs it
    on `state` and `batch` (the state is not donated) and waits for its result."""
    import jax
    import optax

    from dino_jax import losses, optim, schedules as schedules_lib, train_step as step_lib

    graphdef, tx, schedules = parts.graphdef, parts.tx, parts.schedules
    mean, std, t = config.dataset.mean, config.dataset.std, config.train
    num_crops = 2 + config.augment.num_local_crops
    crop_groups = jax.jit(lambda g, l: step_lib.normalized_crop_groups(g, l, mean, std))(
        batch["global_crops"], batch["local_crops"]
    )
    teacher_temperature = schedules_lib.lookup(schedules.teacher_temperature, 0)
    drop_path_rng = jax.random.key(1)

    def loss_fn(student_params, teacher_logits):
        return step_lib.student_loss(
            graphdef,
            student_params,
            crop_groups,
            teacher_logits,
            state.center,
            num_crops=num_crops,
            teacher_temperature=teacher_temperature,
            student_temperature=t.student_temp,
            drop_path_rng=drop_path_rng,
        )

    def optimizer_update(grads, opt_state, params):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), updates, opt_state

    teacher_forward = jax.jit(lambda params, group: step_lib.teacher_forward(graphdef, params, group))
    forward_loss = jax.jit(loss_fn)
    forward_backward = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    update = jax.jit(optimizer_update)
    ema = jax.jit(optim.ema)
    center = jax.jit(lambda c, logits: losses.update_center(c, logits, t.center_momentum))
    metrics = jax.jit(step_lib.norm_metrics)

    teacher_logits = teacher_forward(state.teacher, crop_groups[0])
    _, grads = forward_backward(state.student, teacher_logits)
    student, updates, _ = update(grads, state.opt_state, state.student)
    momentum = jax.numpy.float32(0.996)
    done = jax.block_until_ready
    return {
        "teacher_forward": lambda: done(teacher_forward(state.teacher, crop_groups[0])),
        "student_forward_loss": lambda: done(forward_loss(state.student, teacher_logits)),
        "student_forward_backward": lambda: done(forward_backward(state.student, teacher_logits)),
        "optimizer": lambda: done(update(grads, state.opt_state, state.student)),
        "ema": lambda: done(ema(state.teacher, student, momentum)),
        "center": lambda: done(center(state.center, teacher_logits)),
        "metrics": lambda: done(metrics(grads, updates, student)),
    }


def torch_phases(torch, ref, reference, crops, it: int) -> dict[str, object]:
    """The same pieces of `train_iteration`, on the reference's networks as the steps left them."""
    epoch = it // reference.steps_per_epoch
    student, teacher, dino_loss = reference.student, reference.teacher, reference.loss
    teacher_output = teacher(crops[:2])

    def forward_loss():
        return dino_loss(student(crops), teacher_output, epoch)

    def forward_backward():
        reference.optimizer.zero_grad()
        forward_loss().backward()

    def optimizer_step():
        if reference.clip_grad:
            ref.clip_gradients(student, reference.clip_grad)
        ref.cancel_gradients_last_layer(epoch, student, reference.freeze_last_layer)
        reference.optimizer.step()

    forward_backward()  # gradients for the optimiser phase
    return {
        "teacher_forward": lambda: teacher(crops[:2]),
        "student_forward_loss": lambda: forward_loss().item(),
        "student_forward_backward": forward_backward,
        "optimizer": optimizer_step,
        "ema": lambda: ref.ema_teacher(student, teacher, 0.996),
        "center": lambda: dino_loss.update_center(teacher_output),
    }


class TorchSide:
    """The reference's steps and phases, timed where they run: `step(crops, it) -> (s, loss)`,
    `setup_phases(crops, it)`, `phase(name) -> s`. Crops are `reference_crops` arrays."""

    def __init__(self, name: str, args, out_dim: int | None, weights: dict[str, np.ndarray], threads: int):
        import torch

        from dino_jax import config as config_lib
        from tests import torch_reference as ref

        torch.set_num_threads(threads)
        config = make_config(name, args, out_dim)
        plan = config_lib.plan_steps(config, NUM_TRAIN_EXAMPLES[name])
        self.torch, self.ref = torch, ref
        self.reference = TorchReference(torch, ref, config, plan, weights)
        self.phases: dict[str, object] = {}

    def tensors(self, crops: list[np.ndarray]):
        return [self.torch.from_numpy(crop) for crop in crops]

    def step(self, crops: list[np.ndarray], it: int) -> tuple[float, float]:
        tensors = self.tensors(crops)
        started = time.perf_counter()
        loss = self.reference.step(tensors, it)
        return time.perf_counter() - started, loss

    def setup_phases(self, crops: list[np.ndarray], it: int) -> None:
        self.phases = torch_phases(self.torch, self.ref, self.reference, self.tensors(crops), it)

    def phase(self, name: str) -> float | None:
        if name not in self.phases:
            return None
        started = time.perf_counter()
        self.phases[name]()
        return time.perf_counter() - started

    def close(self) -> None:
        pass


def serve_torch_side(conn, *init_args) -> None:
    """Child process: builds a TorchSide and runs the calls the parent sends, `(method, args)`."""
    side = TorchSide(*init_args)
    conn.send("ready")
    while True:
        method, call_args = conn.recv()
        if method == "close":
            break
        conn.send(getattr(side, method)(*call_args))


class TorchProcess:
    """A TorchSide in a child process, called synchronously: each side keeps its own allocator and
    thread pools, as it would running alone (see `--torch-in-process`)."""

    def __init__(self, *init_args):
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self.conn, child_conn = context.Pipe()
        self.process = context.Process(target=serve_torch_side, args=(child_conn, *init_args), daemon=True)
        self.process.start()
        if self.conn.recv() != "ready":
            raise RuntimeError("the reference's process did not start")

    def _call(self, method: str, *call_args):
        self.conn.send((method, call_args))
        return self.conn.recv()

    def step(self, crops, it):
        return self._call("step", crops, it)

    def setup_phases(self, crops, it):
        return self._call("setup_phases", crops, it)

    def phase(self, name):
        return self._call("phase", name)

    def close(self) -> None:
        self.conn.send(("close", ()))
        self.process.join(timeout=60)


def time_phases(ours: dict, theirs, reps: int) -> dict[str, dict[str, float | None]]:
    """phase -> {"ours": median s, "torch": median s or None}; each side's first call (ours
    compiles) is not timed; the two sides alternate call by call."""
    timings = {}
    for phase in PHASES:
        calls = {"ours": lambda p=phase: time_call(ours[p]), "torch": lambda p=phase: theirs.phase(p)}
        times = {"ours": [], "torch": []}
        available = {side: call() is not None for side, call in calls.items()}
        for rep in range(reps):
            for side in sorted(calls, reverse=rep % 2 == 1):
                if available[side]:
                    times[side].append(calls[side]())
        timings[phase] = {side: statistics.median(v) if v else None for side, v in times.items()}
        print(
            f"  phase {phase}: "
            + ", ".join(
                f"{side} {value:.4f} s" for side, value in timings[phase].items() if value is not None
            ),
            file=sys.stderr,
            flush=True,
        )
    return timings


def time_call(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def print_phase_table(row: str, timings: dict, ours_step: float, torch_step: float) -> None:
    print(f"\n{row}: phases (median s)\n| phase | ours | torch | torch / ours |\n|---|---|---|---|")
    for phase, sides in list(timings.items()) + [("full step", {"ours": ours_step, "torch": torch_step})]:
        ours, torch = sides["ours"], sides["torch"]
        if torch is None:
            print(f"| {phase} | {ours:.4f} | - | - |")
        else:
            print(f"| {phase} | {ours:.4f} | {torch:.4f} | {torch / ours:.2f} |")


def run_config(row: str, name: str, out_dim: int | None, args, report: dict) -> None:
    import jax

    from dino_jax import config as config_lib, sharding, training_parts
    from dino_jax.interop import torch_convert

    config = make_config(name, args, out_dim)
    batch_size, total = config.train.batch_size, args.warmup + args.steps
    mesh = sharding.make_mesh()
    parts = training_parts.build_training(config, NUM_TRAIN_EXAMPLES[name], mesh)
    vit_config = config_lib.vit_config(config, drop_path=True)
    head_config = config_lib.head_config(config, vit_config.embed_dim)
    weights = torch_convert.dino_to_torch(parts.state.student, vit_config, head_config)
    side_args = (name, args, out_dim, weights, args.threads_in_force)
    torch_side = TorchSide(*side_args) if args.torch_in_process else TorchProcess(*side_args)
    batches = random_batches(config, total)
    our_batches = [sharding.to_global_batch(batch, mesh) for batch in batches]
    mean, std = config.dataset.mean, config.dataset.std
    reference_batches = [reference_crops(batch, mean, std) for batch in batches]
    jax.block_until_ready(our_batches)

    state = parts.state
    ours_s, torch_s, ours_loss, torch_loss = [], [], [], []
    for it in range(total):
        for side in ("ours", "torch") if it % 2 == 0 else ("torch", "ours"):
            if side == "ours":
                started = time.perf_counter()
                state, metrics = parts.step_fn(state, our_batches[it])
                ours_loss.append(float(metrics["loss"]))  # waits for the step, like torch's .item()
                ours_s.append(time.perf_counter() - started)
            else:
                seconds, loss = torch_side.step(reference_batches[it], it)
                torch_s.append(seconds)
                torch_loss.append(loss)
        print(
            f"{row} step {it}{' (warm-up)' if it < args.warmup else ''}: ours {ours_s[-1]:.3f} s "
            f"loss {ours_loss[-1]:.6f} | torch {torch_s[-1]:.3f} s loss {torch_loss[-1]:.6f} "
            f"| load {os.getloadavg()[0]:.2f}",
            file=sys.stderr,
            flush=True,
        )

    ours_step = statistics.median(ours_s[args.warmup :])
    torch_step = statistics.median(torch_s[args.warmup :])
    rel_diff = [abs(a - b) / abs(b) for a, b in zip(ours_loss, torch_loss)]
    a = config.augment
    report.update(
        {
            f"{row}_batch": batch_size,
            f"{row}_out_dim": config.head.out_dim,
            f"{row}_crops": f"2x{a.global_crop_size} + {a.num_local_crops}x{a.local_crop_size}",
            f"{row}_drop_path_rate": config.model.drop_path_rate,
            f"{row}_ours_first_step_s": round(ours_s[0], 3),
            f"{row}_torch_first_step_s": round(torch_s[0], 3),
            f"{row}_ours_warmup_s": round(sum(ours_s[: args.warmup]), 3),
            f"{row}_torch_warmup_s": round(sum(torch_s[: args.warmup]), 3),
            f"{row}_ours_step_s": round(ours_step, 4),
            f"{row}_torch_step_s": round(torch_step, 4),
            f"{row}_ours_step_min_s": round(min(ours_s[args.warmup :]), 4),
            f"{row}_torch_step_min_s": round(min(torch_s[args.warmup :]), 4),
            f"{row}_ours_images_per_s": round(batch_size / ours_step, 1),
            f"{row}_torch_images_per_s": round(batch_size / torch_step, 1),
            f"{row}_speedup": round(torch_step / ours_step, 2),
            f"{row}_loss_max_rel_diff": float(f"{max(rel_diff):.3g}"),
            f"{row}_loss_last_rel_diff": float(f"{rel_diff[-1]:.3g}"),
        }
    )
    if args.phase_reps > 0:
        torch_side.setup_phases(reference_batches[-1], total - 1)
        timings = time_phases(our_phases(parts, config, state, our_batches[-1]), torch_side, args.phase_reps)
        print_phase_table(row, timings, ours_step, torch_step)
        for phase, sides in timings.items():
            for side, seconds in sides.items():
                if seconds is not None:
                    report[f"{row}_{side}_{phase}_s"] = round(seconds, 4)
    torch_side.close()


def main():
    args = parse_args()
    threads = limit_threads(args.threads)
    args.threads_in_force = threads
    from dino_jax import host_memory

    # Before JAX starts, as the CLI does; DINO_JAX_HOST_MALLOC=default measures without it.
    host_memory_kept = host_memory.keep_freed_host_memory()
    import jax

    report = {
        "device": jax.devices()[0].platform,
        "host_memory_kept": host_memory_kept,
        "threads": threads,
        "torch_threads": threads,
        "torch_in_process": args.torch_in_process,
        "steps": args.steps,
        "warmup_steps": args.warmup,
        "phase_reps": args.phase_reps,
        "load_avg_1m_start": round(os.getloadavg()[0], 2),
    }
    for row, name, out_dim in row_names(args):
        run_config(row, name, out_dim, args, report)
    report["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(report))


if __name__ == "__main__":
    main()

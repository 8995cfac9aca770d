"""A training run. `Trainer.train` is the loop: dispatch step t, hand step t-1's metrics to the
hooks (`hooks/`: progress, JSON lines, NaN guard, collapse warning, kNN monitor, attention panel),
checkpoint every N steps; SIGTERM/SIGINT end it at a step boundary (`stop_signals.py`). `run` puts
the untrained network's kNN before it and the evaluation of the trained teacher after it, and
returns the results (tests read them). The step itself and what it needs come from
`training_parts.py`. No numerics live here.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
import time

import jax
import ml_collections

from dino_jax import (
    accelerator,
    checkpointing,
    config as config_lib,
    config_validation,
    evaluation,
    host_memory,
    precision,
    sharding,
    training_parts,
)
from dino_jax.data import pipeline
from dino_jax.eval import report
from dino_jax.hooks import guards, metrics_log, monitors
from dino_jax.hooks.base import DelayedMetrics, Hook, fetch
from dino_jax.models import dino
from dino_jax.stop_signals import StopSignals


def _print(*args):
    print(*args, file=sys.stderr, flush=True)


SYNTHETIC_DATA_NOTE = (
    "SYNTHETIC DATA (dataset.synthetic=True): random noise shaped like {name}; throughput figures "
    "are real, losses and accuracies mean nothing"
)


def use_compilation_cache(directory: str) -> None:
    """JAX's persistent compilation cache in `directory` ("" leaves it off). Compiling the CIFAR
    step takes ~60 s on an H200 and more on a 2-core CPU; a resumed run then pays it again."""
    if directory:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(directory))


class Trainer:
    """Everything a run builds once: data, state, jitted step, checkpointer."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        # The one check of a training run's config: before any file, data or array, so a typo
        # costs nothing.
        config_validation.validate(config)
        if "tensorboard" in config.train.log_to and importlib.util.find_spec("tensorboardX") is None:
            raise config_lib.ConfigError(
                "config.train.log_to includes 'tensorboard', but tensorboardX is not installed: run "
                "`bash install.sh`, or pass --config.train.log_to=\"('jsonl',)\""
            )
        use_compilation_cache(config.train.compilation_cache_dir)
        # model.dtype="auto" made concrete, once, for these devices and this workdir's earlier run.
        config, self.precision = precision.resolved_config(config, workdir)
        _print(self.precision.line)
        config, pallas_line = precision.pallas_kernels_for(config)
        if pallas_line:
            _print(pallas_line)
        self.config, self.workdir = config, workdir
        os.makedirs(workdir, exist_ok=True)
        self.mesh = sharding.make_mesh()
        config_lib.check_divisible(config.train.batch_size, jax.device_count())

        if config.dataset.synthetic:
            _print(SYNTHETIC_DATA_NOTE.format(name=config.dataset.name))
        self.train_source = config_lib.open_split(config, "pretrain")
        # Data without labels (a flat folder) trains as any other but cannot be evaluated: said
        # once here; the kNN monitor, the untrained baseline and the final evaluation skip it.
        self.unlabelled_reason = evaluation.unlabelled_reason(config)
        if self.unlabelled_reason and jax.process_index() == 0:
            _print(evaluation.unlabelled_note(self.unlabelled_reason, training=True))
        parts = training_parts.build_training(config, len(self.train_source), self.mesh)
        self.plan, self.schedules, self.graphdef = parts.plan, parts.schedules, parts.graphdef
        self.state, self.step_fn, self.crop_config = parts.state, parts.step_fn, parts.crop_config
        self.data_iterator = iter(
            pipeline.train_dataset(
                self.train_source,
                self.crop_config,
                global_batch_size=config.train.batch_size,
                seed=config.seed,
                augment_on=config.augment.on,
                num_workers=config.augment.num_workers,
            )
        )
        t = config.train
        self.checkpointer = checkpointing.Checkpointer(
            os.path.join(workdir, "checkpoints"),
            max_to_keep=t.keep_checkpoints,
            save_every_steps=t.checkpoint_every_steps,
        )
        if self.checkpointer.latest_step() is not None:
            precision.check_resumable(self.precision, self.checkpointer.directory)
        self.interrupted_by: str | None = None  # set by train(): the signal that stopped it

    def restore_if_any(self) -> int:
        """The step to start from: the workdir's latest checkpoint, else `train.init_from` (a
        reference run, `interop.resume`), else 0."""
        for path in self.checkpointer.unfinished:
            _print(f"removed {path}: a checkpoint the previous run was writing when it stopped")
        if self.checkpointer.latest_step() is None:
            if not self.config.train.init_from:
                return 0
            from dino_jax.interop import resume

            self.state, step = resume.start_from(
                self.config.train.init_from,
                self.state,
                image_size=self.config.augment.global_crop_size,
                steps_per_epoch=self.plan.steps_per_epoch,
                freeze_last_layer_steps=self.plan.freeze_last_layer_steps,
            )
            return step
        self.state = self.checkpointer.restore(
            checkpointing.abstract_like(self.state), self.data_iterator, log=_print
        )
        step = int(self.state.step)
        _print(f"resumed from {self.checkpointer.directory} at step {step}")
        return step

    def next_batch(self):
        return sharding.to_global_batch(next(self.data_iterator), self.mesh)

    def make_hooks(self, start_step: int) -> list[Hook]:
        """The work between steps, in the order it runs."""
        config, plan = self.config, self.plan
        log_to = tuple(config.train.log_to)
        # Every process stops at the same non-finite loss and runs the collective monitor and
        # attention panel; only process 0 logs, warns and writes files.
        lead = jax.process_index() == 0
        made: list[Hook] = []
        if lead:
            made.append(
                metrics_log.LogMetrics(
                    self.workdir,
                    total_steps=plan.train_steps,
                    images_per_step=config.train.batch_size,
                    start_step=start_step,
                    jsonl="jsonl" in log_to,
                )
            )
            if "tensorboard" in log_to:
                made.append(metrics_log.TensorBoardLog(self.workdir, start_step=start_step))
        made.append(guards.NonFiniteGuard())
        after_step = plan.steps_per_epoch * max(config.train.freeze_last_layer, 1) * 2
        monitor_steps = config_lib.monitor_every_steps(config, plan.steps_per_epoch)
        if self.unlabelled_reason:  # said once, in __init__
            monitor_steps = 0
        if monitor_steps > plan.train_steps:
            if lead:
                _print(
                    f"note: no kNN monitor in this run: its interval ({monitor_steps} steps, "
                    f"eval.monitor_every_epochs={config.eval.monitor_every_epochs}) is longer than the run"
                )
            monitor_steps = 0
        monitor = self.make_knn_monitor(monitor_steps, start_step) if monitor_steps else None
        if lead:
            made.append(
                guards.CollapseWarning(
                    config.head.out_dim,
                    after_step=after_step,
                    knn_key=monitor and monitor.key("teacher"),
                    knn_points=self.logged_points(monitor and monitor.key("teacher"), start_step),
                    knn_test_images=monitor.num_test if monitor else 0,
                    # Past the warm-up dip; "no better" needs a quarter of the run (docs/results.md's
                    # reference run collapsed back to its untrained kNN from a quarter on).
                    knn_after_steps=(
                        max(after_step, plan.train_steps // 10),
                        max(after_step, plan.train_steps // 4),
                    ),
                )
            )
        if monitor:
            made.append(monitor)
        attention_steps = config.eval.attention_every_steps or monitor_steps
        if attention_steps:
            vit_graphdef, _ = dino.split_backbone(self.graphdef, self.state.teacher)
            made.append(
                monitors.AttentionPanel(
                    self.workdir,
                    self.graphdef,
                    vit_graphdef,
                    evaluation.test_panel_images(config),
                    every_steps=attention_steps,
                    patch_size=config.model.patch_size,
                    mean=config.dataset.mean,
                    std=config.dataset.std,
                )
            )
        return made

    def make_knn_monitor(self, every_steps: int, start_step: int) -> monitors.KnnMonitor:
        """The kNN monitor on the fixed subsets of `evaluation.monitor_data`, read once here."""
        config = self.config
        monitored = evaluation.monitor_data(config, config.augment.global_crop_size)
        knn_fn = functools.partial(
            evaluation.knn,
            config,
            image_size=config.augment.global_crop_size,
            mean=config.dataset.mean,
            std=config.dataset.std,
            mesh=self.mesh,
            data=monitored.data,
            ks=(config.eval.monitor_knn_k,),
        )
        k = config.eval.monitor_knn_k
        earlier = self.logged_points(f"monitor_teacher_knn_k{k}_top1", start_step)
        return monitors.KnnMonitor(
            self.graphdef,
            knn_fn,
            every_steps=every_steps,
            k=k,
            num_train=monitored.num_train,
            num_test=monitored.num_test,
            networks=("teacher", "student") if config.eval.monitor_student else ("teacher",),
            untrained=earlier[0][1] if earlier and earlier[0][0] == 0 else None,
        )

    def logged_points(self, key: str | None, up_to_step: int) -> list[tuple[int, float]]:
        """`(step, value)` of `key` in the rows metrics.jsonl holds up to `up_to_step` (a resumed run's
        history)."""
        if key is None or not up_to_step:
            return []
        rows = metrics_log.read_metrics(self.workdir, up_to_step=up_to_step)
        return [(row["step"], row[key]) for row in rows if key in row]

    def train(self, start_step: int | None = None) -> dict[str, float]:
        """Runs the steps from `start_step` (None: `restore_if_any()` first); returns the last logged
        metrics. SIGTERM or SIGINT stops it after the step in flight, with a checkpoint of that
        step; `interrupted_by` then names the signal."""
        config, plan = self.config, self.plan
        start = self.restore_if_any() if start_step is None else start_step
        _print(accelerator.describe_backend(jax.default_backend(), jax.devices(), jax.process_count()))
        if jax.default_backend() == "cpu":
            _print(host_memory.describe())
        _print(
            f"training {plan.train_steps} steps ({plan.steps_per_epoch} per epoch, batch "
            f"{config.train.batch_size}, {jax.device_count()} device(s), augment on {config.augment.on}); "
            f"the first step compiles"
        )
        hooks = self.make_hooks(start)
        logged = DelayedMetrics(hooks)
        done = saved = start
        try:
            if start == 0:  # the untrained network's kNN and attention: where the curves start
                logged.run_state_hooks(0, self.state, every=True)
            with StopSignals() as stop:
                for step in range(start, plan.train_steps):
                    self.state, metrics = self.step_fn(self.state, self.next_batch())
                    done = step + 1
                    logged.flush()
                    if done % config.train.log_every_steps == 0 or done == plan.train_steps:
                        logged.put(done, metrics)
                    logged.run_state_hooks(done, self.state)
                    periodic = done % config.train.checkpoint_every_steps == 0 and done != plan.train_steps
                    if periodic or stop.received:
                        # A checkpoint is written only for a finite state.
                        if not logged.flush():
                            guards.check_finite(done, fetch(metrics))
                        self.checkpointer.save(
                            done, self.state, self.data_iterator, force=stop.received is not None
                        )
                        saved = done
                    if stop.received:
                        break
                logged.flush()
                if done > saved:
                    self.checkpointer.save(done, self.state, self.data_iterator, force=True)
                self.checkpointer.wait()
        finally:
            for hook in hooks:
                hook.close()
        self.interrupted_by = stop.received
        return logged.last


def interrupted_message(trainer: Trainer) -> str:
    """Where an interrupted run stopped, and the command that continues it."""
    step = int(trainer.state.step)
    if report.started_from_command_line():
        again = f"run the same command again:\n  {report.default_command()}"
    else:
        again = f"call train.run with the same config and workdir ({trainer.workdir}) again"
    return (
        f"{trainer.interrupted_by} received: stopped after step {step}/{trainer.plan.train_steps}, "
        f"checkpoint written to {os.path.join(trainer.checkpointer.directory, str(step))}. "
        f"To continue from step {step}, {again}"
    )


def write_run_report(config, workdir: str, backbone, step: int, mesh) -> None:
    """report.html of the finished run (`modes/report.py`). The run's results are written by then,
    so a failure here costs nothing but the page: it is reported with the command that retries."""
    from dino_jax.modes import report as report_mode

    try:
        report_mode.run(workdir, config=config, backbone=backbone, step=step, mesh=mesh)
    except Exception as error:  # noqa: BLE001 - the page is optional; the run's results are safe
        _print(
            f"WARNING: report.html was not written ({type(error).__name__}: {error}); "
            f"python launch.py --mode=report --workdir={workdir} tries again"
        )


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains, then evaluates the teacher with the configured suite; `<workdir>/results.json`
    (`eval.report`) gathers the untrained network's kNN, the training figures and the
    evaluation; returns it (percent)."""
    started = time.perf_counter()
    trainer = Trainer(config, workdir)
    config = trainer.config  # model.dtype resolved: what config.json records and evaluation reads
    image_size = config.augment.global_crop_size
    norm = dict(mean=config.dataset.mean, std=config.dataset.std)
    if (
        config.eval.random_init_knn
        and not trainer.unlabelled_reason
        and "random_init_knn_k20_top1" not in report.read_results(workdir)
        and trainer.checkpointer.latest_step() is None
    ):
        _print("kNN of the untrained network (the baseline training must beat)...")
        graphdef, params = dino.split_backbone(trainer.graphdef, trainer.state.teacher)
        baseline = evaluation.knn(config, graphdef, params, image_size=image_size, mesh=trainer.mesh, **norm)
        report.write_results(workdir, {f"random_init_{k}": v for k, v in baseline.items()})
        _print("untrained: " + ", ".join(f"{k} {v:.2f}" for k, v in baseline.items() if k.endswith("top1")))
    # Restored before config.json is written: a refused checkpoint (another model) leaves the
    # workdir's config.json describing the run it holds.
    start = trainer.restore_if_any()
    config_lib.save_run_config(config, workdir)
    last = trainer.train(start)
    if trainer.interrupted_by:
        trainer.checkpointer.close()
        _print(interrupted_message(trainer))
        return report.read_results(workdir)
    train_results = {"train_wall_s": time.perf_counter() - started}
    if config.dataset.synthetic:
        # Kept beside the numbers so no table built from results.json mistakes them for real ones.
        train_results["synthetic_data"] = 1.0
    if last:
        train_results["final_loss"] = last["loss"]
    report.write_results(workdir, train_results)
    trainer.checkpointer.close()
    _print("evaluating the trained teacher...")
    graphdef, params = dino.split_backbone(trainer.graphdef, trainer.state.teacher)
    evaluation.evaluate(
        config, graphdef, params, out_dir=workdir, image_size=image_size, mesh=trainer.mesh, **norm
    )
    results = report.read_results(workdir)
    summary = ", ".join(
        f"{k} {v:.2f}"
        for k, v in sorted(results.items())
        if k.endswith("top1") and "knn_k20" in k or k in ("linear_best_test_top1",)
    )
    _print(f"results ({os.path.join(workdir, report.RESULTS_JSON)}, {report.RESULTS_MD}): {summary}")
    if config.eval.report:  # every process: the feature map's features are a collective computation
        write_run_report(config, workdir, (graphdef, params), int(trainer.state.step), trainer.mesh)
    if config.dataset.synthetic:
        _print(SYNTHETIC_DATA_NOTE.format(name=config.dataset.name))
    return results

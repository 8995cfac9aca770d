"""What happens between training steps (`train.Trainer.make_hooks` puts them in order):
`base.py` the protocol and the one-step-late metrics, `metrics_log.py` the progress line,
`metrics.jsonl` and TensorBoard, `guards.py` the non-finite guard and the collapse warnings,
`monitors.py` the kNN monitor and the attention panel."""

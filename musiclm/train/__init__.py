"""Training a stage on Ray Train with DeepSpeed: the per-worker loop (``loop.py``), optimizer and DeepSpeed
settings (``engine.py``), what workers stream (``data.py``), metrics and TensorBoard (``metrics.py``), stage
checkpoints for use (``checkpoint.py``) and the driver that checks and launches a run (``run.py``)."""

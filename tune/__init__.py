"""Ray Tune sweeps over the same train function that ``jobs.train`` uses (``python -m tune.sweep``)."""

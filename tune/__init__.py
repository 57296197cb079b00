"""Ray Tune sweeps over the same train function that ``jobs.train`` uses (``musiclm tune``, ``jobs/tune.py``)."""

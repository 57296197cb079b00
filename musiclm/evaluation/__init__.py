"""Judging model sets: the evaluation of several sets on one prompt set (``evaluate.py``), its metrics (CLAP
score and FAD: ``quality.py``), and scoring a training run's checkpoints beside it (``watch.py``)."""

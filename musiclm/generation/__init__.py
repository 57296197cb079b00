"""From a text prompt to music: the three stages sampled in sliding windows and decoded by EnCodec, best of N by
CLAP similarity (``generate.py``), and many prompts or model sets on Ray actors (``batch.py``)."""

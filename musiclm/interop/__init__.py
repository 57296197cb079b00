"""Other systems' files: open-musiclm's released stages, RVQ and k-means (``open_musiclm.py``) and laion_clap's
CLAP checkpoints converted to a transformers ``ClapModel`` (``laion_clap.py``)."""

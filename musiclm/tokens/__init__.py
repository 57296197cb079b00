"""The token system (``system.py``): CLAP + RVQ conditioning tokens, MERT/HuBERT + k-means semantic tokens and
EnCodec acoustic tokens, their encoders, and fitting the RVQ and k-means on Ray (``fit.py``)."""

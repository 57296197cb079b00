"""Where files live and where work runs: local folders and buckets through one interface (``storage.py``), and
Ray actor pools sized from the cluster (``raycompute.py``)."""

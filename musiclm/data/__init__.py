"""Token data: sources of audio (FMA, a folder, the synthetic set), preprocessing on Ray Data into the token
dataset (Parquet shards + manifest), and readers that crop stage windows for training."""

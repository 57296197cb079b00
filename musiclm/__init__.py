"""open-musiclm re-created on Ray. The folders follow the data's journey from audio to music:

    audio/       decoding, resampling and writing audio; MP3 frame parsing; the synthetic corpus
    tokens/      the token system: CLAP + RVQ, MERT/HuBERT + k-means, EnCodec; fitting the quantizers, training
                 CLAP and the offline EnCodec
    data/        sources (a folder, FMA, the synthetic set), preprocessing on Ray Data, the token dataset
    models/      the stage decoder (layers, attention, decoding caches), the three stage layouts, sampling
    train/       one train function for every stage: Ray Train + DeepSpeed, checkpoints, metrics
    generation/  text to music through the three stages and EnCodec, best of N by CLAP; batch generation
    evaluation/  comparing model sets (CLAP score, FAD), scoring a run's checkpoints beside its training
    interop/     other systems' files: open-musiclm's released checkpoints, laion_clap's CLAP
    infra/       storage (local folders and buckets) and sizing Ray actor pools

``config.py`` (with ``config_io.py``) holds the settings every part shares; ``pipeline.py`` runs the whole
journey. Library code never starts Ray: the jobs in ``jobs/`` connect and call it.
"""

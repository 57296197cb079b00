"""One token-conditioned decoder (``transformer.py``, built of ``layers.py``, ``attention.py`` and ``caches.py``), the
three stage layouts over it (``stages.py``) and the sampler (``sampling.py``)."""
from .caches import KVCache
from .stages import (build_stage, chance_loss, loss_and_metrics, opening_losses, split_batch, stage_loss,
                     stage_sequences)
from .transformer import TokenConditionedTransformer, TokenSequence, count_parameters

__all__ = ["KVCache", "TokenConditionedTransformer", "TokenSequence", "build_stage", "chance_loss",
           "count_parameters", "loss_and_metrics", "opening_losses", "split_batch", "stage_loss", "stage_sequences"]

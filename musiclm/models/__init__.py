"""One token-conditioned decoder (``transformer.py``) and the three stage layouts over it (``stages.py``)."""
from .stages import build_stage, chance_loss, loss_and_metrics, split_batch, stage_loss, stage_sequences
from .transformer import KVCache, TokenConditionedTransformer, TokenSequence, count_parameters

__all__ = ["KVCache", "TokenConditionedTransformer", "TokenSequence", "build_stage", "chance_loss",
           "count_parameters", "loss_and_metrics", "split_batch", "stage_loss", "stage_sequences"]

"""Pure loss functions. Each algorithm's math lives in one file (`sft.py`, `dpo.py`, ...) whose
docstring states the formula; `logprobs.py` holds the chunked token log-probs they share."""

from jaxpost.losses.logprobs import (model_token_stats, sequence_logprobs, token_logprobs,
                                     token_stats)
from jaxpost.losses.sft import sft_loss

__all__ = ["model_token_stats", "sequence_logprobs", "sft_loss", "token_logprobs", "token_stats"]

"""Training: one loop (`loop.py`) for every algorithm registered in `algorithms.py`.

    metrics = jaxpost.train(config)      # config: configs/<recipe>.py get_config()
"""

from jaxpost.train.algorithms import Algorithm, LossContext, SetupContext, get, register
from jaxpost.train.loop import NonFiniteError, train

__all__ = ["Algorithm", "LossContext", "NonFiniteError", "SetupContext", "get", "register",
           "train"]

"""Training: one loop (`loop.py`) for every algorithm registered in `algorithms.py`.

    metrics = jaxpost.train(config)      # config: configs/<recipe>.py get_config()
"""

from jaxpost._callable_module import make_callable
from jaxpost.train.algorithms import Algorithm, LossContext, SetupContext, get, register
from jaxpost.train.checkpoint import CheckpointError
from jaxpost.train.loop import NonFiniteError, ResumeError, train

make_callable(__name__, "train")  # jaxpost.train(config) runs the loop

__all__ = ["Algorithm", "CheckpointError", "LossContext", "NonFiniteError", "ResumeError",
           "SetupContext", "get", "register", "train"]

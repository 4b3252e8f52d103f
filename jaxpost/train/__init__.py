"""Training: one loop (`loop.py`) for every algorithm registered in `algorithms.py`.

    metrics = jaxpost.train(config)      # config: configs/<recipe>.py get_config()

The loop and its errors load on first use (PEP 562), so importing a building block such as
`jaxpost.train.sharding` (the sampler does) does not import the loop and everything it uses.
"""

from jaxpost._callable_module import make_callable
from jaxpost.train.algorithms import Algorithm, LossContext, SetupContext, get, register
from jaxpost.train.checkpoint import CheckpointError

_FROM_LOOP = ("NonFiniteError", "ResumeError", "train")


def __getattr__(name: str):
  if name in _FROM_LOOP:
    from jaxpost.train import loop
    return getattr(loop, name)
  raise AttributeError(f"module 'jaxpost.train' has no attribute {name!r}")


make_callable(__name__, "train")  # jaxpost.train(config) runs the loop

__all__ = ["Algorithm", "CheckpointError", "LossContext", "NonFiniteError", "ResumeError",
           "SetupContext", "get", "register", "train"]

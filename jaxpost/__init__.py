"""jaxpost: JAX-first post-training for language models.

Public API:
    lm = jaxpost.load_model("bundled:smollm2-135m-instruct" | "/path/to/hf_dir" | "org/name")
    jaxpost.save_model(lm, "out_dir")
"""

from jaxpost.hf import LoadedModel, load_model, save_model
from jaxpost.train.loop import train

__all__ = ["LoadedModel", "load_model", "save_model", "train"]
__version__ = "0.1.0"

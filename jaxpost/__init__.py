"""jaxpost: JAX-first post-training for language models.

Public API:
    lm = jaxpost.load_model("bundled:smollm2-135m-instruct" | "/path/to/hf_dir" | "org/name")
    out = jaxpost.generate(lm, ["Hi!"], max_new_tokens=64, temperature=0.0)
    jaxpost.save_model(lm, "out_dir")
    metrics = jaxpost.train(jaxpost.configs.get("dpo"))   # the recipes ship as jaxpost.configs
    report = jaxpost.pipelines.run(jaxpost.configs.get("rejection_sampling"))  # data generation
    fig = jaxpost.plot.plot_runs(["runs/sft", "runs/dpo"])   # training curves (matplotlib)
"""

from jaxpost import configs, generate, pipelines, plot, train  # callable modules: jaxpost.generate(...), jaxpost.train(...)
from jaxpost.hf import LoadedModel, load_model, save_model

__all__ = ["LoadedModel", "configs", "generate", "load_model", "pipelines", "plot", "save_model",
           "train"]
__version__ = "0.1.0"

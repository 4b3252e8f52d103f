"""Shared defaults of every recipe; a recipe's `get_config(arg)` starts from `get_config()`.

Keys (override any with --config.<key>=<value>; unknown keys fail):
  algorithm            registered algorithm (jaxpost/train/algorithms.py): "sft", "rm", "dpo", ...
  workdir              checkpoints/, metrics.jsonl, tensorboard/ (a restart resumes from it)
  seed, max_steps, batch_size (global rows/pairs per optimiser step), grad_accum (microbatches)
  log_every, eval_every (0: only before/after), eval_steps (eval batches), eval_at_start
  max_update_ratio     stop, without saving the step, when ||update|| > max_update_ratio x
                       ||params|| (a blow-up; 0: off); non-finite loss, gradient, update or
                       parameters always stop
  logprob_chunk_size   positions per row in one chunk of the chunked LM head / log-probs (fp32
                       [B x chunk, vocab] logits alive at once); only chunks holding loss_mask
                       targets are computed
  export_hf            "" or a directory (relative to workdir) to write an HF model at the end
  report.*             task: built-in task whose held-out greedy accuracy is reported before
                       and after training ("" disables); examples, max_new_tokens
  model.*              name_or_path, dtype (compute), param_dtype (master), scan_layers,
                       remat_policy, random_init (+ overrides: HF config fields)
  data.*               jaxpost.data.config.data_defaults(): train, eval, max_length, packing, ...
                       (also "synthetic[:rows=N,min_length=M]" for random-token SFT batches)
  optimizer.*          name (adamw|adafactor|sgd), learning_rate, schedule, warmup_*, ...
  checkpoint.*         every (0: only the final one, <0: none), keep, async_save
  lora.*               rank (0: full finetuning), alpha, dropout, targets (regex over module paths,
                       default every attention + MLP projection), trainable (regex of modules
                       trained in full besides the adapters; "score" for reward models), export
                       ("merged": plain HF weights, "peft": adapter_config.json + adapter weights)
  mesh.*               data, fsdp, tensor (-1 = the rest of the devices), rules
  metrics.*            tensorboard, wandb, wandb_project, progress_bar, cpu_peak_flops
  distributed.*        initialize, coordinator_address, num_processes, process_id,
                       cpu_collectives ("gloo" for multi-process CPU)
"""

import ml_collections

from jaxpost.data.config import data_defaults
from jaxpost.models.lora import DEFAULT_TARGETS
from jaxpost.train.sharding import DEFAULT_RULES


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.algorithm = "sft"
  c.workdir = "runs/default"
  c.seed = 0
  c.max_steps = 100
  c.batch_size = 8
  c.grad_accum = 1
  c.log_every = 10
  c.eval_every = 0
  c.eval_steps = 4
  c.eval_at_start = True
  c.max_update_ratio = 1.0
  c.logprob_chunk_size = 32
  c.export_hf = ""

  c.report = ml_collections.ConfigDict({"task": "", "examples": 128, "max_new_tokens": 24})

  c.model = ml_collections.ConfigDict()
  c.model.name_or_path = "bundled:smollm2-135m-instruct"
  c.model.dtype = "float32"
  c.model.param_dtype = "float32"
  c.model.scan_layers = True
  c.model.remat_policy = "none"
  c.model.random_init = False
  c.model.overrides = ml_collections.ConfigDict()

  c.data = data_defaults()

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adamw"
  c.optimizer.learning_rate = 1e-5
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.momentum = 0.0
  c.optimizer.weight_decay = 0.0
  c.optimizer.decay_embeddings = True
  c.optimizer.max_grad_norm = 1.0
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_steps = 0
  c.optimizer.warmup_ratio = 0.0
  c.optimizer.min_lr_ratio = 0.0

  c.lora = ml_collections.ConfigDict({
      "rank": 0, "alpha": 16.0, "dropout": 0.0, "targets": DEFAULT_TARGETS, "trainable": "score",
      "export": "merged"})

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 500
  c.checkpoint.keep = 3
  c.checkpoint.async_save = True

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.mesh.rules = DEFAULT_RULES

  c.metrics = ml_collections.ConfigDict()
  c.metrics.tensorboard = True
  c.metrics.wandb = False
  c.metrics.wandb_project = "jaxpost"
  c.metrics.progress_bar = True
  c.metrics.cpu_peak_flops = 290e9

  c.distributed = ml_collections.ConfigDict()
  c.distributed.initialize = False
  c.distributed.coordinator_address = ""
  c.distributed.num_processes = 0
  c.distributed.process_id = -1
  c.distributed.cpu_collectives = ""
  return c

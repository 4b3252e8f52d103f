"""Shared defaults of every recipe; a recipe's `get_config(arg)` starts from `get_config()`.

`KEYS` documents every shared key (the `data.*` keys are documented in jaxpost/data/config.py);
the list below is generated from it, and `python scripts/train.py --config=configs/<recipe>.py
--help` prints a recipe's keys with their values. `batch_size` is GLOBAL (all devices and
microbatches together), `grad_accum` splits it, and `eval_every` (not `eval_batches`) is the
interval between evaluations: README "Coming from TRL" maps TRL's arguments to these keys.
"""

import ml_collections

from jaxpost.configs.keys import doc_block
from jaxpost.data.config import data_defaults
from jaxpost.models.config import DTYPES, REMAT_POLICIES
from jaxpost.models.lora import DEFAULT_TARGETS
from jaxpost.train.optim import OPTIMIZERS, SCHEDULES
from jaxpost.train.sharding import DEFAULT_RULES

KEYS = {
    "algorithm": "registered algorithm (jaxpost/train/algorithms.py): sft, rm, dpo, kto, ...",
    "workdir": "run directory: checkpoints/, metrics.jsonl, tensorboard/; a restart resumes "
               "from it",
    "seed": "seed of the initialisation, the data order and dropout",
    "keep_freed_memory": "glibc: one malloc arena that keeps what it frees, so XLA:CPU steps do "
                         "not page-fault their buffers again (jaxpost/train/host_memory.py); "
                         "False: glibc's defaults",
    "max_steps": "optimiser steps (used when num_epochs is 0)",
    "num_epochs": "> 0: train this many passes over data.train (may be fractional): max_steps = "
                  "ceil(num_epochs x epoch size / batch_size), with packing estimated from the "
                  "token count; `epoch` is logged. 0: max_steps decides",
    "batch_size": "GLOBAL rows (pairs for preference data) per optimiser step, summed over "
                  "devices and microbatches (TRL: per_device_train_batch_size x devices x "
                  "gradient_accumulation_steps)",
    "grad_accum": "microbatches per step: batch_size is split into grad_accum microbatches of "
                  "batch_size / grad_accum rows (same global batch and loss, less memory)",
    "log_every": "steps between train records (metrics.jsonl; TensorBoard train/<name>); 0: "
                 "only at the end",
    "eval_every": "steps between evaluations (TRL's eval_steps); 0: only before and after "
                  "training",
    "eval_batches": "batches of eval data per evaluation, the same ones each time",
    "eval_at_start": "evaluate (and report the task) before the first step",
    "evals": "named evaluators {type: loss | task | rollout, every, ...} (jaxpost/train/"
             "evals.py); empty: the algorithm's defaults (loss + task, rollout algorithms: "
             "rollout + task) set by eval_every, eval_batches and report.*",
    "max_update_ratio": "stop, without saving the step, when ||update|| > max_update_ratio x "
                        "||params|| (a blow-up; 0: off); a non-finite loss, gradient, update or "
                        "parameter always stops",
    "logprob_chunk_size": "positions per row in one chunk of the chunked LM head / log-probs "
                          "(fp32 [B x chunk, vocab] logits alive at once); only chunks holding "
                          "loss_mask targets are computed",
    "export_hf": '"" or a directory (relative to workdir) to write an HF model at the end',
    "report.task": 'built-in task whose held-out greedy accuracy is reported before and after '
                   'training; "auto": the task data.train is drawn from, if it is a built-in '
                   'task (else none); "" disables',
    "report.examples": "held-out prompts answered for the task report",
    "report.max_new_tokens": "tokens generated per task-report answer",
    "model.name_or_path": 'HF directory, hub id "org/name" or "bundled:<name>" (with '
                          'random_init: the architecture and tokenizer only)',
    "model.dtype": f"compute dtype: {' | '.join(DTYPES)}",
    "model.param_dtype": f"master weight dtype (what the optimiser updates): {' | '.join(DTYPES)}",
    "model.scan_layers": "one compiled layer under lax.scan (fast compiles) instead of unrolled "
                         "layers",
    "model.remat_policy": f"{' | '.join(REMAT_POLICIES)}: what each layer keeps for the backward "
                          "pass (README memory levers)",
    "model.random_init": "random weights instead of the checkpoint's (tests, throughput runs)",
    "model.overrides": "HF config fields replacing the checkpoint's, e.g. num_hidden_layers "
                       "(random_init only)",
    "optimizer.name": " | ".join(OPTIMIZERS),
    "optimizer.learning_rate": "peak learning rate, > 0",
    "optimizer.b1": "adamw: first-moment decay",
    "optimizer.b2": "adamw: second-moment decay",
    "optimizer.eps": "adamw: denominator epsilon",
    "optimizer.momentum": "sgd: momentum (0: none)",
    "optimizer.weight_decay": "decoupled weight decay (not on norm scales and biases)",
    "optimizer.decay_embeddings": "also decay the token embeddings",
    "optimizer.max_grad_norm": "clip gradients to this global norm (0: no clipping)",
    "optimizer.schedule": f"learning-rate decay after warmup: {' | '.join(SCHEDULES)}",
    "optimizer.warmup_steps": "linear warmup steps (0: use warmup_ratio)",
    "optimizer.warmup_ratio": "warmup as a fraction of max_steps, when warmup_steps is 0",
    "optimizer.min_lr_ratio": "final learning rate / peak",
    "checkpoint.every": "steps between checkpoints (0: only the final one, < 0: none)",
    "checkpoint.keep": "checkpoints kept (0: all)",
    "checkpoint.async_save": "write checkpoints in the background while training continues",
    "lora.rank": "LoRA rank r (0: full finetuning)",
    "lora.alpha": "LoRA scale numerator: the update is (alpha / r) A B",
    "lora.dropout": "dropout on the adapter input, in [0, 1)",
    "lora.targets": "regex fully matching the module paths that get adapters (default: every "
                    "attention and MLP projection)",
    "lora.trainable": 'regex of modules trained in full besides the adapters ("score": a reward '
                      "model's new head)",
    "lora.export": '"merged" (plain HF weights) or "peft" (adapter_config.json + adapter weights)',
    "mesh.data": "data-parallel mesh axis size (-1: the rest of the devices)",
    "mesh.fsdp": "parameter-sharded data-parallel axis size (ZeRO-3 style; -1: the rest)",
    "mesh.tensor": "tensor-parallel axis size (-1: the rest)",
    "mesh.rules": "logical axis name -> mesh axes (jaxpost/train/sharding.py)",
    "metrics.tensorboard": "write TensorBoard events to workdir/tensorboard",
    "metrics.wandb": "log to Weights & Biases (if installed)",
    "metrics.wandb_project": "W&B project name",
    "metrics.progress_bar": "a tqdm bar over the steps",
    "metrics.cpu_peak_flops": "the host's peak FLOP/s, for MFU on CPU",
    "metrics.plot": "at the end of a finished run, draw its curves into workdir/curves.png "
                    "(jaxpost/plot.py; a failure only warns)",
    "distributed.initialize": "call jax.distributed.initialize (multi-process runs)",
    "distributed.coordinator_address": '"host:port" of process 0 ("" on TPU/SLURM: discovered)',
    "distributed.num_processes": "process count (0: discovered)",
    "distributed.process_id": "this process's id (-1: discovered)",
    "distributed.cpu_collectives": '"gloo" for multi-process CPU runs',
}
__doc__ += doc_block(KEYS, "Shared keys")


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.algorithm = "sft"
  c.workdir = "runs/default"
  c.seed = 0
  c.keep_freed_memory = True
  c.max_steps = 100
  c.num_epochs = 0.0
  c.batch_size = 8
  c.grad_accum = 1
  c.log_every = 10
  c.eval_every = 0
  c.eval_batches = 4
  c.eval_at_start = True
  c.evals = ml_collections.ConfigDict()
  c.max_update_ratio = 1.0
  c.logprob_chunk_size = 32
  c.export_hf = ""

  c.report = ml_collections.ConfigDict({"task": "auto", "examples": 128, "max_new_tokens": 24})

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
  c.metrics.plot = True

  c.distributed = ml_collections.ConfigDict()
  c.distributed.initialize = False
  c.distributed.coordinator_address = ""
  c.distributed.num_processes = 0
  c.distributed.process_id = -1
  c.distributed.cpu_collectives = ""
  return c

"""Knowledge distillation (algorithms "distill" and "gkd"; math in jaxpost/losses/distill.py,
glue in jaxpost/algos/distill.py).

    python scripts/train.py --config=configs/distill.py          # SmolLM2-135M -> its 15 layers
    python scripts/train.py --config=configs/distill.py:gkd      # on-policy GKD, JSD beta 0.5
    python scripts/train.py --config=configs/distill.py:seq_kd   # trains on the teacher's samples
    python scripts/train.py --config=configs/distill.py:tiny     # tiny random student (CI)

The default distils the bundled SmolLM2-135M-Instruct (teacher, frozen) into a student made of
its every other layer (15 of 30: `student.init`, built once into <workdir>/student) on the
built-in arithmetic task, with the forward KL to the teacher's per-token distributions on the
answer tokens, and reports the held-out loss (eval/distill/forward_kl = KL(teacher ‖ student))
and the student's task accuracy before and after. A student from any HF checkpoint with the
teacher's tokenizer: --config.student.init= --config.model.name_or_path=<dir>.
"""

import ml_collections

from jaxpost.configs import base, grpo, sft
from jaxpost.configs.keys import doc_block

KEYS = {
    "teacher.name_or_path": "the frozen teacher (HF dir, hub id, bundled:<name>); must share "
                            "the student's tokenizer",
    "student.init": '"teacher_layers:every_other" or "teacher_layers:<i>,<j>,...": build the '
                    "student from these teacher layers (replaces model.name_or_path); \"\": "
                    "the student is model.name_or_path",
    "distill.beta": "generalised JSD β: 0 forward KL(teacher ‖ student), 1 reverse KL, between: "
                    "JSD_β (GKD)",
    "distill.temperature": "τ of both softmaxes in the divergence",
    "distill.temperature_scale": "multiply the divergence by τ² (Hinton et al. 2015)",
    "distill.hard_weight": "w: loss = (1 − w) divergence + w NLL of the data tokens",
    "distill.top_k": "truncate the teacher to its k most likely tokens, renormalised (0: off; "
                     "not with beta 1)",
    "distill.lmbda": "gkd: probability per iteration that the batch's completions are the "
                     "student's own samples (on-policy)",
    "distill.seq_kd": "gkd: train on the teacher's samples (sequence-level KD) unless the coin "
                      "picks the student's",
    **{k: v for k, v in grpo.ROLLOUT_KEYS.items() if k.startswith("rollout.")},
}
__doc__ += doc_block(KEYS, "Keys added to configs/base.py")

VARIANTS = ("default", "gkd", "seq_kd", "tiny")
TEACHER = "bundled:smollm2-135m-instruct"


def get_config(arg=None):
  c = base.get_config()
  c.algorithm = "distill"
  c.workdir = "runs/distill"
  c.teacher = ml_collections.ConfigDict({"name_or_path": TEACHER})
  c.student = ml_collections.ConfigDict({"init": "teacher_layers:every_other"})
  c.distill = ml_collections.ConfigDict({
      "beta": 0.0, "temperature": 1.0, "temperature_scale": True, "hard_weight": 0.0,
      "top_k": 0})
  c.data.train = "builtin:arithmetic"
  c.data.max_length = 96
  c.batch_size = 8
  c.max_steps = 60
  c.log_every = 5
  c.eval_every = 20
  c.eval_batches = 4
  c.checkpoint.every = 0
  c.optimizer.learning_rate = 1e-4
  c.optimizer.warmup_steps = 4
  c.report.examples = 64
  c.report.max_new_tokens = 16
  variant = arg or "default"
  if variant not in VARIANTS:
    raise ValueError(f"configs/distill.py: unknown variant {variant!r}; choose one of {VARIANTS}")
  if variant in ("gkd", "seq_kd"):
    gkd(c, variant)
  if variant == "tiny":
    sft._tiny(c)
    c.workdir = "runs/distill_tiny"
    c.student.init = ""
  return c


def gkd(c, variant: str):
  """On-policy GKD with TRL's defaults (λ 0.5, β 0.5, samples at temperature 0.9), or seq_kd:
  every iteration trains on the teacher's samples."""
  c.algorithm = "gkd"
  c.workdir = f"runs/distill_{variant}"
  c.distill.lmbda = 0.5 if variant == "gkd" else 0.0
  c.distill.seq_kd = variant == "seq_kd"
  if variant == "gkd":
    c.distill.beta = 0.5
  c.rollout = ml_collections.ConfigDict({"max_new_tokens": 16, "temperature": 0.9, "top_k": 0,
                                         "top_p": 1.0})

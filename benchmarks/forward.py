"""Forward throughput of the bundled SmolLM2-135M: jaxpost (jit) vs transformers (torch eager).

    python benchmarks/forward.py [--batch 8 --length 256 --repeats 3]

Same weights, same random token batch, fp32, this machine, one run. Reports compile time,
median forward time after compilation, tokens/s, MFU against the CPU peak, peak RSS.
"""

import argparse
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import (CPU_PEAK_FLOPS, measured_matmul_flops, peak_rss_gb, timed, versions,
                    write_result)  # noqa: E402

import jaxpost  # noqa: E402
from jaxpost.models.config import forward_flops_per_token  # noqa: E402


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--length", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  b, t = args.batch, args.length
  ids = np.random.default_rng(0).integers(0, 49152, (b, t)).astype(np.int32)
  mask = np.ones_like(ids)

  lm = jaxpost.load_model("bundled:smollm2-135m-instruct")
  forward = jax.jit(lambda p, i, m: lm.model.apply({"params": p}, i, attention_mask=m))
  compile_s, jax_s = timed(lambda: forward(lm.params, ids, mask).block_until_ready(),
                           args.repeats)
  jax_rss = peak_rss_gb()
  flops = forward_flops_per_token(lm.config, t) * b * t

  import torch
  import transformers
  ref = transformers.AutoModelForCausalLM.from_pretrained(
      jaxpost.hf.resolve_model_dir("bundled:smollm2-135m-instruct"), dtype=torch.float32).eval()
  ids_t, mask_t = torch.tensor(ids, dtype=torch.long), torch.tensor(mask)

  def torch_forward():
    with torch.no_grad():
      ref(input_ids=ids_t, attention_mask=mask_t)

  torch_first, torch_s = timed(torch_forward, args.repeats)
  row = lambda name, first, sec, rss: [
      name, f"{first:.1f}", f"{sec:.3f}", f"{b * t / sec:,.0f}",
      f"{100 * flops / sec / CPU_PEAK_FLOPS:.1f}%", f"{rss:.2f}"]
  table = [["impl", "first call s (compile)", "median s", "tokens/s", "MFU", "peak RSS GB"],
           row("jaxpost (jit)", compile_s, jax_s, jax_rss),
           row("transformers (torch eager)", torch_first, torch_s, peak_rss_gb())]
  write_result(
      "forward", f"Forward, SmolLM2-135M fp32, B={b} x T={t}",
      f"python benchmarks/forward.py --batch {b} --length {t}", table,
      f"Speed-up {torch_s / jax_s:.2f}x. MFU is against the DESIGN yardstick of "
      f"{CPU_PEAK_FLOPS / 1e9:.0f} GFLOP/s; a 2048^2 fp32 matmul measured "
      f"{measured_matmul_flops() / 1e9:.0f} GFLOP/s on this machine in this run. "
      f"{versions('jax', 'flax', 'torch', 'transformers')}. "
      f"Peak RSS is cumulative per process (the torch row includes the jaxpost model).")


if __name__ == "__main__":
  main()

"""Generation speed: jaxpost `generate` vs transformers `generate` (torch) - the suite's rows.

The "generate" task of benchmarks/run.py (the one generation benchmark; each side in its own
child process there): both load the same converted HF directory (bundled SmolLM2-135M-Instruct,
fp32), decode greedily from identical chat prompts of `prompt_len` tokens and ignore EOS so every
row makes exactly `new_tokens` tokens. Measured per side: the first call (jaxpost: compilation),
the median wall seconds of `repeats` later calls and their median CPU seconds (all threads of
the process: what the call costs, whatever else shares the cores). This module imports jax and
torch only inside the functions.
"""

import statistics
import time


def make_prompts(tokenizer, batch, length):
  """`batch` distinct chat prompts cut/extended to exactly `length` tokens."""
  base = tokenizer.apply_chat_template(
      [{"role": "user", "content": "Write a long story about a lighthouse keeper and the sea."}],
      tokenize=False, add_generation_prompt=True)
  ids = tokenizer.encode(base, add_special_tokens=False)
  filler = tokenizer.encode(" The quick brown fox jumps over the lazy dog." * 20)
  return [(filler[b:b + length - len(ids)] + ids)[-length:] for b in range(batch)]


def timed(fn, repeats):
  """(median wall seconds, median CPU seconds of this process) of `repeats` calls of `fn`."""
  wall, cpu = [], []
  for _ in range(repeats):
    t, c = time.perf_counter(), time.process_time()
    fn()
    wall.append(time.perf_counter() - t)
    cpu.append(time.process_time() - c)
  return statistics.median(wall), statistics.median(cpu)


def _measure(run, batch, new_tokens, repeats):
  """First call (s), median call (s), its CPU seconds, new tokens/s and the first call's tokens
  of `run(k)` (k new tokens per row -> the rows' token lists)."""
  start = time.perf_counter()
  tokens = run(new_tokens)
  first = time.perf_counter() - start
  seconds, cpu = timed(lambda: run(new_tokens), repeats)
  return dict(first=first, seconds=seconds, cpu_seconds=cpu, tps=batch * new_tokens / seconds,
              tokens=tokens)


def bench_jaxpost(lm, prompts, new_tokens, repeats):
  from jaxpost.generate import generate

  def run(k):
    out = generate(lm, prompts, max_new_tokens=k, ignore_eos=True, batch_size=len(prompts))
    assert all(n == k for n in out.lengths), out.lengths
    return out.tokens
  return _measure(run, len(prompts), new_tokens, repeats)


def bench_hf(model, prompts, new_tokens, repeats, threads):
  """HF greedy generate with `threads` torch threads."""
  import torch
  ids = torch.tensor(prompts, dtype=torch.long)
  mask = torch.ones_like(ids)

  def run(k):
    with torch.no_grad():
      out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=k,
                           min_new_tokens=k, do_sample=False, pad_token_id=2)
    assert out.shape[1] == ids.shape[1] + k
    return out[:, ids.shape[1]:].tolist()
  torch.set_num_threads(threads)
  return _measure(run, len(prompts), new_tokens, repeats)


def load_hf(model_dir):
  import torch
  import transformers
  return transformers.AutoModelForCausalLM.from_pretrained(
      str(model_dir), dtype=torch.float32).eval()

"""keep_freed_memory: an XLA:CPU program with a large working set stops page-faulting it on
every execution (measured with getrusage in fresh processes, with and without the settings)."""

import json
import platform
import subprocess
import sys

import pytest

PROGRAM = """
import json, resource, sys
if sys.argv[1] == "keep":
    from jaxpost.train.host_memory import keep_freed_memory
    assert keep_freed_memory()
import jax, jax.numpy as jnp
x = jnp.ones((1024, 1024)) * 1e-3
@jax.jit
def step(x):  # 8 live [1024, 1024] products: 32 MB of temporaries, as one step's buffers
    parts = [jnp.tanh(x @ (x * (i + 1.0))) for i in range(8)]
    return x + sum(p @ x for p in parts) * 1e-6
x = step(x).block_until_ready()
faults = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = step(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(faults))
"""


def later_step_faults(mode: str) -> int:
  out = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True,
                       check=True, env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
  return min(json.loads(out.stdout.strip().splitlines()[-1])[1:])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_kept_memory_is_reused_without_page_faults():
  default, kept = later_step_faults("default"), later_step_faults("keep")
  assert default > 2_000  # glibc's defaults: the temporaries' pages are faulted in each time
  assert kept < default / 20

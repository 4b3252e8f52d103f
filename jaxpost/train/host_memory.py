"""glibc malloc settings that stop XLA:CPU from page-faulting its working set on every step.

XLA:CPU takes each execution's buffers (the temp buffer of a PPO iteration on SmolLM2-135M is
3 GB) and the Eigen/YNNPACK scratch of its worker threads from malloc. With glibc's defaults
each worker thread gets its own arena, whose 64 MiB heaps are created and handed back to the
kernel as they fill and empty, and chunks above the mmap threshold are fresh mappings: every
step touches new pages again. Measured on the PPO iteration (policy + critic + reference +
reward model, 8 rows x 88 tokens, 2 CPU cores): ~0.9 M minor page faults and ~5 s of kernel
time per iteration (of ~32 s of CPU); with these settings 0 faults, 0.15 s, and the update
runs 13.7-14.6 s instead of 15.8-18.5 s (the jaxpost side of benchmarks/ppo.py, processes
with and without the settings interleaved on one machine).

`keep_freed_memory` sets, through `mallopt(3)`:

    M_ARENA_MAX = 1          one arena: no per-thread heaps to create and delete
    M_MMAP_MAX = 0           no mmapped chunks: big buffers come from the heap
    M_TRIM_THRESHOLD = max   freed memory stays mapped for the next step

so freed memory is kept and reused; the process's resident size stays at its peak instead of
shrinking between steps. Arenas are bound to threads at their first allocation, so it must run
before JAX creates its CPU client (`jaxpost.train` calls it first thing); later it still stops
the trimming but the threads keep their arenas. The settings hold for the whole process,
whatever JAX's backend; a no-op off glibc (macOS, musl).
"""

from __future__ import annotations

import ctypes
import functools
import platform

M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8  # glibc's <malloc.h> parameter numbers
NEVER = -1  # as size_t: the largest trim threshold, i.e. never give freed memory back


@functools.cache
def keep_freed_memory() -> bool:
  """Applies the module docstring's settings once; True if glibc took all three."""
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  try:
    libc = ctypes.CDLL("libc.so.6")
  except OSError:
    return False
  settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, NEVER))
  return all([libc.mallopt(param, value) == 1 for param, value in settings])

"""glibc malloc settings that let XLA:CPU reuse the buffers it frees after every step.

Each call of a compiled XLA:CPU executable allocates one temporary buffer for all its
intermediate values (68 MiB for the train step of `benchmarks/train_step.py`) and
frees it when the call returns. glibc serves a block that large with a fresh `mmap`:
above its mmap threshold (32 MiB at most by default), and always when the calling
thread's own arena cannot hold it (thread arenas are 64 MiB). So every step
page-faults the whole buffer in again: about 16,600 minor faults per step of that
benchmark, roughly a fifth of its step time on a 2-core VM. Raising the thresholds and
keeping one arena lets the next call reuse the freed block (no faults).

Call `reuse_freed_blocks` first thing in a process, before JAX starts its threads
(`jbtx.train` does, unless `reuse_host_memory=False`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import pathlib

# mallopt(3) parameters (glibc <malloc.h>).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

KEEP_BYTES = 1 << 30


def reuse_freed_blocks(keep_bytes: int = KEEP_BYTES) -> bool:
  """Makes glibc keep freed blocks of up to `keep_bytes` in the process for reuse.

  Sets the mmap threshold (blocks below it come from the heap, not from `mmap`) and
  the trim threshold (free memory at the heap top kept, not returned to the system)
  to `keep_bytes`, and the number of malloc arenas to one (so no block is too large
  for its arena). The cost: up to `keep_bytes` of freed memory stays mapped, and
  threads share one arena lock for blocks their per-thread caches cannot serve.

  Returns:
    True if glibc accepted all three settings; False where the C library is not
    glibc (macOS, musl), which keeps its defaults.
  """
  if not 0 < keep_bytes < 2**31:
    raise ValueError(f"keep_bytes must be in (0, 2**31) (mallopt takes an int), "
                     f"got {keep_bytes}")
  name = ctypes.util.find_library("c")
  if name is None:
    return False
  try:
    libc = ctypes.CDLL(name)
  except OSError:
    return False
  if not hasattr(libc, "gnu_get_libc_version"):  # Not glibc: its mallopt differs.
    return False
  settings = ((_M_MMAP_THRESHOLD, keep_bytes), (_M_TRIM_THRESHOLD, keep_bytes),
              (_M_ARENA_MAX, 1))
  accepted = [libc.mallopt(param, ctypes.c_int(value)) == 1 for param, value in settings]
  return all(accepted)


def peak_rss() -> int:
  """High-water resident memory of this process image, in bytes (Linux).

  Read from /proc (VmHWM) rather than getrusage: Linux carries ru_maxrss across
  execve, so a child would report its parent's peak.
  """
  for line in pathlib.Path("/proc/self/status").read_text().splitlines():
    if line.startswith("VmHWM:"):
      return int(line.split()[1]) * 1024
  raise RuntimeError("VmHWM not found in /proc/self/status (Linux only)")

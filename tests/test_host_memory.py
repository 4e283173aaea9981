"""`jbtx.runtime.host_memory`: freed large blocks are reused instead of page-faulted in again."""

import ctypes.util
import platform
import subprocess
import sys
import textwrap

import pytest

from jbtx.runtime import host_memory

# On a thread other than the main one, as XLA:CPU runs executables: mallocs, fills and
# frees an 80 MiB block six times and prints the minor page faults of the last five,
# one per page (4 KiB, or 2 MiB with transparent huge pages) if each block is mapped
# afresh, none if freed blocks are reused.
_SCRIPT = textwrap.dedent("""
    import ctypes, ctypes.util, resource, sys, threading
    from jbtx.runtime import host_memory
    if sys.argv[1] == "reuse":
      assert host_memory.reuse_freed_blocks()
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    size = 80 << 20

    def fill_and_free():
      block = libc.malloc(ctypes.c_size_t(size))
      ctypes.memset(block, 1, size)
      libc.free(ctypes.c_void_p(block))

    def run():
      fill_and_free()
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      for _ in range(5):
        fill_and_free()
      print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
""")


def _faults(mode: str) -> int:
  result = subprocess.run([sys.executable, "-c", _SCRIPT, mode], capture_output=True,
                          text=True, check=True)
  return int(result.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_freed_blocks_are_reused_without_page_faults():
  default, reused = _faults("default"), _faults("reuse")
  assert default >= 5  # glibc maps each block afresh: a fault at least per block.
  assert reused <= default // 100


def test_keep_bytes_must_fit_mallopt():
  with pytest.raises(ValueError, match="keep_bytes"):
    host_memory.reuse_freed_blocks(1 << 31)


def test_other_c_libraries_keep_their_defaults(monkeypatch):
  monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
  assert not host_memory.reuse_freed_blocks()

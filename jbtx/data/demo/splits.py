"""Deterministic train / validation / test assignment by a hash of a document's key."""

from __future__ import annotations

import hashlib

SPLITS = ("train", "validation", "test")


def split_of(key: str, held_out: float = 0.05) -> str:
  """"validation" or "test" for a `held_out` share of keys each, else "train"."""
  u = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") / 2**64
  return "validation" if u < held_out else "test" if u < 2 * held_out else "train"

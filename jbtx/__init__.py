"""jbtx: Branch-Train-MiX and its relatives in JAX/Flax."""

from jbtx.interop.checkpoint import load

__all__ = ["load"]
__version__ = "0.1.0"

"""Test setup, before JAX starts: 8 simulated CPU devices, exact float32 matmuls, and
cheap XLA:CPU compilation (tiny test models spend most of their time compiling;
backend optimisation level 0 cuts that several-fold and keeps float32 results within
the tests' tolerances). Subprocesses inherit these flags through the environment."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0"
                           " --xla_llvm_disable_expensive_passes=true").strip()

import jax

jax.config.update("jax_default_matmul_precision", "highest")

"""Test setup: 8 simulated CPU devices and exact float32 matmuls, set before JAX starts."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()

import jax

jax.config.update("jax_default_matmul_precision", "highest")

"""The training engine: train state and the sharded jit-compiled steps, the optimizer,
the resumable loop, checkpoints, validation, metrics, reporting and profiling."""

"""Pure Flax modules: the Llama decoder, the MoE layer (routing, dispatch, expert
parallelism) and the model presets."""

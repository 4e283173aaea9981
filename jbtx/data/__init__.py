"""Training data: sources (local files, TFDS, the built-in demo domains), tokenizers,
packing into rows, domain mixtures, and the deterministic, resumable loader."""

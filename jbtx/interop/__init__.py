"""Checkpoint formats: jbtx's own checkpoint directories (`checkpoint`, `jbtx.load`),
tensor files (safetensors, PyTorch), Meta's Llama-2 release, Hugging Face folders and
the HF <-> jbtx tensor maps, and the conversion both ways."""

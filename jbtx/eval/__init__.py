"""Evaluation: scoring a model (perplexity, exact-match and multiple-choice tasks), the
results table, BTM's ensembles, routing analysis and plots, task files, and the
lm-evaluation-harness adapter. `python -m jbtx.eval` scores a workdir."""

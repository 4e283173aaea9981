"""The methods as pure functions over parameter trees (arrays in, arrays out; no
experiment config, no files, no logging): BTX's mix, sparse upcycling, LLaMA-MoE's FFN
splitting, router initialisation, BTM's ensembles and averages, c-BTM's clustering."""

"""An experiment as stages in a work directory: the stage registry (`registry`, one
module per kind in `stages/`), derived experiments and budgets, the workdir's identity
records, and the runner that `python -m jbtx.train` calls."""

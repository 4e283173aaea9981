r"""The lm-evaluation-harness model "jbtx" for the checkpoints of a workdir.

    python -m jbtx.eval.harness --model_args workdir=runs/btx,stage=finetune \
        --tasks arc_easy,gsm8k [any other lm_eval flag]

or from Python, after importing this module (which registers the model as "jbtx"):

    import lm_eval, jbtx.eval.harness
    lm_eval.simple_evaluate(model="jbtx", model_args="workdir=runs/btx,stage=finetune",
                            tasks=["arc_easy"])

`lm_eval` 0.4 finds models only in its own registry, so the bare `lm_eval` command
cannot see this one; `python -m jbtx.eval.harness` is that command with the model
registered (and `--model jbtx` implied). Model arguments: `workdir`, `stage` (any
checkpointed model of the workdir, as `python -m jbtx.eval --stage` names them;
default finetune, the BTX model), `batch_size` (default 16), `max_gen_toks` (default
256). The model is sharded over the workdir experiment's mesh; requests run through
`jbtx.eval.lm_eval_model.HarnessModel`. Needs the `eval` extra
(`pip install -e ".[eval]"`).
"""

from __future__ import annotations

import pathlib
import sys
from collections.abc import Sequence
from typing import Any

from lm_eval.api.registry import register_model

from jbtx.config import ConfigError, ExperimentConfig, from_mapping
from jbtx.data import loader
from jbtx.eval.lm_eval_model import HarnessModel
from jbtx.interop import checkpoint
from jbtx.models.llama import Llama
from jbtx.pipeline.stages.evaluation import checkpoint_rows, row_of
from jbtx.pipeline.workdir import Paths, workdir_config
from jbtx.runtime import sharding


@register_model("jbtx")
class WorkdirModel(HarnessModel):
  """A checkpoint of a jbtx workdir as an `lm_eval` model."""

  def __init__(self, workdir: str, stage: str = "finetune", batch_size: int | str = 16,
               max_gen_toks: int = 256, **unused: Any):
    del unused  # lm_eval passes device=… and the like, which the mesh decides here
    workdir_path = pathlib.Path(workdir).absolute()
    config = from_mapping(ExperimentConfig, workdir_config(workdir_path))
    row = row_of(config, stage)
    rows = checkpoint_rows(config)
    if row not in rows:
      raise ConfigError("stage", f"{stage!r} is not one checkpoint (BTM's ensembles are "
                        "evaluated by python -m jbtx.eval); choose one of "
                        f"{', '.join(rows)}")
    kind, row_stage = rows[row]
    directory = kind.output(Paths(config, workdir_path), row_stage)
    model_config = checkpoint.load_config(directory)
    super().__init__(Llama(model_config), checkpoint.load_params_for(directory, model_config),
                     loader.make_tokenizer(config.data), sharding.make_mesh(config.mesh),
                     int(batch_size if batch_size != "auto" else 16), max_gen_toks)


def main(argv: Sequence[str]) -> None:
  """lm_eval's command line with this model registered and `--model jbtx` implied."""
  from lm_eval.__main__ import cli_evaluate

  argv = list(argv)
  if not any(a == "--model" or a.startswith("--model=") for a in argv):
    argv = ["--model", "jbtx", *argv]
  sys.argv = ["lm_eval", *argv]
  cli_evaluate()


if __name__ == "__main__":
  main(sys.argv[1:])

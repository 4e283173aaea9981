r"""`python -m jbtx.convert`: checkpoints between Llama-2 / Mixtral / OLMoE and jbtx.

    python -m jbtx.convert import --source=DIR --output=DIR [--dtype=bfloat16]
    python -m jbtx.convert export --checkpoint=DIR --output=DIR [--dtype=bfloat16]

`import` reads Meta's Llama-2 release or a Hugging Face Llama, Qwen2, Mixtral or OLMoE
folder, and copies its tokenizer files along; `export` writes an HF folder that
transformers loads (`jbtx.interop.conversion`).
Outputs appear atomically: a failed conversion leaves nothing at `--output`.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

from jbtx.interop import checkpoint
from jbtx.interop.conversion import DTYPES, export_checkpoint, import_checkpoint
from jbtx.interop.hf_tensor_map import ConversionError

_SOURCE = flags.DEFINE_string("source", None,
                              "import: Meta Llama-2 or HF Llama / Qwen2 / Mixtral / OLMoE "
                              "folder.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "export: jbtx checkpoint folder.")
_OUTPUT = flags.DEFINE_string("output", None, "Folder to create (must not exist).")
_DTYPE = flags.DEFINE_enum("dtype", None, DTYPES,
                           "Dtype of the written weights. Import default: float32; "
                           "export default: the checkpoint's parameter dtype.")
_SCAN_LAYERS = flags.DEFINE_boolean("scan_layers", True,
                                    "import: store layers stacked for nn.scan.")


def main(argv: list[str]) -> None:
  if not flags.FLAGS["verbosity"].present:  # Orbax logs every save at INFO.
    logging.set_verbosity(logging.WARNING)
  commands = ("import", "export")
  if len(argv) != 2 or argv[1] not in commands:
    raise app.UsageError(f"usage: python -m jbtx.convert {{{'|'.join(commands)}}} --flags")
  if not _OUTPUT.value:
    raise app.UsageError("--output is required")
  try:
    if argv[1] == "import":
      if not _SOURCE.value:
        raise app.UsageError("import needs --source")
      cfg = import_checkpoint(_SOURCE.value, _OUTPUT.value, _DTYPE.value or "float32",
                              _SCAN_LAYERS.value)
      print(f"wrote jbtx checkpoint {_OUTPUT.value}: {cfg.n_layers} layers, "
            f"d_model {cfg.d_model}, {cfg.num_params() / 1e6:.1f}M parameters, {cfg.dtype}")
    else:
      if not _CHECKPOINT.value:
        raise app.UsageError("export needs --checkpoint")
      path = export_checkpoint(_CHECKPOINT.value, _OUTPUT.value, _DTYPE.value)
      print(f"wrote Hugging Face checkpoint {path}")
  except (ConversionError, checkpoint.CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)

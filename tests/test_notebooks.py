"""The notebooks run top to bottom, in a Jupyter kernel, on a freshly trained model."""

import pathlib

import nbclient
import nbformat

from tests.training_runs import moe_run  # noqa: F401 (fixture)

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "notebooks"


def _execute(name: str) -> list[dict]:
  """Runs `notebooks/<name>` from that directory; returns the outputs of its code cells."""
  notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
  nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                          resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
  return [output for cell in notebook.cells if cell.cell_type == "code"
          for output in cell.outputs]


def test_routing_notebook_explores_a_trained_moe_model(moe_run, monkeypatch):  # noqa: F811
  monkeypatch.setenv("JBTX_RUN", str(moe_run))
  outputs = _execute("routing.ipynb")
  assert any("image/png" in output.get("data", {}) for output in outputs)  # the load heatmap
  text = "".join(output.get("text", "") for output in outputs)
  assert "2 layers, 16 experts, top-4, routing 'softmax_topk'" in text
  for domain in ("code", "general", "knowledge", "math"):
    assert f"\n{domain}:" in text  # its token-by-token table
  for variant in ("switch (top-1)", "soft", "softmax_topk, renorm"):
    assert variant in text
  assert "RuntimeWarning" not in text  # e.g. log(0) in a metric

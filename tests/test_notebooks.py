"""The notebooks run top to bottom, in a Jupyter kernel, on freshly trained models."""

import pathlib

import nbclient
import nbformat

from tests.training_runs import btx_run, moe_run, run_env  # noqa: F401 (fixtures)

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "notebooks"


def _execute(name: str) -> list[dict]:
  """Runs `notebooks/<name>` from that directory; returns the outputs of its code cells."""
  notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
  nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                          resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
  return [output for cell in notebook.cells if cell.cell_type == "code"
          for output in cell.outputs]


def _text(outputs: list[dict]) -> str:
  return "".join(output.get("text", "") for output in outputs)


def _images(outputs: list[dict]) -> int:
  return sum("image/png" in output.get("data", {}) for output in outputs)


def test_routing_notebook_explores_a_btx_run(btx_run, monkeypatch):  # noqa: F811
  monkeypatch.setenv("JBTX_RUN", str(btx_run))
  monkeypatch.setenv("JBTX_COMPARE_RUN", str(btx_run))  # the comparison's code path
  outputs = _execute("routing.ipynb")
  text = _text(outputs)
  assert "2 layers, 3 experts, top-2" in text and "experts code, math, seed" in text
  for domain in ("code", "math"):  # the own-expert shares, one row per expert's domain
    assert any(line.startswith(domain) and line.count(".") == 2
               for line in text.splitlines()), domain
  assert "experts: 0 = code, 1 = math, 2 = seed" in text  # the typed text's table
  # load by layer, domain x expert, the comparison, the text in two layers
  assert _images(outputs) == 5
  assert "RuntimeWarning" not in text


def test_routing_notebook_explores_a_moe_trained_from_scratch(moe_run, monkeypatch):  # noqa: F811
  monkeypatch.setenv("JBTX_RUN", str(moe_run))
  outputs = _execute("routing.ipynb")
  assert _images(outputs) == 4
  text = _text(outputs)
  assert "2 layers, 16 experts, top-4, routing 'softmax_topk'" in text
  assert "not a BTX model of domain experts" in text
  for domain in ("code", "general", "knowledge", "math"):
    assert f"\n{domain}:" in text  # its token-by-token table
  for variant in ("switch (top-1)", "soft", "softmax_topk, renorm"):
    assert variant in text
  assert "RuntimeWarning" not in text  # e.g. log(0) in a metric

"""Validation curves against training FLOPs (`jbtx.pipeline.curves`), on records written
here: placement after the row's earlier stages, and the plateau measure."""

import json

import pytest

from jbtx.interop import checkpoint
from jbtx.pipeline import curves


def _stage(directory, flops, steps, losses):
  """A checkpoint record whose curve has `losses` (domain -> loss) at `steps`."""
  (directory / checkpoint.PARAMS_DIR).mkdir(parents=True)
  curve = [{"step": s, "loss": sum(d.values()) / len(d), "domains": d}
           for s, d in zip(steps, losses, strict=True)]
  record = {"format": checkpoint.FORMAT, "version": checkpoint.VERSION, "kind": "llama",
            "model": {}, "metrics": {"steps": steps[-1], "compute": {"flops": flops},
                                     "curve": curve}}
  (directory / checkpoint.CONFIG_FILE).write_text(json.dumps(record))
  return directory


def test_a_rows_curve_starts_after_its_earlier_stages_and_ends_at_its_flops(tmp_path):
  _stage(tmp_path / "a", 30.0, [0, 10], [{"x": 5.0}, {"x": 4.0}])
  _stage(tmp_path / "b", 10.0, [0, 10], [{"x": 4.0}, {"x": 3.0}])
  _stage(tmp_path / "ft", 20.0, [0, 5, 10],
         [{"x": 3.0, "y": 5.0}, {"x": 2.0, "y": 4.0}, {"x": 1.0, "y": 2.0}])
  curve = curves.row_curve(["a", "b", "ft"], lambda s: tmp_path / s)
  assert [p["flops"] for p in curve] == [40.0, 50.0, 60.0]
  assert [p["loss"] for p in curve] == [4.0, 3.0, 1.5]  # the mean over domains
  assert curve[-1]["domains"] == {"x": 1.0, "y": 2.0}
  alone = curves.row_curve(["ft"], lambda s: tmp_path / s)
  assert [p["flops"] for p in alone] == [0.0, 10.0, 20.0]


def test_a_converted_checkpoint_has_no_curve_and_an_ensemble_one_point(tmp_path):
  (tmp_path / "seed" / checkpoint.PARAMS_DIR).mkdir(parents=True)
  record = {"format": checkpoint.FORMAT, "version": checkpoint.VERSION, "kind": "llama",
            "model": {}}
  (tmp_path / "seed" / checkpoint.CONFIG_FILE).write_text(json.dumps(record))
  assert curves.row_curve(["seed"], lambda s: tmp_path / s) == []
  row = {"compute": {"flops": 7.0}, "domains": {"x": {"loss": 2.0}, "y": {"loss": 4.0}}}
  assert curves.ensemble_point(row) == [{"flops": 7.0, "loss": 3.0,
                                         "domains": {"x": 2.0, "y": 4.0}}]


def test_improvement_over_the_last_fifth_of_the_steps():
  curve = [{"step": s, "loss": loss} for s, loss in [(0, 5.0), (50, 2.2), (80, 2.0),
                                                       (90, 1.99), (100, 1.98)]]
  assert curves.improvement(curve, 0.2) == pytest.approx(0.01)
  assert curves.improvement(curve, 0.5) == pytest.approx(0.1)
  with pytest.raises(ValueError, match="no validation pass at step 80"):
    curves.improvement([curve[0], curve[-1]], 0.2)

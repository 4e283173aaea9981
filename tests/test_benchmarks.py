"""The benchmarks run end to end on CPU at tiny sizes (the MFU one runs at 1B scale on a GPU)."""

import pathlib
import re
import subprocess
import sys

from tests.training_runs import run_env, uninterrupted_run  # noqa: F401 (fixtures)

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--batch=8", "--seq=32", "--vocab=97", "--d-model=32", "--layers=2", "--heads=4",
        "--d-ff=24", "--experts=4", "--steps=2", "--warmup=1", "--dtype=float32"]


def _mfu(*flags):
  return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "mfu.py"), *TINY, *flags],
                        capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_mfu_benchmark_reports_both_models_consistently():
  run = _mfu("--peak-tflops=0.05")
  assert run.returncode == 0, run.stderr
  rows = re.findall(r"^(MoE|dense equivalent) .*?([\d,]+) tokens/s, +([\d.e+-]+) TFLOP/s/device, "
                    r"MFU +([\d.]+)%", run.stdout, re.M)
  assert [r[0] for r in rows] == ["MoE", "dense equivalent"], run.stdout
  n_devices = int(run.stdout.split(" x ")[0])  # the tests' 8 simulated CPU devices
  assert n_devices == 8
  for _, _, tflops, mfu in rows:  # MFU = achieved FLOP/s per device / peak
    assert float(mfu) > 0
    assert abs(float(tflops) / 0.05 * 100 - float(mfu)) < 0.051 + 1e-3 * float(mfu)


def test_mfu_benchmark_needs_a_peak_for_unknown_devices():
  run = _mfu()
  assert run.returncode == 2 and "--peak-tflops" in run.stderr


def test_mfu_benchmark_names_a_batch_the_devices_do_not_divide():
  run = _mfu("--peak-tflops=0.05", "--batch=3")  # after TINY's --batch=8: the last wins
  assert run.returncode == 2 and "--batch=3 must be divisible by the 8 devices" in run.stderr


def test_moe_layer_benchmark_times_every_path_and_both_references():
  tiny = ["--config=olmoe", "--tokens=256", "--d-model=32", "--d-ff=16", "--experts=8",
          "--top-k=2", "--repeats=1", "--capacity-group-size=64",
          "--paths=blocked,capacity,dense,loop,expert_choice"]
  run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "moe_layer.py"), *tiny],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert run.returncode == 0, run.stderr
  rows = dict(re.findall(r"^(\S+(?: \*)?) +[\d.]+ +[\d.]+ +([\d.]+) ", run.stdout, re.M))
  assert set(rows) == {"blocked *", "capacity", "dense", "loop", "expert_choice", "(balanced)",
                       "(scanned)"}, run.stdout
  assert all(float(ratio) > 0 for ratio in rows.values())


def test_mix_memory_benchmark_mixes_tiny_checkpoints_and_reports_the_ratio():
  tiny = ["--d_model=32", "--n_layers=2", "--d_ff=24", "--vocab=97", "--dtype=float32",
          "--experts=3"]
  run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "mix_memory.py"), *tiny],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert run.returncode == 0, run.stderr
  before = re.search(r"^process before mixing +([\d.]+) GiB", run.stdout, re.M)
  peak = re.search(r"^peak resident memory +([\d.]+) GiB", run.stdout, re.M)
  ratio = re.search(r"^mix peak RSS / one expert checkpoint = ([\d.]+) \(target <= 1\.5\)$",
                    run.stdout, re.M)
  assert before and peak and ratio, run.stdout
  assert 0 < float(before[1]) <= float(peak[1]) and float(ratio[1]) > 0
  assert "(3 experts)" in run.stdout


def test_trace_summary_joins_the_profiled_steps_ops_to_the_model_parts(uninterrupted_run):  # noqa: F811
  sys.path.insert(0, str(ROOT / "benchmarks"))
  import trace_summary

  summary = trace_summary.summarize(uninterrupted_run / "seed")
  assert summary["module"] == "jit_train_step" and summary["devices"] == 4
  assert summary["matched"] > 0.8  # most op time carries its JAX name stack
  parts = summary["parts"]
  total = sum(sum(times.values()) for times in parts.values())
  assert abs(total - summary["total_us"]) < 1e-6 * total
  for part in ("layers/attn", "layers/mlp/gate", "layers/mlp/down"):
    assert parts[part]["forward"] > 0 and parts[part]["backward"] > 0, part
  assert trace_summary.part_of("jit(train_step)/transpose(jvp(Llama))/Llama.run_blocks/while/"
                               "body/closed_call/layers/moe/dot_general", 3) == (
                                   "backward", "layers/moe")


def test_ragged_decoding_benchmark_decodes_the_same_tokens_both_ways():
  """The batched prefill and the token-by-token baseline on the demo's math prompts
  (prompts of different lengths) generate the same greedy tokens."""
  flags = ["--preset=tiny", "--batch=3", "--new_tokens=4", "--repeats=1"]
  run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ragged_decoding.py"), *flags],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert run.returncode == 0, run.stderr
  ratio = re.search(r"^ratio \(token by token / batched prefill\): ([\d.]+); same tokens: "
                    r"(True|False)$", run.stdout, re.M)
  assert ratio and float(ratio[1]) > 0, run.stdout
  assert ratio[2] == "True"

"""Ablation runner: variant configs, the Markdown table, the plot and resuming, with a stand-in trainer."""

import json
import os

import pytest

from cvjax.train import ablation, trainer
from cvjax.train.config import base_config

VARIANTS = (("shifted", {"model.shifted_windows": True}), ("no_shift", {"model.shifted_windows": False}))


def _config(variants=VARIANTS):
  c = base_config()
  c.name, c.preset = "swin", "test"
  c.total_steps = 4
  c.model.shifted_windows = True
  c.ablation = variants
  c.lock()
  return c


def _fake_train(calls):
  """Records the configs it is given and writes what train_and_evaluate writes that the ablation reads."""

  def train_and_evaluate(config, workdir):
    calls.append(config)
    top1 = 0.9 if config.model.shifted_windows else 0.7
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
      for step in (2, 4):
        f.write(json.dumps({"step": step, "train/loss": 1.0 / step}) + "\n")
        f.write(json.dumps({"step": step, "eval/top1": top1 * step / 4, "eval/loss": 0.5,
                            "eval/num_examples": 10}) + "\n")
    summary = {"start_step": 0, "train/loss": 0.25, "eval/top1": top1, "eval/loss": 0.5,
               "eval/num_examples": 10, "step": 4, "wall_time_s": 12.34, "workdir": workdir}
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f)
    return summary

  return train_and_evaluate


def test_variant_config_applies_overrides_to_a_copy_and_rejects_unknown_keys():
  config = _config()
  variant = ablation.variant_config(config, "no_shift", {"model.shifted_windows": False, "total_steps": 9})
  assert not variant.model.shifted_windows and variant.total_steps == 9 and variant.ablation == ()
  assert config.model.shifted_windows and config.total_steps == 4 and len(config.ablation) == 2
  for key in ("model.shifted_window", "modle.shifted_windows", "total_steps.x"):
    with pytest.raises(KeyError, match=f"variant 'bad' overrides '{key}'"):
      ablation.variant_config(config, "bad", {key: 1})


def test_variant_names_must_be_unique_directory_names():
  assert ablation.ablation_variants(_config()) == [(n, dict(o)) for n, o in VARIANTS]
  for variants in ((("a", {}), ("a", {})), (("../up", {}),), (("a", "model.x=1"),)):
    with pytest.raises(ValueError, match="ablation"):
      ablation.ablation_variants(_config(variants))


def test_table_has_a_row_per_variant_with_final_metrics():
  rows = [("shifted", {"model.shifted_windows": True}, {"eval/top1": 0.91234, "eval/loss": 0.3,
                                                       "eval/num_examples": 10, "train/loss": 0.2, "step": 4,
                                                       "wall_time_s": 61.27}),
          ("no_shift", {}, {"eval/top1": 0.8, "train/loss": 0.4, "step": 4, "wall_time_s": 59.0})]
  lines = ablation.ablation_table(rows).splitlines()
  assert lines[0] == "| variant | overrides | eval/top1 | eval/loss | train/loss | steps | wall time (s) |"
  assert lines[2] == "| shifted | `model.shifted_windows=True` | 0.9123 | 0.3 | 0.2 | 4 | 61.3 |"
  assert lines[3] == "| no_shift | (none) | 0.8 |  | 0.4 | 4 | 59.0 |"


def test_chosen_metrics_are_the_table_columns_and_plotted_as_final_bars(tmp_path):
  rows = [("a", {}, {"eval/AP": 0.5, "eval/mask_AP": 0.4, "eval/mask_AP75": 0.3, "train/loss": 1.0, "step": 2,
                     "wall_time_s": 1.0}),
          ("b", {}, {"eval/AP": 0.6, "eval/mask_AP": 0.45, "train/loss": 0.9, "step": 2, "wall_time_s": 1.0})]
  lines = ablation.ablation_table(rows, ["eval/mask_AP75", "eval/mask_AP"]).splitlines()
  assert lines[0] == "| variant | overrides | eval/mask_AP75 | eval/mask_AP | train/loss | steps | wall time (s) |"
  assert lines[3] == "| b | (none) |  | 0.45 | 0.9 | 2 | 1.0 |"
  curves = {"a": [{"step": 1, "train/loss": 2.0}, {"step": 2, "eval/mask_AP": 0.4}],
            "b": [{"step": 1, "train/loss": 1.5}, {"step": 2, "eval/mask_AP": 0.45}]}
  figure_path = tmp_path / "plot.png"
  ablation.plot_ablation(curves, str(figure_path), ["eval/mask_AP", "eval/mask_AP75"])
  plain_path = tmp_path / "plain.png"
  ablation.plot_ablation(curves, str(plain_path))
  # Both are drawn; the bar panel is a different picture from the curve panel.
  assert figure_path.stat().st_size > 0 and figure_path.read_bytes() != plain_path.read_bytes()


def test_run_ablation_trains_each_variant_writes_table_and_plot_and_resumes(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(trainer, "train_and_evaluate", _fake_train(calls))
  result = ablation.run_ablation(_config(), str(tmp_path))
  assert [c.model.shifted_windows for c in calls] == [True, False]
  assert set(result["variants"]) == {"shifted", "no_shift"}
  for name, shifted in (("shifted", True), ("no_shift", False)):
    with open(tmp_path / name / "config.json") as f:
      assert json.load(f)["model"]["shifted_windows"] is shifted
  table = (tmp_path / "ablation.md").read_text()
  assert "| shifted | `model.shifted_windows=True` | 0.9 | 0.5 | 0.25 | 4 | 12.3 |" in table
  assert "| no_shift | `model.shifted_windows=False` | 0.7 |" in table
  with open(tmp_path / "ablation.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  # Finished variants are not trained again.
  again = ablation.run_ablation(_config(), str(tmp_path))
  assert len(calls) == 2 and again["variants"]["no_shift"]["eval/top1"] == 0.7


def test_ablation_metrics_must_be_eval_scalars(tmp_path):
  config = _config()
  config.ablation_metrics = ("mask_AP",)
  with pytest.raises(ValueError, match="ablation_metrics must name eval scalars"):
    ablation.run_ablation(config, str(tmp_path))


def test_chosen_metrics_no_variant_reports_are_named_in_the_table(tmp_path, monkeypatch):
  monkeypatch.setattr(trainer, "train_and_evaluate", _fake_train([]))
  config = _config()
  config.ablation_metrics = ("eval/top1", "eval/mask_AP")
  ablation.run_ablation(config, str(tmp_path))
  table = (tmp_path / "ablation.md").read_text()
  assert "no variant reported eval/mask_AP" in table
  assert "| variant | overrides | eval/top1 | eval/mask_AP | train/loss |" in table
  assert "| shifted | `model.shifted_windows=True` | 0.9 |  |" in table

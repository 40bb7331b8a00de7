"""Ablations: one config, several variants that each override a few keys, trained one after the other.

A config whose ``ablation`` field is non-empty, e.g. (``configs/ablations/swin_shift.py``)::

  c.ablation = (("shifted", {"model.shifted_windows": True}),
                ("no_shift", {"model.shifted_windows": False}))

makes ``launch.py`` train (``--mode=eval``: evaluate) every variant in ``workdir/<variant>/`` with its overrides
applied to a copy of the config. Keys are dotted paths as on the command line (``--config.model.window_size``)
and, as there, a key the config does not have is an error. After training, process 0 writes

  ``workdir/ablation.md``   one row per variant: its overrides, the final eval scalars, the final train loss,
                            the steps run and the wall time;
  ``workdir/ablation.png``  train loss and the first eval scalar the task reports (top-1 for classification)
                            over steps, one curve per variant.

``config.ablation_metrics`` (e.g. ``("eval/mask_AP", "eval/mask_AP50", "eval/mask_AP75")``) names the eval
scalars the comparison is about: the table then has those columns only (in that order) and the plot's second
panel shows their final values as grouped bars, one group per metric, one bar per variant.

A variant whose directory already holds a finished ``summary.json`` is not trained again, so an interrupted
ablation resumes where it stopped (a half-trained variant resumes from its checkpoint, as any run does).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import jax
import ml_collections

Variant = Tuple[str, Dict[str, Any]]
# Variant names become directory names.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Eval scalars that describe the eval set rather than the model.
_NOT_METRICS = ("eval/num_examples",)


def ablation_variants(config: ml_collections.ConfigDict) -> List[Variant]:
  """``config.ablation`` checked: ``[(name, {dotted.key: value})]`` with unique directory-safe names."""
  variants, seen = [], set()
  for entry in config.get("ablation", ()) or ():
    if len(entry) != 2 or not isinstance(entry[0], str) or not isinstance(entry[1], Mapping):
      raise ValueError(f"config.ablation entries must be (name, {{'dotted.key': value}}) pairs, got {entry!r}")
    name, overrides = entry
    if not _NAME.match(name) or name in seen:
      raise ValueError(f"ablation variant name {name!r} must be unique and a plain directory name "
                       "(letters, digits, '_', '.', '-')")
    seen.add(name)
    variants.append((name, dict(overrides)))
  return variants


def variant_config(config: ml_collections.ConfigDict, name: str,
                   overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A copy of ``config`` with ``overrides`` applied and no ``ablation`` (so it trains as a plain run)."""
  variant = config.copy_and_resolve_references()
  for key, value in overrides.items():
    node = variant
    *parents, leaf = key.split(".")
    for parent in parents:
      node = node.get(parent) if isinstance(node, ml_collections.ConfigDict) else None
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
      raise KeyError(f"ablation variant {name!r} overrides {key!r}, which the config does not have")
    node[leaf] = value
  variant.ablation = ()
  return variant


def _jsonl(path: str) -> List[Dict[str, Any]]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _finished_summary(workdir: str, total_steps: int) -> Optional[Dict[str, Any]]:
  path = os.path.join(workdir, "summary.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    summary = json.load(f)
  return summary if summary.get("step") == total_steps and "wall_time_s" in summary else None


def _format(value: Any) -> str:
  if isinstance(value, float):
    return f"{value:.4g}"
  return str(value)


def ablation_table(rows: Sequence[Tuple[str, Mapping[str, Any], Mapping[str, Any]]],
                   metrics: Sequence[str] = ()) -> str:
  """Markdown table of ``(variant, overrides, summary)`` rows (summaries as ``train_and_evaluate`` returns).

  Columns: variant, overrides, the ``metrics`` given (default: every ``eval/`` scalar any variant reports, in
  the task's order), final ``train/loss``, steps and wall time (seconds).
  """
  metrics = list(metrics)
  if not metrics:
    for _, _, summary in rows:
      metrics += [k for k in summary if k.startswith("eval/") and k not in _NOT_METRICS and k not in metrics]
  header = ["variant", "overrides", *metrics, "train/loss", "steps", "wall time (s)"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for name, overrides, summary in rows:
    changed = ", ".join(f"`{k}={v!r}`" for k, v in overrides.items()) or "(none)"
    cells = [name, changed, *(_format(summary.get(k, "")) for k in metrics), _format(summary.get("train/loss", "")),
             _format(summary.get("step", "")), f"{summary.get('wall_time_s', float('nan')):.1f}"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def plot_ablation(curves: Mapping[str, List[Dict[str, Any]]], path: str, metrics: Sequence[str] = ()) -> None:
  """Train loss over steps per variant (``curves``: variant -> metrics.jsonl records) and, in a second panel,
  the first eval scalar over steps -- or, with ``metrics``, the final value of each as grouped bars -- into a
  PNG at ``path``."""
  from matplotlib.figure import Figure  # deferred: only process 0 plots; no pyplot, so no display needed

  eval_key = next((k for records in curves.values() for r in records for k in r
                   if k.startswith("eval/") and k not in _NOT_METRICS), None)
  figure = Figure(figsize=(10, 4), constrained_layout=True)
  loss_axes, eval_axes = figure.subplots(1, 2)
  width = 0.8 / max(len(curves), 1)
  for i, (name, records) in enumerate(curves.items()):
    train = [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]
    if train:
      loss_axes.plot(*zip(*train), label=name)
    if metrics:
      final = [next((r[k] for r in reversed(records) if k in r), float("nan")) for k in metrics]
      eval_axes.bar([j + (i - (len(curves) - 1) / 2) * width for j in range(len(metrics))], final, width,
                    label=name)
      continue
    evals = [(r["step"], r[eval_key]) for r in records if eval_key in r]
    if evals:
      eval_axes.plot(*zip(*evals), marker="o", label=name)
  loss_axes.set(xlabel="step", ylabel="train/loss", title="training loss")
  if metrics:
    eval_axes.set_xticks(range(len(metrics)), [k.removeprefix("eval/") for k in metrics])
    eval_axes.tick_params(axis="x", labelrotation=30)
    eval_axes.set_ylim(top=eval_axes.get_ylim()[1] * 1.25)  # head room for the legend above the bars
    eval_axes.set(ylabel="final value", title="validation, end of training")
  else:
    eval_axes.set(xlabel="step", ylabel=eval_key or "eval", title=f"validation {eval_key or '(none)'}")
  for axes in (loss_axes, eval_axes):
    axes.grid(alpha=0.3)
    axes.legend()
  figure.savefig(path, dpi=100)


def run_ablation(config: ml_collections.ConfigDict, workdir: str, mode: str = "train") -> Dict[str, Any]:
  """Trains (``mode='train'``) or evaluates (``'eval'``) every variant of ``config.ablation``.

  Returns:
    ``{'variants': {name: summary}}``, plus the ``table`` and ``plot`` paths after training.
  """
  from cvjax.train import trainer  # deferred like launch.py's: XLA flags set by the caller take effect

  if mode not in ("train", "eval"):
    raise ValueError(f"an ablation config runs in mode 'train' or 'eval', got {mode!r}")
  variants = ablation_variants(config)
  if not variants:
    raise ValueError("config.ablation is empty: nothing to ablate")
  # Every override is checked before anything trains, so a typo in the last variant fails at once.
  configs = {name: variant_config(config, name, overrides) for name, overrides in variants}
  metrics = [str(k) for k in config.get("ablation_metrics", ()) or ()]
  if any(not k.startswith("eval/") for k in metrics):
    raise ValueError(f"config.ablation_metrics must name eval scalars ('eval/...', as in metrics.jsonl), got "
                     f"{metrics}")
  results = {}
  for name, _ in variants:
    variant_dir = os.path.join(workdir, name)
    if jax.process_index() == 0:
      os.makedirs(variant_dir, exist_ok=True)
      with open(os.path.join(variant_dir, "config.json"), "w") as f:
        f.write(configs[name].to_json_best_effort(indent=2, sort_keys=True))
    if mode == "eval":
      results[name] = trainer.evaluate_latest(configs[name], variant_dir)
    else:
      finished = _finished_summary(variant_dir, configs[name].total_steps)
      results[name] = finished or trainer.train_and_evaluate(configs[name], variant_dir)
  output: Dict[str, Any] = {"variants": results}
  if mode == "train" and jax.process_index() == 0:
    output["table"] = os.path.join(workdir, "ablation.md")
    output["plot"] = os.path.join(workdir, "ablation.png")
    title = f"# Ablation {config.name}:{config.preset}\n\n"
    missing = [k for k in metrics if not any(k in summary for summary in results.values())]
    if missing:  # after training: the runs are kept; the table says so rather than failing
      title += f"(no variant reported {', '.join(missing)}: empty columns)\n\n"
    with open(output["table"], "w") as f:
      f.write(title + ablation_table([(name, overrides, results[name]) for name, overrides in variants], metrics))
    plot_ablation({name: _jsonl(os.path.join(workdir, name, "metrics.jsonl")) for name, _ in variants},
                  output["plot"], metrics)
  return output

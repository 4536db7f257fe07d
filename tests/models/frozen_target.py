"""The slow end-to-end check that target-side draft heads (Medusa, EAGLE) share: the trainer fits
the heads on a frozen target, and their sampler decodes it from Python and from the CLI."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from paxlike import generate
from paxlike.errors import UserError
from paxlike.metrics import read_metrics
from tests.models.test_acceptance_head import _train, assert_frozen
from tests.paxlike import cli


def check_heads_fit_and_decode(tmp_path, kind: str, heads: str, options: dict[str, Any],
                               cli_options: list[str], model_name: str) -> None:
  """target (3 steps) -> heads (`heads`, e.g. "model.draft_heads.medusa=2"; target frozen, 30
  steps): the loss falls and the target's weights are untouched; greedy decoding with sampler
  `kind` (its `options` in Python, `cli_options` as --set values) equals greedy AR, and the
  plain target is refused with an error naming `model_name`."""
  target, target_params = _train(tmp_path / "target", "train.steps=3", "checkpoint.every_steps=3")
  trained, params = _train(
      tmp_path / kind, heads, "train.steps=30", "checkpoint.every_steps=30",
      "optimizer.learning_rate=1e-2", f"train.init_from={tmp_path / 'target'}",
      f"train.trainable={kind}")
  records = [r for r in read_metrics(tmp_path / kind / "metrics.jsonl") if "loss" in r]
  assert records[-1]["loss"] < 0.9 * records[0]["loss"], (records[0], records[-1])
  assert_frozen(params, target_params)

  prompt, lengths = generate.encode_prompts(["ROMEO:", "JULIET: O"], 128)
  base = dataclasses.replace(target.exp.sampler, max_new_tokens=24, temperature=0.0)
  ar_tokens, _, _ = generate.decode(trained.model, params, prompt, lengths, base)
  tokens, _, stats = generate.decode(trained.model, params, prompt, lengths,
                                     dataclasses.replace(base, kind=kind, **options))
  np.testing.assert_array_equal(tokens, ar_tokens)
  assert stats["target_calls"] <= 24
  with pytest.raises(UserError, match=f"kind={kind} needs {model_name}"):
    generate.decode(target.model, target_params, prompt, lengths,
                    dataclasses.replace(base, kind=kind))

  settings = [f"sampler.{s}" for s in [f"kind={kind}", *cli_options, "temperature=0",
                                       "max_new_tokens=24"]]
  result = cli.run(f"--workdir={tmp_path / kind}", "--mode=sample", "--prompt=ROMEO:",
                   *[arg for s in settings for arg in ("--set", s)])
  assert result.returncode == 0, result.stderr
  stats = cli.last_json(result.stdout)
  assert stats["sampler"] == kind and stats["target_calls"] <= 24

"""A few steps of a non-causal model kind through `paxlike.train.Trainer` (shared by the mdlm and
asarm tests): the `tiny` experiment on tinyshakespeare with 8 steps, checkpoints at 4 and 8, and a
held-out evaluation before and after."""

import json

from paxlike import config as config_lib
from paxlike import registry
from paxlike.train import Trainer

registry.load_modules()


def train(kind: str, workdir) -> tuple[Trainer, dict[int, float], dict[int, float]]:
  """(the trainer, step -> training loss, step -> held-out loss) of an 8-step run of `kind`."""
  exp = config_lib.validate(config_lib.apply_overrides(registry.get("tiny"), [
      f"model.kind={kind}", "train.steps=8", "checkpoint.every_steps=4", "eval.every_steps=100",
      "eval.batches=2", "optimizer.learning_rate=0.01"]))
  workdir.mkdir(parents=True)
  (workdir / "config.json").write_text(config_lib.to_json(exp))
  trainer = Trainer(exp, workdir, log=lambda _: None)
  trainer.run()
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  losses = {r["step"]: r["loss"] for r in records if "loss" in r}
  evals = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}
  return trainer, losses, evals

"""`python -m paxlike.bench SUITE [--out FILE] [--workdir DIR]`; suites: train."""

from __future__ import annotations

import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Write the JSON report here.")
flags.DEFINE_string("workdir", None, "Cache folder for suites that train models "
                    "(default ~/.cache/paxlike/bench).")
flags.DEFINE_list("experiments", ["tiny", "demo"], "Experiments to measure (train suite).")
flags.DEFINE_integer("steps", 10, "Timed steps after the compile warm-up.")

SUITES = ("train",)


def main(argv: list[str]) -> int:
  if len(argv) != 2 or argv[1] not in SUITES:
    print(f"usage: python -m paxlike.bench SUITE [--out FILE]; suites: {', '.join(SUITES)}",
          file=sys.stderr)
    return 2
  from paxlike.bench import train_suite
  from paxlike.checkpointing import quiet_orbax_logging
  from paxlike.errors import UserError
  quiet_orbax_logging()
  try:
    train_suite.run(FLAGS.experiments, FLAGS.steps, FLAGS.out)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  app.run(main)

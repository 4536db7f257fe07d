"""`python -m paxlike.bench SUITE [--out FILE] [--workdir DIR]`; suites: train, parallelism, decode,
engine, compare-hf, diffusion, scaling, serve. `python -m paxlike.bench table REPORT.json [--columns a,b]`
prints a report's rows as a Markdown table (how the tables in docs/ are made)."""

from __future__ import annotations

import os
import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Write the JSON report here.")
flags.DEFINE_string("workdir", None, "Cache folder for suites that train models "
                    "(default ~/.cache/paxlike/bench).")
flags.DEFINE_list("experiments", ["tiny", "demo", "lm_11m"], "Experiments to measure (train "
                  "suite); lm_11m is the ~11M-parameter model at sequence length 256.")
flags.DEFINE_integer("steps", 10, "Timed steps after the compile warm-up.")
flags.DEFINE_list("remat", ["none"], "Block rematerialisation policies to measure each experiment "
                  "under (train suite): none, dots, full.")
flags.DEFINE_list("seq_lens", ["2048", "4096", "8192", "16384", "32768"],
                  "Sequence lengths (parallelism suite).")
flags.DEFINE_integer("timed_up_to", 8192, "Longest sequence that is also timed (parallelism "
                     "suite); longer ones are only compiled for their memory.")

flags.DEFINE_integer("max_new_tokens", 96, "Tokens generated per row (decode suite).")
flags.DEFINE_list("batches", ["1", "8"], "Batch sizes (decode and compare-hf suites).")
flags.DEFINE_list("sizes", ["10M", "50M"], "Target sizes (compare-hf suite).")
flags.DEFINE_integer("train_steps", None, "Training steps of the masked-diffusion model; the "
                     "others train for a fraction of them (diffusion suite; default 24000 for the "
                     "short task suite, 12000 for the long one).")
flags.DEFINE_enum("task_suite", "short", ["short", "long"], "Tasks of the diffusion suite: short "
                  "answers (3-8 tokens, every sampler) or long ones (9-16 tokens, the MDLM's "
                  "parallel unmasking rules).")
flags.DEFINE_list("samplers", [], "Sampler names to run, e.g. topk,distilled (diffusion suite) "
                  "or eagle,speculative (decode suite, beside AR); default all. Double-quote a "
                  "name/setting that holds commas: '\"fast_dllm/dual cache, L=8, k=1\"'.")
flags.DEFINE_integer("examples", 64, "Held-out prompts per task (diffusion suite).")
flags.DEFINE_integer("student_cycles", 2, "Runs of the students' second stage, each from the "
                     "last (diffusion suite; the cache keeps every run, so 1 reuses the first).")
flags.DEFINE_integer("prompt_seed", None, "Seed of the held-out prompts (diffusion suite; default "
                     "the reported ones); another seed gives other prompts to choose settings on.")
flags.DEFINE_integer("prompts_per_task", 8, "Held-out prompts per task, 64 samples each (scaling "
                     "suite).")
flags.DEFINE_list("shapes", ["0.07M", "1.6M", "9.5M", "51M"], "Model shapes whose AR step is "
                  "measured against its floors (engine suite).")
flags.DEFINE_list("engine_batches", ["1", "8", "32"], "Batch sizes of the AR rows (engine suite).")
flags.DEFINE_list("targets", ["1.6M", "9.5M"], "Target shapes of the drafted samplers' overhead "
                  "rows, drafted by the 0.07M shape (engine suite).")
flags.DEFINE_string("dtype", "float32", "Compute dtype of the models (engine suite); bfloat16 on "
                    "accelerators.")
flags.DEFINE_list("columns", [], "Columns of `table` (default: every key of the rows).")
flags.DEFINE_list("rates", ["2", "8", "32"], "Request arrival rates per second (serve suite).")
flags.DEFINE_integer("requests", 96, "Requests per rate (serve suite).")
flags.DEFINE_list("concurrency", ["1"], "Closed loops to serve after the rates (serve suite): "
                  "at most C requests in flight, the next sent when one is done; empty for none.")
flags.DEFINE_list("policies", [], "Serving policies to run (serve suite; default: all of static, "
                  "continuous_ar, continuous_speculative, smartspec, tetris).")
flags.DEFINE_list("outputs", ["uniform", "long_tail"], "Distributions of the requests' new-token "
                  "counts (serve suite): uniform 16-96, and/or long_tail (16 plus an exponential "
                  "of mean 40, cut at 256).")
flags.DEFINE_list("prefills", ["piggybacked"], "How continuous_ar and smartspec admit prompts "
                  "(serve suite): piggybacked (chunks inside decode steps) and/or call (one "
                  "prefill call per admission).")
flags.DEFINE_list("drafters", ["model", "eagle"], "What drafts for continuous_speculative and "
                  "smartspec (serve suite): model (pair_draft) and/or eagle (the target's own "
                  "EAGLE head, pair_eagle).")
flags.DEFINE_boolean("long_prompts", True, "Also serve the with_long trace (a quarter of the "
                     "prompts 256-384 bytes) with prefill calls and piggybacked (serve suite).")
flags.DEFINE_list("parts", ["decode", "train"], "What compare-hf measures: decode (AR and "
                  "speculative generation) and/or train (one AdamW step per batch).")
flags.DEFINE_integer("train_batch", 8, "Batch size of compare-hf's train rows.")
flags.DEFINE_integer("threads", 2, "CPU threads for both systems (compare-hf suite): the process "
                     "is pinned to this many cores and torch.set_num_threads is set to it.")

SUITES = ("train", "parallelism", "decode", "engine", "compare-hf", "diffusion", "scaling",
          "serve")
SIMULATED_DEVICES = "--xla_force_host_platform_device_count"


def _table(path: str) -> int:
  """Prints the rows of a suite's JSON report as a Markdown table."""
  import json
  from paxlike.bench import harness
  try:
    report = json.loads(open(path).read())
    rows = report["rows"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    print(f"error: {path!r} is not a bench report (JSON with 'rows'): {e}", file=sys.stderr)
    return 2
  print(harness.markdown_table(rows, FLAGS.columns))
  return 0


def _numbers(flag: str, values: list[str], kind: type) -> tuple:
  """A list flag's values as numbers of `kind`, or a UserError naming the flag and the value."""
  from paxlike.errors import UserError
  try:
    return tuple(kind(v) for v in values)
  except ValueError:
    raise UserError(f"--{flag}={','.join(values)}: each value must be "
                    f"{'an integer' if kind is int else 'a number'}") from None


def main(argv: list[str]) -> int:
  if len(argv) == 3 and argv[1] == "table":
    return _table(argv[2])
  if len(argv) != 2 or argv[1] not in SUITES:
    print(f"usage: python -m paxlike.bench SUITE [--out FILE]; suites: {', '.join(SUITES)}; or "
          f"python -m paxlike.bench table REPORT.json [--columns a,b]", file=sys.stderr)
    return 2
  if argv[1] == "parallelism" and SIMULATED_DEVICES not in os.environ.get("XLA_FLAGS", ""):
    # Before jax is first imported: 8 simulated CPU devices for the 'sequence' axis.
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {SIMULATED_DEVICES}=8".strip()
  if argv[1] == "compare-hf":  # before jax starts its thread pool
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:max(1, FLAGS.threads)])
  from paxlike.bench import compare_hf_suite, decode_suite, diffusion_suite, engine_suite
  from paxlike.bench import parallelism_suite
  from paxlike.bench import scaling_suite, serve_suite, train_suite
  from paxlike.checkpointing import quiet_orbax_logging
  from paxlike.errors import UserError
  quiet_orbax_logging()
  try:
    if argv[1] == "compare-hf":
      compare_hf_suite.run(FLAGS.out, tuple(FLAGS.sizes), _numbers("batches", FLAGS.batches, int),
                           FLAGS.max_new_tokens, threads=FLAGS.threads,
                           parts=tuple(FLAGS.parts), train_batch=FLAGS.train_batch)
    elif argv[1] == "decode":
      decode_suite.run(FLAGS.workdir, FLAGS.out, FLAGS.max_new_tokens,
                       _numbers("batches", FLAGS.batches, int),
                       samplers=tuple(FLAGS.samplers) or decode_suite.SAMPLERS)
    elif argv[1] == "engine":
      engine_suite.run(FLAGS.out, tuple(FLAGS.shapes),
                       _numbers("engine_batches", FLAGS.engine_batches, int),
                       tuple(FLAGS.targets), _numbers("batches", FLAGS.batches, int),
                       new_tokens=FLAGS.max_new_tokens, dtype=FLAGS.dtype)
    elif argv[1] == "diffusion":
      diffusion_suite.run(FLAGS.workdir, FLAGS.out, FLAGS.examples, FLAGS.train_steps,
                          only=tuple(FLAGS.samplers), student_cycles=FLAGS.student_cycles,
                          suite=FLAGS.task_suite,
                          prompt_seed=diffusion_suite.PROMPT_SEED if FLAGS.prompt_seed is None
                          else FLAGS.prompt_seed)
    elif argv[1] == "serve":
      serve_suite.run(FLAGS.workdir, FLAGS.out, _numbers("rates", FLAGS.rates, float),
                      FLAGS.requests, policies=tuple(FLAGS.policies) or serve_suite.POLICIES,
                      long_prompts=FLAGS.long_prompts, outputs=tuple(FLAGS.outputs),
                      prefills=tuple(FLAGS.prefills), drafters=tuple(FLAGS.drafters),
                      concurrency=_numbers("concurrency", FLAGS.concurrency, int))
    elif argv[1] == "scaling":
      scaling_suite.run(FLAGS.workdir, FLAGS.out, FLAGS.prompts_per_task)
    elif argv[1] == "parallelism":
      parallelism_suite.run(FLAGS.out, list(_numbers("seq_lens", FLAGS.seq_lens, int)),
                            FLAGS.timed_up_to)
    else:
      train_suite.run(FLAGS.experiments, FLAGS.steps, FLAGS.out, tuple(FLAGS.remat))
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  app.run(main)

"""paxlike: a JAX research framework for parallel decoding of language models.

This package is the framework around the models and samplers: experiments, training, running
and measuring them.

- `config`, `sampler_section`, `registry`: the typed experiment schema (`--set` overrides, JSON,
  diffs), the sampler section as a tagged union over `samplers.registry`, and registered
  experiments by name.
- `main`, `workflows`: the command line and what each of its modes does.
- `run`: a workdir's stored config and trained model, for anyone who needs them.
- `train`, `train_state`, `optim`, `checkpointing`, `metrics`, `atomic`: the training loop, what a
  checkpoint holds and its shardings, the optax optimizer and
  schedules, Orbax checkpoints, run output, crash-safe writes.
- `data`, `tokenizer`, `tasks`: corpora to packed token batches (Grain), the byte tokenizer, the
  synthetic parallel-decoding tasks.
- `generate`, `parallel_sampling`, `coverage`: text in and out of any sampler kind, n samples
  with a selection rule, pass@k.
- `teacher_text`, `diffusion_teacher`: a trained model's own outputs for distillation.
- `interchange`: Hugging Face Llama checkpoints in and out.
- `timing`: fair interleaved timing of compiled functions.
- `errors`: the one exception type for bad user input.
- `bench`: `python -m paxlike.bench SUITE`, the benchmark suites.
"""

__version__ = "0.1.0"

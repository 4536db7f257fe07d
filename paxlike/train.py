"""The train step and the training loop: sharded state, Grain batches, eval, Orbax checkpoints.

`train_step(state, batch) -> (state, metrics)` is a pure function compiled once with
`jax.jit(in_shardings=..., out_shardings=..., donate_argnums=0)`. The loop around it resumes from
the latest readable checkpoint (model, optimizer, step, RNG and the data iterator position), so an
interrupted-and-resumed run reproduces the losses of an uninterrupted one bit for bit.
Reading a trained run back (its config, its latest parameters) is `paxlike.run.Run`'s job; the
shapes and shardings of what a checkpoint holds are `paxlike.train_state`'s, shared by both.
"""

from __future__ import annotations

import dataclasses
import math
import functools
import json
import signal
import sys
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from models import consistency
from parallelism import rules
from paxlike import atomic
from paxlike import data as data_lib
from paxlike import interchange
from paxlike.checkpointing import Checkpointer
from paxlike.config import Experiment
from paxlike.errors import UserError
from paxlike.metrics import MetricsLog, Progress
from paxlike.optim import learning_rate_schedule, param_path
from paxlike.run import Run, hf_params
from paxlike.train_state import TrainState, boxed_init, state_layout


def make_train_step(model: Any, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    teacher: Any = None, distill_weight: float = 1.0,
                    microbatches: int = 1, consistency_block: int = 0,
                    consistency_ar_weight: float = 1.0) -> Callable:
  """(state, batch [B, L + 1] int32, teacher_params=None) -> (state, metrics).

  The loss is the model's own objective (`model.loss`, see `models.build`), given a key folded
  from the state's RNG and the step; with a teacher its logits on the batch are passed along for
  distillation. With `consistency_block` n > 0 the loss is instead CLLM's consistency objective
  for Jacobi decoding of blocks of n (`models.consistency`), on the teacher's Jacobi trajectories.

  With `microbatches` k > 1 (gradient accumulation, for a batch whose activations do not fit) the
  batch is split into k microbatches of B / k rows, row i going to microbatch i mod k so that each
  keeps the batch's sharding; their gradients, losses and metrics are averaged in a `lax.scan`,
  one microbatch's activations alive at a time. Microbatch j's objective gets the step's key
  folded with j. For an objective that averages over its rows (next-token cross-entropy) this is
  the full batch's gradient, up to float32 rounding.
  """

  def loss_fn(params, batch, teacher_params, key):
    if consistency_block:
      trajectory = jax.lax.stop_gradient(consistency.teacher_trajectory(
          teacher, teacher_params, batch, consistency_block))
      return consistency.loss(model, params, batch, trajectory, key, consistency_ar_weight)
    teacher_logits = None
    if teacher is not None:
      teacher_logits = jax.lax.stop_gradient(
          teacher.logits(teacher_params, model.teacher_inputs(batch)))
    return model.loss(params, batch, key, teacher_logits, distill_weight)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def accumulated(params, batch, teacher_params, key):
    """grad_fn's ((loss, parts), grads), averaged over the microbatches of `batch`."""
    rows = batch.shape[0] // microbatches
    split = batch.reshape(rows, microbatches, *batch.shape[1:]).swapaxes(0, 1)

    def add(total, indexed):
      index, chunk = indexed
      out = grad_fn(params, chunk, teacher_params, jax.random.fold_in(key, index))
      return jax.tree.map(jnp.add, total, out), None

    shapes = jax.eval_shape(grad_fn, params, split[0], teacher_params, key)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    total, _ = jax.lax.scan(add, zeros, (jnp.arange(microbatches), split))
    return jax.tree.map(lambda x: x / microbatches, total)

  def train_step(state: TrainState, batch: jax.Array, teacher_params: Any = None):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    gradients = grad_fn if microbatches == 1 else accumulated
    (loss, parts), grads = gradients(state.params, batch, teacher_params, key)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, **parts, "grad_norm": optax.tree.norm(grads),
               "learning_rate": schedule(state.step)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def make_eval_step(model: Any) -> Callable:
  """(params, batch [B, L + 1], index) -> summed nll and token count (float32 scalars); the
  index seeds any randomness of the objective, so evaluation is deterministic."""

  def eval_step(params, batch, index):
    return model.eval_nll(params, batch, jax.random.fold_in(jax.random.key(0), index))

  return eval_step


class _StopRequest:
  """Turns SIGTERM/SIGINT into a flag checked between steps (save, then exit cleanly)."""

  def __init__(self):
    self.signal_name: str | None = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.signal_name = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


@dataclasses.dataclass
class TrainResult:
  """What a finished (or interrupted) run reports."""

  step: int
  eval_loss: float | None
  eval_bpb: float | None
  tokens_per_s: float
  interrupted: bool
  params: Any


class Trainer:
  """Builds mesh, model, optimizer, data and checkpoints for an experiment, and runs training."""

  def __init__(self, exp: Experiment, workdir: Path, log: Callable[[str], None] = print):
    self.exp = exp
    self.workdir = Path(workdir)
    self.log = log
    self.layout = state_layout(exp)
    self.mesh, self.model, self.tx = self.layout.mesh, self.layout.model, self.layout.tx
    self.teacher = self._teacher()
    self.schedule = learning_rate_schedule(exp.optimizer, exp.schedule, exp.train.steps)
    self._build_state_functions()

  # ------------------------------------------------------------------ distillation teacher

  def _teacher(self) -> Run | None:
    """The trained run named by train.teacher_workdir (or None)."""
    path = self.exp.train.teacher_workdir
    if not path:
      return None
    teacher = Run(path, log=self.log)
    if teacher.exp.model.vocab_size != self.exp.model.vocab_size:
      raise UserError(f"the teacher's model.vocab_size={teacher.exp.model.vocab_size} differs "
                      f"from this model's {self.exp.model.vocab_size}; distillation needs one "
                      "vocabulary")
    if teacher.exp.model.max_len < self.exp.data.seq_len:
      raise UserError(f"the teacher's model.max_len={teacher.exp.model.max_len} is shorter than "
                      f"data.seq_len={self.exp.data.seq_len}")
    if self.exp.train.consistency_block and (teacher.exp.model.kind != "llama"
                                             or teacher.exp.model.parscale.streams > 1):
      raise UserError(f"train.consistency_block needs a plain causal teacher (model.kind='llama', "
                      f"one stream) in train.teacher_workdir={path!r}, got kind "
                      f"{teacher.exp.model.kind!r} with {teacher.exp.model.parscale.streams} "
                      "streams")
    return teacher

  @functools.cached_property
  def teacher_params(self) -> Any:
    """The teacher's parameters from its latest checkpoint, on this run's mesh (None without a
    teacher)."""
    return self.teacher.restore(self.exp.mesh).params if self.teacher else None

  # ------------------------------------------------------------------ data (read on first use)

  @functools.cached_property
  def corpus(self) -> data_lib.Corpus:
    return data_lib.load_corpus(self.exp.data, interchange.text_codec(self.exp.model))

  @functools.cached_property
  def eval_data(self) -> list[np.ndarray]:
    exp = self.exp
    return data_lib.eval_batches(
        self.corpus.held_out, exp.data.seq_len, exp.train.batch_size, exp.eval.batches)

  def train_iterator(self):
    exp = self.exp
    dataset = data_lib.train_dataset(
        self.corpus.train, exp.data.seq_len, exp.train.batch_size, exp.train.seed,
        jax.process_index(), jax.process_count())
    return data_lib.train_iterator(dataset)

  # ------------------------------------------------------------------ compiled functions

  def _build_state_functions(self) -> None:
    self.abstract_state = self.layout.abstract_state
    self.state_shardings = self.layout.state_shardings
    self.batch_sharding = rules.batch_sharding(self.mesh)
    init = functools.partial(boxed_init, self.model, self.tx, self.exp.data.seq_len)
    self._init = jax.jit(lambda k: nn.meta.unbox(init(k)), out_shardings=self.state_shardings)
    replicated = rules.replicated(self.mesh)
    teacher_model = teacher_shardings = None
    if self.teacher:
      teacher_layout = self.teacher.layout(self.exp.mesh)
      teacher_model, teacher_shardings = teacher_layout.model, teacher_layout.state_shardings.params
    self._train_step = jax.jit(
        make_train_step(self.model, self.tx, self.schedule, teacher_model,
                        self.exp.train.distill_weight, self.exp.train.microbatches,
                        self.exp.train.consistency_block, self.exp.train.consistency_ar_weight),
        in_shardings=(self.state_shardings, self.batch_sharding, teacher_shardings),
        out_shardings=(self.state_shardings, replicated), donate_argnums=0)
    self._eval_step = jax.jit(
        make_eval_step(self.model),
        in_shardings=(self.state_shardings.params, self.batch_sharding, None),
        out_shardings=replicated)

  def init_state(self) -> TrainState:
    """Fresh state from train.seed; parameters from model.init_from (Hugging Face weights), then
    copied from train.init_from where they match."""
    with rules.activate(self.mesh):
      state = self._init(jax.random.key(self.exp.train.seed))
    if self.exp.model.init_from:
      state = state.replace(params=hf_params(self.exp.model, self.layout, self.log))
    if self.exp.train.init_from:
      state = state.replace(params=self._params_from(self.exp.train.init_from, state.params))
    return state

  def _params_from(self, workdir: str, params: Any) -> Any:
    """`params` with every leaf whose path and shape match one in `workdir`'s latest checkpoint
    replaced by that value (placed with this run's sharding); refuses a shape mismatch."""
    source = Run(workdir, log=self.log).restore(self.exp.mesh)
    loaded = {param_path(p): v for p, v in
              jax.tree_util.tree_flatten_with_path(source.params)[0]}
    copied, fresh, mismatched = [], [], []

    def take(path, leaf):
      name = param_path(path)
      if name not in loaded:
        fresh.append(name)
        return leaf
      value = loaded[name]
      if value.shape != leaf.shape:
        mismatched.append(f"{name}: {value.shape} there, {leaf.shape} here")
        return leaf
      copied.append(name)
      return jax.device_put(value.astype(leaf.dtype), leaf.sharding)

    params = jax.tree_util.tree_map_with_path(take, params)
    if mismatched or not copied:
      raise UserError(f"train.init_from={workdir!r} does not fit this model: "
                      + ("; ".join(mismatched[:5]) if mismatched else "no parameter path matches")
                      + "; use a run with the same shapes for the shared parameters")
    self.log(f"initialised {len(copied)} parameter arrays from {workdir}"
             + (f"; fresh: {', '.join(fresh)}" if fresh else ""))
    return params

  def to_global_batch(self, local_batch: np.ndarray) -> jax.Array:
    """This process's rows -> one global array sharded over ('data', 'fsdp')."""
    return jax.make_array_from_process_local_data(self.batch_sharding, local_batch)

  @staticmethod
  def local_rows(global_batch: np.ndarray) -> np.ndarray:
    """This process's rows of a batch every process holds whole (the eval batches)."""
    local = len(global_batch) // jax.process_count()
    return global_batch[jax.process_index() * local:(jax.process_index() + 1) * local]

  def train_step(self, state: TrainState, batch: jax.Array):
    with rules.activate(self.mesh):
      return self._train_step(state, batch, self.teacher_params)

  def lowered_train_step(self, state: TrainState, batch: jax.Array) -> jax.stages.Lowered:
    """The train step lowered for these arguments' shapes; `.compile()` gives its memory and
    cost analyses (the bench reads them)."""
    with rules.activate(self.mesh):
      return self._train_step.lower(state, batch, self.teacher_params)

  def train_step_jaxpr(self, state: TrainState, batch: jax.Array):
    """The train step's closed jaxpr for these arguments (`bench train` reads its products)."""
    with rules.activate(self.mesh):
      return jax.make_jaxpr(self._train_step)(state, batch, self.teacher_params)

  def evaluate(self, params: Any) -> tuple[float, float]:
    """Mean held-out loss (nats/token) and bits per byte (tokens are bytes)."""
    total, count = 0.0, 0.0
    with rules.activate(self.mesh):
      for index, batch in enumerate(self.eval_data):
        nll, n = self._eval_step(params, self.to_global_batch(self.local_rows(batch)), index)
        total, count = total + float(nll), count + float(n)
    loss = total / count
    return loss, loss / math.log(2)

  # ------------------------------------------------------------------ the loop

  def restore_or_init(self, checkpointer: Checkpointer, iterator) -> tuple[TrainState, int]:
    restored = checkpointer.restore_latest(self.abstract_state, iterator)
    if restored is None:
      return self.init_state(), 0
    state, step = restored
    self.log(f"resumed from step {step}")
    return state, step

  def run(self) -> TrainResult:
    exp = self.exp
    total = exp.train.steps
    iterator = self.train_iterator()  # reads the corpus first: bad data fails before any I/O
    self.write_sharding_report()
    lead = jax.process_index() == 0
    metrics = MetricsLog(self.workdir / "metrics.jsonl", enabled=lead)
    checkpointer = Checkpointer(self.workdir, exp.checkpoint, log=self.log)
    eval_loss = eval_bpb = None
    progress = Progress(total, exp.train.batch_size * exp.data.seq_len,
                        stream=sys.stdout if lead else None)
    try:
      state, step = self.restore_or_init(checkpointer, iterator)
      metrics.truncate_after(step)
      if step == 0:
        self.log(f"training {exp.name}: {self.param_count(state.params) / 1e6:.2f}M parameters, "
                 f"{total} steps of {exp.train.batch_size}x{exp.data.seq_len} tokens "
                 f"on {self.corpus.description}")
      if step == 0 and exp.eval.every_steps:
        eval_loss, eval_bpb = self.evaluate(state.params)
        metrics.write({"step": 0, "eval_loss": eval_loss, "eval_bpb": eval_bpb})
      with _StopRequest() as stop:
        first_step = step
        while step < total and stop.signal_name is None:
          state, step_metrics = self.train_step(state, self.to_global_batch(next(iterator)))
          step += 1
          if step == first_step + 1:  # rates exclude the compiling first step
            jax.block_until_ready(step_metrics)
            progress.start(step)
          loss = float(step_metrics["loss"])
          if not math.isfinite(loss):
            last = checkpointer.latest_step()
            raise UserError(
                f"loss became {loss} at step {step}; stopping without saving. The last good "
                f"checkpoint (step {last}) is intact; lower optimizer.learning_rate or "
                "raise schedule.warmup_steps")
          if step % exp.run.log_every == 0 or step == total:
            record = {"step": step, **{k: float(v) for k, v in step_metrics.items()}}
            metrics.write(record)
            progress.update(step, loss)
          if exp.eval.every_steps and step % exp.eval.every_steps == 0 and step < total:
            eval_loss, eval_bpb = self.evaluate(state.params)
            metrics.write({"step": step, "eval_loss": eval_loss, "eval_bpb": eval_bpb})
            progress.message(f"eval at step {step}: loss {eval_loss:.4f}, {eval_bpb:.3f} bits/byte")
          if step % exp.checkpoint.every_steps == 0 or step == total:
            checkpointer.save(step, state, iterator)
        progress.finish()
        interrupted = stop.signal_name is not None
        if interrupted:
          if checkpointer.latest_step() != step:
            checkpointer.save(step, state, iterator)
          self.log(f"received {stop.signal_name}: saved checkpoint at step {step}; exiting")
        elif total > 0:
          if checkpointer.latest_step() != step:
            checkpointer.save(step, state, iterator)
          eval_loss, eval_bpb = self.evaluate(state.params)
          metrics.write({"step": step, "eval_loss": eval_loss, "eval_bpb": eval_bpb})
    finally:
      checkpointer.close()
      metrics.close()
    return TrainResult(step=step, eval_loss=eval_loss, eval_bpb=eval_bpb,
                       tokens_per_s=progress.tokens_per_s, interrupted=interrupted,
                       params=state.params)

  def sharding_report(self) -> dict[str, Any]:
    """The mesh, the attention variant and each parameter's path, global shape and PartitionSpec."""
    params = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(self.abstract_state.params):
      params.append({"path": "/".join(str(getattr(k, "key", k)) for k in path),
                     "shape": list(leaf.shape), "spec": rules.spec_of(leaf.sharding)})
    return {"mesh": dict(self.mesh.shape), "devices": self.mesh.size,
            "processes": jax.process_count(), "attention": self.exp.model.attention,
            "params": params}

  def write_sharding_report(self) -> None:
    if jax.process_index() == 0:
      atomic.write_text(self.workdir / "sharding.json",
                        json.dumps(self.sharding_report(), indent=1) + "\n")

  @staticmethod
  def param_count(params: Any) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


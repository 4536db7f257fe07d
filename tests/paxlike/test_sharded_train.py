"""A train step on 8 devices under each parallelism equals the single-device step.

The test also checks the per-device shard shapes of the parameters, so a mesh that is accepted
but ignored fails.
"""


import jax
import numpy as np
import pytest

from paxlike import config as config_lib
from paxlike import registry
from paxlike.errors import UserError
from paxlike.train import Trainer, make_train_step

registry.load_modules()
STEPS = 3
MESHES = {
    "data": dict(data=8),
    "fsdp": dict(data=1, fsdp=8),
    "tensor": dict(data=2, tensor=4),
    "mixed": dict(data=2, fsdp=2, tensor=2),
    "sequence-ring": dict(data=2, sequence=4, attention="ring"),
    "sequence-allgather": dict(data=2, sequence=4, attention="allgather"),
    "sequence-ulysses": dict(data=2, sequence=4, attention="ulysses"),
    "all-axes-ring": dict(data=1, fsdp=2, sequence=2, tensor=2, attention="ring"),
}


def _trainer(tmp_path, mesh: dict, *extra: str) -> Trainer:
  overrides = [f"mesh.{k}={v}" for k, v in mesh.items() if k != "attention"]
  overrides.append(f"model.attention={mesh.get('attention', 'dense')}")
  overrides += extra
  exp = config_lib.apply_overrides(registry.get("tiny"), overrides)
  return Trainer(exp, tmp_path, log=lambda _: None)


@pytest.fixture(scope="module")
def batches(tmp_path_factory):
  trainer = _trainer(tmp_path_factory.mktemp("b"), dict(data=8))
  iterator = trainer.train_iterator()
  return [next(iterator) for _ in range(STEPS)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, batches):
  """The same steps on one device with no shardings at all."""
  trainer = _trainer(tmp_path_factory.mktemp("r"), dict(data=8))
  state = jax.device_put(jax.device_get(trainer.init_state()), jax.devices()[0])
  step = jax.jit(make_train_step(trainer.model, trainer.tx, trainer.schedule))
  losses = []
  for batch in batches:
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return losses, jax.device_get(state.params)


# Variants of the step that must not change it: gradient accumulation (2 microbatches of 4 rows,
# each split over data x fsdp) and the blocks' rematerialisation policies.
VARIANTS = {"mixed-2-microbatches": ("mixed", "train.microbatches=2"),
            "data-remat-dots": ("data", "train.remat=dots"),
            "mixed-remat-full": ("mixed", "train.remat=full")}


@pytest.mark.parametrize("name", [*MESHES, *VARIANTS])
def test_sharded_step_matches_single_device(name, tmp_path, batches, reference):
  mesh, *extra = VARIANTS.get(name, (name,))
  trainer = _trainer(tmp_path, MESHES[mesh], *extra)
  state = trainer.init_state()
  if "remat" in name:  # the policy is applied: the blocks' recomputation is fenced off
    lowered = trainer.lowered_train_step(state, trainer.to_global_batch(batches[0])).as_text()
    assert lowered.count("optimization_barrier") >= 2, "no rematerialised block in the step"
  losses = []
  for batch in batches:
    state, metrics = trainer.train_step(state, trainer.to_global_batch(batch))
    losses.append(float(metrics["loss"]))
  ref_losses, ref_params = reference
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5),
               jax.device_get(state.params), ref_params)

  mesh = trainer.mesh.shape
  query = state.params["blocks_0"]["attention"]["query"]["kernel"]  # (embed, heads, head_dim)
  shard = query.addressable_shards[0].data.shape
  assert shard == (query.shape[0] // mesh["fsdp"], query.shape[1] // mesh["tensor"], query.shape[2])
  down = state.params["blocks_0"]["mlp"]["down"]["kernel"]  # (mlp, embed)
  assert down.addressable_shards[0].data.shape == (down.shape[0] // mesh["tensor"],
                                                   down.shape[1] // mesh["fsdp"])
  mu = jax.tree.leaves(state.opt_state)  # optimizer state is sharded like the parameters
  assert any(x.shape == query.shape and x.addressable_shards[0].data.shape == shard for x in mu)


def test_sharding_report_lists_every_parameter(tmp_path):
  trainer = _trainer(tmp_path, MESHES["mixed"])
  report = trainer.sharding_report()
  assert report["mesh"] == {"data": 2, "fsdp": 2, "sequence": 1, "tensor": 2}
  assert report["attention"] == "dense"
  by_path = {p["path"]: p for p in report["params"]}
  assert by_path["blocks_0/attention/query/kernel"]["spec"] == ["fsdp", "tensor", None]
  assert len(by_path) == len(jax.tree.leaves(trainer.abstract_state.params))


def test_mesh_device_mismatch_is_clear(tmp_path):
  from paxlike.errors import UserError
  with pytest.raises(UserError, match=r"has 6 devices but 8 are available"):
    _trainer(tmp_path, dict(data=3, tensor=2))


@pytest.mark.parametrize("mesh, overrides, message", [
    (dict(data=1, tensor=8), [], r"kv_heads\) has size 4, not divisible by the mesh axes tensor = 8.*"
                                 r"model.num_kv_heads=4"),
    (dict(data=8), ["train.batch_size=4"], "train.batch_size=4 is not divisible by mesh.data x mesh.fsdp = 8"),
    (dict(data=1, sequence=8), ["data.seq_len=60"], "data.seq_len=60 is not divisible by mesh.sequence=8"),
])
def test_indivisible_shapes_are_named(tmp_path, mesh, overrides, message):
  from paxlike.errors import UserError
  exp = config_lib.apply_overrides(
      registry.get("tiny"), [f"mesh.{k}={v}" for k, v in mesh.items()] + overrides)
  with pytest.raises(UserError, match=message):
    Trainer(exp, tmp_path, log=lambda _: None)


OBJECTIVES = {  # the other training objectives, each on the mixed data/fsdp/tensor mesh
    "mdlm": ["model.kind=mdlm"],
    "asarm": ["model.kind=asarm"],
    "parscale": ["model.parscale.streams=2", "model.parscale.prefix_len=2"],
}


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_sharded_objectives_match_single_device(name, tmp_path, batches):
  """MDLM, AS-ARM and ParScale steps (their own losses, masks and gradients) sharded over
  data x fsdp x tensor equal the same steps on one device."""
  mesh = [f"mesh.{k}={v}" for k, v in MESHES["mixed"].items()]
  exp = config_lib.apply_overrides(registry.get("tiny"), [*OBJECTIVES[name], *mesh])
  sharded = Trainer(exp, tmp_path / "s", log=lambda _: None)
  single = Trainer(exp, tmp_path / "d", log=lambda _: None)
  state = sharded.init_state()
  dense = jax.device_put(jax.device_get(single.init_state()), jax.devices()[0])
  dense_step = jax.jit(make_train_step(single.model, single.tx, single.schedule))
  for batch in batches:
    state, metrics = sharded.train_step(state, sharded.to_global_batch(batch))
    dense, dense_metrics = dense_step(dense, batch)
    np.testing.assert_allclose(float(metrics["loss"]), float(dense_metrics["loss"]), rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5),
               jax.device_get(state.params), jax.device_get(dense.params))
  leaves = jax.tree.leaves(state.params)  # and the mesh was used, not ignored
  assert sum(x.addressable_shards[0].data.size < x.size for x in leaves) >= len(leaves) // 2


def test_microbatches_that_do_not_split_the_batch_are_refused(tmp_path):
  with pytest.raises(UserError, match="train.microbatches=4 .* multiple of 16"):
    _trainer(tmp_path, MESHES["mixed"], "train.microbatches=4")


def test_an_unknown_remat_policy_names_the_valid_ones():
  with pytest.raises(UserError, match="train.remat='some' is unknown; valid: none, dots, full"):
    config_lib.validate(config_lib.apply_overrides(registry.get("tiny"), ["train.remat=some"]))

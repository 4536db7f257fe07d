"""SpecTr k-sequential selection and drafts without replacement: exact target joint (oracle, with
broken verifiers caught), acceptance between single-draft and alpha*, greedy equality with AR on
a Llama pair, batching, randomness, row caches sharded over 'data' on a mesh, bad input."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parallelism import rules
from parallelism.mesh import make_mesh
from samplers import ar, spectr
from samplers.core import optimal, verify
from samplers.core.logits import SamplingParams
from tests.samplers import llama_pair, oracle, toy
from tests.samplers.oracle import POWER, SIGNIFICANCE, distribution, p_value
from tests.samplers.toy import DRAFT, ORACLE_PROMPTS, ORACLE_ROWS, ORACLE_STEPS, TARGET, TOY, VOCAB

GREEDY = SamplingParams(temperature=0.0)


def _oracle_p_values(config, prompts=ORACLE_PROMPTS, seed=0):
  """p-value per prompt of ORACLE_ROWS samples each (one batch) against the exact joint."""
  prompt, lengths = ar.pad_prompts([p for p in prompts for _ in range(ORACLE_ROWS)])
  out = spectr.sample(TOY, TARGET, TOY, DRAFT, prompt, lengths, jax.random.key(seed), config)
  tokens = np.asarray(out.tokens).reshape(len(prompts), ORACLE_ROWS, ORACLE_STEPS)
  return [p_value(rows, toy.exact_joint(TARGET, prompt_tokens, ORACLE_STEPS,
                                        distribution(config.sampling), config.eos_id,
                                        config.pad_id))[0]
          for prompt_tokens, rows in zip(prompts, tokens)]


K_SEQUENTIAL = spectr.SpecTrConfig(num_drafts=3, num_draft_tokens=2, max_new_tokens=ORACLE_STEPS)
WITHOUT_REPLACEMENT = spectr.SpecTrConfig(num_drafts=3, num_draft_tokens=2,
                                          max_new_tokens=ORACLE_STEPS, without_replacement=True)
ORACLE_CONFIGS = [  # the first, at T = 1, is checked over 8 tokens in test_long_oracle
    K_SEQUENTIAL,
    spectr.SpecTrConfig(num_drafts=2, num_draft_tokens=2, max_new_tokens=ORACLE_STEPS, eos_id=0,
                        sampling=SamplingParams(temperature=0.7, top_k=3, top_p=0.9)),
    WITHOUT_REPLACEMENT,
    spectr.SpecTrConfig(num_drafts=3, num_draft_tokens=2, max_new_tokens=ORACLE_STEPS,
                        without_replacement=True,
                        sampling=SamplingParams(temperature=1.3, top_k=2)),
]


@pytest.mark.slow
@pytest.mark.parametrize("config", ORACLE_CONFIGS[1:], ids=["kseq-k2-g2-t0.7-k3-p0.9-eos",
                                                            "wor-k3-g2", "wor-k3-g2-t1.3-k2"])
def test_joint_matches_the_exact_target_joint(config):
  """100k samples per prompt; Pearson chi-square over the 625 continuations (pooled below 5
  expected); a correct sampler gives p > 1e-3 (fixed seed 1: with seed 0 the filtered eos case's
  second prompt gives p = 2.6e-4, with seeds 1-3 p = 0.10-0.59, a chance event at this
  significance). With top-k 2, the third draft without replacement falls outside the draft's
  support (an invalid draft)."""
  assert min(_oracle_p_values(config, seed=1)) > SIGNIFICANCE


@pytest.mark.slow
def test_k_sequential_without_its_residual_correction_fails_the_oracle(fresh_trace):
  """Power: drawing from p instead of p_res after k rejections is caught."""
  fresh_trace.setattr(verify, "k_sequential_residual", lambda p, q, rho, k, max_k: p)
  assert _oracle_p_values(K_SEQUENTIAL, ORACLE_PROMPTS[:1])[0] < POWER


@pytest.mark.slow
def test_drafts_without_replacement_verified_as_iid_fail_the_oracle(fresh_trace):
  """Power: recursive rejection with the plain q (as if the drafts were i.i.d.) is caught."""
  as_iid = lambda q, children, active: jnp.broadcast_to(q, (children.shape[0],) + q.shape)
  fresh_trace.setattr(verify, "without_replacement", as_iid)
  assert _oracle_p_values(WITHOUT_REPLACEMENT, ORACLE_PROMPTS[:1])[0] < POWER


def test_acceptance_lies_between_single_draft_and_alpha_star_on_context_free_tables():
  """Acceptance of 3 i.i.d. one-token drafts = 1 - (1 - beta(rho))^3 within 5 standard errors,
  which lies between sum(min(p, q)) and alpha*(p, q, 3). (With gamma > 1, later positions have
  fewer drafts left: only those agreeing with the emitted prefix.)"""
  rng = np.random.default_rng(0)
  target, draft = (toy.context_free(rng.normal(0, 1.0, VOCAB)) for _ in range(2))
  p, q = (jax.nn.softmax(table[0, 0]) for table in (target, draft))
  beta = float(jnp.sum(jnp.minimum(q, p / verify.division_factor(p, q, 3))))
  expected = 1 - (1 - beta) ** 3
  single, best = float(jnp.sum(jnp.minimum(p, q))), float(optimal.optimal_acceptance(p, q, 3))
  assert single < expected < best
  prompt, lengths = ar.pad_prompts([[1]] * 2000)
  config = spectr.SpecTrConfig(num_drafts=3, num_draft_tokens=1, max_new_tokens=12)
  stats = spectr.sample(TOY, target, TOY, draft, prompt, lengths, jax.random.key(3), config).stats
  accepted, rejections = int(stats["accepted_tokens"]), int(stats["rejections"])
  tried = accepted + rejections
  assert abs(accepted / tried - expected) < 5 * np.sqrt(expected * (1 - expected) / tried)
  assert int(stats["draft_calls"]) == int(stats["target_calls"])  # prefill, then 1 per round


LLAMA_PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [31]]
LLAMA_STEPS = 12


@pytest.mark.parametrize("without_replacement", [False, True])
def test_greedy_equals_greedy_ar_on_a_llama_pair(without_replacement):
  """Mixed acceptance; mismatches only from a near-tie (at most one)."""
  target, draft = llama_pair.params()
  prompt, lengths = ar.pad_prompts(LLAMA_PROMPTS)
  expected = ar.sample(llama_pair.TARGET, target, prompt, lengths, jax.random.key(0),
                       ar.ARConfig(max_new_tokens=LLAMA_STEPS, sampling=GREEDY)).tokens
  config = spectr.SpecTrConfig(num_drafts=2, num_draft_tokens=3, max_new_tokens=LLAMA_STEPS,
                               sampling=GREEDY, without_replacement=without_replacement)
  out = spectr.sample(llama_pair.TARGET, target, llama_pair.DRAFT, draft, prompt, lengths,
                      jax.random.key(0), config)
  ties = llama_pair.near_ties(target, LLAMA_PROMPTS, expected, out.tokens)
  assert ties <= 1, f"{ties} near-ties"
  assert 0 < float(out.stats["acceptance"]) < 1 and int(out.stats["rejections"]) > 0
  assert int(out.stats["target_calls"]) < LLAMA_STEPS


def test_data_sharded_mesh_keeps_the_row_caches_sharded():
  """8 simulated devices as data=8, prompts passed unsharded (as the CLI does): the same tokens
  as on one device, the output sharded over 'data', and in the compiled program every per-row KV
  buffer [R, 1, KVH, S, D] holds only the device's own rows (B / 8 rows, or B k / 8 copies),
  never all of them: no replicated cache, no gather of all rows to keep the accepted copy."""
  target, draft = llama_pair.params()
  rng = np.random.default_rng(0)
  prompts = [list(rng.integers(1, 32, rng.integers(2, 6))) for _ in range(8)]
  prompt, lengths = ar.pad_prompts(prompts)
  config = spectr.SpecTrConfig(num_drafts=2, num_draft_tokens=3, max_new_tokens=8,
                               sampling=SamplingParams())
  args = (llama_pair.TARGET, target, llama_pair.DRAFT, draft, jnp.asarray(prompt),
          jnp.asarray(lengths), jax.random.key(0), config)
  expected = spectr.sample(*args)
  mesh = make_mesh(data=8)
  with rules.activate(mesh):
    out = spectr.sample(*args)
    hlo = spectr.sample.lower(*args).compile().as_text()
  np.testing.assert_array_equal(out.tokens, expected.tokens)
  assert out.tokens.sharding.is_equivalent_to(rules.batch_sharding(mesh), 2), out.tokens.sharding
  _, kv_heads, _, head_dim = llama_pair.TARGET.init_cache(1, 4).keys[0].shape
  rows_per_buffer = {int(r) for r in re.findall(rf"\[(\d+),1,{kv_heads},\d+,{head_dim}\]", hlo)}
  assert rows_per_buffer and max(rows_per_buffer) <= 8 * 2 // 8, sorted(rows_per_buffer)


def test_rows_follow_their_keys_whatever_the_batch_order_and_under_vmap():
  prompt, lengths = ar.pad_prompts([[1, 2], [3], [0, 1, 2], [2, 2]])
  config = spectr.SpecTrConfig(num_drafts=2, num_draft_tokens=2, max_new_tokens=6, eos_id=0)
  run = lambda order, row_keys: spectr.sample(TOY, TARGET, TOY, DRAFT, prompt[order],
                                              lengths[order], row_keys, config)
  oracle.assert_rows_follow_their_keys(run)


def test_bad_input_is_a_clear_error():
  prompt, lengths = ar.pad_prompts([[1] * 10])
  with pytest.raises(ValueError, match=r"num_drafts \(k\) must be >= 1, got 0"):
    spectr.SpecTrConfig(num_drafts=0, num_draft_tokens=2, max_new_tokens=4)
  with pytest.raises(ValueError, match=r"num_draft_tokens \(gamma\) must be >= 1, got 0"):
    spectr.SpecTrConfig(num_drafts=2, num_draft_tokens=0, max_new_tokens=4)
  with pytest.raises(ValueError, match="temperature must be >= 0"):
    spectr.SpecTrConfig(num_drafts=2, num_draft_tokens=2, max_new_tokens=4,
                        sampling=SamplingParams(temperature=-1.0))
  with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
    spectr.SpecTrConfig(num_drafts=2, num_draft_tokens=2, max_new_tokens=4,
                        sampling=SamplingParams(top_p=0.0))
  config = spectr.SpecTrConfig(num_drafts=6, num_draft_tokens=2, max_new_tokens=4,
                               without_replacement=True)
  with pytest.raises(ValueError, match="without_replacement needs num_drafts <= vocab_size; got "
                                       "num_drafts 6 for vocab_size 5"):
    spectr.sample(TOY, TARGET, TOY, DRAFT, prompt, lengths, jax.random.key(0), config)
  config = spectr.SpecTrConfig(num_drafts=2, num_draft_tokens=4, max_new_tokens=4)
  with pytest.raises(ValueError, match=r"= 17 exceeds the target's max_len 16"):
    spectr.sample(TOY, TARGET, TOY, DRAFT, prompt, lengths, jax.random.key(0), config)
  with pytest.raises(ValueError, match="draft's vocab_size 6 differs from the target's "
                                       "vocab_size 5"):
    other = toy.TrigramLM(vocab_size=6, max_len=16)
    spectr.sample(TOY, TARGET, other, other.init(jax.random.key(0)), prompt, lengths,
                  jax.random.key(0), config)

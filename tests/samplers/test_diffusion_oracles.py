"""Energy-based and ancestral masked diffusion against enumerated outputs of tabular models:
EDLM with one and with several steps, and a 1%-biased ancestral schedule that the oracle catches.

As in `test_diffusion_samplers`: canvases of 4 positions over 3 tokens, 100k vmapped samples (200k
where stated) compared with the exact output by Pearson chi-square (`oracle.p_value`).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from samplers import edlm, mdlm
from samplers.core.logits import SamplingParams
from tests.samplers import toy
from tests.samplers import toy_denoiser as td
from tests.samplers.oracle import POWER, SIGNIFICANCE, draw, p_value

VOCAB, LENGTH = 3, 4
JOINT = td.random_joint(0, VOCAB, LENGTH)
MASKS = jnp.full((1, LENGTH), VOCAB, jnp.int32)
T1 = SamplingParams(temperature=1.0)


def _edlm_setup():
  """(denoiser, its params, AR model, AR table, canvas [1, 4], AR joint [V]^3): a perfect
  denoiser of the AR model's joint after the prompt token 0, so that EDLM's target and its
  proposal differ only by the factorisation of parallel steps."""
  table = np.array(toy.TrigramLM(VOCAB + 1, LENGTH).init(jax.random.key(7), 2.0))
  table[..., VOCAB] = -1e9  # the AR model never emits the mask id
  ar_model = toy.TrigramLM(VOCAB + 1, LENGTH)
  ar_joint = toy.exact_joint(table, [0], LENGTH - 1)[:VOCAB, :VOCAB, :VOCAB]
  joint = np.zeros((VOCAB,) * LENGTH)
  joint[0] = ar_joint / ar_joint.sum()  # the denoiser's joint: the AR's, prompt token 0
  model = td.TabularDenoiser(VOCAB, LENGTH)
  canvas = jnp.array([[0, 3, 3, 3]], jnp.int32)
  return model, model.params(joint), ar_model, jnp.asarray(table), canvas, joint


def _edlm_draw(config, samples=100_000):
  model, params, ar_model, table, canvas, joint = _edlm_setup()
  return draw(lambda key: edlm.sample(model, params, ar_model, table, canvas, key, config),
              samples=samples)


@pytest.mark.slow
def test_edlm_moves_toward_the_ar_distribution_as_k_grows():
  """One step, so the output is self-normalised importance sampling from the product of the
  denoiser's marginals towards the AR joint: its TV to the AR joint shrinks with K."""
  joint = _edlm_setup()[-1]
  product = td.grouped_joint(joint, [[1, 2, 3]])[0]
  distances = []
  for count in (1, 4, 16):
    tokens, stats = _edlm_draw(edlm.EDLMConfig(steps=1, num_candidates=count, sampling=T1))
    distances.append(td.tv(td.empirical(tokens[:, 1:], VOCAB, LENGTH - 1), joint[0]))
    assert np.all(stats["energy_calls"] == 1)
  print(f"EDLM TV to the AR joint for K = 1, 4, 16: {np.round(distances, 3)}; product of "
        f"marginals {td.tv(product, joint[0]):.3f}")
  assert abs(distances[0] - td.tv(product, joint[0])) < 0.01  # K = 1: the plain denoiser
  assert distances[0] > distances[1] > distances[2]
  assert distances[2] < 0.5 * distances[0]


@pytest.mark.slow
def test_edlm_with_several_steps_is_ancestral_at_k1_and_nears_the_ar_joint_as_k_grows():
  """S = 3 steps. With K = 1 the importance weights have nothing to choose from, so the output is
  exactly ancestral sampling's enumerated distribution (`td.ancestral_joint` with the schedule's
  unmasking probabilities; chi-square). With K = 16 each step's candidate is resampled towards the
  AR conditional given what is visible, so the output's TV to the AR joint falls below half of
  K = 1's, and its energy model is called once per step."""
  steps, joint = 3, _edlm_setup()[-1]
  probs = [float(mdlm.unmask_probability("loglinear", jnp.int32(k), steps)) for k in range(steps)]
  ancestral = td.ancestral_joint(joint, probs)[0]
  tokens, _ = _edlm_draw(edlm.EDLMConfig(steps=steps, num_candidates=1, sampling=T1))
  assert p_value(tokens[:, 1:], ancestral)[0] > SIGNIFICANCE
  tokens, stats = _edlm_draw(edlm.EDLMConfig(steps=steps, num_candidates=16, sampling=T1))
  assert np.all(stats["energy_calls"] == steps)
  far, near = td.tv(ancestral, joint[0]), td.tv(td.empirical(tokens[:, 1:], VOCAB, 3), joint[0])
  print(f"EDLM S = 3: TV to the AR joint {far:.3f} at K = 1, {near:.3f} at K = 16")
  assert near < 0.5 * far


LEAK = 0.04  # added to the unmasking probability of every step but the last


@pytest.mark.slow
def test_an_ancestral_schedule_off_by_one_percent_tv_is_caught(fresh_trace):
  """Ancestral sampling (2 steps, loglinear) whose steps unmask with probability 0.54 instead of
  0.5 (as a schedule evaluated at a slightly wrong t would): its exact output is 1.1% in total
  variation from the correct one (enumerated below); 200k samples give p < POWER against the
  correct output (which the correct sampler matches: `test_diffusion_samplers`'s
  `test_ancestral_sampler_matches_its_exact_transition[loglinear-2]`)."""
  model, config = td.TabularDenoiser(VOCAB, LENGTH), mdlm.AncestralConfig(2, "loglinear", T1)
  row = lambda key: mdlm.sample(model, model.params(JOINT), MASKS, key, config)
  probs = [float(mdlm.unmask_probability("loglinear", jnp.int32(k), 2)) for k in range(2)]
  exact = td.ancestral_joint(JOINT, probs)
  biased = td.ancestral_joint(JOINT, [probs[0] + LEAK, 1.0])
  assert 0.008 < td.tv(biased, exact) < 0.015
  probability = mdlm.unmask_probability
  fresh_trace.setattr(mdlm, "unmask_probability", lambda schedule, step, steps: jnp.where(
      step >= steps - 1, 1.0, probability(schedule, step, steps) + LEAK))
  assert p_value(draw(row, 200_000)[0], exact)[0] < POWER

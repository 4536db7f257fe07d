"""APD (`samplers.apd`): drafts from a denoiser's marginals verified against the multiplicative
mixture p_D^R p_AR^(1 - R), on a random Llama scorer and a random MDLM (vocabulary 8, mask 7).

Oracle: two tokens with gamma 1 from a fixed prompt, 100k draws at T = 1. The first comes from
the causal model's prefill, the second is the round's draft or its residual draw, so the exact
joint is p_AR(x1) * p_T(x2 | x1), enumerated by calling both models. Verifying against the causal
model alone (R ignored) is caught.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.build import build_model
from models.config import DiffusionConfig, ModelConfig
from samplers import apd, ar, diffusion_drafted
from samplers.core.logits import SamplingParams
from samplers.spec import Decode
from tests.samplers.oracle import POWER, SIGNIFICANCE, draw, p_value

VOCAB, MASK = 8, 7
SHAPE = dict(vocab_size=VOCAB, d_model=32, num_heads=4, num_kv_heads=2, mlp_dim=64, max_len=16,
             init_std=1.0, tie_embeddings=False)
PROMPT = np.array([[1, 2, 3]], np.int32)
T1, GREEDY = SamplingParams(temperature=1.0), SamplingParams(temperature=0.0)


def pair():
  scorer = build_model(ModelConfig(num_layers=1, **SHAPE))
  denoiser = build_model(ModelConfig(kind="mdlm", num_layers=1, **SHAPE,
                                     diffusion=DiffusionConfig(mask_id=MASK)))
  return scorer, scorer.init(jax.random.key(1)), denoiser, denoiser.init(jax.random.key(2))


def exact_joint(mixture: float, temperature: float) -> np.ndarray:
  """[V, V] p_AR(x1 | prompt) * p_T(x2 | prompt, x1) at `temperature`: the mixture of the
  log-probabilities, divided by the temperature and renormalised over V."""
  scorer, scorer_params, denoiser, denoiser_params = pair()
  rows = np.concatenate([np.repeat(PROMPT, VOCAB, 0), np.arange(VOCAB)[:, None]], axis=1)
  first = jax.nn.softmax(scorer.logits(scorer_params, jnp.asarray(PROMPT))[0, -1] / temperature)
  second_ar = jax.nn.log_softmax(scorer.logits(scorer_params, jnp.asarray(rows))[:, -1], -1)
  canvas = np.concatenate([rows, np.full((VOCAB, 2), MASK)], axis=1)  # the sampler's canvas
  second_d = jax.nn.log_softmax(denoiser.denoise(denoiser_params, jnp.asarray(canvas))[:, 4], -1)
  mixed = (1 - mixture) * second_ar + (mixture * second_d if mixture else 0.0)  # 0 * -inf
  second = jax.nn.softmax(mixed / temperature, axis=-1)
  return np.asarray(first[:, None] * second, np.float64)


def run_row(mixture: float, temperature: float):
  scorer, scorer_params, denoiser, denoiser_params = pair()
  config = diffusion_drafted.DiffusionDraftedConfig(
      1, 2, sampling=SamplingParams(temperature=temperature), mixture=mixture)
  lengths = jnp.asarray([3])
  return lambda key: diffusion_drafted.sample(scorer, scorer_params, denoiser, denoiser_params,
                                              jnp.asarray(PROMPT), lengths, key[None], config)


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_a_drafted_token_follows_the_mixture_and_a_missing_mixture_is_caught(temperature):
  tokens, _ = draw(run_row(0.6, temperature))
  tokens = tokens[:, :2]
  p, _, _ = p_value(tokens, exact_joint(0.6, temperature))
  assert p > SIGNIFICANCE, p
  broken, _, _ = p_value(tokens, exact_joint(0.0, temperature))  # the causal model alone
  assert broken < POWER, broken


def test_the_ends_of_the_mixture():
  """R = 0 is greedy AR exactly; R = 1 accepts every draft (gamma tokens per round, plus the
  causal model's bonus token), the drafts being the denoiser's greedy marginals."""
  scorer, scorer_params, denoiser, denoiser_params = pair()
  prompt, lengths = (jnp.asarray(a) for a in ar.pad_prompts([[1, 2, 3], [4, 5], [6]]))
  expected = ar.sample(scorer, scorer_params, prompt, lengths, jax.random.key(0),
                       ar.ARConfig(max_new_tokens=9, sampling=GREEDY))
  run = lambda r: diffusion_drafted.sample(
      scorer, scorer_params, denoiser, denoiser_params, prompt, lengths, jax.random.key(0),
      diffusion_drafted.DiffusionDraftedConfig(4, 9, sampling=GREEDY, mixture=r))
  np.testing.assert_array_equal(run(0.0).tokens, expected.tokens)
  full = run(1.0)
  assert float(full.stats["acceptance"]) == 1.0
  assert int(full.stats["target_calls"]) == 1 + 2  # 1 + 5 + 3: the prefill's token, two rounds
  canvas = np.concatenate([np.asarray(prompt)[:1, :3], np.asarray(full.tokens)[:1, :1],
                           np.full((1, 3 + 9 + 4 - 4), MASK)], axis=1)  # row 0's first round
  marginals = denoiser.denoise(denoiser_params, jnp.asarray(canvas))[0, 4:8]
  np.testing.assert_array_equal(full.tokens[0, 1:5], jnp.argmax(marginals, axis=-1))


def test_the_kind_builds_its_mixture_and_refuses_a_bad_one():
  build = lambda **o: apd.SPEC.build(apd.APDOptions(**o), Decode(max_new_tokens=8))
  assert build().mixture == 0.5 and build(mixture=0.0).mixture == 0.0
  with pytest.raises(ValueError, match=r"mixture \(APD's R\) must be in \[0, 1\], got 1.5"):
    build(mixture=1.5)
  assert dataclasses.fields(apd.APDOptions)[0].name == "mixture"

"""Hugging Face Llama interchange: parity with transformers on tiny random models built locally.

Tolerance: float32 logits agree within 1e-4 absolute (observed ~1e-7; the models differ only in
summation order and in how rotary frequencies are rounded). Greedy generations agree token for
token except after a near-tie (top-two logits within 1e-4), which is counted.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from models.causal_lm import CausalLM  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from parallelism.mesh import make_mesh  # noqa: E402
from paxlike import interchange  # noqa: E402
from paxlike.errors import UserError  # noqa: E402
from samplers import ar  # noqa: E402
from samplers.core.logits import SamplingParams  # noqa: E402

TOLERANCE = 1e-4
NEW_TOKENS = 24
_BASE = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             max_position_embeddings=64, initializer_range=0.3, bos_token_id=1, eos_token_id=2)
VARIANTS = {
    # grouped-query attention, untied head, Llama 3.1 rope scaling
    "gqa_untied_llama3": dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=500.0,
                              rms_norm_eps=1e-5, tie_word_embeddings=False,
                              rope_scaling={"rope_type": "llama3", "factor": 4.0,
                                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 16}),
    # tied embeddings, linear rope scaling, head_dim != hidden_size / heads
    "tied_linear_headdim": dict(num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                                rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                                rope_scaling={"rope_type": "linear", "factor": 2.0}),
}


def _hf_model(variant: str):
  torch.manual_seed(0)
  config = transformers.LlamaConfig(**_BASE, **VARIANTS[variant])
  return transformers.LlamaForCausalLM(config).eval()


def _hf_logits(model, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(np.array(tokens), dtype=torch.long)).logits.numpy()


@pytest.fixture(scope="module", params=list(VARIANTS))
def saved(request, tmp_path_factory):
  """(variant, transformers model, its save_pretrained directory)."""
  model = _hf_model(request.param)
  directory = tmp_path_factory.mktemp(request.param)
  model.save_pretrained(directory, safe_serialization=True)
  return request.param, model, directory


def _prompts() -> np.ndarray:
  return np.random.default_rng(0).integers(3, 64, size=(2, 8)).astype(np.int32)


def test_import_matches_transformers_logits_and_greedy(saved):
  variant, hf, directory = saved
  config, params = interchange.load_hf(directory)
  expected = dict(_BASE, **VARIANTS[variant])
  assert (config.num_heads, config.num_kv_heads, config.tie_embeddings) == (
      expected["num_attention_heads"], expected["num_key_value_heads"],
      expected["tie_word_embeddings"])
  assert config.rope_scaling == expected["rope_scaling"]["rope_type"]
  model = CausalLM(config)
  tokens = np.random.default_rng(1).integers(0, 64, size=(2, 40)).astype(np.int32)
  ours = np.asarray(model.logits(params, jnp.asarray(tokens)))
  np.testing.assert_allclose(ours, _hf_logits(hf, tokens), atol=TOLERANCE, rtol=0)

  prompts = _prompts()
  hf.generation_config.eos_token_id = None
  hf.generation_config.pad_token_id = 0
  with torch.no_grad():
    reference = hf.generate(torch.as_tensor(prompts, dtype=torch.long), do_sample=False,
                            max_new_tokens=NEW_TOKENS)
  reference = reference.numpy()[:, prompts.shape[1]:]
  out = ar.sample(model, params, jnp.asarray(prompts), jnp.full([2], prompts.shape[1], jnp.int32),
                  jax.random.key(0), ar.ARConfig(max_new_tokens=NEW_TOKENS,
                                                 sampling=SamplingParams(temperature=0.0)))
  got = np.asarray(out.tokens)
  ties = 0
  for row in np.flatnonzero(np.any(got != reference, axis=1)):
    t = int(np.argmax(got[row] != reference[row]))
    context = np.concatenate([prompts[row], reference[row, :t]])[None]
    best, second = np.sort(_hf_logits(hf, context)[0, -1])[::-1][:2]
    assert best - second < TOLERANCE, (variant, row, t, best - second)
    ties += 1
  assert ties == 0, f"{ties} near-tie(s) parted the greedy continuations"


def test_export_round_trip_is_bit_exact_and_loads_in_transformers(saved, tmp_path):
  variant, hf, directory = saved
  config, params = interchange.load_hf(directory)
  interchange.save_hf(tmp_path, config, params)
  again, params_again = interchange.load_hf(tmp_path)
  assert dataclasses.replace(again, init_from="") == dataclasses.replace(config, init_from="")
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params,
               params_again)
  exported = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
  for name, tensor in hf.state_dict().items():  # same weights, bit for bit
    np.testing.assert_array_equal(exported.state_dict()[name].numpy(), tensor.numpy(), name)
  tokens = np.random.default_rng(2).integers(0, 64, size=(1, 30)).astype(np.int32)
  np.testing.assert_allclose(_hf_logits(exported, tokens), _hf_logits(hf, tokens), atol=1e-6,
                             rtol=0)
  stored = json.loads((tmp_path / "config.json").read_text())
  assert (stored["bos_token_id"], stored["eos_token_id"]) == (1, 2)  # from the source directory


def test_sharded_checkpoint_onto_a_mesh_equals_single_device(tmp_path):
  hf = _hf_model("gqa_untied_llama3")
  hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
  assert (tmp_path / interchange.INDEX).is_file() and len(list(tmp_path.glob("*.safetensors"))) > 1
  config, single = interchange.load_hf(tmp_path)
  mesh = make_mesh(data=2, fsdp=2, tensor=2)
  _, sharded = interchange.load_hf(tmp_path, mesh)
  query = sharded["blocks_0"]["attention"]["query"]["kernel"]
  assert query.sharding.spec[:2] == ("fsdp", "tensor") and len(query.sharding.device_set) == 8
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), single,
               sharded)
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, 64, size=(4, 16)), jnp.int32)
  np.testing.assert_allclose(np.asarray(CausalLM(config).logits(sharded, tokens)),
                             _hf_logits(hf, np.asarray(tokens)), atol=TOLERANCE, rtol=0)


def test_bfloat16_weights_are_read_as_float32(tmp_path):
  hf = _hf_model("tied_linear_headdim").to(torch.bfloat16)
  hf.save_pretrained(tmp_path, safe_serialization=True)
  _, params = interchange.load_hf(tmp_path)
  embedding = params["embed"]["embedding"]
  assert embedding.dtype == jnp.float32
  np.testing.assert_array_equal(
      np.asarray(embedding), hf.state_dict()["model.embed_tokens.weight"].float().numpy())


# ----------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("good")
  _hf_model("gqa_untied_llama3").save_pretrained(directory, safe_serialization=True,
                                                 max_shard_size="20KB")
  return directory


def _copy(good_dir, tmp_path):
  target = tmp_path / "ckpt"
  shutil.copytree(good_dir, target)
  return target


def test_non_llama_architecture_names_config(good_dir, tmp_path):
  directory = _copy(good_dir, tmp_path)
  stored = json.loads((directory / "config.json").read_text())
  stored.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
  (directory / "config.json").write_text(json.dumps(stored))
  with pytest.raises(UserError, match=r"config\.json.*not a Llama model"):
    interchange.load_hf(directory)


def test_missing_shard_names_the_file(good_dir, tmp_path):
  directory = _copy(good_dir, tmp_path)
  shard = sorted(directory.glob("*.safetensors"))[-1]
  shard.unlink()
  with pytest.raises(UserError, match=f"missing: .*{shard.name}"):
    interchange.load_hf(directory)


def test_mismatched_shapes_name_the_file(good_dir, tmp_path):
  directory = _copy(good_dir, tmp_path)
  stored = json.loads((directory / "config.json").read_text())
  stored["intermediate_size"] = 40
  (directory / "config.json").write_text(json.dumps(stored))
  with pytest.raises(UserError, match=r"\.safetensors: tensor model\.layers\.0\.mlp\.\w+_proj"
                     r"\.weight has shape \[48, 32\] but .*config\.json implies \[40, 32\]"):
    interchange.load_hf(directory)


def test_shape_settings_that_disagree_with_config_json_are_refused(good_dir):
  model = ModelConfig(init_from=str(good_dir), d_model=48, max_len=96)
  with pytest.raises(UserError, match=r"model\.d_model=48 \(config\.json: 32\)"):
    interchange.resolve_model(model, explicit=["d_model", "max_len"])
  derived = interchange.resolve_model(model, explicit=["max_len"])  # only what it fixes is taken
  assert (derived.d_model, derived.num_kv_heads, derived.max_len) == (32, 2, 96)


def test_pickle_only_weights_are_refused(good_dir, tmp_path):
  directory = tmp_path / "pickled"
  directory.mkdir()
  shutil.copy(good_dir / "config.json", directory)
  (directory / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
  with pytest.raises(UserError, match=r"pytorch_model\.bin holds pickled weights"):
    interchange.load_hf(directory)


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_json_is_used_when_present(good_dir, tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers
  vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
  hf_tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  hf_tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
  directory = _copy(good_dir, tmp_path)
  config = ModelConfig(vocab_size=64, init_from=str(directory))
  with pytest.raises(UserError, match="tokenizer.json is missing"):
    interchange.text_codec(config)
  hf_tokenizer.save(str(directory / "tokenizer.json"))
  codec = interchange.text_codec(config)
  assert codec.encode("hello world").tolist() == [3, 4]
  assert (codec.start_id, codec.eos_id, codec.decode([3, 4])) == (1, 2, "hello world")
  assert interchange.text_codec(ModelConfig()) is interchange.BYTES


# ----------------------------------------------------------------------------- command line


def _word_model(directory):
  """A tiny HF Llama over a 64-word WordLevel tokenizer.json (ids 1/2 = <s>/</s>)."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(3, 64)]
  hf_tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
  hf_tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
  model = _hf_model("gqa_untied_llama3")
  model.save_pretrained(directory, safe_serialization=True)
  hf_tokenizer.save(str(directory / "tokenizer.json"))
  return model, words


@pytest.mark.slow
@pytest.mark.optimised
def test_cli_sample_finetune_and_export(tmp_path):
  from tests.paxlike import cli
  source = tmp_path / "llama"
  hf, words = _word_model(source)
  prompt = "w5 w17 w9"
  result = cli.run("--exp=tiny", f"--workdir={tmp_path / 'run'}", "--mode=sample",
                   f"--prompt={prompt}", f"--set=model.init_from={source}",
                   "--set=sampler.temperature=0", "--set=sampler.max_new_tokens=12")
  assert result.returncode == 0, result.stderr
  with torch.no_grad():  # the same greedy continuation from transformers (bos, then the prompt)
    ids = torch.tensor([[1, 5, 17, 9]])
    hf.generation_config.eos_token_id = 2
    expected = hf.generate(ids, do_sample=False, max_new_tokens=12, pad_token_id=2)[0, 4:]
  expected = [int(t) for t in expected if t != 2][:12]
  assert f"{prompt}{' '.join(words[t] for t in expected)}\n" in result.stdout, result.stdout

  corpus = tmp_path / "words.txt"
  rng = np.random.default_rng(0)
  corpus.write_text("\n".join(" ".join(rng.choice(words[3:], 30)) for _ in range(60)))
  run_dir = tmp_path / "finetune"
  result = cli.run("--exp=tiny", f"--workdir={run_dir}", f"--set=model.init_from={source}",
                   f"--set=data.path={corpus}", "--set=data.seq_len=16", "--set=train.steps=2",
                   "--set=checkpoint.every_steps=2")
  assert result.returncode == 0, result.stderr
  stored = json.loads((run_dir / "config.json").read_text())["model"]
  assert (stored["vocab_size"], stored["num_kv_heads"], stored["rope_scaling"]) == (64, 2, "llama3")

  out = tmp_path / "exported"
  result = cli.run(f"--workdir={run_dir}", "--mode=export", f"--export_dir={out}")
  assert result.returncode == 0, result.stderr
  assert (out / "tokenizer.json").is_file()
  tuned = transformers.LlamaForCausalLM.from_pretrained(out).eval()
  delta = (tuned.state_dict()["model.embed_tokens.weight"]
           - hf.state_dict()["model.embed_tokens.weight"]).abs().max()
  assert 0 < float(delta) < 1.0  # fine-tuned from the imported weights, not from scratch


# ----------------------------------------------------------------------------- compare-hf


@pytest.mark.slow
def test_compare_hf_rows_on_a_tiny_pair():
  from paxlike.bench import compare_hf_suite
  config = ModelConfig(vocab_size=64, num_layers=3, d_model=32, num_heads=4, num_kv_heads=2,
                       mlp_dim=64, max_len=64, tie_embeddings=False, init_std=0.3)
  rows = compare_hf_suite.measure("tiny", config, batches=(1,), new_tokens=8, gamma=2,
                                  draft_layers=1, damping=0.05, repeats=1, threads=1)
  assert [(r["system"], r["method"]) for r in rows] == [
      ("hf", "ar"), ("hf", "speculative"), ("paxlike", "ar"), ("paxlike", "speculative")]
  for row in rows:
    assert row["greedy_equal"] and row["near_ties"] == 0 and row["tokens_per_s"] > 0, row
  assert all(r["ratio_vs_hf"] > 0 for r in rows if r["system"] == "paxlike")
  assert 0 <= rows[3]["acceptance"] <= 1


@pytest.mark.slow
def test_compare_hf_train_rows_take_the_same_steps():
  """PyTorch and paxlike train the same weights on the same batches: their losses agree step by
  step, and both rows report a rate; the matmul floor's row is timed and compared to PyTorch."""
  from paxlike.bench import compare_hf_train
  config = ModelConfig(vocab_size=64, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2,
                       mlp_dim=64, max_len=32, tie_embeddings=False, init_std=0.3)
  rows = compare_hf_train.measure("tiny", config, batch=2, seq_len=16, steps=3, warmup=1,
                                  threads=1)
  assert [(r["system"], r["method"]) for r in rows] == [
      ("hf", "train"), ("paxlike", "train"), ("matmuls only", "train")]
  for row in rows[:2]:
    assert row["tokens_per_s"] > 0 and row["max_loss_diff"] < 1e-3, row
  assert rows[1]["ratio_vs_hf"] > 0 and rows[2]["ratio_vs_hf"] > 0
  assert rows[2]["final_loss"] is None and rows[2]["step_s"] > 0
  assert rows[2]["matmul_gflop"] > 0 and "matmul_gflop" not in rows[0]
  assert rows[0]["final_loss"] == pytest.approx(rows[1]["final_loss"], abs=1e-3)

"""Models: pure functional Flax linen modules and the small objects samplers call.

- `config`: the model section of an experiment (shared shape plus per-family sections).
- `build`: `build_model(config)`, the one map from `config.kind` to a model class.
- `base`: what every model object built on the Llama decoder shares (init, loss, shardings).
- `llama`: the Llama decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU) with its
  training forward, prefill and cached decode.
- `attention`: attention math (rotary embeddings, dense and cached attention, the choice of
  sequence-parallel variant).
- `kv_cache`: the per-layer key/value cache with per-row write pointers, rollback, compaction.
- `causal_lm`: `CausalLM`, the decoder behind the causal model protocol of `samplers`.
- `acceptance_head`: a draft with a SpecDec++ acceptance head.
- `medusa`: a target with Medusa heads that draft several tokens ahead.
- `parscale`: ParScale's parallel streams of one decoder.
- `diffusion`, `noise_schedule`: masked-diffusion denoisers (MDLM) and their schedules.
- `asarm`: any-subset autoregressive models (for ASSD).
- `learn2pd`: a denoiser with a learned finality head (Learn2PD).
- `conditioning`: prompt -> response training of the diffusion-style models.
- `losses`: per-token losses shared by the families.
- `hf_llama`: Hugging Face Llama config and weight names/layouts.
"""

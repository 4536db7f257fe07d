"""The `decode` suite: every sampler against the compiled KV-cache AR sampler on the same target.

Trains (or loads from `--workdir`) the `pair_target` / `pair_draft` experiments — the draft
distilled from the target on the target's own continuations (`paxlike.teacher_text`, greedy and
T = 1, written once into the target's cache) — then decodes the same prompts at batch 1 and 8,
greedy and at temperature 1, and reports tokens/s, speedup over AR, tokens per target call and
acceptance. Each sampler is timed interleaved with AR: `repeats` back-to-back (AR, sampler) pairs
after a warm-up; `speedup_vs_ar` is the median of the pairs' time ratios (`speedup_range` their
min and max), which background load on a shared machine barely moves, and `tokens_per_s` the
median of the sampler's own runs (AR's over all its pairs).
Greedy rows compare their tokens with AR's from the same run (positions after a near-tie of the
target's top-two logits, < 1e-4, are counted rather than failed). Adaptive draft length runs
with both stopping rules, the head rule on `pair_draft_head` (the draft plus an acceptance head,
trained and cached like the pair), and reports its draft calls against the fixed-length
speculative row of the same batch and temperature. Medusa decodes the target with 4 heads
(`pair_medusa`) and EAGLE with its feature-level draft head (`pair_eagle`): the target's weights
frozen, the heads trained on the same continuations as the draft, cached likewise; EAGLE runs as
its default chain of 4 drafts, a chain of 9 and EAGLE-2's dynamic tree (`EAGLE_SHAPES`). The exact
diffusion-drafted decoder drafts with `pair_mdlm`, a masked-diffusion model trained on the same
continuations, cached likewise. Jacobi decoding also runs on `pair_cllm`, the target fine-tuned on
the same continuations by CLLM's consistency objective (`models.consistency`), a second `jacobi`
row with `model` "pair_cllm": its `greedy_equal_ar` compares with that model's own greedy AR (the
decoder's guarantee) and
`equal_to_target` counts the rows equal to the target's greedy AR (what the fine-tuning kept).
Every row names its `text`: "held_out" prompts, or for the draft-free kinds (prompt lookup,
lookahead) also "repeating" ones, which end with the target's own greedy continuation
(`repeating`), the text those kinds are for, and its `setting`: the kind's own settings.
"""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from paxlike import config as config_lib
from paxlike import generate, registry, teacher_text, tokenizer
from paxlike.bench import harness
from paxlike.data import load_corpus
from paxlike.errors import UserError
from paxlike.run import Run
from samplers import registry as sampler_registry

NEAR_TIE = 1e-4

SAMPLERS = ("speculative", "spectr", "tree", "dynamic_tree", "adaptive", "jacobi", "medusa",
            "eagle", "prompt_lookup", "lookahead", "diffusion_drafted")
HEADED = ("medusa", "eagle")  # the kinds that decode the target with its draft heads (pair_KIND)
DRAFT_FREE = ("prompt_lookup", "lookahead")  # the kinds also measured on repeating text
TEXTS = ("held_out", "repeating")
REPEAT_TOKENS = 64  # the target's own greedy tokens appended to a "repeating" prompt
ADAPTIVE_RULES = ("confidence", "head")  # one "adaptive" row each, after "speculative"
GREEDY_ONLY = ("jacobi", "eagle/tree")  # kinds (or kind/rule rows) without a T = 1 row
# EAGLE's rows besides the default chain of 4: a longer chain, and EAGLE-2's dynamic tree (greedy
# only: its point-mass drafts are exact at T = 1 but rarely accepted). Chosen by a sweep on the
# bench's own prompts (docs/drafting.md).
EAGLE_SHAPES = {"long_chain": {"num_draft_tokens": 9},
                "tree": {"num_draft_tokens": 5, "tree_nodes": 6, "tree_children": 2}}
CONSISTENCY = "pair_cllm"  # the target fine-tuned for Jacobi decoding (`jacobi`'s second row)
NUM_DRAFT_TOKENS = 6  # gamma of the fixed-length drafted samplers (and adaptive's most)


def variant(cfg, kind: str, rule: str | None):
  """The sampler section of one bench row: `cfg`'s shared settings, kind's defaults, gamma (and
  adaptive's stopping `rule`, or the EAGLE draft shape named by `rule`, `EAGLE_SHAPES`)."""
  extra = {"num_draft_tokens": NUM_DRAFT_TOKENS} if kind in ("speculative", "spectr",
                                                             "adaptive") else {}
  if kind == "eagle":
    extra, rule = EAGLE_SHAPES.get(rule, {}), None
  return dataclasses.replace(cfg, kind=kind, **extra, **({"rule": rule} if rule else {}))


def setting(sampler) -> str:
  """A row's `setting`: every one of the kind's own settings in order, e.g. "num_draft_tokens=9,
  confidence_threshold=0.0, tree_nodes=0, tree_children=0"."""
  return ", ".join(f"{name}={value}"
                   for name, value in dataclasses.asdict(sampler.options()).items())


def trained(name: str, workdir: Path, overrides: list[str] = ()) -> Run:
  """The registered experiment `name` with `overrides`, trained in `workdir` unless cached."""
  return harness.trained(config_lib.apply_overrides(registry.get(name), list(overrides)), workdir)


def shortened(steps: int) -> list[str]:
  """The overrides that cut an experiment's training to `steps` (0: as registered)."""
  return [f"train.steps={steps}", f"checkpoint.every_steps={steps}"] if steps else []


def drafting_on_target(root: Path, small: bool = False) -> list[str]:
  """The overrides that train a drafter on the trained `pair_target`'s own continuations (greedy
  and T = 1, written once into its cache; `small`: a few short ones, for smoke runs)."""
  continuations = root / "pair_target" / "teacher_text.txt"
  if not continuations.exists():
    print(f"writing the target's continuations to {continuations} (cached for later runs)",
          flush=True)
    teacher_text.write(root / "pair_target", continuations,
                       **(dict(prompts=16, new_tokens=64) if small else {}))
  return [f"train.teacher_workdir={root / 'pair_target'}", f"data.path={continuations}"]


def near_ties(model, params, prompt: np.ndarray, tokens: np.ndarray) -> int:
  """Greedy steps whose top-two target logits differ by less than NEAR_TIE (equal-length prompts)."""
  sequence = jnp.asarray(np.concatenate([prompt, tokens], axis=1))
  logits = jax.jit(model.logits)(params, sequence)[:, prompt.shape[1] - 1:-1]
  top2 = jax.lax.top_k(logits, 2)[0]
  return int(jnp.sum(top2[..., 0] - top2[..., 1] < NEAR_TIE))


def prompts(batch: int, length: int = 32) -> tuple[np.ndarray, np.ndarray]:
  """`batch` held-out tinyshakespeare snippets of `length` bytes as token prompts."""
  held_out = load_corpus(registry.get("pair_target").data).held_out
  starts = np.linspace(0, len(held_out) - length - 1, batch).astype(int)
  rows = [np.concatenate([[tokenizer.EOS_ID], held_out[s:s + length]]) for s in starts]
  return np.stack(rows).astype(np.int32), np.full([batch], length + 1, np.int32)


def repeating(model, params, cfg, prompt: np.ndarray,
              lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The "repeating" prompts: each held-out prompt followed by the target's own greedy
  continuation of REPEAT_TOKENS tokens. Greedy decoding of a small model falls into loops, so
  what follows such a prompt largely repeats text the prompt holds (the case prompt lookup and
  lookahead are for; on real workloads: code edits, quoted passages, retrieved documents)."""
  config = dataclasses.replace(cfg, kind="ar", temperature=0.0, max_new_tokens=REPEAT_TOKENS)
  decoder = generate.CompiledDecoder(model, params, prompt, lengths, config)
  continuation = decoder.result(decoder.run(), 1.0)[0]
  return np.concatenate([prompt, continuation], axis=1).astype(np.int32), lengths + REPEAT_TOKENS


def run(workdir: str | None, out: str | None, max_new_tokens: int = 96,
        batches: tuple[int, ...] = (1, 8), repeats: int = 9,
        train_steps: tuple[int, int] | None = None,
        target_overrides: tuple[str, ...] = (),
        draft_overrides: tuple[str, ...] = (),
        samplers: tuple[str, ...] = SAMPLERS) -> dict[str, Any]:
  """Runs the suite for `samplers` (a subset of SAMPLERS, each beside AR); `train_steps`
  (target, draft) shortens training and `target_overrides` / `draft_overrides` (`--set`-style,
  e.g. a smaller model.d_model) reshape the target / the draft and its head (tests, smoke
  runs). Only the models the chosen samplers need are trained."""
  unknown = sorted(set(samplers) - set(SAMPLERS))
  if unknown:
    raise UserError(f"--samplers: {', '.join(unknown)} not in the decode suite; valid: "
                    f"{', '.join(SAMPLERS)}")
  registry.load_modules()
  root = Path(workdir or Path.home() / ".cache" / "paxlike" / "bench").expanduser()
  target_steps, draft_steps = train_steps or (0, 0)
  target = trained("pair_target", root / "pair_target",
                   [*shortened(target_steps), *target_overrides])
  if "adaptive" in samplers:  # its rows report draft calls saved against speculative's
    samplers = ("speculative", *samplers)
  on_target = drafting_on_target(root, small=bool(train_steps))
  continuations = root / "pair_target" / "teacher_text.txt"
  drafts = {}
  if any(sampler_registry.get(kind).second_model == "draft" for kind in samplers):
    draft = trained("pair_draft", root / "pair_draft",
                    [*on_target, *shortened(draft_steps), *draft_overrides])
    head = trained("pair_draft_head", root / "pair_draft_head",
                   [f"train.init_from={root / 'pair_draft'}", *on_target, *shortened(draft_steps),
                    *draft_overrides])
    drafts = {"confidence": draft.restore()[:2], "head": head.restore()[:2],
              "config": config_lib.to_dict(draft.exp.model)}
  headed = {kind: trained(f"pair_{kind}", root / f"pair_{kind}",
                          [f"train.init_from={root / 'pair_target'}",
                           f"data.path={continuations}",
                           *shortened(draft_steps), *target_overrides]).restore()[:2]
            for kind in HEADED if kind in samplers}
  if "diffusion_drafted" in samplers:  # a masked-diffusion drafter of the same continuations
    drafts["denoiser"] = trained("pair_mdlm", root / "pair_mdlm", [
        f"data.path={continuations}", *shortened(draft_steps), *draft_overrides]).restore()[:2]
  if "jacobi" in samplers:
    headed[CONSISTENCY] = trained(CONSISTENCY, root / CONSISTENCY, [
        f"train.init_from={root / 'pair_target'}", f"train.teacher_workdir={root / 'pair_target'}",
        f"data.path={continuations}", *shortened(draft_steps), *target_overrides]).restore()[:2]
  target_model, target_params, _ = target.restore()
  base = dataclasses.replace(target.exp.sampler, max_new_tokens=max_new_tokens, top_p=1.0, top_k=0)
  rules = {"adaptive": ADAPTIVE_RULES, "eagle": (None, *EAGLE_SHAPES)}
  variants = [(kind, rule) for kind in SAMPLERS if kind in samplers
              for rule in rules.get(kind, (None,))]
  variants += [("jacobi", CONSISTENCY)] if "jacobi" in samplers else []
  rows = []
  texts = TEXTS if set(samplers) & set(DRAFT_FREE) else TEXTS[:1]
  for batch, text in [(batch, text) for batch in batches for text in texts]:
    prompt, lengths = prompts(batch)
    if text == "repeating":
      prompt, lengths = repeating(target_model, target_params, base, prompt, lengths)
    for temperature in (0.0, 1.0):
      cfg = dataclasses.replace(base, temperature=temperature)
      def compiled(c, *draft, model_name=None):  # medusa and eagle: the target with its heads
        model = headed.get(model_name or c.kind, (target_model, target_params))
        return generate.CompiledDecoder(*model, prompt, lengths, c, *draft)
      ar = compiled(dataclasses.replace(cfg, kind="ar"))
      ar_out = ar.run()  # warm-up; every run of a sampler is the same (same key)
      ar_tokens = ar.result(ar_out, 1.0)[0]
      ties = near_ties(target_model, target_params, prompt, ar_tokens) if temperature == 0 else None
      group, ar_times = [], []
      for kind, rule in variants:
        greedy_only = kind in GREEDY_ONLY or f"{kind}/{rule}" in GREEDY_ONLY
        if (temperature and greedy_only) or (text != TEXTS[0] and kind not in DRAFT_FREE):
          continue
        model_name = rule if rule == CONSISTENCY else None
        sampler = variant(cfg, kind, None if model_name else rule)
        second = (drafts["denoiser"] if kind == "diffusion_drafted" else
                  drafts[rule or "confidence"] if sampler.spec.second_model else ())
        decoder = compiled(sampler, *second, model_name=model_name)
        first = decoder.run()
        (ar_t, variant_t), _ = harness.interleaved_times([ar.run, decoder.run], repeats)
        ar_times += ar_t
        tokens, _, stats = decoder.result(first, statistics.median(variant_t))
        row = _row(stats, temperature, [a / v for a, v in zip(ar_t, variant_t)]) | {
            "near_ties": ties, "text": text, "setting": setting(sampler)}
        if kind == "speculative":
          fixed = stats
        if kind == "adaptive":  # draft calls saved against fixed-length speculative, this run
          row |= {"adaptive_rule": rule, "mean_draft_length": stats["mean_draft_length"],
                  "draft_calls_saved": fixed["draft_calls"] - stats["draft_calls"],
                  "target_calls_added": stats["target_calls"] - fixed["target_calls"]}
        if temperature == 0.0:
          own = ar_tokens
          if model_name:  # its own greedy AR, and how many rows still equal the target's
            own_ar = compiled(dataclasses.replace(cfg, kind="ar"), model_name=model_name)
            own = own_ar.result(own_ar.run(), 1.0)[0]
            row |= {"model": model_name, "equal_to_target": int(np.sum(np.all(
                tokens == ar_tokens, axis=1))), "rows": len(tokens)}
          row["greedy_equal_ar"] = bool(np.array_equal(tokens, own))
          row["mismatched_rows"] = int(np.sum(np.any(tokens != own, axis=1)))
        group.append(row)
      if not group:  # every chosen kind is greedy only (or only for the other text)
        continue
      ar_stats = ar.result(ar_out, statistics.median(ar_times))[2]
      rows += [_row(ar_stats, temperature, [1.0]) | {"near_ties": ties, "text": text,
                                                      "setting": ""}, *group]
  harness.print_table(rows, ["sampler", "setting", "model", "text", "batch", "temperature",
                             "tokens_per_s",
                             "speedup_vs_ar", "tokens_per_target_call", "acceptance",
                             "draft_calls", "draft_calls_saved", "greedy_equal_ar"])
  config = {"target": config_lib.to_dict(target.exp.model), "draft": drafts.get("config"),
            "max_new_tokens": max_new_tokens, "repeats": repeats,
            "draft_data": str(continuations),
            "samplers": {
                f"{kind}/{rule}" if rule else kind:
                config_lib.to_dict(variant(base, kind, None if rule == CONSISTENCY else rule))
                for kind, rule in variants}}
  return harness.write_report(out, "decode", config, rows)


def _row(stats: dict[str, Any], temperature: float, ratios: list[float]) -> dict[str, Any]:
  """A table row; `ratios` are AR's wall time over this sampler's, one per interleaved pair."""
  return {
      "sampler": stats["sampler"], "batch": stats["batch"], "temperature": temperature,
      "tokens_per_s": stats["tokens_per_s"],
      "speedup_vs_ar": round(statistics.median(ratios), 3),
      "speedup_range": [round(min(ratios), 3), round(max(ratios), 3)],
      "tokens_per_target_call": stats.get("tokens_per_target_call", 1.0),
      "acceptance": stats.get("acceptance"), "target_calls": stats.get("target_calls",
                                                                       stats["model_calls"]),
      "draft_calls": stats.get("draft_calls", 0), "wall_s": stats["wall_s"],
      "compile_s": stats["compile_s"], "greedy_equal_ar": True if stats["sampler"] == "ar" else None,
      "near_ties": None,
  }

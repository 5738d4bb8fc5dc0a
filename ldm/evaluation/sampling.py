"""DDIM sampling with classifier-free guidance and per-image seeds, shared by the scripts."""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ldm.data.captions import (
    LEVEL_NAMES,
    caption_from_levels,
    class_label_from_levels,
    conditioning_batch,
    level_name,
    levels_from_caption,
    prob_to_level,
)
from ldm.evaluation.images import SplitStore, to_uint8

logger = logging.getLogger(__name__)

# (tumor, til) level pairs in class-label order: 0 low/low, 1 low/high, 2 high/low, 3 high/high
TUMOR_TIL_COMBINATIONS: tuple[tuple[str, str], ...] = tuple(
    (tumor, til) for tumor in LEVEL_NAMES[2] for til in LEVEL_NAMES[2])
# How FID prompts are drawn. uniform: the paper's protocol ("we randomly sample classes ...
# randomly select summaries from the training set"): a tumor/TIL combination uniformly, a slide
# uniformly, one of its summaries uniformly. data: a random real patch's levels and one summary
# of its slide, i.e. the data's distribution (slides weighted by their patch counts).
PROMPT_SAMPLINGS = ("uniform", "data")



def tumor_til_conditions(kind: str, summary: str | None = None) -> list[tuple[str, str | int]]:
    """``(row label, condition)`` of the four tumor/TIL combinations in class-label order.

    Text models get the training caption of each combination with ``summary``; class models
    the class label (the summary plays no part).
    """
    if kind not in ("text", "class"):
        raise ValueError(f"the tumor/TIL combinations need a text or class model, not {kind!r}")
    if kind == "text" and not (summary or "").strip():
        raise ValueError("a text model needs a slide summary for the tumor/TIL combinations")
    rows: list[tuple[str, str | int]] = []
    for tumor, til in TUMOR_TIL_COMBINATIONS:
        label = f"{tumor} tumor, {til} TIL"
        rows.append((label, caption_from_levels(tumor, til, summary) if kind == "text"
                     else class_label_from_levels(tumor, til)))
    return rows


def image_seed(seed: int, index: int) -> int:
    """Seed of image ``index`` of a run seeded with ``seed``; independent of batching."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def initial_noise(seeds: Sequence[int], shape: Sequence[int],
                  device: torch.device | str) -> torch.Tensor:
    """``x_T`` with one CPU generator per image, so a seed gives the same noise on any device."""
    noise = [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s)))
             for s in seeds]
    return torch.stack(noise).to(device)


def conditioning_kind(model: Any) -> str:
    """What a model's conditions are written as: ``"class"`` (it reads only class labels),
    ``"text"`` (captions; levels and summary are parsed from them) or ``"none"``."""
    fields = set(model.conditioning_fields())
    if not fields:
        return "none"
    return "class" if fields <= {"class_label"} else "text"


def count_tokens(model: Any, prompt: str) -> int | None:
    """Tokens of ``prompt`` including BOS and EOS for the model's text encoder (None if none)."""
    stage = getattr(model, "cond_stage_model", None)
    if callable(getattr(stage, "text_token_ids", None)):
        return len(stage.text_token_ids([prompt])[0]) + 2
    tokenizer = getattr(stage, "tokenizer", None)
    if tokenizer is None:
        return None
    return len(tokenizer(prompt)["input_ids"])


def warn_long_prompts(model: Any, prompts: Sequence[str]) -> int:
    """Log a warning for each distinct prompt longer than the encoder's context; returns count."""
    max_length = int(getattr(getattr(model, "cond_stage_model", None), "max_length", 154))
    too_long = 0
    for prompt in dict.fromkeys(prompts):
        n = count_tokens(model, prompt)
        if n is not None and n > max_length:
            too_long += 1
            logger.warning("prompt has %d tokens, more than the %d the text encoder reads; the "
                           "rest is truncated: %.80s...", n, max_length, prompt)
    return too_long


# Which batch fields each separately guided conditioning covers (sample.py --guidance-levels,
# --guidance-text), in the order the guidance adds them.
GUIDANCE_GROUPS = {"levels": ("class_label",), "text": ("summary", "caption")}


def guidance_chain(model: Any, batch: dict[str, Any], scales: Sequence[tuple[str, float]]
                   ) -> tuple[Any, list[tuple[Any, float]]]:
    """Unconditional conditioning and ``[(cond_k, s_k)]`` for guidance one group at a time.

    ``scales`` names groups of :data:`GUIDANCE_GROUPS` in order, e.g. ``[("levels", s_l),
    ("text", s_t)]`` gives ``e = e_uu + s_l (e_lu - e_uu) + s_t (e_lt - e_lu)``, where ``e_lu``
    sees the levels and not the text. Needs a model with a Conditioner that reads each group.
    """
    fields = model.conditioning_fields()
    groups = []
    for name, _ in scales:
        if name not in GUIDANCE_GROUPS:
            raise ValueError(f"unknown guidance group {name!r}; use {sorted(GUIDANCE_GROUPS)}")
        group = [f for f in GUIDANCE_GROUPS[name] if f in fields]
        if not group:
            raise ValueError(f"separate {name} guidance: the model reads no {name} field "
                             f"(it reads {fields})")
        groups.append(group)
    conds = [model.get_conditioning(batch, uncond_keys=[f for g in groups[k:] for f in g])
             for k in range(len(groups) + 1)]
    return conds[0], [(c, float(s)) for c, (_, s) in zip(conds[1:], scales)]


def class_of(cond: str | int) -> int:
    """Class label of a class-conditional model from a label or a training-format caption."""
    if isinstance(cond, int):
        return cond
    levels = levels_from_caption(cond)
    if levels is None:
        raise ValueError(f"cannot derive a class label from {cond!r}; give --class-label or "
                         "tumor/TIL levels")
    return class_label_from_levels(*levels)


@torch.no_grad()
def sample_batch(model: Any, sampler: Any, conds: Sequence[Any], seeds: Sequence[int],
                 steps: int = 50, scale: float = 1.75, eta: float = 0.0,
                 callback: Callable[[int], None] | None = None,
                 guidance: Sequence[tuple[str, float]] | None = None) -> np.ndarray:
    """Generate one image per ``(cond, seed)`` with DDIM; uint8 ``(B, H, W, 3)``.

    Conditions are captions, class labels or records
    (:func:`ldm.data.captions.conditioning_batch`).

    ``callback(i)`` is called after DDIM step ``i`` (0-based), e.g. to report progress.
    ``guidance`` (e.g. ``[("levels", 2.0), ("text", 1.5)]``) guides each conditioning with its
    own scale (:func:`guidance_chain`) instead of the joint ``scale``.

    With ``eta = 0`` each image depends only on its seed; with ``eta > 0`` the sampler's extra
    noise is seeded from the batch's first seed, so results then also depend on batching.
    """
    if len(conds) != len(seeds):
        raise ValueError(f"{len(conds)} conditions for {len(seeds)} seeds")
    b = len(seeds)
    shape = (model.channels, model.image_size, model.image_size)
    x_t = initial_noise(seeds, shape, model.device)
    batch = conditioning_batch(conds)
    c = model.get_conditioning(batch)
    uc = model.get_unconditional_conditioning(b) if c is not None and scale != 1.0 else None
    chain = None
    if guidance:
        uc, chain = guidance_chain(model, batch, guidance)
    torch.manual_seed(int(seeds[0]))
    samples, _ = sampler.sample(S=steps, batch_size=b, shape=shape, conditioning=c, eta=eta,
                                unconditional_guidance_scale=scale,
                                unconditional_conditioning=uc, x_T=x_t, verbose=False,
                                callback=callback, guidance_chain=chain)
    return to_uint8(model.decode_first_stage(samples))


def check_steps(model: Any, steps: int) -> None:
    """DDIM needs 1 <= ``steps`` <= the model's diffusion timesteps (one-line error otherwise)."""
    total = int(getattr(model, "num_timesteps", 0) or 0)
    if total and not 1 <= steps <= total:
        raise ValueError(f"--steps {steps}: the model has {total} diffusion timesteps, so DDIM "
                         f"takes 1 to {total} steps")


def make_sampler(model: Any) -> Any:
    """A ``DDIMSampler`` for ``model``."""
    from ldm.models.diffusion.ddim import DDIMSampler

    return DDIMSampler(model)


def generate_to_folder(model: Any, items: Sequence[dict[str, Any]], batch_size: int,
                       steps: int, scale: float, eta: float, desc: str = "sampling",
                       callback: Callable[[int], None] | None = None,
                       guidance: Sequence[tuple[str, float]] | None = None) -> int:
    """Write one PNG per item (``{"path", "cond", "seed"}``), skipping existing files.

    Returns how many images were generated; files appear atomically, so an interrupted run
    resumes where it stopped.
    """
    from tqdm import tqdm

    from ldm.atomic import remove_stale_tmp
    from ldm.evaluation.images import save_png

    todo = [it for it in items if not Path(it["path"]).exists()]
    remove_stale_tmp(it["path"] for it in todo)
    if len(todo) < len(items):
        logger.info("%d of %d images exist already; generating %d", len(items) - len(todo),
                    len(items), len(todo))
    if not todo:
        return 0
    sampler = make_sampler(model)
    with tqdm(total=len(todo), desc=desc, unit="img") as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            images = sample_batch(model, sampler, [it["cond"] for it in batch],
                                  [it["seed"] for it in batch], steps=steps, scale=scale, eta=eta,
                                  callback=callback, guidance=guidance)
            for it, img in zip(batch, images):
                save_png(img, it["path"], clean_stale=False)
            bar.update(len(batch))
    return len(todo)


def caption_plan(store: SplitStore, n: int, seed: int = 0, sampling: str = "uniform",
                 start: int = 0) -> list[dict[str, Any]]:
    """Conditions of ``n`` samples drawn from a split store, one seeded draw per index.

    ``sampling`` (``PROMPT_SAMPLINGS``): ``uniform`` draws the tumor/TIL combination (hence the
    class label) uniformly and a summary from a slide drawn uniformly over the store's slides
    with a summary; ``data`` takes a real patch (with known tumor/TIL probabilities) and one of
    its slide's summaries. The draw of index ``i`` depends only on ``(seed, i)``, so plans of
    different ``n`` share their prefix, and ``start`` gives indices ``start .. start + n - 1``
    of the same plan (a block of a large run).
    """
    if sampling not in PROMPT_SAMPLINGS:
        raise ValueError(f"prompt sampling must be one of {PROMPT_SAMPLINGS}, got {sampling!r}")
    summaries = store.slide_summaries()
    slides = store.array("slides")
    draw = _uniform_draw(summaries, store) if sampling == "uniform" else _data_draw(summaries,
                                                                                    store)
    plan = []
    for i in range(start, start + n):
        rng = np.random.default_rng([seed, i])
        tumor_level, til_level, s, patch = draw(rng)
        k = int(rng.integers(len(summaries[s])))
        plan.append({"index": i, "caption": caption_from_levels(tumor_level, til_level,
                                                                summaries[s][k]),
                     "tumor": tumor_level, "til": til_level,
                     "class_label": class_label_from_levels(tumor_level, til_level),
                     "patch_index": patch, "slide": str(slides[s]), "slide_index": s,
                     "summary_index": k, "summary": summaries[s][k],
                     "seed": image_seed(seed, i)})
    return plan


def plan_condition(record: dict[str, Any]) -> dict[str, Any]:
    """The conditioning fields of a :func:`caption_plan` record (every model reads its own)."""
    return {k: record[k] for k in ("caption", "class_label", "summary") if k in record}


def _uniform_draw(summaries: list[list[str]], store: SplitStore) -> Any:
    """``rng -> (tumor, til, slide, None)``: a uniform combination and a uniform slide."""
    with_summary = [s for s, texts in enumerate(summaries) if texts]
    if not with_summary:
        raise ValueError(f"{store.path}: no slide has a summary")

    def draw(rng: np.random.Generator) -> tuple[str, str, int, None]:
        tumor, til = TUMOR_TIL_COMBINATIONS[int(rng.integers(len(TUMOR_TIL_COMBINATIONS)))]
        return tumor, til, with_summary[int(rng.integers(len(with_summary)))], None

    return draw


def _data_draw(summaries: list[list[str]], store: SplitStore) -> Any:
    """``rng -> (tumor, til, slide, patch)``: a random real patch's levels and its slide."""
    tumor, til = store.array("tumor_prob"), store.array("til_prob")
    slide_index = store.array("slide_index")
    valid = np.flatnonzero(np.isfinite(tumor) & np.isfinite(til)
                           & np.array([len(summaries[s]) > 0 for s in slide_index], dtype=bool))
    if len(valid) == 0:
        raise ValueError(f"{store.path}: no patch has tumor/TIL probabilities and a summary")

    def draw(rng: np.random.Generator) -> tuple[str, str, int, int]:
        j = int(valid[rng.integers(len(valid))])
        return (level_name(prob_to_level(tumor[j])), level_name(prob_to_level(til[j])),
                int(slide_index[j]), j)

    return draw

"""The model card (``README.md`` with Hugging Face metadata) of an exported folder."""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)

CITATION = """@inproceedings{yellapragada2024pathldm,
  title     = {PathLDM: Text conditioned Latent Diffusion Model for Histopathology},
  author    = {Yellapragada, Srikar and Graikos, Alexandros and Prasanna, Prateek and
               Kurc, Tahsin and Saltz, Joel and Samaras, Dimitris},
  booktitle = {Proceedings of the IEEE/CVF Winter Conference on Applications of Computer
               Vision (WACV)},
  year      = {2024}
}"""
EVAL_GLOB_DEPTH = 3  # how deep under a run directory evaluation JSONs are looked for


@dataclass
class CardInfo:
    """Everything the card states."""

    config: Mapping[str, Any]
    conditioning: str  # "text" or "class"
    info: Mapping[str, Any]  # pathldm_export.json
    license: str = "other"
    repo_id: str | None = None
    dataset_card: Path | None = None
    eval_results: Sequence[Mapping[str, Any]] = field(default_factory=list)
    guidance_scale: float = 1.75


def find_dataset_card(config: Mapping[str, Any]) -> Path | None:
    """``dataset_card.md`` next to the training store named by the config, if it exists."""
    train = (config.get("data", {}).get("params", {}).get("train") or {})
    path = train.get("path") if isinstance(train, Mapping) else None
    if not path:
        return None
    card = Path(path).parent / "dataset_card.md"
    return card if card.is_file() else None


def read_eval_results(path: Path) -> dict[str, Any] | None:
    """Evaluation results or None: ``scripts/fid.py``'s JSON (``{"results": [{"fid": ...}]}``,
    kind ``fid``) or ``scripts/evaluate.py``'s ``results.json`` (``protocol`` and ``metrics``,
    kind ``evaluate``)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, Mapping):
        return None
    if isinstance(data.get("metrics"), Mapping) and isinstance(data.get("protocol"), Mapping) \
            and isinstance(data.get("sample_sets"), Mapping):
        return {"file": path.name, "kind": "evaluate", **data}
    rows = data.get("results")
    if not isinstance(rows, list) or not rows or not all(
            isinstance(r, Mapping) and "fid" in r for r in rows):
        return None
    return {"file": path.name, "kind": "fid", **data}


def find_eval_results(run_dir: Path) -> list[dict[str, Any]]:
    """Every evaluation results JSON under a run directory (a few levels deep)."""
    found = []
    for depth in range(EVAL_GLOB_DEPTH + 1):
        for path in sorted(run_dir.glob("/".join(["*"] * depth + ["*.json"]))):
            result = read_eval_results(path)
            if result is not None:
                found.append(result)
    return found


def _fmt(value: Any, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _fid_results(res: Mapping[str, Any]) -> list[str]:
    parts = [f"From `{res['file']}` (scripts/fid.py): Inception features of "
             f"{res.get('dims', 2048)} dimensions against the reference "
             f"`{Path(str(res.get('reference'))).name}`, prompts sampled "
             f"`{res.get('prompt_sampling')}`.\n",
             "| samples | prompts | guidance scale | n | FID | KID x1e3 |\n"
             "|---|---|---|---|---|---|"]
    for r in res["results"]:
        kid = ("" if r.get("kid") is None
               else f"{1e3 * r['kid']:.3f} ± {1e3 * r.get('kid_std', 0.0):.3f}")
        parts.append(f"| {Path(str(r.get('samples'))).name} | {r.get('split') or ''} | "
                     f"{_fmt(r.get('scale'), 'g')} | {r.get('n', '')} | "
                     f"{_fmt(r.get('fid'), '.3f')} | {kid} |")
    return parts


def _evaluate_results(res: Mapping[str, Any]) -> list[str]:
    from ldm.evaluation.report import metrics_table

    protocol = json.dumps(res["protocol"], indent=1, sort_keys=True, default=str)
    return [f"From `{res['file']}` (scripts/evaluate.py), overall metrics per sample set:\n",
            "```\n" + metrics_table(dict(res)) + "\n```\n",
            "<details><summary>Protocol</summary>\n\n```json\n" + protocol
            + "\n```\n</details>"]


def _eval_section(results: Sequence[Mapping[str, Any]]) -> str:
    if not results:
        return ("No evaluation results were found in the run directory. Compute FID/KID with "
                "`python scripts/fid.py` or `python scripts/evaluate.py` (see the project's "
                "README) and export again, or pass `--eval`.\n")
    parts = []
    for res in results:
        parts += _evaluate_results(res) if res.get("kind") == "evaluate" else _fid_results(res)
        parts.append("")
    return "\n".join(parts) + "\n"


def usage_snippet(card: CardInfo) -> str:
    """Three lines that sample the folder (``.``) or the hub repository."""
    from ldm.data.captions import caption_from_levels

    source = card.repo_id or "."
    call = (f'pipe("{caption_from_levels("high", "low", "invasive ductal carcinoma, grade 2")}")'
            if card.conditioning == "text" else "pipe(class_labels=[2])")
    return ("from diffusers import DiffusionPipeline\n"
            f'pipe = DiffusionPipeline.from_pretrained("{source}", trust_remote_code=True)\n'
            f'{call}.images[0].save("sample.png")\n')


def _header(card: CardInfo) -> str:
    meta = {"license": card.license, "library_name": "diffusers",
            "pipeline_tag": "text-to-image" if card.conditioning == "text" else
            "unconditional-image-generation",
            "tags": ["pathology", "histopathology", "latent-diffusion", "pathldm"]}
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def _model_section(card: CardInfo) -> str:
    info = card.info
    cond = ("a caption `\"<tumor> tumor; <til> til; <report summary>\"` (levels `low`/`high`) "
            "encoded as 154 tokens by the CLIP/PLIP text tower"
            if card.conditioning == "text" else
            "a class label: 0 low tumor/low TIL, 1 low/high, 2 high/low, 3 high/high "
            "(4 is the unconditional class used for guidance)")
    return (f"A latent diffusion model that generates H&E histopathology patches from {cond}. "
            f"First stage: {info.get('first_stage', '').upper()} autoencoder; denoiser: a "
            "cross-attention U-Net; sampler: DDIM with classifier-free guidance "
            f"(default scale {card.guidance_scale:g}). Exported with {info.get('weights')} "
            f"weights at training step {info.get('global_step')} from `{info.get('source')}`; "
            f"the exported denoiser matches the training code to "
            f"{info.get('self_check_max_rel_err', float('nan')):.1e} (relative, fp32).\n")


def render_card(card: CardInfo) -> str:
    """The full ``README.md``."""
    dataset = (card.dataset_card.read_text() if card.dataset_card is not None
               else "No dataset card was found next to the training data; describe the "
                    "training patches (source slides, splits, labels) here before publishing.\n")
    if dataset.startswith("# "):  # the dataset card's own title: this section names it
        dataset = dataset.split("\n", 1)[1].lstrip("\n")
    dataset = dataset.replace("\n# ", "\n### ").replace("\n## ", "\n### ")
    config = yaml.safe_dump(dict(card.config), sort_keys=False)
    return "\n".join([
        _header(card),
        "# PathLDM latent diffusion model\n",
        _model_section(card),
        "## Usage\n",
        "Offline from this folder (or with the hub id once published); needs `diffusers`, "
        "`transformers` and `torch`:\n",
        "```python\n" + usage_snippet(card) + "```\n",
        "`pipeline.py` in this folder holds the pipeline (hence `trust_remote_code=True`). "
        "The folder also samples with PathLDM's own CLI: "
        "`python scripts/sample.py --ckpt FOLDER ...`.\n",
        "## Intended use and limits\n",
        "For research on synthetic histopathology only. **Not for diagnosis** or any clinical "
        "decision. Generated patches are not evidence about any patient, may show artefacts "
        "and reflect the biases of the training slides (one organ, one staining protocol, the "
        "tumor/TIL labels' own errors); follow the caption format above: other text is out of "
        "distribution.\n",
        "## Training data\n",
        dataset,
        "## Evaluation\n",
        _eval_section(card.eval_results),
        "## Training configuration\n",
        "The resolved configuration of the run (also in `pathldm.yaml`):\n",
        "```yaml\n" + config + "```\n",
        "## Licence\n",
        f"`{card.license}` (the metadata header's `license` field).\n",
        "## Citation\n",
        "```bibtex\n" + CITATION + "\n```\n",
    ])

#!/usr/bin/env python
"""Checkpoint tools for PathLDM / CompVis latent-diffusion checkpoints.

Subcommands:
  inspect              key groups (with tensor counts and sizes), EMA, embedded config, step,
                       and the keys a load ignores (PathLDM's inception.*, old position_ids).
  extract-first-stage  the autoencoder of a full LDM checkpoint (first_stage_model.*) as its
                       own checkpoint that loads strictly into VQModelInterface/AutoencoderKL
                       (config embedded; usable as first_stage_config.ckpt_path or by
                       eval_vae.py --config OUT).
  export-ema           the model with its EMA weights (or raw ones) as .safetensors, without
                       model_ema.* and legacy keys, the config kept as metadata; sample.py
                       and fid.py load the export directly.
"""
from __future__ import annotations

import argparse
import json
import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ldm.argtypes import positive_int
from ldm.checkpoint import (
    EMA_PREFIX,
    LEGACY_PREFIXES,
    ema_state_dict,
    find_config,
    legacy_keys,
    model_config,
    read_checkpoint,
    resolve_checkpoint,
    set_trust,
    write_safetensors,
)
from ldm.evaluation.cli import (
    add_trust_arg,
    configure_logging,
    format_table,
    run_main,
)

logger = logging.getLogger("ckpt_tools")
FIRST_STAGE_PREFIX = "first_stage_model."

EXAMPLES = """examples:
  python scripts/ckpt_tools.py inspect logs/RUN/checkpoints/last.ckpt
  python scripts/ckpt_tools.py extract-first-stage logs/RUN vq_f4_tcga.ckpt
  python scripts/ckpt_tools.py export-ema pathldm.ckpt pathldm_ema.safetensors \\
      --config configs/pathldm.yaml
"""


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface."""
    parser = argparse.ArgumentParser(description=__doc__, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("ckpt", help="checkpoint (.ckpt/.pt/.safetensors) or run directory")
    common.add_argument("--config", nargs="+", default=None,
                        help="model config YAML(s) when the checkpoint embeds none")
    add_trust_arg(common)
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("inspect", parents=[common], help="list key groups and metadata")
    p.add_argument("--depth", type=positive_int, default=2, help="prefix depth of the groups")
    p.add_argument("--json", type=Path, default=None, help="also write the summary as JSON")
    p = sub.add_parser("extract-first-stage", parents=[common],
                       help="save the autoencoder of an LDM checkpoint on its own")
    p.add_argument("out", type=Path, help="output .ckpt (or .safetensors)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the strict load into the configured first-stage class")
    p = sub.add_parser("export-ema", parents=[common], help="export weights to safetensors")
    p.add_argument("out", type=Path, help="output .safetensors")
    p.add_argument("--weights", choices=("auto", "ema", "raw"), default="ema",
                   help="ema: require EMA weights; auto: EMA when present; raw: no EMA")
    p.add_argument("--unet-only", action="store_true",
                   help="only model.diffusion_model.* (a U-Net init checkpoint)")
    return parser


def key_groups(state_dict: Mapping[str, Any], depth: int) -> dict[str, dict[str, int]]:
    """Key count and number of elements per dotted prefix of ``depth`` components."""
    groups: dict[str, dict[str, int]] = defaultdict(lambda: {"keys": 0, "numel": 0})
    for k, v in state_dict.items():
        g = groups[".".join(k.split(".")[:depth])]
        g["keys"] += 1
        g["numel"] += int(v.numel()) if hasattr(v, "numel") else 0
    return dict(groups)


def cmd_inspect(args: argparse.Namespace) -> dict[str, Any]:
    """Print key groups and checkpoint metadata."""
    path = resolve_checkpoint(args.ckpt)
    ckpt = read_checkpoint(path)
    sd = ckpt["state_dict"]
    config = ckpt.get("config")
    target = model_config(config).get("target") if isinstance(config, Mapping) else None
    ema = [k for k in sd if k.startswith(EMA_PREFIX)]
    legacy = legacy_keys(sd)
    summary = {"checkpoint": str(path), "keys": len(sd),
               "numel": sum(int(v.numel()) for v in sd.values() if hasattr(v, "numel")),
               "global_step": ckpt.get("global_step"), "epoch": ckpt.get("epoch"),
               "lightning_version": ckpt.get("pytorch-lightning_version"),
               "embedded_config": config is not None, "model_target": target,
               "ema_keys": len(ema), "ignored_on_load": sorted(
                   {k.split(".")[0] + ".*" if k.startswith(LEGACY_PREFIXES) else k
                    for k in legacy}),
               "groups": key_groups(sd, args.depth)}
    print(format_table(["group", "keys", "params"],
                       [[g, v["keys"], f"{v['numel']:,}"] for g, v in summary["groups"].items()]))
    print()
    for k in ("checkpoint", "keys", "numel", "global_step", "epoch", "lightning_version",
              "embedded_config", "model_target", "ema_keys"):
        print(f"{k:18s} {summary[k]}")
    if legacy:
        print(f"{'ignored on load':18s} {len(legacy)} keys: {', '.join(summary['ignored_on_load'])}"
              " (PathLDM's track_fid Inception / transformers<4.31 position_ids)")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _save(obj: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".safetensors":
        write_safetensors(obj["state_dict"], out, config=obj.get("config"),
                          global_step=obj.get("global_step"))
        return
    import torch

    tmp = out.with_name(f".{out.name}.tmp")
    torch.save(obj, tmp)
    tmp.replace(out)


def first_stage_checkpoint(ckpt: Mapping[str, Any], config: Mapping | None) -> dict[str, Any]:
    """``{"state_dict": first-stage weights without prefix, "config": {"model": cfg}}``."""
    sd = {k[len(FIRST_STAGE_PREFIX):]: v for k, v in ckpt["state_dict"].items()
          if k.startswith(FIRST_STAGE_PREFIX)}
    if not sd:
        raise KeyError("no first_stage_model.* keys: not a full LDM checkpoint")
    out: dict[str, Any] = {"state_dict": sd}
    if config is not None:
        fs = dict(model_config(config)["params"]["first_stage_config"])
        fs["params"] = {k: v for k, v in (fs.get("params") or {}).items() if k != "ckpt_path"}
        out["config"] = {"model": fs}
    if "global_step" in ckpt:
        out["global_step"] = ckpt["global_step"]
    return out


def cmd_extract_first_stage(args: argparse.Namespace) -> dict[str, Any]:
    """Write the first stage as its own checkpoint and check that it loads strictly."""
    from ldm.util import instantiate_from_config

    path = resolve_checkpoint(args.ckpt)
    ckpt = read_checkpoint(path)
    try:
        config = find_config(ckpt, path, args.config)
    except ValueError:
        logger.warning("%s: no config found; the extracted checkpoint will carry none", path)
        config = None
    out = first_stage_checkpoint(ckpt, config)
    if config is not None and not args.no_verify:
        fs_cfg = out["config"]["model"]
        model = instantiate_from_config(fs_cfg)
        model.load_state_dict(out["state_dict"], strict=True)
        logger.info("verified: loads strictly into %s", fs_cfg["target"])
    _save(out, args.out)
    print(f"wrote {args.out}: {len(out['state_dict'])} first-stage tensors"
          + (f" ({out['config']['model']['target']})" if "config" in out else ""))
    return out


def cmd_export_ema(args: argparse.Namespace) -> dict[str, Any]:
    """Export the (EMA) weights to safetensors."""
    if args.out.suffix != ".safetensors":
        raise ValueError(f"output must end in .safetensors: {args.out}")
    path = resolve_checkpoint(args.ckpt)
    ckpt = read_checkpoint(path)
    sd = ckpt["state_dict"]
    has_ema = any(k.startswith(EMA_PREFIX) for k in sd)
    if args.weights == "ema" and not has_ema:
        raise KeyError(f"{path} has no EMA weights (no model_ema.* keys); use --weights raw")
    used = "ema" if has_ema and args.weights != "raw" else "raw"
    sd = ema_state_dict(sd) if used == "ema" else dict(sd)
    legacy = legacy_keys(sd)
    sd = {k: v for k, v in sd.items() if not k.startswith(EMA_PREFIX) and k not in legacy}
    if args.unet_only:
        sd = {k: v for k, v in sd.items() if k.startswith("model.diffusion_model.")}
    if not sd:
        raise KeyError(f"{path}: nothing to export")
    try:
        config = find_config(ckpt, path, args.config)
    except ValueError:
        config = None
    write_safetensors(sd, args.out, config=None if args.unet_only else config,
                      global_step=ckpt.get("global_step"), weights=used, source=path.name)
    print(f"wrote {args.out}: {len(sd)} tensors, {used} weights"
          + (f", dropped {len(legacy)} legacy keys" if legacy else ""))
    return {"weights": used, "keys": len(sd), "dropped": legacy}


def main(argv: Sequence[str] | None = None) -> Any:
    """Entry point."""
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    set_trust(args.trust_checkpoint)
    commands = {"inspect": cmd_inspect, "extract-first-stage": cmd_extract_first_stage,
                "export-ema": cmd_export_ema}
    return commands[args.command](args)


if __name__ == "__main__":
    run_main(main)

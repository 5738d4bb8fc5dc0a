"""Helpers of ``main.py``: run directories, config merging, device flags and pre-flight checks."""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig

from ldm.atomic import remove_stale_tmp, tmp_path
from ldm.config import ConfigError
from ldm.config import load_config as _load_config

logger = logging.getLogger(__name__)

RUN_TIMESTAMP_ENV = "PATHLDM_RUN_TIMESTAMP"
TIMESTAMP_FORMAT = "%Y-%m-%dT%H-%M-%S"
DEVICE_KEYS = ("accelerator", "devices", "num_nodes", "gpus")
DEFAULT_SEED = 23


# ----------------------------------------------------------------------------- run directory
@dataclass
class RunPaths:
    """Where one training session writes, and what it resumes from."""

    now: str
    name: str
    logdir: Path
    resume_ckpt: Path | None = None
    resumed_configs: list[Path] = field(default_factory=list)

    @property
    def ckptdir(self) -> Path:
        return self.logdir / "checkpoints"

    @property
    def cfgdir(self) -> Path:
        return self.logdir / "configs"

    @property
    def imagedir(self) -> Path:
        return self.logdir / "images"


def run_timestamp() -> str:
    """The session timestamp, shared with child processes through the environment.

    Lightning's DDP launcher re-runs ``main.py`` for ranks > 0 with a copy of this environment,
    so every rank derives the same run directory.
    """
    now = os.environ.get(RUN_TIMESTAMP_ENV)
    if not now:
        now = datetime.now().strftime(TIMESTAMP_FORMAT)
        os.environ[RUN_TIMESTAMP_ENV] = now
    return now


def resolve_run(base: Sequence[str], resume: str | None, name: str | None, postfix: str,
                logdir: str) -> RunPaths:
    """Run directory ``<logdir>/<timestamp>_<name><postfix>`` or the one being resumed."""
    now = run_timestamp()
    if resume:
        if name:
            raise ConfigError("-n/--name cannot be used with -r/--resume: a resumed run keeps "
                              "its directory; use -l/--logdir with a fresh name instead")
        path = Path(resume)
        if not path.exists():
            raise ConfigError(f"-r/--resume: {path} does not exist")
        if path.is_file():
            ckpt = path
            rundir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        else:
            rundir, ckpt = path, path / "checkpoints" / "last.ckpt"
            if not ckpt.is_file():
                raise ConfigError(f"-r/--resume: {ckpt} does not exist; pass a checkpoint file "
                                  "to resume from another one")
        configs = sorted((rundir / "configs").glob("*.yaml"))
        return RunPaths(now, rundir.name, rundir, ckpt.resolve(), configs)
    if name:
        run_name = name
    elif base:
        run_name = "+".join(Path(b).stem for b in base)
    else:
        run_name = "run"
    run_name = re.sub(r"[^A-Za-z0-9_.+-]+", "-", run_name) + postfix
    nowname = f"{now}_{run_name}"
    return RunPaths(now, nowname, Path(logdir) / nowname)


# ----------------------------------------------------------------------------- configs
def load_config(paths: Sequence[str | Path], dotlist: Sequence[str]) -> DictConfig:
    """Merge YAML files in order, then ``key=value`` overrides (:func:`ldm.config.load_config`)."""
    config = _load_config(paths, dotlist, flag="--base")
    for section in ("model", "data"):
        if section not in config or "target" not in config[section]:
            raise ConfigError(f"the merged config has no '{section}.target' (files: "
                              f"{', '.join(map(str, paths))}); an overlay such as "
                              "configs/ablations/*.yaml goes after the config it changes: "
                              "--base configs/pathldm.yaml configs/ablations/clip_text.yaml")
    return config


# ----------------------------------------------------------------------------- devices
@dataclass
class Hardware:
    """Resolved Lightning device arguments."""

    accelerator: str
    devices: int | list[int] | str
    num_nodes: int
    precision: str
    gpus_flag: str | None = None

    @property
    def devices_per_node(self) -> int:
        if isinstance(self.devices, list):
            return len(self.devices)
        if isinstance(self.devices, int) and self.devices > 0:
            return self.devices
        return torch.cuda.device_count() if self.accelerator == "gpu" else 1

    @property
    def world_size(self) -> int:
        return self.devices_per_node * self.num_nodes


def parse_gpus(spec: str) -> list[int]:
    """``--gpus`` as CUDA device indices: ``0,1,2`` or ``0,`` (CompVis style)."""
    spec = str(spec).strip()
    if re.fullmatch(r"-?\d+", spec):
        raise ConfigError(
            f"--gpus {spec} is ambiguous: --gpus takes device indices. Use --gpus {spec}, to train "
            f"on CUDA device {spec} only, or --devices {spec} to train on {spec} devices")
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts or not all(re.fullmatch(r"\d+", p) for p in parts):
        raise ConfigError(f"--gpus {spec!r}: expected comma-separated device indices like 0,1,2")
    indices = [int(p) for p in parts]
    if len(set(indices)) != len(indices):
        raise ConfigError(f"--gpus {spec}: device indices repeat")
    return indices


def parse_devices(spec: str | int | Sequence[int]) -> int | list[int] | str:
    """``--devices``: a count (``2``), indices (``0,1``), ``auto`` or ``-1`` (all)."""
    if isinstance(spec, (list, tuple, ListConfig)):
        return [int(i) for i in spec]
    spec = str(spec).strip()
    if spec == "auto":
        return spec
    if re.fullmatch(r"-?\d+", spec):
        n = int(spec)
        if n == 0 or n < -1:
            raise ConfigError(f"--devices {spec}: use a positive count, -1 (all) or indices")
        return n
    if "," in spec:
        return parse_gpus(spec)
    raise ConfigError(f"--devices {spec!r}: expected a count, comma-separated indices or 'auto'")


def _is_gpu(accelerator: str) -> bool:
    if accelerator in ("gpu", "cuda"):
        return True
    return accelerator == "auto" and torch.cuda.is_available()


def resolve_hardware(gpus: str | None, devices: str | None, accelerator: str | None,
                     num_nodes: int | None, precision: str | None,
                     trainer_cfg: Mapping[str, Any]) -> Hardware:
    """Command-line flags over ``lightning.trainer`` over defaults (one device, GPU if any)."""
    if "gpus" in trainer_cfg:
        raise ConfigError("lightning.trainer.gpus is not a Lightning 2 argument: use --gpus 0,1 "
                          "on the command line or lightning.trainer.devices")
    if gpus is not None and devices is not None:
        raise ConfigError("use either --gpus (device indices) or --devices (a count), not both")
    if gpus is not None:
        if accelerator not in (None, "gpu", "cuda"):
            raise ConfigError(f"--gpus selects CUDA devices but --accelerator is {accelerator}")
        accel, devs = "gpu", parse_gpus(gpus)
    else:
        accel = accelerator or trainer_cfg.get("accelerator") or "auto"
        devs = parse_devices(devices if devices is not None else trainer_cfg.get("devices", 1))
    if accel == "cuda":
        accel = "gpu"
    if accel == "auto":
        accel = "gpu" if torch.cuda.is_available() else "cpu"
    nodes = int(num_nodes if num_nodes is not None else trainer_cfg.get("num_nodes", 1))
    if nodes < 1:
        raise ConfigError(f"--num_nodes must be positive, got {nodes}")
    prec = precision or trainer_cfg.get("precision")
    if prec is None:
        prec = _default_precision(accel)
    return Hardware(accel, devs, nodes, str(prec), gpus)


def _default_precision(accelerator: str) -> str:
    """bf16 autocast on GPUs that support it, fp16 autocast with a grad scaler on older ones."""
    if not _is_gpu(accelerator):
        return "32-true"
    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        return "16-mixed"
    return "bf16-mixed"


def device_problems(hw: Hardware) -> list[str]:
    """Devices the run asks for but this machine lacks."""
    if hw.accelerator != "gpu":
        if hw.accelerator == "cpu" and isinstance(hw.devices, list):
            return [f"--devices {hw.devices}: CPU runs take a process count, not indices"]
        return []
    available = torch.cuda.device_count()
    flag = f"--gpus {hw.gpus_flag}" if hw.gpus_flag else f"devices={hw.devices}"
    if isinstance(hw.devices, list):
        wanted = hw.devices
        missing = [i for i in wanted if i >= available]
        if missing:
            return [f"{flag} asks for CUDA device(s) {', '.join(map(str, wanted))} but this "
                    f"machine has {available} CUDA device(s){_no_cuda_hint(available)}"]
    elif isinstance(hw.devices, int) and hw.devices > available:
        return [f"{flag} asks for {hw.devices} CUDA device(s) but this machine has "
                f"{available}{_no_cuda_hint(available)}"]
    elif available == 0:
        return [f"{flag}: no CUDA device is available{_no_cuda_hint(0)}"]
    return []


def _no_cuda_hint(available: int) -> str:
    if available:
        return ""
    build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
    return (f" (torch {torch.__version__}, {build}); train on CPU with --accelerator cpu, "
            "or check the driver and CUDA_VISIBLE_DEVICES")


# ----------------------------------------------------------------------------- pre-flight
_HINTS = (
    ("outputs/demo/", "python scripts/demo.py writes it (or run its steps: see configs/demo/)"),
    ("cin256-v2", "download the CompVis class-conditional ImageNet LDM: mkdir -p "
     "models/ldm/cin256-v2 && wget -O models/ldm/cin256-v2/model.ckpt "
     "https://ommer-lab.com/files/latent-diffusion/nitro/cin/model.ckpt"),
    ("first_stage_models/vq-f4/", "download https://ommer-lab.com/files/latent-diffusion/vq-f4.zip "
     "and unzip it into models/first_stage_models/vq-f4/"),
    ("first_stage_models/vq-f8/", "download https://ommer-lab.com/files/latent-diffusion/vq-f8.zip "
     "and unzip it into models/first_stage_models/vq-f8/"),
    ("first_stage_models/kl-f8/", "download https://ommer-lab.com/files/latent-diffusion/kl-f8.zip "
     "and unzip it into models/first_stage_models/kl-f8/"),
    ("stable-diffusion", "download sd-v1-4.ckpt from "
     "https://huggingface.co/CompVis/stable-diffusion-v-1-4-original"),
    (".h5", "build the training stores with data_prep (README, step 1; "
     "python -m data_prep.build_dataset --help)"),
    ("vq-f8-tcga", "fine-tune the CompVis vq-f8 on your patches first (README, step 2, with "
     "configs/autoencoder/vq_f8_finetune.yaml)"),
    ("first_stage_models/", "fine-tune the CompVis first stage on your patches first (README, "
     "step 2: python main.py --base configs/autoencoder/vq_f4_finetune.yaml -t)"),
)
_PATH_KEY = re.compile(r"(^|_)(path|root)$")


def _walk(node: Any, prefix: str) -> Iterator[tuple[str, str, Any]]:
    if isinstance(node, (DictConfig, dict)):
        for k, v in node.items():
            yield from _walk(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(node, (ListConfig, list)):
        for i, v in enumerate(node):
            yield from _walk(v, f"{prefix}.{i}")
    else:
        yield prefix, prefix.rsplit(".", 1)[-1], node


def _hint(key: str, value: str) -> str:
    for needle, hint in _HINTS:
        if needle in value or needle in key:
            return hint
    return "create it or point the key elsewhere"


def _hub_problem(key: str, repo_id: str) -> str | None:
    """An offline run needs a hub model in the local cache."""
    if os.environ.get("HF_HUB_OFFLINE", "0") in ("0", "", "false", "False"):
        logger.info("%s: %s comes from the Hugging Face Hub (downloaded if not cached)", key,
                    repo_id)
        return None
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return None
    return (f"{key}: {repo_id} is neither a local directory nor in the Hugging Face cache, and "
            "HF_HUB_OFFLINE is set; "
            f"run once online, or download it (huggingface-cli download {repo_id} --local-dir "
            f"models/{repo_id.split('/')[-1]}) and set {key}=models/{repo_id.split('/')[-1]}")


def path_problems(config: DictConfig) -> list[str]:
    """Configured checkpoints, model directories and data stores that do not exist."""
    problems = []
    for section in ("model", "data"):
        for key, leaf, value in _walk(config.get(section), section):
            if not isinstance(value, str) or not value:
                continue
            if leaf == "version" and re.fullmatch(r"[\w.-]+/[\w.-]+", value) \
                    and not Path(value).exists() and not value.startswith("."):
                problem = _hub_problem(key, value)
            elif leaf == "version" or _PATH_KEY.search(leaf):
                problem = None if Path(value).expanduser().exists() else (
                    f"{key}: {value} does not exist; {_hint(key, value)}; or override it, e.g. "
                    f"{key}=/path/to/it" + (f" ({key}=null to start from random weights)"
                                            if leaf == "ckpt_path" else ""))
            else:
                continue
            if problem:
                problems.append(problem)
    return problems


def format_problems(problems: Sequence[str]) -> str:
    """One line for one problem, else one readable block for stderr."""
    if len(problems) == 1:
        return f"cannot start: {problems[0]}"
    return "cannot start:\n" + "\n".join(f"  - {p}" for p in problems)


def trainer_kwargs(trainer_cfg: Mapping[str, Any], hw: Hardware) -> dict[str, Any]:
    """``lightning.trainer`` plus the resolved devices and a DDP strategy for several devices."""
    kwargs = {k: v for k, v in trainer_cfg.items() if k not in DEVICE_KEYS + ("precision",)}
    kwargs.update(accelerator=hw.accelerator, devices=hw.devices, num_nodes=hw.num_nodes,
                  precision=hw.precision)
    if "strategy" not in kwargs:
        if hw.world_size > 1:
            from pytorch_lightning.strategies import DDPStrategy

            # frozen first/cond stages have no trainable parameters; every U-Net weight is used
            kwargs["strategy"] = DDPStrategy(find_unused_parameters=False)
        else:
            kwargs["strategy"] = "auto"
    return kwargs


def scale_lr_setting(flag: bool | None, model_cfg: Mapping[str, Any]) -> tuple[bool, str]:
    """Whether to scale the base rate, and where that was decided.

    ``--scale_lr``/``--no-scale_lr`` win; else the config's ``model.scale_lr`` (the autoencoder
    configs set it, as taming-transformers' ``main.py`` always scaled); else no scaling (the
    default of CompVis and PathLDM's LDM ``main.py``).
    """
    if flag is not None:
        return bool(flag), "--scale_lr" if flag else "--no-scale_lr"
    value = model_cfg.get("scale_lr", None)
    if value is None:
        return False, "default"
    if not isinstance(value, bool):
        raise ConfigError(f"model.scale_lr must be true or false, got {value!r}")
    return value, "model.scale_lr"


def learning_rate(base_lr: float, scale: bool, batch_size: int, accumulate: int,
                  hw: Hardware, source: str = "--scale_lr") -> float:
    """``base_lr``, or ``accumulate * nodes * devices * batch * base_lr`` when ``scale``."""
    if not scale:
        logger.info("learning rate %.2e (base_learning_rate, not scaled: %s)", base_lr, source)
        return base_lr
    lr = accumulate * hw.num_nodes * hw.devices_per_node * batch_size * base_lr
    logger.info("learning rate %.2e = %d (accumulate_grad_batches) * %d (nodes) * %d (devices) "
                "* %d (batch size) * %.2e (base_learning_rate), scaled by %s", lr, accumulate,
                hw.num_nodes, hw.devices_per_node, batch_size, base_lr, source)
    return lr


def hand_accumulation_to_model(model: Any, trainer_cfg: DictConfig) -> int:
    """Move ``accumulate_grad_batches`` from the trainer into a manual-optimization model.

    Lightning accumulates only under automatic optimization; the autoencoders step their two
    optimizers by hand and accumulate themselves (``accumulate_grad_batches`` attribute).
    Returns the count handed over (1 when there was nothing to do).
    """
    n = int(trainer_cfg.get("accumulate_grad_batches", 1) or 1)
    if n == 1 or getattr(model, "automatic_optimization", True):
        return 1
    if not hasattr(model, "accumulate_grad_batches"):
        raise ConfigError(f"lightning.trainer.accumulate_grad_batches={n}: "
                          f"{type(model).__name__} optimizes by hand and cannot accumulate")
    model.accumulate_grad_batches = n
    trainer_cfg.accumulate_grad_batches = 1
    logger.info("%s accumulates gradients over %d batches itself (manual optimization)",
                type(model).__name__, n)
    return n


# ----------------------------------------------------------------------------- seed
def resume_checkpoint_seed(ckpt: Path) -> int | None:
    """The seed recorded in a checkpoint written by ``main.py`` (None for other checkpoints).

    Reading it also checks the file: a truncated, empty or refused checkpoint raises a one-line
    :class:`ldm.checkpoint.CheckpointError` here, before anything is built.
    """
    from ldm.checkpoint import read_checkpoint

    ckpt_dict = read_checkpoint(ckpt, mmap=True)
    run = ((ckpt_dict.get("config") or {}).get("lightning") or {}).get("run") or {}
    seed = run.get("seed") if isinstance(run, Mapping) else None
    return None if seed is None else int(seed)


def run_seed(explicit: int | None, saved: int | None) -> int:
    """``-s`` if given, else the resumed run's seed, else :data:`DEFAULT_SEED`."""
    if saved is not None and explicit is not None and explicit != saved:
        logger.warning("-s %d differs from the resumed run's seed %d: the data order and noise "
                       "will not continue as the uninterrupted run would", explicit, saved)
    if explicit is not None:
        return explicit
    if saved is not None:
        logger.info("seed %d (the resumed run's)", saved)
        return saved
    return DEFAULT_SEED


# ----------------------------------------------------------------------------- checkpoint files
def atomic_checkpoint_io() -> Any:
    """Lightning checkpoint IO that writes ``.NAME.PID.tmp`` next to the target, then renames it
    (:mod:`ldm.atomic`; a killed run's temporary is removed at the next save).

    Lightning's own IO stages the file in the system temporary directory and moves it into place,
    which is a copy (not atomic) when the run directory is on another filesystem; a rename within
    the directory is atomic, so a SIGKILL never leaves a partial ``last.ckpt``.
    """
    from pytorch_lightning.plugins.io import TorchCheckpointIO

    class AtomicCheckpointIO(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint: dict[str, Any], path: Any,
                            storage_options: Any | None = None) -> None:
            if storage_options is not None or "://" in str(path):
                return super().save_checkpoint(checkpoint, path, storage_options)
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_tmp([path])
            tmp = tmp_path(path)
            try:
                torch.save(checkpoint, tmp)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)

    return AtomicCheckpointIO()

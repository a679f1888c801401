"""YAML configuration: built-in defaults, a config file on top, then `--set key.sub=value` overrides.

Every key must exist in DEFAULTS (a typo is an error that names the known keys); values are checked
for type and range before anything runs, so a bad value fails in a second, not after an hour.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import yaml

from BrainIDLib.devices import DEVICES
from BrainIDLib.errors import BrainIDError
from BrainIDLib.tasks import HEAD_TASKS

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

# Sections whose content is free-form (passed on as keyword arguments or {task: file}).
FREE_FORM = {"data.generator", "adapt.heads", "evaluate.heads"}

DEFAULTS: dict = {
    "run": {
        "name": "brainid",
        "dir": "runs/brainid",          # run directory: config.json, log.jsonl, checkpoints/, tensorboard/, outputs
        "seed": 0,
        "device": "auto",               # a BrainIDLib.devices name: auto | cuda | mps | cpu | gpu
        "threads": 0,                   # torch CPU threads (0: leave torch's default)
        "max_steps": 1000,
        "log_every": 10,                # summary line + TensorBoard every N steps (log.jsonl gets every step)
        "checkpoint_every": 100,
        "stop_at_step": 0,              # >0: stop there as if interrupted (checkpoint, exit); for tests/time slots
        "max_minutes": 0.0,             # >0: wall-clock budget of this launch: checkpoint and export when reached
        "amp": "auto",                  # auto (bf16 on capable GPUs, else fp16; off on CPU) | bf16 (GPU or CPU) | fp16 | off
        "progress": True,               # tqdm progress bar on rank 0
        "tensorboard": True,
        "deterministic": False,
        "channels_last": False,         # channels-last 3D memory format (faster on CPU, same numbers)
    },
    "model": {
        "f_maps": 64,
        "levels": 5,
        "num_groups": 8,
        "init": None,                   # weights file or registry name to start from (pretraining / adaptation)
    },
    "data": {
        "source": "generator",          # generator | nifti
        "labels": None,                 # generator: folder, glob or list of label maps (FreeSurfer ids)
        "t1": None,                     # optional folder of T1s named like the label maps (generator target)
        "subjects": None,               # nifti: list of {image, labels, t1, mask} or a JSON/CSV manifest path
        "size": [128, 128, 128],        # crop size (one int or three), or a list of crop sizes drawn per step
        "size_probs": [],               # with a list of sizes: their probabilities (empty: equal)
        "subjects_per_step": 1,         # subjects per optimizer step per process
        "mild": 2,                      # mildly corrupted samples per subject
        "severe": 2,                    # severely corrupted samples per subject
        "generator": {"preset": "brainid"},  # extra keyword arguments for SubjectGenerator
        "num_workers": 0,               # DataLoader worker processes drawing subjects ahead
        "generator_device": "cpu",      # cpu | cuda: where the generator renders (cuda needs num_workers 0)
        "cache_label_maps": 16,         # label maps kept in memory per process
    },
    "loss": {
        "anatomy_l1": 1.0,
        "anatomy_grad": 1.0,
        "contrastive": 0.0,             # weight of the voxel-wise contrastive term (official default: off)
        "contrastive_voxels": 256,
        "contrastive_temperature": 0.1,
        "segmentation": 0.0,            # weight of segmentation supervision during pretraining
        "segmentation_style": "official",  # official (class-weighted CE + Dice over all classes) | brainid
        "super_resolution": 0.0,        # pretraining: also fit these heads on detached features (0: off)
        "bias_field": 0.0,
    },
    "optim": {
        "lr": 1.0e-4,
        "weight_decay": 0.0,
        "betas": [0.9, 0.999],
        "grad_clip": 0.0,               # max gradient norm (0: off)
        "schedule": "multistep",        # multistep | cosine | constant
        "milestones": [],               # multistep: steps (ints) or fractions of max_steps (floats < 1)
        "gamma": 0.1,
        "warmup_steps": 0,
        "cooldown_steps": 0,            # the last N steps before run.max_steps: lr falls linearly towards 0 (a
                                        # warmup-stable-decay cooldown: branch a constant-lr run to ship it, keep
                                        # the constant one to continue)
        "ema": 0.0,                     # EMA decay of the weights (0: off; e.g. 0.999)
    },
    "adapt": {
        "tasks": ["segmentation"],
        "freeze_backbone": True,
        "low_memory_features": "auto",  # frozen backbone features: true = the model's low-memory no_grad path
                                        # (a little slower), false = plain no_grad forward; auto: low-memory when
                                        # the plain forward would need more than adapt.plain_forward_gb
        "plain_forward_gb": 4.0,
        "corruption": "mild",           # mild | severe | none: corruption of real images
        "description": "",
        "heads": {},                    # task -> existing head file to continue from
    },
    "evaluate": {
        "weights": None,                # model file (or registry name); default: the run's output model
        "heads": {},                    # task -> head file
        "families": ["t1", "t2", "flair", "ct", "gmm"],
        "regimes": ["1mm", "thick_slice", "low_field", "low_iso"],
        "subjects": 2,                  # label maps to evaluate on
        "features": True,               # robustness metrics of the features
        "out": None,                    # report folder (default: <run.dir>/evaluation)
    },
}

CHOICES = {
    "run.device": (*DEVICES, "gpu"),
    "run.amp": ("auto", "bf16", "fp16", "off"),
    "data.source": ("generator", "nifti"),
    "optim.schedule": ("multistep", "cosine", "constant"),
    "adapt.corruption": ("mild", "severe", "none"),
    "loss.segmentation_style": ("official", "brainid"),
    "data.generator_device": ("cpu", "cuda"),
}
POSITIVE = {"run.max_steps", "run.log_every", "run.checkpoint_every", "data.subjects_per_step",
            "model.f_maps", "model.levels", "model.num_groups", "loss.contrastive_voxels", "evaluate.subjects"}
NON_NEGATIVE = {"run.stop_at_step", "run.max_minutes", "run.threads", "data.mild", "data.severe", "data.num_workers",
                "data.cache_label_maps", "optim.lr", "optim.weight_decay", "optim.grad_clip", "optim.warmup_steps", "optim.cooldown_steps",
                "loss.anatomy_l1", "loss.anatomy_grad", "loss.contrastive", "loss.segmentation", "loss.super_resolution", "loss.bias_field",
                "adapt.plain_forward_gb"}


class ConfigError(BrainIDError):
    """A bad configuration value; the message names the key and what is allowed."""


class Config(dict):
    """A nested dict with attribute access for sections: cfg.run.max_steps."""

    def __getattr__(self, name):
        try:
            v = self[name]
        except KeyError:
            raise AttributeError(name) from None
        return Config(v) if isinstance(v, dict) and not isinstance(v, Config) else v

    def get_path(self, dotted: str):
        node = self
        for part in dotted.split("."):
            node = node[part]
        return node

    def plain(self) -> dict:
        return json.loads(json.dumps(self))


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A file path, or the name of a shipped config (`smoke`, `pretrain_lite_cpu.yaml`)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    for cand in (CONFIG_DIR / p.name, CONFIG_DIR / f"{p.name}.yaml"):
        if cand.is_file():
            return cand
    shipped = ", ".join(sorted(q.stem for q in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"config {name_or_path!s} not found; give a YAML file or one of: {shipped}")


def _merge(base: dict, update: dict, prefix: str = "") -> None:
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if key not in base:
            known = ", ".join(sorted(base))
            raise ConfigError(f"unknown config key '{dotted}'; known keys here: {known}")
        if isinstance(base[key], dict) and dotted not in FREE_FORM:
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{dotted}' is a section; give it a mapping, not {value!r}")
            _merge(base[key], value, dotted + ".")
        elif isinstance(base[key], dict) and isinstance(value, dict):
            # free-form mapping: keys given replace theirs, the others stay (--set data.generator.x=1
            # must not drop data.generator.preset)
            base[key] = {**base[key], **copy.deepcopy(value)}
        else:
            base[key] = copy.deepcopy(value)


def parse_override(text: str) -> dict:
    """'optim.lr=3e-4' -> {'optim': {'lr': 0.0003}} (the value is parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"--set expects key.sub=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {e}") from None
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def _coerce_numbers(node):
    """YAML 1.1 reads '3e-4' (no dot) as a string: make such values floats."""
    if isinstance(node, dict):
        return {k: _coerce_numbers(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_coerce_numbers(v) for v in node]
    if isinstance(node, str) and _FLOAT.match(node.strip()):
        return float(node)
    return node


def with_defaults(saved: dict) -> dict:
    """A run's saved config completed with the defaults added since it was written (for resuming
    or evaluating an older run)."""
    out = copy.deepcopy(DEFAULTS)
    for section, values in saved.items():
        if section in out and isinstance(values, dict):
            out[section].update(values)
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, base: dict | None = None) -> Config:
    """Defaults (or `base`, e.g. a run's saved config) <- YAML file <- overrides; then validated."""
    cfg = copy.deepcopy(base if base is not None else DEFAULTS)
    if path is not None:
        p = resolve_config_path(path)
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p} must hold a mapping of sections (run:, model:, data:, ...)")
        data.pop("description", None)
        _merge(cfg, data)
    for text in overrides or []:
        _merge(cfg, parse_override(text))
    cfg = Config(_coerce_numbers(cfg))
    validate(cfg)
    return cfg


def _type_ok(default, value) -> bool:
    if default is None or value is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, list):
        return isinstance(value, list)
    return True


def _walk(d: dict, prefix=""):
    for k, v in d.items():
        dotted = f"{prefix}{k}"
        if isinstance(v, dict) and dotted not in FREE_FORM:
            yield from _walk(v, dotted + ".")
        else:
            yield dotted, v


def crop_sizes(value) -> list[tuple[int, int, int]]:
    """data.size as a list of crop sizes: one int, three ints, or a list of either."""
    if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
        return [size3(v) for v in value]
    return [size3(value)]


def size3(value) -> tuple[int, int, int]:
    if isinstance(value, int):
        value = [value] * 3
    if not (isinstance(value, (list, tuple)) and len(value) == 3 and all(isinstance(v, int) and v >= 8 for v in value)):
        raise ConfigError(f"data.size must be one integer or three integers >= 8, got {value!r}")
    return tuple(value)


def validate(cfg: Config) -> None:
    defaults = dict(_walk(DEFAULTS))
    for key, value in _walk(cfg):
        default = defaults.get(key)
        if key == "data.size":
            crop_sizes(value)
            continue
        if key == "data.size_probs":
            if not (isinstance(value, list) and all(isinstance(v, (int, float)) and v >= 0 for v in value)):
                raise ConfigError(f"data.size_probs must be a list of non-negative numbers, got {value!r}")
            continue
        if key == "adapt.low_memory_features":
            if value not in ("auto", True, False):
                raise ConfigError(f"adapt.low_memory_features must be auto, true or false, got {value!r}")
            continue
        if not _type_ok(default, value):
            raise ConfigError(f"config key '{key}' must be a {type(default).__name__}, got {value!r}")
        if key in CHOICES and value not in CHOICES[key]:
            raise ConfigError(f"config key '{key}' must be one of {', '.join(CHOICES[key])}, got {value!r}")
        if key in POSITIVE and not (value > 0):
            raise ConfigError(f"config key '{key}' must be > 0, got {value!r}")
        if key in NON_NEGATIVE and value is not None and value < 0:
            raise ConfigError(f"config key '{key}' must be >= 0, got {value!r}")
    probs, n_sizes = cfg["data"]["size_probs"], len(crop_sizes(cfg["data"]["size"]))
    if probs and (len(probs) != n_sizes or sum(probs) <= 0):
        raise ConfigError(f"data.size_probs needs one probability per crop size ({n_sizes}), not all zero; got {probs!r}")
    if cfg["data"]["generator_device"] == "cuda" and cfg["data"]["num_workers"] > 0:
        raise ConfigError("data.generator_device=cuda renders in the training process: set data.num_workers=0")
    if cfg["data"]["mild"] + cfg["data"]["severe"] < 1:
        raise ConfigError("data.mild + data.severe must be at least 1 sample per subject")
    if not 0 <= cfg["optim"]["ema"] < 1:
        raise ConfigError(f"optim.ema must be in [0, 1), got {cfg['optim']['ema']}")
    if not 0 < cfg["optim"]["gamma"] <= 1:
        raise ConfigError(f"optim.gamma must be in (0, 1], got {cfg['optim']['gamma']}")
    if cfg["loss"]["contrastive_temperature"] <= 0:
        raise ConfigError("loss.contrastive_temperature must be > 0")
    betas = cfg["optim"]["betas"]
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
        raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {betas!r}")
    for m in cfg["optim"]["milestones"]:
        if not isinstance(m, (int, float)) or m <= 0:
            raise ConfigError(f"optim.milestones must be positive steps or fractions, got {m!r}")
    tasks = cfg["adapt"]["tasks"]
    if isinstance(tasks, str):
        cfg["adapt"]["tasks"] = tasks = [tasks]
    bad = [t for t in tasks if t not in HEAD_TASKS]
    if bad or not tasks:
        raise ConfigError(f"adapt.tasks must list some of {', '.join(HEAD_TASKS)}, got {tasks!r}")
    f, g, levels = cfg["model"]["f_maps"], cfg["model"]["num_groups"], cfg["model"]["levels"]
    widths = [f * 2**i for i in range(levels)]
    normalised = [max(f // 2, 1), *widths] + [widths[i] + widths[i + 1] for i in range(levels - 1)]
    bad = sorted({c for c in normalised if c >= g and c % g})
    if bad:
        raise ConfigError(f"model.f_maps={f} with model.num_groups={g}: GroupNorm cannot split {bad[0]} channels into "
                          f"{g} groups; use f_maps a multiple of 2*num_groups (e.g. {2 * g}, {4 * g})")

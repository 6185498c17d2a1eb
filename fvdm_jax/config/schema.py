"""One validation of a whole config against its schema, configs/default.py.

configs/default.py sets every knob with its default, so it is the schema: its sections and keys
are the only ones that exist, the type of each default is the type of that key
(`config_dict.placeholder(T)` marks a key that may be None or a T), and every other config starts
from it, so a key it has and a config lacks is a broken config. On top of that come two tables:
CHOICES, the allowed values of the enum-like keys (taken from the engine modules' constants), and
RANGES, the simple numeric bounds of single keys. Checks that relate several keys (size='custom'
needs the dimensions, ...) are fvdm_jax/config/checks.py's, which runs this one first.

    from fvdm_jax.config import schema as config_schema
    config_schema.validate(config)  # raises ConfigError, a ValueError with a one-line message

Where the schema comes from: `default_config_path` prefers the default.py next to the config file
being validated (pass its path as `near`: a config built with `load_sibling(__file__, "default")`
always has one), then <repo root>/configs/default.py (the parent of the fvdm_jax package: a source
checkout or an editable install). A non-editable install ships no configs/, so without `near` no
schema may be found: then `validate` logs one warning and checks only CHOICES and RANGES.

This module imports nothing heavy at import time: the schema file and the engine constants
behind CHOICES (`config_schema.CHOICES` is computed on first access) are loaded on first use.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
import numbers
import os
import re
import types
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from fvdm_jax.errors import ConfigError

logger = logging.getLogger(__name__)

# The parent of the fvdm_jax package: the repository root in a checkout / editable install.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGE_DEFAULT = os.path.join(REPO_ROOT, "configs", "default.py")
DEFAULT_NAME = "default.py"


# ---------------------------------------------------------------------------------------------
# The schema: configs/default.py.


@dataclasses.dataclass(frozen=True)
class Field:
    """One key of the schema."""

    path: str  # 'section.key'
    default: Any
    type: type  # the default's type (the placeholder's type for a placeholder)
    placeholder: bool  # config_dict.placeholder(T): None or a T


Schema = dict  # {name: Field | Schema} (ConfigDict order: sorted by name)


def default_config_path(near: str | None = None) -> str | None:
    """The default.py to validate against: beside `near` (a config file or its folder) if there
    is one, else <repo root>/configs/default.py; None when neither exists."""
    candidates = []
    if near:
        folder = near if os.path.isdir(near) else os.path.dirname(os.path.abspath(near))
        candidates.append(os.path.join(folder, DEFAULT_NAME))
    candidates.append(PACKAGE_DEFAULT)
    return next((path for path in candidates if os.path.isfile(path)), None)


def default_config(near: str | None = None):
    """A fresh ConfigDict of configs/default.py (see `default_config_path`)."""
    from fvdm_jax.config.load import load_config_module

    path = default_config_path(near)
    if path is None:
        raise FileNotFoundError(
            f"no configs/default.py found ({PACKAGE_DEFAULT} does not exist: fvdm_jax is "
            f"installed without its configs); pass near=<your config file> or install with pip -e"
        )
    return load_config_module(path).get_config()


def _is_section(value) -> bool:
    """A Mapping or a ConfigDict (which is not a Mapping)."""
    return (not isinstance(value, (str, bytes)) and hasattr(value, "keys")
            and hasattr(value, "__getitem__"))


def _schema_of(cfg, prefix: str) -> Schema:
    out: Schema = {}
    for key in cfg.keys():
        path = f"{prefix}{key}"
        value = cfg[key]
        if _is_section(value):
            out[key] = _schema_of(value, path + ".")
            continue
        ref = cfg.get_ref(key)  # the placeholder's FieldReference, or a new one of the value's type
        typ = ref.get_type()
        out[key] = Field(path, value, typ, placeholder=value is None)
    return out


@functools.lru_cache(maxsize=8)
def _schema_at(path: str) -> Schema:
    from fvdm_jax.config.load import load_config_module

    return _schema_of(load_config_module(path).get_config(), "")


def schema(near: str | None = None) -> Schema | None:
    """{section: {key: Field}} of configs/default.py (cached per file), or None if none is found."""
    path = default_config_path(near)
    return None if path is None else _schema_at(os.path.abspath(path))


@functools.lru_cache(maxsize=1)
def _warn_no_schema() -> None:
    logger.warning(
        "configs/default.py not found (%s does not exist: fvdm_jax is installed without its "
        "configs): unknown keys, missing keys and types are not checked, only CHOICES and "
        "RANGES; pass near=<config file> to config_schema.validate", PACKAGE_DEFAULT)


# ---------------------------------------------------------------------------------------------
# CHOICES and RANGES.


@functools.lru_cache(maxsize=1)
def choices() -> Mapping[str, tuple]:
    """{'section.key': allowed values}. For a key whose default is a sequence, every element must
    be one of them. None passes wherever the default is a placeholder."""
    from fvdm_jax.data import SOURCES
    from fvdm_jax.data.clips import DATASETS
    from fvdm_jax.data.folder import CLASS_IDS, SPLITS
    from fvdm_jax.diffusion.guidance import HISTORY_MODES
    from fvdm_jax.diffusion.ptss import PTSS_MODES
    from fvdm_jax.diffusion.samplers import POLICIES, SAMPLERS
    from fvdm_jax.diffusion.schedule import BETA_SCHEDULES, PREDICTIONS
    from fvdm_jax.diffusion.schemes import SCHEMES
    from fvdm_jax.diffusion.tasks import EVAL_TASKS, TASK_NAMES
    from fvdm_jax.evaluation.features import BASELINES, PROTOCOL_NAMES, VERDICT_TASKS
    from fvdm_jax.evaluation.videos import SELECTIONS
    from fvdm_jax.models.dit import DTYPES, MODEL_SIZES, REMAT_POLICIES
    from fvdm_jax.models.layers import ATTENTION_IMPLEMENTATIONS
    from fvdm_jax.runtime.console import PROGRESS_MODES
    from fvdm_jax.training.step import LR_SCHEDULES

    # VideoFolderSource and the real FVD clips also read '' and 'all' as every video (None).
    splits = tuple(SPLITS) + ("all", "")
    return types.MappingProxyType({
        "model.size": tuple(MODEL_SIZES) + ("custom",),
        "model.dtype": tuple(DTYPES),
        "model.param_dtype": tuple(DTYPES),
        "model.attention": tuple(ATTENTION_IMPLEMENTATIONS),
        "lora.export": ("merged", "adapter"),
        "model.remat": tuple(REMAT_POLICIES),
        "diffusion.beta_schedule": tuple(BETA_SCHEDULES),
        "diffusion.prediction": tuple(PREDICTIONS),
        "ptss.mode": tuple(PTSS_MODES),
        "ptss.scheme": tuple(SCHEMES),
        "data.source": tuple(SOURCES),
        "data.dataset": tuple(DATASETS),
        "data.split": splits,
        "data.class_ids": tuple(CLASS_IDS),
        "vae.dtype": tuple(DTYPES),
        "encoders.dtype": tuple(DTYPES),
        "train.schedule": tuple(LR_SCHEDULES),
        "sample.task": tuple(TASK_NAMES),
        "sample.sampler": tuple(SAMPLERS),
        "sample.policy": tuple(POLICIES),
        "sample.history_guidance_mode": tuple(HISTORY_MODES),
        "sample.train_tasks": tuple(TASK_NAMES),
        "eval.task": tuple(EVAL_TASKS),
        "eval.protocol": tuple(PROTOCOL_NAMES),
        "eval.split": splits,
        "eval.real_selection": tuple(SELECTIONS),
        "eval.after_training": tuple(VERDICT_TASKS),
        "eval.baselines": tuple(BASELINES),
        "console.progress": tuple(PROGRESS_MODES),
    })


@functools.lru_cache(maxsize=1)
def ranges() -> Mapping[str, str]:
    """{'section.key': bound}: '>= a', '> a', '<= b', '< b', or an interval '[a, b]', '[a, b)',
    '(a, b]', '(a, b)'. None passes wherever the default is a placeholder."""
    from fvdm_jax.models.i3d import I3D_MIN_FRAMES

    return types.MappingProxyType({
        # models/dit.py (DiT._check_architecture: depth even and >= 2) and the data sources.
        "model.hidden_size": ">= 1",
        "model.depth": ">= 2",
        "model.num_heads": ">= 1",
        "model.patch_size": ">= 1",
        "model.mlp_ratio": "> 0",
        "model.num_frames": ">= 1",
        "model.input_size": ">= 1",
        "model.in_channels": ">= 1",
        "model.num_classes": ">= 0",  # data/synthetic.py
        "model.class_dropout_prob": "[0, 1]",  # a probability
        # diffusion/schedule.py (make_betas; the betas after the 1000/T scaling stay checked there).
        "diffusion.num_timesteps": ">= 2",
        "diffusion.beta_start": "(0, 1]",
        "diffusion.beta_end": "(0, 1]",
        "ptss.p": "[0, 1]",  # train_step.py, diffusion/ptss.py
        # data/demo.py, data/folder.py, data/synthetic.py, data/clips.py, data/pipeline.py.
        "data.frame_interval": ">= 1",
        "data.image_size": ">= 1",
        "data.num_examples": ">= 1",
        "data.synthetic_prompts": ">= 1",
        "lora.rank": ">= 0",
        "data.seed": ">= 0",
        "data.num_workers": ">= 0",
        "data.cache_videos_per_shard": ">= 1",
        "data.device_prefetch": ">= 0",
        "data.min_crop_fraction": "(0, 1]",
        "data.hold_out_frames": ">= 0",
        "vae.scale_factor": "> 0",
        "vae.encode_batch_size": ">= 1",
        "encoders.text_length": ">= 1",  # sampling/wan_encoders.py, data/tokenizer.py
        "encoders.frame_interval": ">= 1",  # data/captioned.py read_clip
        # train_step.py validate_train_config.
        "train.num_steps": ">= 1",
        "train.batch_size": ">= 1",
        "train.grad_accum_steps": ">= 1",
        "train.log_every_steps": ">= 1",
        "train.lr": "> 0",
        "train.end_lr": ">= 0",
        "train.weight_decay": ">= 0",
        "train.warmup_steps": ">= 0",
        "train.grad_clip_start_step": ">= 0",
        "train.ema_decay": "[0, 1]",
        "train.b1": "[0, 1)",
        "train.b2": "[0, 1)",
        "train.eps": "> 0",
        # checkpoint.py TrainCheckpointer.
        "checkpoint.every_steps": ">= 1",
        "checkpoint.keep": ">= 1",
        "checkpoint.preemption_check_every_steps": ">= 1",
        # sampling/sampler.py validate_sample_config (overlap < model.num_frames stays there).
        "sample.num_steps": ">= 1",
        "sample.num_videos": ">= 1",
        "sample.batch_size": ">= 1",
        "sample.total_frames": ">= 1",
        "sample.fps": ">= 1",
        "sample.delay": ">= 1",
        "sample.train_num_videos": ">= 1",
        "sample.eta": ">= 0",
        "sample.slope": "> 0",
        "sample.noise_multiplier": "[0, 1]",
        "sample.history_guidance": ">= 0",  # 0 = off
        "sample.history_noise_level": ">= 0",  # < diffusion.num_timesteps: sampling/sampler.py
        "sample.overlap": ">= 1",
        "sample.sheet_frame_size": ">= 1",
        "sample.every_steps": ">= 0",  # 0 = off
        # jobs/evaluate.py validate_eval_config; eval.seed seeds np.random.default_rng.
        "eval.num_videos": ">= 1",
        "eval.subsample_factor": ">= 1",
        "eval.batch_size": ">= 1",
        "eval.train_num_videos": ">= 1",
        "eval.num_frames": f">= {I3D_MIN_FRAMES}",  # models/i3d.py: I3D's time pooling
        "eval.resolution": ">= 1",
        "eval.seed": ">= 0",
        "eval.every_steps": ">= 0",  # 0 = off
        "console.plain_every_sec": ">= 0",  # console.py PlainProgress / TrainProgress; 0 = log steps only
    })


def __getattr__(name: str):
    """CHOICES and RANGES, built on first access (they import the engine modules)."""
    if name == "CHOICES":
        return choices()
    if name == "RANGES":
        return ranges()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_BOUND = re.compile(r"^(>=|>|<=|<)\s*(\S+)$")
_INTERVAL = re.compile(r"^([\[(])\s*([^,\s]+)\s*,\s*([^\])\s]+)\s*([\])])$")


def _in_range(value: float, spec: str) -> bool:
    bound = _BOUND.match(spec)
    if bound:
        op, limit = bound.group(1), float(bound.group(2))
        return {">=": value >= limit, ">": value > limit, "<=": value <= limit, "<": value < limit}[op]
    interval = _INTERVAL.match(spec)
    if not interval:
        raise ValueError(f"bad range spec {spec!r}")
    lo_open, lo, hi, hi_open = interval.group(1) == "(", float(interval.group(2)), float(
        interval.group(3)), interval.group(4) == ")"
    above = value > lo if lo_open else value >= lo
    below = value < hi if hi_open else value <= hi
    return above and below


def _range_text(spec: str) -> str:
    return f"be {spec}" if _BOUND.match(spec) else f"lie in {spec}"


# ---------------------------------------------------------------------------------------------
# The checks.

_SCALARS = (bool, int, float, str)
_NAMES = {bool: "a bool (True/False)", int: "an int", float: "a float", str: "a string",
          tuple: "a tuple (or list)", list: "a list (or tuple)"}


def _type_name(typ) -> str:
    return _NAMES.get(typ, f"a {getattr(typ, '__name__', typ)}")


def _is_bool(value) -> bool:
    return isinstance(value, bool) or type(value).__name__ == "bool_"  # numpy.bool_


def _has_type(value, typ) -> bool:
    if typ is bool:
        return _is_bool(value)
    if typ is int:
        return isinstance(value, numbers.Integral) and not _is_bool(value)
    if typ is float:  # an int is a fine float
        return isinstance(value, numbers.Real) and not _is_bool(value)
    if typ in (tuple, list):
        return isinstance(value, (tuple, list))
    return isinstance(value, typ)


def _element_spec(default) -> tuple[type | None, int | None]:
    """(element type, element length) every element of a sequence default shares, else None."""
    if not isinstance(default, (tuple, list)) or not default:
        return None, None
    types = {type(v) for v in default}
    typ = types.pop() if len(types) == 1 else None
    if typ in (tuple, list):
        lengths = {len(v) for v in default}
        return typ, lengths.pop() if len(lengths) == 1 else None
    return (typ if typ in _SCALARS else None), None


def _suggest(word: str, known: Sequence[str], prefix: str = "") -> str:
    """' (did you mean X?)' for the closest known word (case-insensitive first), or ''."""
    folded = {str(k).lower(): k for k in known}
    match = folded.get(str(word).lower())
    if match is None:
        close = difflib.get_close_matches(str(word).lower(), list(folded), n=1, cutoff=0.6)
        match = folded[close[0]] if close else None
    if match is None:
        return ""
    return f" (did you mean {prefix}{match}?)" if prefix else f" (did you mean {match!r}?)"


def _default_hint(field: Field | None) -> str:
    return "" if field is None or field.placeholder else f" (default.py: {field.default!r})"


def _check_value(path: str, value, field: Field | None, allowed: tuple | None,
                 bound: str | None) -> Iterator[tuple[str, str]]:
    """Type, then choices and range (only for a value of the right type)."""
    if value is None:
        if field is not None and not field.placeholder:
            yield path, (f"{path}=None is not allowed: it must be {_type_name(field.type)}"
                         f"{_default_hint(field)}")
        return
    if field is not None:
        if not _has_type(value, field.type):
            extra = " or None" if field.placeholder else ""
            yield path, (f"{path}={value!r} must be {_type_name(field.type)}{extra}, not "
                         f"{type(value).__name__}{_default_hint(field)}")
            return
        element_type, element_len = _element_spec(field.default)
        if element_type is not None:
            for i, element in enumerate(value):
                if not _has_type(element, element_type):
                    yield path, (f"{path}[{i}]={element!r} must be {_type_name(element_type)}, "
                                 f"not {type(element).__name__}{_default_hint(field)}")
                    return
                if element_len is not None and len(element) != element_len:
                    yield path, (f"{path}[{i}]={element!r} must have {element_len} entries"
                                 f"{_default_hint(field)}")
                    return
    if allowed is not None:
        listed = ", ".join(repr(a) for a in allowed)
        if isinstance(value, (tuple, list)):
            for element in value:
                if element not in allowed:
                    yield path, (f"{path} has {element!r}, which is not one of {listed}"
                                 f"{_suggest(element, allowed)}")
                    return
        elif value not in allowed:
            yield path, f"{path}={value!r} is not one of {listed}{_suggest(value, allowed)}"
            return
    if bound is not None and isinstance(value, numbers.Real) and not _is_bool(value):
        if not _in_range(float(value), bound):
            yield path, f"{path}={value!r} must {_range_text(bound)}{_default_hint(field)}"


def _walk(node: Schema, given, prefix: str, allow_missing: bool, table: Mapping,
          bounds: Mapping) -> Iterator[tuple[str, str]]:
    where = prefix[:-1]
    if not _is_section(given):
        what = f"{where}={given!r}" if where else f"the config {given!r}"
        yield where, f"{what} must be a section (a ConfigDict of keys), not {type(given).__name__}"
        return
    known = list(node)
    for key in given.keys():
        if key not in node:
            path = f"{prefix}{key}"
            if prefix:
                yield path, (f"unknown config key {path}{_suggest(key, known, prefix)}; the keys of "
                             f"{where} are: {', '.join(known)}")
            else:
                yield path, (f"unknown config section {key!r}{_suggest(key, known)}; the "
                             f"sections are: {', '.join(known)}")
    present = set(given.keys())
    for key, spec in node.items():
        path = f"{prefix}{key}"
        if key not in present:
            if not allow_missing:
                what = "section" if isinstance(spec, dict) else "key"
                yield path, (f"the config lacks the {what} {path} (configs/default.py has it): "
                             f"build configs on default.get_config()")
            continue
        value = given[key]
        if isinstance(spec, dict):
            yield from _walk(spec, value, path + ".", allow_missing, table, bounds)
        elif _is_section(value):
            yield path, f"{path} must be {_type_name(spec.type)}, not a section"
        else:
            yield from _check_value(path, value, spec, table.get(path), bounds.get(path))


def _lookup(config, path: str):
    node = config
    for part in path.split("."):
        if not _is_section(node) or part not in node.keys():
            return False, None
        node = node[part]
    return True, node


def problems(config, *, near: str | None = None, allow_missing: bool = False,
             section: str | None = None) -> list[tuple[str, str]]:
    """[(key path, one-line message)] of everything wrong with `config` (a ConfigDict or a
    nested dict); [] when it is fine. `section`: `config` is that one section (e.g. the model
    section of an inference checkpoint) instead of a whole config. allow_missing: keys of
    default.py that `config` lacks are fine (partial configs, configs of older versions)."""
    table, bounds = choices(), ranges()
    full = schema(near)
    if section is not None:
        config = {section: config}
    if full is None:
        _warn_no_schema()
        found = []
        for path in dict.fromkeys([*table, *bounds]):
            if section is not None and not path.startswith(section + "."):
                continue
            present, value = _lookup(config, path)
            if present and not _is_section(value):
                found.extend(_check_value(path, value, None, table.get(path), bounds.get(path)))
        return found
    if section is not None:
        if section not in full:
            return [(section, f"unknown config section {section!r}{_suggest(section, list(full))}")]
        full = {section: full[section]}
    return list(_walk(full, config, "", allow_missing, table, bounds))


def validate(config, *, near: str | None = None, allow_missing: bool = False) -> None:
    """Raises ConfigError (one line) if `config` does not fit configs/default.py: an unknown
    section or key (with a did-you-mean and the known keys), a missing key, a value of the wrong
    type, outside CHOICES or outside RANGES. near: the config file it was loaded from (its
    folder's default.py is the schema; needed when fvdm_jax is installed without configs/)."""
    found = problems(config, near=near, allow_missing=allow_missing)
    if found:
        raise ConfigError(found)


def validate_section(name: str, values, *, near: str | None = None,
                     allow_missing: bool = False) -> None:
    """validate() for one section given alone, e.g. validate_section('model', config.model)."""
    found = problems(values, near=near, allow_missing=allow_missing, section=name)
    if found:
        raise ConfigError(found)

"""fvdm_jax.config.schema: every shipped config fits configs/default.py; bad ones fail in one line.

No jax compilation: configs are built and checked on the host only.
"""

import glob
import logging
import os
import re
import shutil

import pytest

from fvdm_jax.config import schema as cs
from fvdm_jax.config.load import load_config

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


def tiny():
    return load_config(os.path.join(ROOT, "configs", "tiny.py"))


def tiny_dict():
    """A plain nested dict: ConfigDict itself refuses most wrong types on assignment, a dict
    (a saved config, a hand-built one) does not."""
    return tiny().to_dict()


def error_of(config, **kwargs) -> cs.ConfigError:
    with pytest.raises(cs.ConfigError) as info:
        cs.validate(config, **kwargs)
    return info.value


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_shipped_config_validates(path):
    assert len(CONFIGS) >= 7
    cs.validate(load_config(path))
    cs.validate(load_config(path), near=path)
    cs.validate(load_config(path).to_dict())  # as a checkpoint saves it (tuples become lists)


def test_tiny_demo_config_validates():
    from tiny_demo import tiny_demo_config

    cs.validate(tiny_demo_config())
    cs.validate(tiny_demo_config(num_frames=16))


def test_config_error_is_a_one_line_value_error():
    assert issubclass(cs.ConfigError, ValueError)
    config = tiny()
    config.model.dtype = "fp16"
    with pytest.raises(ValueError) as info:  # existing `except ValueError` callers keep working
        cs.validate(config)
    assert "\n" not in str(info.value)


def test_unknown_key_names_it_with_a_suggestion_and_the_known_keys():
    config = tiny()
    config.model.hiden_size = 64  # ConfigDict accepts new keys: only the schema catches this
    message = str(error_of(config))
    assert "model.hiden_size" in message
    assert "did you mean model.hidden_size?" in message
    assert "num_heads" in message and "patch_size" in message  # the known keys of model


def test_unknown_section_names_it_with_a_suggestion():
    config = tiny_dict()
    config["sampel"] = {"num_steps": 2}
    message = str(error_of(config))
    assert "'sampel'" in message and "did you mean 'sample'?" in message


def test_missing_key_is_an_error_unless_allowed():
    config = tiny_dict()
    del config["model"]["remat"]
    error = error_of(config)
    assert "model.remat" in str(error) and "lacks" in str(error)
    cs.validate(config, allow_missing=True)


@pytest.mark.parametrize("section, key, value, expected", [
    ("model", "num_frames", "16", "an int"),  # string for an int
    ("model", "num_frames", 16.0, "an int"),  # float for an int
    ("model", "learn_sigma", 1, "a bool"),  # int for a bool
    ("train", "num_steps", True, "an int"),  # bool for an int
    ("train", "lr", "1e-3", "a float"),  # string for a float
    ("model", "size", 3, "a string"),
    ("model", "size", None, "None is not allowed"),  # None where the default is no placeholder
    ("sample", "train_tasks", "generate", "a tuple"),  # a bare string for a tuple
])
def test_wrong_type_fails_naming_key_value_and_type(section, key, value, expected):
    config = tiny_dict()
    config[section][key] = value
    message = str(error_of(config))
    assert message.startswith(f"{section}.{key}=")
    assert repr(value) in message and expected in message


def test_wrong_element_type_fails():
    config = tiny_dict()
    config["mesh"]["shape"] = [-1, "1", 1]
    assert "mesh.shape[1]='1' must be an int" in str(error_of(config))
    config = tiny_dict()
    config["mesh"]["rules"] = [["batch", "data", "fsdp"]]
    assert "mesh.rules[0]" in str(error_of(config))


def test_accepted_types():
    config = tiny_dict()
    config["train"]["lr"] = 1  # an int where a float is expected
    config["sample"]["train_tasks"] = ["generate"]  # a list for a tuple
    config["mesh"]["shape"] = (2, 2, 2)
    config["eval"]["after_training"] = ("i2v",)
    cs.validate(config)


def test_placeholder_accepts_none_and_its_type_only():
    config = tiny_dict()
    config["model"]["size"] = "custom"
    config["model"]["hidden_size"] = 64
    config["sample"]["overlap"] = None
    config["train"]["peak_flops_per_device"] = 1  # an int for placeholder(float)
    config["data"]["dataset"] = None
    cs.validate(config)
    config["train"]["peak_flops_per_device"] = 3e14
    config["data"]["dataset"] = "ucf101"
    cs.validate(config)
    config["model"]["hidden_size"] = "64"
    message = str(error_of(config))
    assert "model.hidden_size='64' must be an int or None" in message


def test_bad_enum_value_names_the_allowed_values():
    config = tiny()
    config.model.dtype = "fp16"
    message = str(error_of(config))
    assert "model.dtype='fp16'" in message
    assert "'float32', 'bfloat16'" in message


def test_enum_suggestion_is_case_insensitive():
    config = tiny()
    config.model.size = "xl"
    assert "did you mean 'XL'?" in str(error_of(config))


def test_bad_element_of_a_sequence_enum():
    config = tiny()
    config.sample.train_tasks = ("generate", "i2V")
    message = str(error_of(config))
    assert "sample.train_tasks has 'i2V'" in message and "did you mean 'i2v'?" in message
    config = tiny()
    config.eval.baselines = ("noise", "gt")
    assert "eval.baselines has 'gt'" in str(error_of(config))


@pytest.mark.parametrize("section, key, value, bound", [
    ("train", "lr", 0.0, "be > 0"),
    ("train", "b2", 1.0, "lie in [0, 1)"),
    ("ptss", "p", 1.5, "lie in [0, 1]"),
    ("checkpoint", "keep", 0, "be >= 1"),
    ("sample", "eta", -0.1, "be >= 0"),
    ("eval", "num_frames", 4, "be >= 9"),  # I3D's minimum
    ("model", "depth", 0, "be >= 2"),
    ("data", "min_crop_fraction", 0.0, "lie in (0, 1]"),
    ("train", "ema_decay", float("nan"), "lie in [0, 1]"),
])
def test_value_out_of_range_fails(section, key, value, bound):
    config = tiny()
    config[section][key] = value
    message = str(error_of(config))
    assert message.startswith(f"{section}.{key}={value!r} must {bound}")


def test_all_problems_counted_in_one_line():
    config = tiny()
    config.model.sise = "B"
    config.model.dtype = "fp16"
    config.train.lr = 0.0
    error = error_of(config)
    assert len(error.problems) == 3 and len(error.keys) == 3
    assert set(error.keys) == {"model.sise", "model.dtype", "train.lr"}
    assert str(error).startswith(error.problems[0])
    assert "(and 2 more problems: " in str(error)
    assert "\n" not in str(error)


def test_validate_section_alone():
    config = tiny()
    cs.validate_section("model", config.model)
    config.model.remat = "everything"
    with pytest.raises(cs.ConfigError, match="model.remat='everything'"):
        cs.validate_section("model", config.model)
    with pytest.raises(cs.ConfigError, match="lacks"):
        cs.validate_section("model", {"size": "XL"})
    cs.validate_section("model", {"size": "XL"}, allow_missing=True)


def test_tables_name_existing_keys_and_admit_their_defaults():
    default = cs.default_config()
    schema = cs.schema()
    for table in (cs.CHOICES, cs.RANGES):
        for path in table:
            section, key = path.split(".")
            assert key in schema[section], path
    for path, allowed in cs.CHOICES.items():
        section, key = path.split(".")
        value = default[section][key]
        values = value if isinstance(value, (tuple, list)) else (value,)
        assert all(v is None or v in allowed for v in values), path


def test_choices_come_from_the_engine_modules():
    from fvdm_jax.diffusion import ptss, samplers, schedule, tasks
    from fvdm_jax.models import dit
    from fvdm_jax.training.step import LR_SCHEDULES

    assert cs.CHOICES["sample.sampler"] == samplers.SAMPLERS
    assert cs.CHOICES["sample.policy"] == samplers.POLICIES
    assert cs.CHOICES["ptss.mode"] == ptss.PTSS_MODES
    assert cs.CHOICES["diffusion.prediction"] == schedule.PREDICTIONS
    assert cs.CHOICES["diffusion.beta_schedule"] == schedule.BETA_SCHEDULES
    assert cs.CHOICES["model.size"] == tuple(dit.MODEL_SIZES) + ("custom",)
    assert cs.CHOICES["train.schedule"] == LR_SCHEDULES
    assert cs.CHOICES["sample.task"] == tasks.TASK_NAMES
    assert cs.CHOICES["eval.task"] == tasks.EVAL_TASKS


def test_schema_beside_the_config_file_is_preferred(tmp_path):
    """A config folder of its own: its default.py (here: with one more key) is the schema."""
    with open(os.path.join(ROOT, "configs", "default.py")) as f:
        source = f.read()
    source = source.replace("    return config\n",
                            "    config.train.extra_knob = 1\n    return config\n")
    (tmp_path / "default.py").write_text(source)
    config = tiny()
    config.train.extra_knob = 1
    cs.validate(config, near=str(tmp_path / "mine.py"))
    with pytest.raises(cs.ConfigError, match="train.extra_knob"):
        cs.validate(config)  # the repository's default.py has no such key
    assert cs.default_config_path(str(tmp_path / "mine.py")) == str(tmp_path / "default.py")
    assert cs.default_config_path(str(tmp_path / "nowhere" / "x.py")) == cs.PACKAGE_DEFAULT


def test_without_a_schema_only_choices_and_ranges_are_checked(monkeypatch, caplog):
    """An install without configs/ (non-editable) and no `near`: a warning, then a partial check."""
    monkeypatch.setattr(cs, "PACKAGE_DEFAULT", "/nonexistent/configs/default.py")
    cs._warn_no_schema.cache_clear()
    config = tiny()
    config.model.sise = "B"  # not caught without the schema
    with caplog.at_level(logging.WARNING, logger=cs.__name__):
        cs.validate(config)
    assert "not found" in caplog.text
    config.model.dtype = "fp16"
    with pytest.raises(cs.ConfigError, match="model.dtype='fp16'"):
        cs.validate(config)
    with pytest.raises(FileNotFoundError, match="near="):
        cs.default_config()
    cs._warn_no_schema.cache_clear()


@pytest.mark.parametrize("name", ["ffs_xl", "sky_xl", "ucf_xl", "taichi_xl", "demo", "tiny"])
def test_recipes_set_only_what_differs(tmp_path, name):
    """Every `config.section.key = value` line of a recipe changes the config it builds on: a
    default lives in configs/default.py alone (a line that re-sets one is dead weight that drifts)."""
    configs = os.path.join(os.path.dirname(__file__), "..", "configs")
    for other in os.listdir(configs):
        if other.endswith(".py"):
            shutil.copy(os.path.join(configs, other), tmp_path / other)
    source = open(os.path.join(configs, f"{name}.py"), encoding="utf-8").read().split("\n")
    built = load_config(os.path.join(configs, f"{name}.py")).to_dict()
    redundant = []
    for i, line in enumerate(source):
        if re.match(r"\s+config\.\w+\.\w+\s*=[^=]", line) and not line.rstrip().endswith(("(", "[", "{", ",")):
            trial = source[:i] + [re.match(r"\s*", line).group(0) + "pass"] + source[i + 1:]
            (tmp_path / f"{name}.py").write_text("\n".join(trial), encoding="utf-8")
            if load_config(str(tmp_path / f"{name}.py")).to_dict() == built:
                redundant.append(line.strip())
    assert not redundant, f"configs/{name}.py re-sets values it already has: {redundant}"

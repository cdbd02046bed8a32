"""Every config under conf/ composes and validates (lightning-hydra-template's test_configs, for DVC's
Hydra composition); params.yaml and the generated conf/<group>/default.yaml files never drift from
the typed classes; bad values and unknown keys are errors naming the file, line and key path."""

from pathlib import Path

import pytest
import yaml

from ragtune.config import Config, ConfigError, Params, compose, read_params
from ragtune.params import GROUPS, expected_defaults, validate_all
from tests.conftest import ROOT

CONF = ROOT / "conf"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def composed(overrides: list[str], tmp_path: Path) -> Params:
    path = tmp_path / "params.yaml"
    path.write_text(compose(overrides, config_dir=CONF), encoding="utf-8")
    return read_params(path)


@pytest.mark.parametrize(
    "override", [f"{group}={option}" for group in [*GROUPS, "profile"] for option in options(group)]
)
def test_every_option_file_composes_and_validates(override, tmp_path):
    validate_all(composed([override], tmp_path))


@pytest.mark.parametrize("profile", options("profile"))
def test_every_profile_with_the_gpu_choices(profile, tmp_path):
    overrides = [f"profile={profile}", "model=qwen2_5_7b", "embedder=bge_large_zh", "teacher=deepseek_r1",
                 "router=llm", "data=cmrc_full"]
    validate_all(composed(overrides, tmp_path))


def test_params_yaml_equals_the_composition_of_the_defaults():
    committed = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    assert committed == yaml.safe_load(compose(config_dir=CONF)), "run `make params` and commit params.yaml"
    validate_all(read_params(ROOT / "params.yaml"))


def test_generated_defaults_are_up_to_date():
    for rel, text in expected_defaults().items():
        assert (CONF / rel).read_text(encoding="utf-8") == text, f"conf/{rel} drifted: run `make params`"


def test_settings_reference_is_up_to_date():
    from ragtune.params import settings_reference

    assert (ROOT / "docs" / "settings.md").read_text(encoding="utf-8") == settings_reference(), "run `make params`"


def test_every_field_has_a_one_line_help():
    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    classes = set(subclasses(Config))  # ragtune.params imported every module that defines one
    assert len(classes) > 15
    missing = [f"{c.__name__}.{name}" for c in classes for name, info in c.model_fields.items() if not info.description]
    assert not missing


def test_lr_override_is_top_level_and_reaches_only_lr():
    base = yaml.safe_load(compose(config_dir=CONF))
    changed = yaml.safe_load(compose(["lr=1e-4"], config_dir=CONF))
    assert changed["lr"] == 1e-4
    assert {k for k in base if base[k] != changed[k]} == {"lr"}


def test_full_profile_uses_the_seed_sizes(tmp_path):
    full = validate_all(composed(["profile=full"], tmp_path))
    assert full["common"].lr == 1e-4 and full["sft"].cutoff_len == 5120 and full["eval"].cmrc_samples is None


def write_params(tmp_path: Path, edit) -> Path:
    data = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    edit(data)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def line_of(path: Path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def test_unknown_key_names_file_line_and_key_path(tmp_path):
    path = write_params(tmp_path, lambda d: d["serve"].update(prot=8001))
    with pytest.raises(ConfigError) as err:
        validate_all(read_params(path))
    assert f"{path}:{line_of(path, 'prot:')}: serve.prot: unknown key" in str(err.value)


def test_nested_out_of_range_value_names_its_key_path(tmp_path):
    path = write_params(tmp_path, lambda d: d["sft"]["lora"].update(r=0))
    with pytest.raises(ConfigError, match=r"params.yaml:\d+: sft\.lora\.r: Input should be greater than or equal to 1"):
        validate_all(read_params(path))


def test_unknown_top_level_key_and_bad_choice(tmp_path):
    path = write_params(tmp_path, lambda d: d.update(lr2=1e-4))
    with pytest.raises(ConfigError, match="lr2: unknown key"):
        validate_all(read_params(path))
    path = write_params(tmp_path, lambda d: d["teacher"].update(kind="oracle"))
    with pytest.raises(ConfigError, match="teacher"):
        validate_all(read_params(path))
    path = write_params(tmp_path, lambda d: d["teacher"].update(kind="openai"))  # an openai teacher needs its URL
    with pytest.raises(ConfigError, match="teacher.base_url: missing required key"):
        validate_all(read_params(path))


def test_cross_field_checks(tmp_path):
    path = write_params(tmp_path, lambda d: d["split"].update(chunk_overlap=500))
    with pytest.raises(ConfigError, match="chunk_overlap"):
        validate_all(read_params(path))
    path = write_params(tmp_path, lambda d: d.update(device="gpu"))
    with pytest.raises(ConfigError, match="device"):
        validate_all(read_params(path))


def test_configs_are_checked_on_construction_and_frozen():
    from pydantic import ValidationError

    from ragtune.training import SftConfig

    with pytest.raises(ValidationError):
        SftConfig(batch_size=0)
    with pytest.raises(ValidationError):
        SftConfig(bacth_size=4)
    cfg = SftConfig()
    with pytest.raises(ValidationError):
        cfg.batch_size = 3


def test_no_secret_values_in_params():
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    assert "sk-" not in yaml.safe_dump(params)
    assert not any(k in ("api_key", "token") for k in params["teacher"])

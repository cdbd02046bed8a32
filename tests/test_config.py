"""conf/ (Hydra) is the source; params.yaml is its committed composition and must not drift."""

import yaml

from ragtune.config import compose, load_params
from tests.conftest import ROOT


def test_params_yaml_equals_composition_of_defaults():
    composed = compose(config_dir=ROOT / "conf")
    committed = (ROOT / "params.yaml").read_text(encoding="utf-8")
    assert yaml.safe_load(committed) == yaml.safe_load(composed), "run `make params` and commit params.yaml"


def test_lr_override_is_top_level_and_reaches_only_lr():
    base = yaml.safe_load(compose(config_dir=ROOT / "conf"))
    changed = yaml.safe_load(compose(["lr=1e-4"], config_dir=ROOT / "conf"))
    assert changed["lr"] == 1e-4
    assert {k for k in base if base[k] != changed[k]} == {"lr"}


def test_full_profile_uses_the_seed_sizes():
    full = yaml.safe_load(compose(["profile=full"], config_dir=ROOT / "conf"))
    assert full["lr"] == 1e-4


def test_no_secret_values_in_params():
    params = load_params(ROOT / "params.yaml")
    text = yaml.safe_dump(params)
    assert "sk-" not in text
    for group in ("teacher",):
        assert not any(k in ("api_key", "token") for k in params[group])

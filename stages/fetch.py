"""fetch: the datasets (checksummed, mirror first) and the base models as plain checkpoints."""

from pathlib import Path

from ragtune.config import load_params
from ragtune.data import fetch_datasets, resolve_mirror
from ragtune.io import atomic_dir, write_json
from ragtune.models import materialize_embedder, materialize_generator
from ragtune.tracking import stage_run


def main() -> None:
    params = load_params()
    data = params["data"]
    mirror = resolve_mirror(data.get("mirror"))
    with stage_run("fetch", {"data": data["datasets"], "model": params["model"], "embedder": params["embedder"]}) as mlflow:
        with atomic_dir("data/raw") as raw:
            fetched = fetch_datasets(data["datasets"], raw, mirror)
            (raw / "SHA256SUMS").write_text("".join(f"{f['sha256']}  {f['file']}\n" for f in fetched))
        for f in fetched:
            print(f"fetched {f['file']} from {f['source']} (sha256 {'verified' if f['verified'] else 'recorded'})")
        generator = materialize_generator(params["model"], "models/base/generator")
        embedder = materialize_embedder(params["embedder"], "models/base/embedder")
        print(f"generator {generator['name']}: {generator['parameters']:,} parameters -> models/base/generator")
        print(f"embedder {embedder['name']} -> models/base/embedder")
        mlflow.log_dict({"datasets": fetched, "generator": generator, "embedder": embedder}, "fetch.json")
        if "max_logit_diff" in generator:
            mlflow.log_metric("gguf_max_logit_diff", generator["max_logit_diff"])


if __name__ == "__main__":
    main()

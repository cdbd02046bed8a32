"""fetch: the datasets (checksummed, mirror first) or your own files (data=custom), and the base models
as plain checkpoints."""

from pathlib import Path

from ragtune.config import read_params, run_stage, stage_parser
from ragtune.sources import RAW, CustomDataConfig, DataChoice, fetch_custom, fetch_datasets, resolve_mirror
from ragtune.io import atomic_dir
from ragtune.models import EmbedderConfig, ModelConfig, materialize_embedder, materialize_generator
from ragtune.tracking import stage_run

GENERATOR = Path("models/base/generator")
EMBEDDER = Path("models/base/embedder")


def main() -> None:
    params = read_params(stage_parser(__doc__).parse_args().params)
    data = params.group("data", DataChoice)
    model, embedder = params.group("model", ModelConfig), params.group("embedder", EmbedderConfig)
    custom = isinstance(data, CustomDataConfig)
    sources = data.model_dump() if custom else data.model_dump()["datasets"]
    logged = {"data": sources, "model": model.model_dump(), "embedder": embedder.model_dump()}
    with stage_run("fetch", logged) as mlflow:
        with atomic_dir(RAW) as raw:
            if custom:
                fetched = fetch_custom(data, raw)
            else:
                fetched = fetch_datasets(data.datasets, raw, resolve_mirror(data.mirror))
            (raw / "SHA256SUMS").write_text("".join(f"{f['sha256']}  {f['file']}\n" for f in fetched))
        for f in fetched:
            print(f"fetched {f['file']} from {f['source']} (sha256 {'verified' if f['verified'] else 'recorded'})")
        generator = materialize_generator(model, GENERATOR)
        report = materialize_embedder(embedder, EMBEDDER)
        print(f"generator {generator['name']}: {generator['parameters']:,} parameters -> {GENERATOR}")
        print(f"embedder {report['name']} -> {EMBEDDER}")
        mlflow.log_dict({"datasets": fetched, "generator": generator, "embedder": report}, "fetch.json")
        if "max_logit_diff" in generator:
            mlflow.log_metric("gguf_max_logit_diff", generator["max_logit_diff"])


if __name__ == "__main__":
    run_stage("fetch", main)

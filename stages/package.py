"""package: the served bundle, the base bundle plus the LoRA adapter (eval scores it, `ragtune serve`
serves it, `dvc pull bundle` brings it)."""

import json
from pathlib import Path

from ragtune.bundle import add_adapter
from ragtune.config import run_stage, stage_parser
from ragtune.tracking import stage_run

BASE_BUNDLE = Path("bundle_base")
ADAPTER = Path("models/sft/adapter")
OUT = Path("bundle")


def main() -> None:
    stage_parser(__doc__).parse_args()  # --help; the stage reads no params
    with stage_run("package") as mlflow:
        manifest = add_adapter(BASE_BUNDLE, OUT, ADAPTER)
        mlflow.log_dict(manifest, "bundle_manifest.json")
        mlflow.set_tag("bundle.digest", manifest["digest"])
        print(json.dumps({"digest": manifest["digest"], "adapter": manifest["adapter"]}))


if __name__ == "__main__":
    run_stage("package", main)

"""split: train/eval by article, the knowledge base, SFT data, embedding triples, eval sets."""

import json
from pathlib import Path

from ragtune.config import load_params
from ragtune.data import prepare
from ragtune.io import atomic_dir
from ragtune.tracking import stage_run

OUT = Path("data/prepared")


def main() -> None:
    params = load_params()
    with stage_run("split", {"seed": params["seed"], "split": params["split"]}) as mlflow:
        outputs, stats = prepare(
            Path("data/raw"), params["data"], params["split"], params["embedder"]["query_prompt"], params["seed"]
        )
        # Everything lands together or not at all: a failure leaves no partial outputs.
        with atomic_dir(OUT) as tmp:
            for name, rows in outputs.items():
                with open(tmp / name, "w", encoding="utf-8") as fh:
                    if name.endswith(".jsonl"):
                        fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
                    else:
                        json.dump(rows, fh, ensure_ascii=False, indent=1)
            (tmp / "stats.json").write_text(json.dumps(stats, ensure_ascii=False, indent=2) + "\n")
        summary = {k: v for k, v in stats["cmrc"].items()} | {"embed_triples": stats["embed_triples"]}
        mlflow.log_metrics({f"cmrc.{k}" if k != "embed_triples" else k: v for k, v in summary.items()})
        print(json.dumps({k: v for k, v in stats.items() if k not in ("repairs", "drops")}, ensure_ascii=False))


if __name__ == "__main__":
    main()

"""split: train/eval by article, the knowledge base, SFT data, embedding triples, eval sets."""

import json
from pathlib import Path

from ragtune.config import read_params, run_stage, stage_parser
from ragtune.data import SplitConfig, prepare
from ragtune.sources import DataConfig
from ragtune.io import atomic_dir
from ragtune.models import EmbedderConfig
from ragtune.retrieval import RetrievalConfig
from ragtune.tracking import stage_run

RAW = Path("data/raw")
OUT = Path("data/prepared")


def main() -> None:
    params = read_params(stage_parser(__doc__).parse_args().params)
    split, data, seed = params.group("split", SplitConfig), params.group("data", DataConfig), params.common().seed
    stopwords = params.group("retrieval", RetrievalConfig).stopwords
    query_prompt = params.group("embedder", EmbedderConfig).query_prompt
    with stage_run("split", {"seed": seed, "split": split.model_dump()}) as mlflow:
        outputs, stats = prepare(RAW, data=data, split=split, stopwords=stopwords, query_prompt=query_prompt, seed=seed)
        # Everything lands together or not at all: a failure leaves no partial outputs.
        with atomic_dir(OUT) as tmp:
            for name, rows in outputs.items():
                with open(tmp / name, "w", encoding="utf-8") as fh:
                    if name.endswith(".jsonl"):
                        fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
                    else:
                        json.dump(rows, fh, ensure_ascii=False, indent=1)
            (tmp / "stats.json").write_text(json.dumps(stats, ensure_ascii=False, indent=2) + "\n")
        summary = dict(stats["cmrc"]) | {"embed_triples": stats["embed_triples"]}
        mlflow.log_metrics({f"cmrc.{k}" if k != "embed_triples" else k: v for k, v in summary.items()})
        print(json.dumps({k: v for k, v in stats.items() if k not in ("repairs", "drops")}, ensure_ascii=False))


if __name__ == "__main__":
    run_stage("split", main)

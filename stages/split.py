"""split: train/eval by article, the knowledge base, train and eval questions, embedding triples."""

import json

from ragtune.config import read_params, run_stage, stage_parser
from ragtune.data import SplitConfig, prepare
from ragtune.io import atomic_dir
from ragtune.models import EmbedderConfig
from ragtune.records import PREPARED, write_records
from ragtune.retrieval import RetrievalConfig
from ragtune.sources import RAW, DataConfig
from ragtune.tracking import stage_run


def main() -> None:
    params = read_params(stage_parser(__doc__).parse_args().params)
    split, data, seed = params.group("split", SplitConfig), params.group("data", DataConfig), params.common().seed
    stopwords = params.group("retrieval", RetrievalConfig).stopwords
    query_prompt = params.group("embedder", EmbedderConfig).query_prompt
    with stage_run("split", {"seed": seed, "split": split.model_dump()}) as mlflow:
        outputs, stats = prepare(RAW, data=data, split=split, stopwords=stopwords, query_prompt=query_prompt, seed=seed)
        # Everything lands together or not at all: a failure leaves no partial outputs.
        with atomic_dir(PREPARED) as tmp:
            for name, rows in outputs.items():
                write_records(tmp / name, rows)
            (tmp / "stats.json").write_text(json.dumps(stats, ensure_ascii=False, indent=2) + "\n")
        summary = dict(stats["cmrc"]) | {"embed_triples": stats["embed_triples"]}
        mlflow.log_metrics({f"cmrc.{k}" if k != "embed_triples" else k: v for k, v in summary.items()})
        print(json.dumps({k: v for k, v in stats.items() if k not in ("repairs", "drops")}, ensure_ascii=False))


if __name__ == "__main__":
    run_stage("split", main)

"""split: train/eval by article, the knowledge base, train and eval questions, embedding triples
(from CMRC2018 + GSM8K, or from your own documents and questions: data=custom)."""

import json

from ragtune.config import read_params, run_stage, stage_parser
from ragtune.custom_data import prepare_custom
from ragtune.data import SplitConfig, prepare
from ragtune.io import atomic_dir
from ragtune.models import EmbedderConfig
from ragtune.records import PREPARED, write_records
from ragtune.retrieval import RetrievalConfig
from ragtune.sources import RAW, CustomDataConfig, DataChoice
from ragtune.tracking import stage_run


def main() -> None:
    params = read_params(stage_parser(__doc__).parse_args().params)
    split, data, seed = params.group("split", SplitConfig), params.group("data", DataChoice), params.common().seed
    stopwords = params.group("retrieval", RetrievalConfig).stopwords
    query_prompt = params.group("embedder", EmbedderConfig).query_prompt
    with stage_run("split", {"seed": seed, "split": split.model_dump()}) as mlflow:
        recipe = prepare_custom if isinstance(data, CustomDataConfig) else prepare
        outputs, stats = recipe(RAW, data=data, split=split, stopwords=stopwords, query_prompt=query_prompt, seed=seed)
        # Everything lands together or not at all: a failure leaves no partial outputs.
        with atomic_dir(PREPARED) as tmp:
            for name, rows in outputs.items():
                write_records(tmp / name, rows)
            (tmp / "stats.json").write_text(json.dumps(stats, ensure_ascii=False, indent=2) + "\n")
        sections = ("cmrc",) if "cmrc" in stats else ("documents", "reading", "maths")
        summary = {f"{name}.{k}": v for name in sections for k, v in stats[name].items()
                   if isinstance(v, int | float) and not isinstance(v, bool)}
        mlflow.log_metrics(summary | {"embed_triples": stats["embed_triples"]})
        shown = {k: v for k, v in stats.items() if k not in ("repairs", "drops", "unanswerable")}
        print(json.dumps(shown, ensure_ascii=False))
        if stats.get("unanswerable"):
            print(f"split: {len(stats['unanswerable'])} unanswerable questions kept out of training "
                  f"(listed in {PREPARED / 'stats.json'}): " + ", ".join(u["id"] for u in stats["unanswerable"][:10]))
        if stats.get("drops"):
            print(f"split: {len(stats['drops'])} questions or answers dropped (reasons and where in "
                  f"{PREPARED / 'stats.json'})")


if __name__ == "__main__":
    run_stage("split", main)

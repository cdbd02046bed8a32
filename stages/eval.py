"""eval: score a bundle's own answer path (what `ragtune serve` runs) on held-out CMRC and GSM8K questions,
by CMRC2018's official rules, with 95 % bootstrap intervals; with --baseline, also the paired
difference to the base bundle's answers, the report and the chart, and endpoints as extra rows.

    python stages/eval.py --bundle bundle_base --out reports/eval_base                           # eval_base
    python stages/eval.py --bundle bundle --out reports/eval --baseline reports/eval_base        # eval
"""

import contextlib
import json
from pathlib import Path

from ragtune.bundle import Bundle, checked_base, log_pyfunc_model, read_manifest, resolve_base
from ragtune.config import read_params, run_stage, stage_parser
from ragtune.devices import placement
from ragtune.engine import VllmConfig, VllmEngine
from ragtune.evaluate import (
    AssistantEndpoint,
    EvalConfig,
    evaluate_bundle,
    paired_differences,
    question_sets,
)
from ragtune.inference import OpenAIGenerator
from ragtune.io import DataError, atomic_dir, read_json, read_jsonl
from ragtune.records import CMRC_EVAL, GSM8K_EVAL, MathsQuestion, ReadingQuestion, read_records
from ragtune.report import bar_chart, markdown_report
from ragtune.tracking import flatten, mlflow_key, stage_run

EMBEDDER = Path("models/base/embedder")  # the seed's similarity metric
UPSTREAM = {"embed_ft": Path("reports/embed_ft/metrics.json"), "router": Path("reports/router/metrics.json")}


def arguments():
    parser = stage_parser(__doc__)
    parser.add_argument("--bundle", default="bundle", help="the bundle to score (default: bundle)")
    parser.add_argument("--out", default="reports/eval", help="output folder (default: reports/eval)")
    parser.add_argument("--baseline", help="a folder eval wrote for the base bundle: adds the paired differences and the report")
    return parser.parse_args()


def load_bundle(folder: Path, cfg: EvalConfig, vllm: VllmConfig, device: str, dtype: str, stack):
    """The bundle with its in-process generator, or with a managed vLLM engine as its generator."""
    if cfg.backend == "vllm":
        manifest = read_manifest(folder)
        adapter = folder / manifest["adapter"] if manifest.get("adapter") else None
        engine = stack.enter_context(VllmEngine(vllm, checked_base(folder), adapter, log_path=folder.parent / "vllm.log",
                                                dtype=dtype))
        return Bundle.load(folder, generator=engine.generator(), device=device)
    return Bundle.load(folder, device=device, dtype=dtype, batch_size=cfg.batch_size)


def endpoint_rows(cfg: EvalConfig, folder: Path, sets, seed: int, embedder) -> dict:
    """Each configured endpoint scored on the same questions: through the bundle (generator mode) or as a
    whole assistant."""
    out = {}
    for name, ep in cfg.endpoints.items():
        if ep.mode == "assistant":
            answerer = AssistantEndpoint(ep)
        else:
            generator = OpenAIGenerator(ep.base_url, ep.model, api_key_env=ep.api_key_env, timeout=ep.timeout,
                                        max_concurrency=ep.max_concurrency)
            answerer = Bundle.load(folder, generator=generator)
        out[name], _ = evaluate_bundle(answerer, sets, cfg, seed, embedder)
    return out


def baseline_rows(folder: Path) -> tuple[dict, dict]:
    metrics = read_json(folder / "metrics.json")
    rows = {p.stem: read_jsonl(p) for p in sorted((folder / "predictions").glob("*.jsonl"))}
    return metrics, rows


def main() -> None:
    args = arguments()
    params = read_params(args.params)
    cfg, common = params.group("eval", EvalConfig), params.common()
    device, dtype = placement(common.device, common.dtype)
    folder, out = Path(args.bundle), Path(args.out)
    sets = question_sets(read_records(CMRC_EVAL, ReadingQuestion), read_records(GSM8K_EVAL, MathsQuestion), cfg, common.seed)
    for what, path, size in (("reading", CMRC_EVAL, len(sets.cmrc)), ("maths", GSM8K_EVAL, len(sets.gsm8k))):
        if not size:  # your own data may have none: only the sets that exist are scored
            print(f"eval: no held-out {what} questions in {path}: those rows are skipped", flush=True)
    name = "tuned" if read_manifest(folder).get("adapter") else "base"
    embedder = None
    if cfg.similarity:
        from sentence_transformers import SentenceTransformer

        embedder = SentenceTransformer(str(EMBEDDER), device=device)

    with contextlib.ExitStack() as stack:
        bundle = load_bundle(folder, cfg, params.group("vllm", VllmConfig), device, dtype, stack)
        metrics, rows = evaluate_bundle(bundle, sets, cfg, common.seed, embedder)
    metrics["bundle_digest"] = bundle.manifest["digest"]
    report = {name: metrics}
    if args.baseline:
        base_metrics, base_rows = baseline_rows(Path(args.baseline))
        if base_metrics["base"]["questions"] != metrics["questions"]:
            raise DataError(f"{args.baseline}: scored on other question sets than {folder} (rerun eval_base)")
        report = {"base": base_metrics["base"], name: metrics,
                  "tuned_minus_base": paired_differences(scored(base_rows), scored(rows), common.seed,
                                                         cfg.bootstrap_resamples)}
        report["endpoints"] = endpoint_rows(cfg, folder, sets, common.seed, embedder)
        report |= {k: read_json(p) for k, p in UPSTREAM.items() if p.exists()}
        for upstream in ("router",):
            report.get(upstream, {}).pop("errors", None)

    with atomic_dir(out) as tmp:
        (tmp / "predictions").mkdir()
        for set_name, set_rows in rows.items():
            with open(tmp / "predictions" / f"{set_name}.jsonl", "w", encoding="utf-8") as fh:
                fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in set_rows)
        (tmp / "metrics.json").write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n")
        if args.baseline:
            columns = {"base": report["base"], "tuned": metrics} | report["endpoints"]
            header = report_header(sets, cfg, common.seed, device, dtype, metrics, report["base"])
            (tmp / "report.md").write_text(markdown_report(columns, report["tuned_minus_base"], header,
                                                           cfg.references, metrics.get("retrieval")), encoding="utf-8")
            bar_chart(columns, tmp / "comparison.png", title=header[2])

    with stage_run("eval" if args.baseline else "eval_base", {"seed": common.seed, "eval": cfg.model_dump(),
                                                              "bundle": str(folder), "device": device, "dtype": dtype}) as mlflow:
        numbers = {mlflow_key(k): float(v) for k, v in flatten(report).items()
                   if isinstance(v, int | float) and not isinstance(v, bool)}
        mlflow.log_metrics(numbers)
        mlflow.set_tag("bundle.digest", metrics["bundle_digest"])
        mlflow.log_artifacts(str(out))
        if args.baseline and cfg.log_model:
            model = log_pyfunc_model(mlflow, folder, resolve_base(folder, bundle.manifest))
            model_numbers = {k: v for k, v in numbers.items() if k.startswith(f"{name}.")}
            mlflow.log_metrics(model_numbers, model_id=model.model_id)  # the model carries what was measured on it
    print((out / "report.md").read_text(encoding="utf-8") if args.baseline else json.dumps(metrics["served"]))


def scored(rows: dict) -> dict:
    """The prediction sets that hold rows: an empty one (no held-out maths, say) has no difference to take."""
    return {name: set_rows for name, set_rows in rows.items() if set_rows}


def report_header(sets, cfg: EvalConfig, seed: int, device: str, dtype: str, tuned: dict, base: dict) -> list[str]:
    sizes = sets.sizes()
    seconds = ", ".join(f"{k} {v:.0f} s" for k, v in tuned["seconds"].items())
    return [
        "# ragtune eval: the served assistant, base bundle against tuned bundle",
        "",
        f"{sizes['cmrc']} held-out reading questions (CMRC2018 trial, or data=custom's) + {sizes['gsm8k']} held-out "
        f"maths questions (GSM8K test, or data=custom's) through each bundle's own answer path; "
        f"{sizes['unanswerable']} more reading questions with their article left out of retrieval.",
        f"Official CMRC2018 EM/F1; seed {seed}; means with 95 % bootstrap intervals ({cfg.bootstrap_resamples} "
        f"resamples), differences by paired bootstrap over the same questions. Generation on {device}, {dtype}, greedy.",
        f"Tuned bundle {tuned['bundle_digest'][:12]}, base bundle {base['bundle_digest'][:12]}; tuned timings: {seconds}.",
    ]


if __name__ == "__main__":
    run_stage("eval", main)

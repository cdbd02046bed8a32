"""export (optional stage): models/sft/adapter merged into models/base/generator -> models/merged, a
standalone model folder for vLLM without LoRA, llama.cpp's converter or Ollama, checked against base +
adapter in float32 (ragtune.export). Not in dvc.yaml; add it with

    dvc stage add -n export -p device \\
        -d stages/export.py -d ragtune/__init__.py -d ragtune/config.py -d ragtune/devices.py \\
        -d ragtune/export.py -d ragtune/io.py -d ragtune/prompts.py \\
        -d models/base/generator -d models/sft/adapter \\
        -o models/merged -M reports/export/metrics.json \\
        python stages/export.py
"""

from pathlib import Path

from ragtune.config import read_params, run_stage, stage_parser
from ragtune.devices import resolve_device
from ragtune.export import export_merged
from ragtune.io import write_json

BASE = Path("models/base/generator")
ADAPTER = Path("models/sft/adapter")
OUT = Path("models/merged")
METRICS = Path("reports/export/metrics.json")


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="dtype of the saved weights (default: the base's own)")
    args = parser.parse_args()
    device = resolve_device(read_params(args.params).common().device)
    report = export_merged(BASE, ADAPTER, OUT, device=device, dtype=args.dtype)
    write_json(METRICS, report)


if __name__ == "__main__":
    run_stage("export", main)

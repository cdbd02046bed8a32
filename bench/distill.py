"""Distill throughput against a loopback teacher with a fixed latency, and the calls a rerun makes.

Ideal throughput with C calls in flight, each taking L seconds, is C / L calls per second; this
prints measured ÷ ideal (target ≥ 0.9) and the number of calls a second run makes (target 0).
Usage: python bench/distill.py [--items 200] [--concurrency 8] [--latency 0.25]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ragtune.prompts import math_prompt  # noqa: E402
from ragtune.teacher import (  # noqa: E402
    DistillConfig,
    Distiller,
    OpenAITeacherConfig,
    ResponseCache,
    make_teacher,
    retry_policy,
)
from tests.loopback_teacher import Answer, LoopbackTeacher, user_text  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--latency", type=float, default=0.25)
    args = parser.parse_args()

    items = [{"id": f"b{i}", "question": f"What is {i} plus 1?", "answer": str(i + 1)} for i in range(args.items)]
    gold = {math_prompt(item["question"]): item["answer"] for item in items}

    def respond(request, call_no):
        return Answer(f"\\boxed{{{gold[user_text(request)]}}}", reasoning="Add one.", latency=args.latency)

    os.environ["RAGTUNE_BENCH_TEACHER_KEY"] = "bench"
    with tempfile.TemporaryDirectory() as tmp, LoopbackTeacher(respond) as server:
        cfg = OpenAITeacherConfig(kind="openai", name="loopback", base_url=server.base_url, model="loopback",
                                  api_key_env="RAGTUNE_BENCH_TEACHER_KEY", system=None, temperature=0.6, top_p=None,
                                  max_tokens=64, timeout=30)
        retry = retry_policy(DistillConfig())
        runs = []
        for _ in range(2):
            teacher = make_teacher(cfg)
            with ResponseCache(Path(tmp) / "cache.jsonl") as cache:
                calls_before = len(server.calls)
                started = time.perf_counter()
                result = Distiller(teacher, cache, max_rounds=1, concurrency=args.concurrency, retry=retry,
                                   seed=0).run(items)
                runs.append((time.perf_counter() - started, len(server.calls) - calls_before, result.stats))
    (first_s, first_calls, stats), (second_s, second_calls, second_stats) = runs
    ideal = args.concurrency / args.latency
    measured = first_calls / first_s
    print(f"items={args.items} concurrency={args.concurrency} latency={args.latency}s "
          f"accepted={stats['accepted']} peak_in_flight={server.max_in_flight}")
    print(f"first run: {first_calls} calls in {first_s:.2f}s = {measured:.1f} calls/s; ideal {ideal:.1f} calls/s")
    print(f"throughput / (concurrency / latency) = {measured / ideal:.3f}  (target >= 0.9)")
    print(f"second run: {second_calls} calls, {second_stats['cache_hits']} cache hits, {second_s:.2f}s  (target 0 calls)")


if __name__ == "__main__":
    main()

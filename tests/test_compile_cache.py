"""Compiled kernels shared through the run's storage: a second actor, on a machine whose Inductor
cache is empty, loads what the first one compiled instead of compiling again."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
ACTOR = """
import json, sys
import torch
from torch._dynamo.utils import counters
from workers import experiments
from workers.model import source
from workers.shard import ShardRunner
from workers.work import WorkParams
params = WorkParams("toy-2l", 0, 0, source.FALLBACK_PAIR, 1, False, "fp32", False, "exact", (experiments.get("neighbors"),))
runner = ShardRunner(params, sys.argv[1], device="cpu", compile=True)
assert runner.scorer.options["compiled"], runner.scorer.options
print(json.dumps({"hits": counters["inductor"]["fxgraph_cache_hit"], "misses": counters["inductor"]["fxgraph_cache_miss"],
                  "steps": sorted(k for k in runner.timings if k.startswith("cache"))}))
"""


def actor(out: str, inductor_dir: Path) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(inductor_dir)}
    proc = subprocess.run([sys.executable, "-c", ACTOR, out], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_second_actor_loads_the_first_ones_kernels(tmp_path):
    out = str(tmp_path / "run")
    first = actor(out, tmp_path / "inductor-a")
    assert first["misses"] >= 1 and first["steps"] == ["cache load", "cache save"]
    assert len(list((tmp_path / "run" / "cache").glob("compile-*.bin"))) == 1
    second = actor(out, tmp_path / "inductor-b")  # another machine: nothing in its own cache
    assert second["hits"] >= 1 and second["misses"] == 0 and second["steps"] == ["cache load"]

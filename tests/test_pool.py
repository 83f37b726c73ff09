"""The elastic actor pool (jobs/pool.py): how many actors a run asks for, and a sweep on a cluster of
several Ray nodes on this machine that gains a node mid-run and loses another."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

from jobs import driver, manifest, results
from jobs.cli import main
from jobs.config import RunConfig, parse_resources, plan_shards
from jobs.errors import ConfigError
from jobs.pool import plan_actors
from storage import open_store
from tests.helpers import VENV_BIN, assert_complete_once, free_port, resolved, wait_for_port
from workers.shard import ORIGIN_KEY, ShardRunner

ROOT = Path(__file__).parent.parent


def config(**fields) -> RunConfig:
    return RunConfig(model="toy-2l", out="unused", **fields)


def test_actors_beyond_what_fits_now_are_asked_for():
    """Pending actors are the autoscaler's demand: --actors 8 on a cluster with 2 GPUs now asks for 8."""
    plan = plan_actors(config(actors=8), {"GPU": 2, "CPU": 16})
    assert (plan.count, plan.fit_now, plan.num_gpus, plan.device) == (8, 2, 1.0, "cuda")
    plan = plan_actors(config(actors=5, resources_per_actor=(("slot", 1.0),)), {"CPU": 2, "slot": 2})
    assert (plan.count, plan.fit_now, plan.resources) == (5, 2, {"slot": 1.0})


def test_auto_is_what_the_cluster_holds_now():
    assert plan_actors(config(), {"GPU": 4, "CPU": 8}).count == 4
    assert plan_actors(config(gpus_per_actor=0.5), {"GPU": 2, "CPU": 8}).count == 4
    assert plan_actors(config(resources_per_actor=(("slot", 1.0),)), {"CPU": 3, "slot": 3}).count == 3
    plan = plan_actors(config(), {"CPU": 4})
    assert (plan.count, plan.num_gpus, plan.threads, plan.device) == (2, 0, 2, "cpu")


def test_auto_counts_what_the_autoscaler_can_reach():
    """cluster.yaml's shape: a CPU head now, GPU workers from 1 up to 8: auto asks for 8, 1 fits now."""
    plan = plan_actors(config(), {"CPU": 4, "GPU": 1}, reachable={"CPU": 36, "GPU": 8})
    assert (plan.count, plan.fit_now, plan.device) == (8, 1, "cuda")
    # GPU workers at zero now: not refused, all pending until the autoscaler brings nodes up
    plan = plan_actors(config(gpus_per_actor=1.0), {"CPU": 4}, reachable={"GPU": 8})
    assert (plan.count, plan.fit_now) == (8, 0)
    # an unbounded node type: room for one actor more than there is now, at zero nodes too
    assert plan_actors(config(), {"CPU": 4, "GPU": 2}, reachable={"GPU": 2**63 - 1}).count == 3
    plan = plan_actors(config(), {"CPU": 4}, reachable={"GPU": 2**63 - 1})
    assert (plan.count, plan.fit_now, plan.device) == (1, 0, "cuda")


def test_fractional_gpus():
    assert plan_actors(config(gpus_per_actor=0.1), {"CPU": 4, "GPU": 1}).count == 10
    with pytest.raises(ConfigError, match="one actor needs 1 GPU; the cluster has 0.5"):
        plan_actors(config(), {"CPU": 4, "GPU": 0.5})


def test_eta_hours_are_not_wrapped_at_a_day():
    from jobs.pool import format_eta

    assert (format_eta(90061), format_eta(59), format_eta(None)) == ("25:01:01", "0:00:59", "unknown")


def test_the_local_cluster_has_no_autoscaler(ray_cluster):
    from jobs.pool import reachable_resources

    assert reachable_resources(ray_cluster) is None


@pytest.mark.parametrize("fields, resources, match", [
    (dict(gpus_per_actor=1.0), {"CPU": 4}, "more GPUs than the cluster has"),
    (dict(resources_per_actor=(("slot", 1.0),)), {"CPU": 4}, "'slot' per actor; the cluster has 0"),
])
def test_an_actor_that_fits_nowhere_is_refused(fields, resources, match):
    with pytest.raises(ConfigError, match=match):
        plan_actors(config(**fields), resources)


@pytest.mark.parametrize("text, match", [
    ("slot", "JSON object"), ('{"slot": 0}', "positive"), ('{"slot": true}', "positive"), ("{}", "JSON object"),
    ('{"GPU": 1}', "use --gpus-per-actor for GPU"),
])
def test_bad_resources_per_actor(text, match):
    with pytest.raises(ConfigError, match=match):
        parse_resources(text)
    assert parse_resources('{"b": 2, "a": 0.5}') == (("a", 0.5), ("b", 2.0))


# --- several nodes ---------------------------------------------------------------------------------

# long enough (about a minute of scoring on 2 cores) for an actor on a node added mid-run to start,
# prove its scorer and take shards
SWEEP = ["--model", "toy-2l", "--experiment", "token-powers", "--tokens", "400", "--seqs", "96", "--shard-size", "64",
         "--batch-size", "32", "--precision", "fp32"]
# the GCS notices a dead node within seconds instead of its default half minute
FAST_FAILURE = {"RAY_health_check_initial_delay_ms": "0", "RAY_health_check_period_ms": "500",
                "RAY_health_check_timeout_ms": "500", "RAY_health_check_failure_threshold": "2"}


class Node:
    """One `ray start --block` node with its own temp dir and ports, stopped by its own PIDs."""

    def __init__(self, temp: Path, head_port: int | None = None, port: int | None = None):
        self.temp = temp
        ports = [f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
                 f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                 f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]
        where = ["--head", f"--port={port}", "--include-dashboard=false"] if head_port is None else [
            f"--address=127.0.0.1:{head_port}"]
        env = {**os.environ, **FAST_FAILURE, "RAY_AUTH_MODE": "disabled", "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "ray"), "start", "--block", *where, "--num-cpus=1", '--resources={"slot": 1}',
             f"--temp-dir={temp}", "--disable-usage-stats", *ports],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def processes(self) -> list[psutil.Process]:
        found = []
        for p in psutil.process_iter(["cmdline"]):
            cmd = p.info["cmdline"] or []
            if any(str(self.temp) in part for part in cmd) and p.pid != os.getpid():
                found.append(p)
        return found

    def kill(self) -> None:
        """All at once with SIGKILL: a machine lost, not a shutdown."""
        self.proc.kill()
        for p in self.processes():
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self.proc.wait(30)

    def stop(self) -> None:
        """Raylet first, then the rest, GCS last (the order `ray stop` uses)."""
        for name in ("raylet", "", "gcs_server"):
            for p in self.processes():
                try:
                    if name in " ".join(p.cmdline()) and (name or "gcs_server" not in " ".join(p.cmdline())):
                        p.terminate()
                except psutil.NoSuchProcess:
                    pass
            time.sleep(0.5)
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        for p in self.processes():
            p.kill()


def shard_nodes(out: Path) -> dict[str, str]:
    """Shard key -> the Ray node that computed it, from each shard's metadata."""
    nodes = {}
    for path in (out / "shards").rglob("*.parquet"):
        try:
            origin = json.loads(pq.read_schema(path).metadata[ORIGIN_KEY])
        except (OSError, KeyError, ValueError):
            continue  # not whole yet
        nodes[path.relative_to(out).as_posix()] = origin["node"]
    return nodes


def wait_until(condition, what: str, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_a_sweep_grows_onto_a_new_node_and_survives_losing_one(ray_cluster, short_tmp, tmp_path, capsys):
    out = tmp_path / "multi"
    head_port = free_port()
    nodes = [Node(short_tmp / "head", port=head_port)]
    try:
        wait_for_port(head_port, timeout=60)
        nodes.append(Node(short_tmp / "a", head_port=head_port))
        time.sleep(3)  # the worker node registers
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", "INDUCTION_SWEEP_PLACEMENT_WAIT_S": "5"}
        log = open(tmp_path / "driver.log", "w")
        run = subprocess.Popen([sys.executable, "-m", "jobs.cli", "run", *SWEEP, "--actors", "3", "--out", str(out),
                                "--resources-per-actor", '{"slot": 1}', "--address", f"127.0.0.1:{head_port}"],
                               cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        # two nodes hold two of the three actors; both compute
        wait_until(lambda: len(set(shard_nodes(out).values())) >= 2, "shards from the head and node a")
        nodes_before = set(shard_nodes(out).values())
        nodes.append(Node(short_tmp / "b", head_port=head_port))  # the cluster grows mid-run
        wait_until(lambda: len(set(shard_nodes(out).values())) >= 3, "a shard from the added node b")
        nodes[1].kill()  # node a is lost with its actor and whatever it was computing
        # a running run's rate and time left, as `status --json` gives them to scripts
        wait_until(lambda: open_store(str(out)).exists("progress.json"), "progress.json")
        assert main(["status", "--json", str(out)]) == 0
        running = json.loads(capsys.readouterr().out)
        assert running["status"] == "running" and running["seq_per_s"] > 0 and running["eta_s"] is not None
        assert 0 < running["shards_done"] < running["shards_total"]
        assert run.wait(600) == 0, (tmp_path / "driver.log").read_text()[-3000:]
    finally:
        for node in reversed(nodes):
            node.stop()
    text = (tmp_path / "driver.log").read_text()
    # node a may register after the driver looked: room for 1 or 2 at the start, never 3
    assert re.search(r"3 actors asked for, room for [12] now", text), text[-3000:]
    assert re.search(r"[0-2] of 3 actors ready after 5 s", text), text[-3000:]
    # no terminal: progress lines in the log (what a Ray Job's log shows)
    assert re.search(r"progress: shards \d+/\d+, [\d,]+/[\d,]+ sequences, [\d,]+ seq/s, ETA \d+:\d\d:\d\d", text)
    computed_by = shard_nodes(out)
    assert len(set(computed_by.values())) == 3 and nodes_before < set(computed_by.values())
    assert_complete_once(str(out), 400, 96)
    powers = results.open_run(str(out)).aggregates.tables()["token_powers"]  # no shard merged twice or missed
    assert len(powers) == 400 and (powers.a_n == 96).all() and (powers.b_n == 96).all()
    # what each node wrote is what one process here computes from the same specs, bit for bit (the
    # aggregates are a fixed-order merge of the shards' footers: test_driver.py compares those)
    cfg = manifest.config_of(open_store(str(out)))
    here = ShardRunner(cfg.work_params, str(tmp_path / "here"), device="cpu", batch_size=32)
    specs = {spec.key: spec for spec in plan_shards(cfg)}
    for node in set(computed_by.values()):
        for key in sorted(k for k, n in computed_by.items() if n == node)[:2]:
            here.run(specs[key])
            rows = [pq.read_table(root / key).replace_schema_metadata() for root in (out, tmp_path / "here")]
            assert rows[0].equals(rows[1]), key


def test_actors_that_cannot_load_fail_the_run_with_their_error(ray_cluster, tmp_path):
    """A model an actor cannot load is not a lost node: no replacements; the run is refused (exit 2) with
    the actor's one line, as every actor would refuse it."""
    from jobs.errors import ConfigError
    from workers.model import hooked, source

    checkpoint = tmp_path / "ckpt"
    hooked.export_model(hooked.load_model("toy-2l", "cpu"), str(checkpoint))
    cfg = resolved(RunConfig(model=str(checkpoint), out=str(tmp_path / "out"), experiments=("neighbors",), pairs=32,
                             neighbors=3, actors=2), None)
    info = source.describe(str(checkpoint))
    (checkpoint / "model.safetensors").unlink()  # gone after the driver read its header
    with pytest.raises(ConfigError, match="model.safetensors"):
        driver.run(cfg, info, progress=False)


def test_progress_rate_follows_the_last_minute(tmp_path):
    """After the pool grows the rate (and the ETA) are those of the last minute, not the run's average;
    with no actor ready there is no ETA."""
    from jobs.phases import Phases
    from jobs.pool import Progress

    progress = Progress(False, 1_000_000, 0, 100, 0.0, Phases(), open_store(str(tmp_path)))
    progress.start, progress.placed = 0.0, 1
    progress.scored = 1_000
    assert progress.figures(10.0)["seq_per_s"] == 100.0
    progress.scored += 60_000  # eight actors now
    progress.figures(70.0)
    progress.scored += 10_000
    figures = progress.figures(80.0)
    assert figures["seq_per_s"] == 1000.0 and figures["eta_s"] == (1_000_000 - 71_000) / 1000
    progress.placed = 0
    assert progress.figures(90.0)["eta_s"] is None

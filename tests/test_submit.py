"""A real Ray Job: a local head started with `ray start --head` (stopped by its own PIDs, never
`ray stop`, which would stop every Ray on the machine), the run submitted through the Jobs API."""

import os
import re
import subprocess
import time

import psutil
import pytest

from jobs.cli import main
from storage import open_store
from tests.conftest import VENV_BIN, free_port, wait_for_port


@pytest.fixture
def ray_head(short_tmp, moto_server):
    dashboard, gcs = free_port(), free_port()
    temp = short_tmp
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    proc = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--head", "--block", "--num-cpus=2", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--port={gcs}", f"--temp-dir={temp}",
         "--disable-usage-stats",
         # the session's other Ray cluster (tests/conftest.py) holds the default agent ports
         f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
         f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(dashboard, timeout=90)
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        stop_head(proc, str(temp))


def stop_head(proc: subprocess.Popen, temp: str) -> None:
    """Raylet first, then the rest, GCS last (the order `ray stop` uses), for this head's processes only."""
    def ours(name: str):
        found = []
        for p in psutil.process_iter(["cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if temp in cmd and name in cmd:
                found.append(p)
        return found

    for name in ("raylet", "", "gcs_server"):
        for p in ours(name):
            if name or "gcs_server" not in " ".join(p.cmdline()):
                p.terminate()
        time.sleep(1)
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
    for p in ours(""):
        p.kill()


def test_submit_runs_as_a_ray_job_and_lands_in_the_bucket(ray_head, bucket, capsys, monkeypatch):
    """As `ray job submit`: the cluster from RAY_ADDRESS; the job id and dashboard URL first; the job's
    log shows progress lines (no terminal there); a second submit of the same run is refused."""
    monkeypatch.setenv("RAY_ADDRESS", ray_head)
    run = ["--model", "toy-2l", "--experiment", "neighbors", "--pairs", "32", "--neighbors", "3", "--actors", "2",
           "--out", f"s3://{bucket}/job"]
    code = main(["submit", "--wait", "--", *run])
    out = capsys.readouterr()
    assert code == 0, out.out[-3000:] + out.err[-2000:]
    job_id, dashboard = out.out.splitlines()[:2]
    assert job_id.startswith("induction-sweep-") and dashboard == f"dashboard: {ray_head}/#/jobs/{job_id}"
    assert re.search(r"progress: shards \d+/\d+, .* seq/s, ETA", out.out), out.out[-3000:]
    keys = open_store(f"s3://{bucket}/job").list()
    assert {"report.html", "aggregates/neighbors.parquet", "manifest.json"} <= set(keys)
    assert any(k.startswith("shards/neighbors/") for k in keys)
    # the same run again: recognised by its submission id (output URI + config hash)
    assert main(["submit", "--", *run]) == 2
    assert f"job {job_id} already completed this run" in capsys.readouterr().err


def test_submit_needs_a_cluster_address(capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    assert main(["submit", "--", "--model", "toy-2l", "--out", "x"]) == 2
    assert "give --address http://HEAD:8265 or set RAY_ADDRESS" in capsys.readouterr().err


def test_submit_refuses_bad_run_options_before_submitting(capsys):
    assert main(["submit", "--address", "http://127.0.0.1:1", "--", "--model", "toy-2l", "--out", "x",
                 "--seqs", "0"]) == 2
    assert "--seqs must be an integer in 1..2147483647" in capsys.readouterr().err

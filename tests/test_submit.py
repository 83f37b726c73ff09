"""A real Ray Job: a local head started with `ray start --head` (stopped by its own PIDs, never
`ray stop`, which would stop every Ray on the machine), the run submitted through the Jobs API; and
that head's dashboard address given to `run`."""

import json
import re
import subprocess
import time

import pytest

from jobs import manifest, results
from jobs.cli import build_parser, main, run_config
from storage import open_store
from tests.helpers import free_port, refused


def test_submit_runs_as_a_ray_job_and_lands_in_the_bucket(ray_head, bucket, capsys, monkeypatch):
    """As `ray job submit`: the cluster from RAY_ADDRESS; the job id and dashboard URL first; the job's
    log shows progress lines (no terminal there); a second submit of the same run is refused."""
    monkeypatch.setenv("RAY_ADDRESS", ray_head)
    run = ["--model", "toy-2l", "--experiment", "neighbors", "--pairs", "32", "--neighbors", "3", "--actors", "2",
           "--out", f"s3://{bucket}/job"]
    code = main(["submit", "--", *run])  # waits, as `ray job submit` does
    out = capsys.readouterr()
    assert code == 0, out.out[-3000:] + out.err[-2000:]
    job_id, dashboard = out.out.splitlines()[:2]
    assert job_id.startswith("induction-sweep-") and dashboard == f"dashboard: {ray_head}/#/jobs/{job_id}"
    assert re.search(r"progress: shards \d+/\d+, .* seq/s, ETA", out.out), out.out[-3000:]
    keys = open_store(f"s3://{bucket}/job").list()
    assert {"report.html", "aggregates/neighbors.parquet", "manifest.json"} <= set(keys)
    assert any(k.startswith("shards/neighbors/") for k in keys)
    # the same run again: complete at --out, so nothing is submitted
    assert main(["submit", "--", *run]) == 2
    assert "already holds this run, complete" in capsys.readouterr().err


def test_submit_needs_a_cluster_address(capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    assert main(["submit", "--", "--model", "toy-2l", "--out", "x"]) == 2
    assert "give --address http://HEAD:8265 or set RAY_ADDRESS" in capsys.readouterr().err


def test_submit_refuses_bad_run_options_before_submitting(capsys):
    assert main(["submit", "--address", "http://127.0.0.1:1", "--", "--model", "toy-2l", "--out", "x",
                 "--seqs", "0"]) == 2
    assert "--seqs must be an integer in 1..2147483647" in capsys.readouterr().err


def dead_address() -> str:
    return f"http://127.0.0.1:{free_port()}"


def test_an_address_that_does_not_answer_is_refused_in_seconds(tmp_path, capsys):
    address = dead_address()
    assert main(["submit", "--address", address, "--", "--model", "toy-2l", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"the Ray dashboard at {address}" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_an_out_holding_another_config_is_refused_before_submitting(tmp_path, capsys):
    out = str(tmp_path / "o")
    run = ["--model", "toy-2l", "--experiment", "neighbors", "--pairs", "32", "--out", out]
    cfg, _ = run_config(build_parser().parse_args(["run", *run, "--shard-size", "32"]))
    manifest.write(open_store(out), cfg, 1, "running")
    assert main(["submit", "--address", dead_address(), "--", *run, "--shard-size", "16"]) == 2
    err = capsys.readouterr().err
    assert "holds a run with another config" in err and "nothing submitted" in err


def test_a_python_without_the_project_is_refused_before_submitting(ray_head, tmp_path, capsys):
    """The probe job runs on the interpreter the job would use; a system python without torch fails it."""
    system = "/usr/bin/python3"
    if subprocess.run([system, "-c", "import torch"], capture_output=True).returncode == 0:
        pytest.skip(f"{system} imports torch here")
    assert main(["submit", "--address", ray_head, "--python", system, "--no-wait", "--",
                 "--model", "toy-2l", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"({system}) on the cluster at {ray_head} cannot import the project" in err and "No module named" in err
    assert main(["list", "--address", ray_head, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert not any(j["out"] == str(tmp_path / "o") for j in listed) and not (tmp_path / "o").exists()


def test_no_wait_list_stop_and_the_status_of_a_stopped_job(ray_head, bucket, capsys, monkeypatch):
    out = f"s3://{bucket}/stopped"
    run = ["--model", "toy-2l", "--experiment", "token-powers", "--tokens", "all", "--actors", "1", "--out", out]
    assert main(["submit", "--address", ray_head, "--no-wait", "--", *run]) == 0
    said = capsys.readouterr().out.splitlines()
    job_id = said[0]
    assert f"ray job logs --address {ray_head} --follow {job_id}" in said[2]
    assert f"induction-sweep stop --address {ray_head} {job_id}" in said[2]
    assert main(["list", "--address", ray_head]) == 0
    assert re.search(rf"^{job_id}\s+(PENDING|RUNNING)\s.*{out}$", capsys.readouterr().out, re.M)
    store = open_store(out)
    deadline = time.time() + 300
    while not store.exists("progress.json"):
        assert time.time() < deadline, "no progress.json from the job"
        time.sleep(0.25)
    # a second submit while it runs is refused, naming the job and the address
    assert main(["submit", "--address", ray_head, "--", *run]) == 2
    err = capsys.readouterr().err
    assert f"job {job_id} is already running" in err and f"--address {ray_head}" in err
    assert main(["stop", "--address", ray_head, job_id]) == 0
    assert f"job {job_id} at {ray_head}: stop asked" in capsys.readouterr().out
    while manifest.read(store)["status"] == "running":  # the driver says it was stopped
        assert time.time() < deadline, "the stopped driver did not mark its run"
        time.sleep(0.25)
    assert "failed: terminated by SIGTERM" in results.status_text(out)
    # a driver that could not mark its run (SIGKILL, its node lost) leaves "running": status asks the Jobs API
    found, cfg = manifest.read_run(store)
    manifest.write(store, cfg, found["shards"], "running")
    monkeypatch.setattr(results, "STALE_S", -1.0)
    monkeypatch.setenv("RAY_ADDRESS", ray_head)
    while results.status(out)["driver"]["state"] == "running":  # Ray marks the job once its driver has exited
        assert time.time() < deadline, "the job was not marked stopped"
        time.sleep(0.25)
    assert results.status(out)["driver"]["state"] == "stopped"
    assert f"job {job_id} is stopped at {ray_head}" in results.status_text(out)


def test_a_dashboard_address_for_run_is_translated_or_refused(ray_head, capsys, tmp_path):
    """The dashboard's http:// address answers as one (submit's check); `run` joins the GCS on the
    same host's 6379 where one answers, else refuses naming what to pass (this head's GCS is elsewhere)."""
    from jobs.address import GCS_PORT, _gcs_answers, check_dashboard

    check_dashboard(ray_head)
    if _gcs_answers("127.0.0.1", GCS_PORT):
        pytest.skip("a Ray cluster of someone else's holds 6379 on this machine")
    refused(capsys, ["run", "--model", "toy-2l", "--quiet", "--out", str(tmp_path / "o"), "--address", ray_head],
            f"{ray_head} is a Ray dashboard; `run` joins the cluster's GCS address")

"""Careless or hostile input, through the command line: refused in one line (exit 2) before Ray
starts and before anything is written; never a hang; never a write outside its place; messages
that match the failure and show no secret."""

import json
import os
import shutil
import socket
import threading
from pathlib import Path

import pytest

from jobs import manifest
from jobs.cli import main
from jobs.config import RunConfig
from storage import open_store

RUN = ["run", "--model", "toy-2l", "--experiment", "neighbors", "--pairs", "16", "--neighbors", "3", "--quiet"]


def refused(capsys, argv, match):
    """Exit 2, one line on stderr containing ``match``, and Ray not started (nor joined) by the command."""
    import ray

    before = ray.is_initialized()  # the session's own cluster (tests/conftest.py), where a test before used it
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("induction-sweep: error:"), err
    assert match in lines[0], lines[0]
    assert ray.is_initialized() == before
    return lines[0]


# --- numbers, ids and paths ------------------------------------------------------------------------

@pytest.mark.parametrize("extra, match", [
    (["--tokens", "²"], "--tokens must be a positive integer or 'all', not '²'"),
    (["--actors", "³"], "--actors must be an integer in 1..10000 or 'auto'"),
    (["--seqs", "١٢"], "--seqs must be an integer in 1..2147483647"),  # int() would read 12
    (["--bos", "²"], "--bos must be an integer in 0..2047 or 'tokenizer'"),
    (["--seed", str(2**64)], "--seed must be an integer in 0..18446744073709551615"),
    (["--seed", "-1"], "--seed must be an integer in 0.."),
    (["--shard-size", "1e3"], "--shard-size must be an integer"),
    (["--batch-size", str(2**20 + 1)], "--batch-size must be an integer in 1..1048576"),
    (["--gpus-per-actor", "nan"], "--gpus-per-actor must be a number in (0, 1024]"),
    (["--gpus-per-actor", "inf"], "--gpus-per-actor must be a number in (0, 1024]"),
    (["--gpus-per-actor", "1.5"], "above 1 must be a whole number"),
    (["--resources-per-actor", '{"x": Infinity}'], "finite positive amounts"),
    (["--resources-per-actor", '{"x": NaN}'], "finite positive amounts"),
    (["--experiment", "fixed-pair", "--pair-a", "-5"], "--pair-a '-5': id -5 outside 4..2047"),
    (["--neighbors", "5000"], "leave B at most 2043 candidate neighbours"),
])
def test_numbers_and_ids_are_checked_before_any_work(capsys, tmp_path, extra, match):
    refused(capsys, RUN + ["--out", str(tmp_path / "out"), *extra], match)
    assert not (tmp_path / "out").exists()


def test_paths_that_cannot_hold_a_run(capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    for out, match in [
        (tmp_path / ("a" * 300) / "run", "a path component of 300 bytes"),
        (tmp_path.joinpath(*["abcdefghi"] * 420), "its files need 128 more"),
        (tmp_path / "file", "is a file, not a directory"),
        (tmp_path / "file" / "run", "is a file, not a directory"),
        ("s3:/bucket/run", "malformed S3 URI 's3:/bucket/run'"),
        ("s3:bucket/run", "malformed S3 URI"),
        ("S3://bucket/run", "malformed S3 URI"),
    ]:
        refused(capsys, RUN + ["--out", str(out)], match)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
    refused(capsys, ["export-model", "toy-2l", str(tmp_path / "file")], "is a file, not a directory")


def test_a_token_powers_run_ignores_the_options_it_does_not_use(capsys, tmp_path):
    """--neighbors beyond the vocabulary matters only where neighbours are scored; --pairs only for
    the experiments that use it: neither enters a token-powers run's hash."""
    from jobs.cli import build_parser, run_config

    def hashed(*extra):
        return run_config(build_parser().parse_args(["run", "--model", "toy-2l", "--out", str(tmp_path / "o"),
                                                     "--experiment", "token-powers", *extra]), join=False)[0].config_hash

    assert hashed() == hashed("--neighbors", "5000", "--pairs", "7") != hashed("--seqs", "7")
    assert not (tmp_path / "o").exists()


def broken_checkpoint(tmp_path, config=None, truncate=False) -> Path:
    from workers.model import source

    path = tmp_path / "ckpt"
    shutil.copytree(source.TOY_DIR, path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, **(config or {})}))
    if truncate:
        data = (path / "model.safetensors").read_bytes()
        (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize("change, match", [
    (dict(config={"n_ctx": 16}), "n_ctx 16 is shorter than the sweep's 24-token sequences"),
    (dict(config={"normalization_type": "BatchNorm"}), "normalization_type 'BatchNorm' is not one of"),
    (dict(truncate=True), "lie outside the file's"),
])
def test_broken_checkpoints_are_refused_by_run_before_ray(capsys, tmp_path, change, match):
    path = broken_checkpoint(tmp_path, **change)
    refused(capsys, ["run", "--model", str(path), "--out", str(tmp_path / "out")], match)
    assert not (tmp_path / "out").exists()


# --- manifests -------------------------------------------------------------------------------------

def run_dir(tmp_path, name="run") -> Path:
    """A directory holding a complete run's manifest (no Ray: the manifest alone, as written by a run)."""
    path = tmp_path / name
    manifest.write(open_store(str(path)), RunConfig(model="toy-2l", out=str(path)), 4, "complete")
    return path


@pytest.mark.parametrize("content, match", [
    (b"", "is not an induction-sweep manifest (not JSON)"),
    (b"{trunc", "(not JSON)"),
    (b"[1, 2]", "(not a JSON object)"),
    (b'{"name": "some other tool"}', "'config' missing or not a dict"),
    (b"\xff\xfe", "(not JSON)"),
    ("foreign config", "its config"),
    ("directory", "is a directory, not a run's manifest"),
    ("file", "is a file, not a run's directory"),
])
@pytest.mark.parametrize("command", [["status"], ["status", "--json"], ["report"], ["fetch", "--to", "TO"], ["run"]])
def test_a_manifest_that_is_not_one(capsys, tmp_path, content, match, command):
    path = run_dir(tmp_path)
    target = path / "manifest.json"
    if content == "foreign config":
        found = json.loads(target.read_text())
        target.write_text(json.dumps({**found, "config": {**found["config"], "seqs": -4}}))
    elif content == "directory":
        target.unlink()
        target.mkdir()
    elif content == "file":
        shutil.rmtree(path)
        path.write_text("not a run")
    else:
        target.write_bytes(content)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    if command[0] == "run":
        argv = RUN + ["--out", str(path)]
        if content == "file":
            match = "is a file, not a directory"  # run refuses the --out itself first
    else:
        argv = [command[0], str(path), *[str(tmp_path / "to") if a == "TO" else a for a in command[1:]]]
    refused(capsys, argv, match)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


# --- fetch -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["aggregates/../../../../escape.txt", "plots/./x.png", "plots//x.png", "aggregates/a/../../../up"])
def test_fetch_refuses_keys_that_would_leave_the_target(capsys, bucket, tmp_path, key):
    from storage.store import s3_client

    uri = f"s3://{bucket}/deep/er/run"
    manifest.write(open_store(uri), RunConfig(model="toy-2l", out=uri), 4, "complete")
    s3_client().put_object(Bucket=bucket, Key="deep/er/run/aggregates/summary.json", Body=b"{}")
    s3_client().put_object(Bucket=bucket, Key=f"deep/er/run/{key}", Body=b"planted")
    to = tmp_path / "a" / "b" / "c" / "to"
    refused(capsys, ["fetch", uri, "--to", str(to)], f"the key {key!r} would be written outside --to")
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_fetch_through_a_symlink_in_the_target_is_refused(capsys, bucket, tmp_path):
    uri = f"s3://{bucket}/run"
    manifest.write(open_store(uri), RunConfig(model="toy-2l", out=uri), 4, "complete")
    open_store(uri).put("plots/x.png", b"png")
    (tmp_path / "to").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "to" / "plots").symlink_to(tmp_path / "elsewhere")
    refused(capsys, ["fetch", uri, "--to", str(tmp_path / "to")], "leads outside --to")
    assert list((tmp_path / "elsewhere").iterdir()) == [] and not (tmp_path / "to" / "manifest.json").exists()


def test_fetch_skips_what_is_present_and_says_sizes(capsys, bucket, tmp_path, monkeypatch):
    """As `aws s3 sync`: a second fetch copies nothing; a changed file is fetched again; --dry-run writes
    nothing; sizes and a total are printed. --endpoint-url is the AWS CLI's name for AWS_ENDPOINT_URL."""
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    uri = f"s3://{bucket}/run"
    manifest.write(open_store(uri), RunConfig(model="toy-2l", out=uri), 4, "complete")
    open_store(uri).put("plots/x.png", b"p" * 3000)
    open_store(uri).put("report.html", b"<html>")
    to = tmp_path / "to"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")  # wrong: the option below is what counts
    argv = ["fetch", uri, "--to", str(to), "--endpoint-url", endpoint]
    assert main(argv + ["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "2.9 KiB" in out and "would fetch" in out and "total: 3 file(s)" in out and not to.exists()
    assert main(argv) == 0
    assert "total: 3 file(s)" in capsys.readouterr().out and (to / "plots" / "x.png").read_bytes() == b"p" * 3000
    (to / "report.html").write_bytes(b"<HTML>")  # same size, other content: fetched again
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "total: 1 file(s), 6 B fetched; 2 already present" in out and (to / "report.html").read_bytes() == b"<html>"


def test_fetch_does_not_follow_symlinks_in_a_local_run(capsys, tmp_path):
    path = run_dir(tmp_path)
    (tmp_path / "secret.txt").write_text("outside the run")
    (path / "plots").mkdir()
    (path / "plots" / "x.png").symlink_to(tmp_path / "secret.txt")
    (path / "aggregates").symlink_to(tmp_path, target_is_directory=True)
    assert main(["fetch", str(path), "--to", str(tmp_path / "to")]) == 0
    out = capsys.readouterr().out
    assert "a symlink in the run, not followed: skipped" in out
    assert sorted(p.name for p in (tmp_path / "to").rglob("*")) == ["manifest.json"]


@pytest.mark.parametrize("to, match", [("", "--to must name a directory"), ("FILE", "is a file, not a directory")])
def test_fetch_targets_that_cannot_be(capsys, tmp_path, to, match):
    path = run_dir(tmp_path)
    (tmp_path / "file").write_text("x")
    refused(capsys, ["fetch", str(path), "--to", str(tmp_path / "file") if to == "FILE" else to], match)
    assert (tmp_path / "file").read_text() == "x"


# --- addresses and deadlines -----------------------------------------------------------------------

@pytest.fixture
def silent_port():
    """A TCP port that accepts connections and never says a word."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held = []

    def accept():
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield server.getsockname()[1]
    server.close()
    for conn in held:
        conn.close()


def test_an_address_that_accepts_but_is_not_ray(silent_port, tmp_path, capfd, monkeypatch):
    """Each refused before Ray starts, in one line, with no credential in anything this process writes."""
    monkeypatch.setattr("jobs.address.PROBE_S", 1.0)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    out = str(tmp_path / "out")
    for argv, env, match in [
        (RUN + ["--out", out, "--address", f"127.0.0.1:{silent_port}"], {}, "accepts connections but is not a Ray cluster's GCS"),
        (RUN + ["--out", out], {"RAY_ADDRESS": f"127.0.0.1:{silent_port}"}, "(RAY_ADDRESS) accepts connections"),
        (RUN + ["--out", out, "--address", f"http://127.0.0.1:{silent_port}"], {}, "no Ray dashboard at"),
        (["submit", "--address", f"http://127.0.0.1:{silent_port}", "--", *RUN[1:], "--out", out], {}, "no Ray dashboard at"),
        (["submit", "--address", "http://127.0.0.1:99999", "--", *RUN[1:], "--out", out], {}, "port in 1..65535"),
        (RUN + ["--out", out, "--address", "http://user:hunter2pw@127.0.0.1:1"], {}, "http://user:***@127.0.0.1:1"),
    ]:
        with monkeypatch.context() as patch:
            for name, value in env.items():
                patch.setenv(name, value)
            code = main(argv)
        said = capfd.readouterr()  # file descriptors: gRPC's and Ray's own logging too
        lines = said.err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and match in lines[0], said.err[-2000:]
        assert "hunter2pw" not in said.err + said.out
    assert not Path(out).exists()


def test_the_cluster_address_convention(ray_cluster, monkeypatch):
    """A live GCS address is taken as given, from --address or RAY_ADDRESS (honoured, never ignored)."""
    from jobs.address import cluster_address

    gcs = ray_cluster.get_runtime_context().gcs_address
    assert cluster_address(gcs) == gcs
    monkeypatch.setenv("RAY_ADDRESS", gcs)
    assert cluster_address(None) == gcs
    monkeypatch.delenv("RAY_ADDRESS")
    assert cluster_address(None) is None


def test_a_pool_with_every_actor_lost_ends(tmp_path, monkeypatch):
    """Replacements pending with no room: the run ends in one line instead of waiting for ever."""
    from jobs import pool
    from jobs.errors import RunFailed
    from jobs.phases import Phases

    monkeypatch.setattr(pool, "NO_ACTOR_WAIT_S", 0.0)
    progress = pool.Progress(False, 100, 0, 4, Phases().now(), Phases(), open_store(str(tmp_path)))
    progress.tick(1, 1)  # one actor ready, then lost
    with pytest.raises(RunFailed, match="no actor ready for 0 s after all were lost"):
        progress.tick(0, 1)


# --- messages --------------------------------------------------------------------------------------

def test_redaction():
    from jobs.inputs import redact

    text = redact("http://alice:s3cr3t@head:8265 and ray://bob:pw@h:10001; aws_secret_access_key=AbCdEf0123456789 "
                  "X-Amz-Security-Token: tok0123456789")
    assert "s3cr3t" not in text and ":pw@" not in text and "AbCdEf" not in text and "tok0123" not in text
    assert "http://alice:***@head:8265" in text


def test_missing_buckets_on_read_paths_are_input_errors(capsys, moto_server, tmp_path):
    """A rerun cannot create a bucket: exit 2 naming it, not "rerunning resumes"."""
    for argv in (["status", "s3://no-such-bucket-r/run"], ["fetch", "s3://no-such-bucket-r/run", "--to", str(tmp_path / "t")],
                 ["report", "s3://no-such-bucket-r/run"], ["run", "--model", "s3://no-such-bucket-r/m", "--out", str(tmp_path / "o")]):
        line = refused(capsys, argv, "bucket 'no-such-bucket-r' does not exist")
        assert "rerun" not in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, match", [
    (["--profile", "no-such-profile"], "--profile 'no-such-profile': no such AWS profile"),
    (["--region", "Mars 1"], "--region must be an AWS region name"),
    (["--endpoint-url", "minio:9000"], "--endpoint-url must be http(s)://HOST[:PORT]"),
])
def test_aws_options_are_checked(capsys, tmp_path, monkeypatch, argv, match):
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    refused(capsys, ["status", str(tmp_path / "run"), *argv], match)


# --- actors and plots ------------------------------------------------------------------------------

def test_cpu_actors_ask_for_the_cpus_their_threads_use():
    """--actors 6 on 2 CPUs: 2 fit (1 CPU and 1 thread each), 4 stay pending; auto on 4 CPUs: 2 actors of 2."""
    from jobs.pool import plan_actors

    plan = plan_actors(RunConfig(model="toy-2l", out="x", actors=6), {"CPU": 2.0})
    assert (plan.count, plan.fit_now, plan.num_cpus, plan.threads) == (6, 2, 1.0, 1)
    plan = plan_actors(RunConfig(model="toy-2l", out="x"), {"CPU": 4.0})
    assert (plan.count, plan.fit_now, plan.num_cpus, plan.threads) == (2, 2, 2.0, 2)


def test_old_runs_resume_under_the_narrower_hash(tmp_path):
    """A run stored when every science field entered the hash is this config's run still."""
    from dataclasses import replace

    cfg = RunConfig(model="toy-2l", out=str(tmp_path / "run"), experiments=("token-powers",))
    store = open_store(cfg.out)
    manifest.write(store, cfg, 4, "running")
    found = json.loads(store.get("manifest.json"))
    found["config_hash"] = cfg.hashes[1]  # as the earlier hashing wrote it
    store.put("manifest.json", json.dumps(found).encode())
    assert cfg.hashes[0] != cfg.hashes[1]
    assert manifest.check_compatible(store, cfg)["config_hash"] == cfg.hashes[1]
    with pytest.raises(Exception, match="holds a run with another config"):
        manifest.check_compatible(store, replace(cfg, seed=1))


def test_token_strings_reach_plots_as_literal_text():
    """What matplotlib draws for a token string is the string itself: no mathtext, no escape left showing."""
    from matplotlib.text import Text

    from jobs.report import literal

    for token in ("$x_{", "$", "a$b$c", "50$ ", r"\frac"):
        text = Text(0, 0, literal(token))
        assert text._preprocess_math(text.get_text()) == (token, False)  # (drawn text, as mathtext)


def test_fetch_refuses_a_file_where_a_directory_goes(capsys, tmp_path):
    path = run_dir(tmp_path)
    (path / "plots").mkdir()
    (path / "plots" / "x.png").write_bytes(b"png")
    (tmp_path / "to").mkdir()
    (tmp_path / "to" / "plots").write_text("a file")
    refused(capsys, ["fetch", str(path), "--to", str(tmp_path / "to")], "is in the way")
    assert sorted(p.name for p in (tmp_path / "to").iterdir()) == ["plots"]

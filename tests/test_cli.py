"""The command line: bad input refused before any work (exit 2, one line, nothing written), a real
end-to-end run in a subprocess, and no credential anywhere in what a run writes or prints."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.cli import main
from storage import open_store
from tests.helpers import refused

RUN = ["run", "--model", "toy-2l", "--experiment", "neighbors", "--pairs", "16", "--neighbors", "3", "--quiet"]


@pytest.mark.parametrize("extra, match", [
    (["--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["--tokens", "0"], "--tokens must be a positive integer"),
    (["--tokens", "-3"], "--tokens must be a positive integer"),
    (["--tokens", "5000"], "d_vocab 2048"),
    (["--seqs", "0"], "--seqs must be an integer in 1..2147483647"),
    (["--experiment", "induction"], "unknown experiment 'induction'"),
    (["--pair-a", " Fab"], "has no tokenizer"),
    (["--pair-b", "99999"], "outside 4..2047"),
    (["--precision", "fp8"], "unknown precision"),
    (["--actors", "two"], "--actors must be"),
    (["--address", "127.0.0.1:1"], "cannot reach a Ray cluster at 127.0.0.1:1"),
])
def test_bad_options_are_refused_before_any_work(capsys, tmp_path, extra, match):
    out = tmp_path / "out"
    argv = RUN + ["--out", str(out)] + extra
    if extra[0] == "--model":
        argv = ["run", "--out", str(out), *extra]
    refused(capsys, argv, match)
    assert not out.exists()


def test_missing_and_corrupt_checkpoints(capsys, tmp_path):
    refused(capsys, ["run", "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")], "unknown model")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{not json")
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"\0" * 10)
    refused(capsys, ["run", "--model", str(tmp_path / "ckpt"), "--out", str(tmp_path / "o")], "cannot be loaded")
    assert not (tmp_path / "o").exists()


def test_pair_strings_that_are_not_single_tokens(capsys, tokenized_checkpoint, tmp_path):
    base = ["run", "--model", str(tokenized_checkpoint), "--experiment", "fixed-pair", "--out", str(tmp_path / "o")]
    refused(capsys, base + ["--pair-a", " Fab ien"], "is not a single token of")
    refused(capsys, base + ["--pair-b", "Fabien"], "is not a token of")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("uri, match", [
    ("s3://", "malformed S3 URI"),
    ("s3://UPPER_case/x", "malformed S3 URI"),
    ("gs://bucket/x", "unsupported URI"),
])
def test_malformed_uris(capsys, uri, match):
    refused(capsys, RUN + ["--out", uri], match)


def test_missing_bucket_and_missing_credentials(capsys, moto_server, monkeypatch, tmp_path):
    refused(capsys, RUN + ["--out", "s3://no-such-bucket-xyz/run"], "bucket 'no-such-bucket-xyz' does not exist")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    refused(capsys, RUN + ["--out", "s3://any-bucket/run"], "no AWS credentials found")


def test_another_config_on_the_same_out_and_too_many_gpus(capsys, ray_cluster, tmp_path):
    out = str(tmp_path / "run")
    assert main(RUN + ["--out", out]) == 0
    capsys.readouterr()
    before = {k: open_store(out).get(k) for k in open_store(out).list()}
    refused(capsys, RUN + ["--out", out, "--seed", "1"], "holds a run with another config")
    assert {k: open_store(out).get(k) for k in open_store(out).list()} == before
    refused(capsys, RUN + ["--out", str(tmp_path / "gpus"), "--gpus-per-actor", "1"], "more GPUs than the cluster has (0)")
    assert not (tmp_path / "gpus").exists()


def test_a_real_run_in_a_subprocess_writes_no_secret(bucket, short_tmp):
    """Plant secret-looking credentials, run the CLI against moto, scan every output for them."""
    secrets = {"AWS_SECRET_ACCESS_KEY": "sekritKEY0123456789abcdefXYZ", "AWS_SESSION_TOKEN": "sessTOKEN9876543210zyxwvut"}
    env = {**os.environ, **secrets, "RAY_TMPDIR": str(short_tmp)}
    argv = [sys.executable, "-m", "jobs.cli", *RUN, "--experiment", "all", "--tokens", "8", "--seqs", "4",
            "--actors", "2", "--out", f"s3://{bucket}/run", "--json"]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stdout = "\n" + proc.stdout  # the summary starts a line, after any log lines
    start = stdout.index("\n{\n") + 1
    summary = json.loads(stdout[start : stdout.index("\n}\n", start) + 2])
    assert summary["token_powers"]["tokens"] == 8
    store = open_store(f"s3://{bucket}/run")
    blobs = {key: store.get(key) for key in store.list()}
    assert "report.html" in blobs and any(k.startswith("shards/") for k in blobs)
    logs = [p.read_bytes() for p in short_tmp.rglob("*") if p.is_file() and p.stat().st_size < 50_000_000]
    assert len(logs) > 5  # the Ray session's logs were found and are scanned too
    for value in secrets.values():
        assert value not in proc.stdout and value not in proc.stderr
        assert not [k for k, data in blobs.items() if value.encode() in data]
        assert not [i for i, data in enumerate(logs) if value.encode() in data]


def test_wrong_credentials(capsys, monkeypatch):
    """A moto server that authenticates: after creating the bucket, unknown keys are refused."""
    from storage.store import s3_client
    from tests.helpers import VENV_BIN, free_port, wait_for_port

    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "1"}
    proc = subprocess.Popen([str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        s3_client().create_bucket(Bucket="guarded")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG0")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
        refused(capsys, RUN + ["--out", "s3://guarded/run"], "denied: check the AWS credentials")
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize("command", [["status"], ["report"], ["fetch", "--to", "TO"]])
def test_commands_on_a_uri_with_no_run(capsys, tmp_path, command):
    """status, report and fetch of a directory that holds no run: one line, exit 2, nothing written."""
    argv = [command[0], str(tmp_path / "empty"), *[str(tmp_path / "to") if a == "TO" else a for a in command[1:]]]
    refused(capsys, argv, "no run at")
    assert not (tmp_path / "to").exists()
    refused(capsys, ["run", "--model", "toy-2l", "--out", str(tmp_path / "big"), "--seqs", "3000000000"], "1..2147483647")

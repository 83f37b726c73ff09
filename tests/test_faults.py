"""Failures a long sweep meets: a killed actor, a killed driver, S3 going away, a corrupt shard.
Each ends with every row present exactly once and aggregates equal to an undisturbed run's."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

from jobs import driver, manifest, results
from jobs.config import RunConfig, plan_shards
from jobs.errors import RunFailed
from storage import open_store
from tests.helpers import assert_complete_once, assert_same_aggregates, resolved

ROOT = Path(__file__).parent.parent
SWEEP = dict(model="toy-2l", experiments=("token-powers",), seqs=16, shard_size=64, actors=2, batch_size=64)


def sweep(out: str, **overrides) -> RunConfig:
    return resolved(RunConfig(out=out, **{**SWEEP, **overrides}), "96")


@pytest.fixture(scope="module")
def baseline(ray_cluster, tmp_path_factory):
    """The undisturbed run every faulty run is compared with."""
    out = str(tmp_path_factory.mktemp("baseline") / "run")
    driver.run(sweep(out), progress=False)
    return results.open_run(out).aggregates


def wait_for_shards(store, n: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while len(store.list("shards/")) < n:
        assert time.time() < deadline, "the run wrote no shard"
        time.sleep(0.05)


def test_actor_killed_mid_run(baseline, tmp_path):
    out = str(tmp_path / "run")
    errors = []
    thread = threading.Thread(target=lambda: errors.append(driver.run(sweep(out), progress=False)))
    thread.start()
    wait_for_shards(open_store(out), 2)
    victims = [p for p in psutil.process_iter(["cmdline"]) if "ray::Runner" in " ".join(p.info["cmdline"] or [])]
    assert victims, "no actor process found"
    victims[0].send_signal(signal.SIGKILL)
    thread.join(600)
    assert len(open_store(out).list("shards/")) == len(plan_shards(manifest.config_of(open_store(out))))
    assert_complete_once(out, 96, 16)
    assert_same_aggregates(baseline, results.open_run(out).aggregates)


def cli(out: str, env=None) -> list[str]:
    return [sys.executable, "-m", "jobs.cli", "run", "--model", "toy-2l", "--experiment", "token-powers",
            "--tokens", "96", "--seqs", "16", "--shard-size", "64", "--actors", "2", "--batch-size", "64",
            "--quiet", "--out", out]


def test_a_killed_driver_and_a_stopped_one_each_resume_to_identical_aggregates(baseline, tmp_path, short_tmp):
    """SIGKILL of the driver and the local cluster it started: what is visible under shards/ is whole and
    the manifest still says "running". Then SIGTERM of the rerun (a scheduler's stop, `ray job stop`):
    exit 143 with one line, the manifest says "failed" with the reason and `status` shows it. The same
    command then resumes to the undisturbed run's aggregates."""
    out = str(tmp_path / "run")
    env = {**os.environ, "RAY_TMPDIR": str(short_tmp)}
    proc = subprocess.Popen(cli(out), env=env, cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = open_store(out)
    wait_for_shards(store, 3)
    for _ in range(20):  # whatever is visible under shards/ is a whole Parquet file
        for key in store.list("shards/"):
            pq.read_metadata(str(Path(out) / key))
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    done_before = len(store.list("shards/"))
    assert 0 < done_before < len(plan_shards(manifest.config_of(store)))
    assert manifest.read(store)["status"] == "running"

    proc = subprocess.Popen(cli(out), env=env, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    wait_for_shards(store, done_before + 2)
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1] == "induction-sweep: terminated by SIGTERM; rerunning the same command resumes"
    found = manifest.read(store)
    assert found["status"] == "failed" and found["failure"]["reason"] == "terminated by SIGTERM"
    assert "failed: terminated by SIGTERM" in results.status_text(out)

    rerun = subprocess.run(cli(out), env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert manifest.read(store)["status"] == "complete" and "failure" not in manifest.read(store)
    assert_complete_once(out, 96, 16)
    assert_same_aggregates(baseline, results.open_run(out).aggregates)


def test_a_scorer_that_fails_its_load_check_refuses_the_run(ray_cluster, tmp_path, capsys):
    """The actors' load-time check refuses bf16 for a model whose logits bf16 moves by nats: one line
    naming the model, the figure and the cure, exit 2, and the manifest says why the run stopped."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from jobs.cli import main
    from workers.model import source

    path = tmp_path / "loud"
    shutil.copytree(source.TOY_DIR, path)
    state = load_file(str(path / "model.safetensors"))
    state["unembed.W_U"].mul_(30)
    save_file(state, str(path / "model.safetensors"))
    out = str(tmp_path / "run")
    code = main(["run", "--model", str(path), "--out", out, "--experiment", "token-powers", "--tokens", "8", "--seqs", "4",
                 "--actors", "1", "--precision", "bf16", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err, err
    assert f"{path}: the compact scorer (bf16) differs from TransformerLens' float64 forward" in err
    assert "likely cause: bf16 rounding is too coarse for this model: run with --precision fp32" in err
    found = json.loads(open_store(out).get("manifest.json"))
    assert found["status"] == "failed" and "--precision fp32" in found["failure"]["reason"]


class Switch:
    """A TCP forwarder in front of the moto server that can be switched off (connections refused)."""

    def __init__(self, target_port: int):
        self.target, self.listener, self.conns = target_port, None, []
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]

    def on(self):
        self.listener = socket.create_server(("127.0.0.1", self.port), reuse_port=True)
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def off(self):
        self.listener.close()
        for c in self.conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
                c.close()
            except OSError:
                pass
        self.conns = []

    def _accept(self, listener):
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass


@pytest.fixture
def switched_s3(moto_server, bucket, monkeypatch):
    switch = Switch(int(moto_server.rsplit(":", 1)[1]))
    switch.on()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{switch.port}")
    yield switch, bucket
    try:
        switch.off()
    except Exception:
        pass


def test_s3_down_for_seconds_is_retried(baseline, switched_s3, monkeypatch):
    switch, bucket = switched_s3
    monkeypatch.setenv("INDUCTION_SWEEP_S3_ATTEMPTS", "12")  # forwarded to the actors
    out = f"s3://{bucket}/outage"
    done = []
    thread = threading.Thread(target=lambda: done.append(driver.run(sweep(out), progress=False)))
    thread.start()
    wait_for_shards(open_store(out), 2)
    switch.off()
    time.sleep(3)
    switch.on()
    thread.join(600)
    assert done, "the run did not finish"
    assert_complete_once(out, 96, 16)
    assert_same_aggregates(baseline, results.open_run(out).aggregates)


def test_s3_gone_for_good_fails_clearly_then_resumes(baseline, switched_s3, monkeypatch):
    switch, bucket = switched_s3
    monkeypatch.setenv("INDUCTION_SWEEP_S3_ATTEMPTS", "2")
    out = f"s3://{bucket}/gone"
    failure = []

    def target():
        try:
            driver.run(sweep(out), progress=False)
        except RunFailed as exc:
            failure.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    wait_for_shards(open_store(out), 2)
    switch.off()
    thread.join(600)
    assert failure and "S3" in str(failure[0])
    switch.on()
    driver.run(sweep(out), progress=False)
    assert_complete_once(out, 96, 16)
    assert_same_aggregates(baseline, results.open_run(out).aggregates)


def test_corrupt_shard_is_named_by_status_and_recomputed(baseline, tmp_path):
    out = str(tmp_path / "run")
    driver.run(sweep(out), progress=False)
    victim = sorted(open_store(out).list("shards/"))[3]
    path = Path(out) / victim
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert victim in results.status_text(out)
    driver.run(sweep(out), progress=False)
    assert victim not in results.status_text(out)
    assert_complete_once(out, 96, 16)
    assert_same_aggregates(baseline, results.open_run(out).aggregates)

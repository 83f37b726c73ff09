"""Shared fixtures: the bundled model, a real moto S3 server on 127.0.0.1, a local Ray cluster, a Ray
head with a dashboard for Ray Jobs. Shared helpers are in helpers.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pytest

# Never touch ~/.ray or a real AWS account from tests.
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ["INDUCTION_SWEEP_S3_ATTEMPTS"] = "3"
# the load-time check's reference figures (workers/scoring/check.py): kept for the session, not in ~/.cache
os.environ["INDUCTION_SWEEP_CACHE"] = tempfile.mkdtemp(prefix="induction-sweep-cache-")
# Without a GPU, Triton kernels run under its interpreter. Triton reads this once, when it is first
# imported (torch.compile imports it too), so it is set before any test module loads.
if not shutil.which("nvidia-smi"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.helpers import VENV_BIN, free_port, wait_for_port  # noqa: E402 - after the environment above


@pytest.fixture
def short_tmp():
    """A short temporary directory: Ray's unix socket paths must stay under 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="rs-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch. The suite builds, in one process, more graphs of the compact
    forward than Dynamo's recompile limit (8), past which a scorer runs eager (and says so); a run
    builds one scorer per actor process."""
    import torch._dynamo

    torch._dynamo.reset()


@pytest.fixture(scope="session")
def toy_model():
    from workers.model import hooked

    return hooked.load_model("toy-2l", "cpu")


@pytest.fixture(scope="session")
def moto_server():
    """A moto_server process (real S3 protocol over HTTP) reached through AWS_ENDPOINT_URL."""
    port = free_port()
    proc = subprocess.Popen([str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        endpoint = f"http://127.0.0.1:{port}"
        os.environ["AWS_ENDPOINT_URL"] = endpoint
        yield endpoint
    finally:
        os.environ.pop("AWS_ENDPOINT_URL", None)
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def bucket(moto_server):
    """A fresh bucket on the moto server."""
    from storage.store import s3_client

    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_client().create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole session (Ray's testing advice: starting one costs seconds)."""
    import ray

    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    ray.init(num_cpus=4, include_dashboard=False, _temp_dir=temp, log_to_driver=False)
    yield ray
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="session")
def tokenized_checkpoint(tmp_path_factory):
    """A small random attention-only model with a real (word-level) tokenizer, as a checkpoint directory."""
    from tokenizers import Regex, Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    from workers.model import hooked

    words = ["<unk>", "<|BOS|>", "<pad>", "<|EOS|>", " Fab", "ien"] + [f" w{i}" for i in range(58)]
    tokenizer = Tokenizer(tok_models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r" ?[A-Za-z0-9]+|[^A-Za-z0-9 ]"), behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|BOS|>", unk_token="<unk>",
                                   pad_token="<pad>", eos_token="<|EOS|>")
    model = hooked.random_model(d_vocab=len(words), n_ctx=32, d_model=64, n_heads=4, d_head=16, seed=8)
    model.cfg.model_name = "tiny-words"
    path = tmp_path_factory.mktemp("ckpt") / "tiny-words"
    hooked.export_model(model, str(path))
    fast.save_pretrained(str(path))  # the optional tokenizer files of a checkpoint directory
    return path


@pytest.fixture(scope="session")
def toy_runs(ray_cluster, tmp_path_factory):
    """Three small finished runs of the post's experiments for the report and compare tests: toy-2l
    under seeds 0 and 1, and a random-weight checkpoint of toy-2l's shape (no induction)."""
    from jobs import driver
    from jobs.config import RunConfig, resolve
    from workers.model import hooked, source

    root = tmp_path_factory.mktemp("toy-runs")
    random_dir = root / "random-toy"
    hooked.export_model(hooked.random_model(d_vocab=2048, d_model=128, n_heads=4, d_head=32, n_ctx=64,
                                            normalization_type="LNPre", seed=5), str(random_dir))
    runs = {}
    for name, model, seed in (("seed0", "toy-2l", 0), ("seed1", "toy-2l", 1), ("random", str(random_dir), 0)):
        cfg = RunConfig(model=model, out=str(root / name), seqs=256, pairs=64, neighbors=15, seed=seed, shard_size=4096,
                        actors=2, batch_size=512)
        cfg = resolve(cfg, source.describe(model), "64")
        driver.run(cfg, progress=False)
        runs[name] = str(root / name)
    return runs


@pytest.fixture(scope="module")
def ray_head(moto_server):
    """One head for the module (starting one costs seconds)."""
    dashboard, gcs = free_port(), free_port()
    temp = tempfile.mkdtemp(prefix="rh-", dir="/tmp")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    proc = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--head", "--block", "--num-cpus=2", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--port={gcs}", f"--temp-dir={temp}",
         "--disable-usage-stats",
         # the session's other Ray cluster (ray_cluster above) holds the default agent ports
         f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
         f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(dashboard, timeout=90)
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        stop_head(proc, temp)
        shutil.rmtree(temp, ignore_errors=True)


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


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(os.environ["INDUCTION_SWEEP_CACHE"], ignore_errors=True)

"""``submit``, ``list`` and ``stop``: the same run as a Ray Job on a cluster (Ray's JobSubmissionClient).

What travels and what must be there: the project's code travels as the job's ``working_dir``; its
requirements (torch, Ray, TransformerLens…) are not shipped with the job (a ``pip`` runtime_env
would build a GPU torch per job, gigabytes, and needs a package index on every node): they are
installed on the nodes (cluster.yaml's setup commands). ``submit`` proves that before it submits,
with a probe job that imports the project on the job's interpreter (``--python``), and refuses in
one line otherwise. It also refuses, before submitting, an ``--out`` that holds a run of another
config (read through the storage layer, as the driver checks it) and an address where no Jobs API
answers within a few seconds. Only non-secret settings are forwarded (``AWS_ENDPOINT_URL``, the
region, retries): credentials come from the cluster's own chain. As ``ray job submit``, the cluster
is --address, RAY_API_SERVER_ADDRESS or RAY_ADDRESS, and submit waits for the job unless
--no-wait; the job is named by the output URI and the config hash, so a second submit of a run is
recognised.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shlex
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

from jobs.address import check_dashboard
from jobs.errors import ConfigError
from jobs.phases import JOB_ID_ENV
from storage.store import FORWARDED_ENV

PROJECT_ROOT = Path(__file__).resolve().parent.parent
AGENT_WAIT_S = 30  # a head that has just started answers "No available agent" for a few seconds
PROBE_TIMEOUT_S = 180.0  # the probe imports torch on the cluster, after the working_dir upload
PREFIX = "induction-sweep-"
PROBE_PREFIX = f"{PREFIX}check-"
# what a run's driver and its actors import on the job's interpreter
PROBE = ("import importlib.util as u, jobs.driver, jobs.report, workers.shard; "
         "assert u.find_spec('transformer_lens'), 'transformer_lens is not installed'")
EXCLUDES = [".venv", ".git", "runs", "out", "**/__pycache__", "*.egg-info", ".pytest_cache"]


def cluster_address(given: str | None) -> str:
    """As `ray job submit` finds the cluster: --address, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS."""
    address = given or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ConfigError("no Ray cluster to submit to: give --address http://HEAD:8265 or set RAY_ADDRESS")
    return address if "://" in address else f"http://{address}"


def submission_id(out: str, config_hash: str, attempt: int = 1) -> str:
    """Named by the output and the science: a second submit of the same run is recognised as such."""
    base = f"{output_prefix(out)}{config_hash}"
    return base if attempt == 1 else f"{base}-{attempt}"


def output_prefix(out: str) -> str:
    return f"{PREFIX}{hashlib.sha256(out.rstrip('/').encode()).hexdigest()[:10]}-"


def shown(address: str) -> str:
    """The address without any user:password part, for printing."""
    parts = urlsplit(address)
    return parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")).geturl() if parts.hostname else address


def hints(address: str, job_id: str) -> str:
    a = shown(address)
    return (f"logs: ray job logs --address {a} --follow {job_id}; stop: induction-sweep stop --address {a} {job_id} "
            f"(or ray job stop --address {a} {job_id})")


def client_for(address: str | None):
    from ray.job_submission import JobSubmissionClient

    address = cluster_address(address)
    check_dashboard(address)  # answers within a deadline, or refused
    try:
        return address, JobSubmissionClient(address)
    except Exception as exc:  # noqa: BLE001 - Ray's own connection errors: one line
        raise ConfigError(f"cannot use the Ray Jobs API at {shown(address)}: {str(exc).splitlines()[0][:200]}") from None


def check_out(cfg) -> None:
    """Refuse an ``--out`` holding a run of another config (the driver's check, with ``--precision
    auto`` resolved either way); an already complete run of this config is ConfigError too."""
    from jobs import manifest
    from jobs.config import possible_hashes
    from storage import open_store

    store = open_store(cfg.out)
    found = manifest.read(store)
    if found is None or cfg.overwrite:
        return
    if found.get("config_hash") not in possible_hashes(cfg):
        raise ConfigError(f"{store.uri} holds a run with another config (hash {found.get('config_hash')}, this one "
                          f"{cfg.config_hash}); use another --out or --overwrite; nothing submitted")
    if found.get("status") == "complete":
        raise ConfigError(f"{store.uri} already holds this run, complete (config {found.get('config_hash')}); "
                          "read it with `induction-sweep status` or `fetch`, or pass --overwrite; nothing submitted")


def next_attempt(client, address: str, out: str, config_hash: str) -> int:
    """1 for a new run. Refused: any pending or running job writing to ``out`` (whatever its config:
    ``--precision auto`` is resolved only on the cluster), and a succeeded job of this run. A failed
    or stopped one is submitted again under the next attempt number (it resumes)."""
    from ray.job_submission import JobStatus

    jobs = {job.submission_id: job.status for job in client.list_jobs()
            if (job.submission_id or "").startswith(output_prefix(out))}
    for job_id, status in jobs.items():
        if status in (JobStatus.PENDING, JobStatus.RUNNING):
            raise ConfigError(f"job {job_id} is already {status.value.lower()} for {out}; {hints(address, job_id)}")
    ours = [job_id for job_id in jobs if job_id == submission_id(out, config_hash)
            or job_id.startswith(submission_id(out, config_hash) + "-")]
    for job_id in ours:
        if jobs[job_id] == JobStatus.SUCCEEDED:
            raise ConfigError(f"job {job_id} at {shown(address)} already completed this run at {out}; "
                              "read it with `induction-sweep status` or `fetch`")
    attempts = [int(j.rsplit("-", 1)[1]) if j != submission_id(out, config_hash) else 1 for j in ours]
    return max(attempts, default=0) + 1


def submit_job(client, address: str, job_id: str, entrypoint: str, runtime_env: dict, metadata: dict) -> None:
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=job_id, metadata=metadata)
            return
        except RuntimeError as exc:
            if "No available agent" in str(exc) and time.monotonic() < deadline:
                time.sleep(1)
                continue
            why = str(exc).strip().splitlines()[0][:300]
            if "No available agent" in why:
                why += " (the head's dashboard agent is not up: see dashboard_agent.log in the head's Ray logs)"
            raise ConfigError(f"the Ray Jobs API at {shown(address)} refused job {job_id}: {why}") from None


def probe(client, address: str, python: str, runtime_env: dict) -> None:
    """Run PROBE as a job on ``python`` with the run's runtime_env; ConfigError with its last log line if it fails."""
    from ray.job_submission import JobStatus

    job_id = f"{PROBE_PREFIX}{uuid.uuid4().hex[:8]}"
    submit_job(client, address, job_id, shlex.join([python, "-c", PROBE]), runtime_env, {})
    deadline = time.monotonic() + PROBE_TIMEOUT_S
    try:
        while not (status := client.get_job_status(job_id)).is_terminal():
            if time.monotonic() > deadline:
                client.stop_job(job_id)
                raise ConfigError(f"the cluster at {shown(address)} did not run a {PROBE_TIMEOUT_S:.0f} s import check of "
                                  f"the project (job {job_id}); is it short of CPUs?; nothing submitted")
            time.sleep(0.5)
        if status != JobStatus.SUCCEEDED:
            lines = [line for line in client.get_job_logs(job_id).strip().splitlines() if line.strip()]
            info = client.get_job_info(job_id)
            why = lines[-1][:300] if lines else (info.message or status.value)[:300]
            raise ConfigError(f"the job's python ({python}) on the cluster at {shown(address)} cannot import the project: "
                              f"{why}; install the requirements on the nodes (cluster.yaml's setup_commands) or pass "
                              "--python /path/to/venv/bin/python; nothing submitted")
    finally:
        if client.get_job_status(job_id).is_terminal():
            client.delete_job(job_id)


def submit(address: str | None, run_args: list[str], cfg, wait: bool = True, python: str = "python") -> int:
    """Check, then submit ``run`` with ``run_args`` (resolved to ``cfg``) as a Ray Job; with ``wait``
    stream its logs and return its outcome."""
    check_out(cfg)
    address, client = client_for(address)
    job_id = submission_id(cfg.out, cfg.config_hash, next_attempt(client, address, cfg.out, cfg.config_hash))
    env = {"PYTHONUNBUFFERED": "1", JOB_ID_ENV: job_id, **{k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}}
    runtime_env = {"working_dir": str(PROJECT_ROOT), "excludes": EXCLUDES, "env_vars": env}
    probe(client, address, python, runtime_env)
    # no terminal in a job: the run logs a progress line every few seconds (jobs/pool.py Progress)
    entrypoint = shlex.join([python, "-m", "jobs.cli", "run", *run_args])
    submit_job(client, address, job_id, entrypoint, runtime_env, {"out": cfg.out, "config_hash": cfg.config_hash})
    print(job_id, flush=True)
    print(f"dashboard: {shown(address).rstrip('/')}/#/jobs/{job_id}", flush=True)
    print(hints(address, job_id), flush=True)
    if not wait:
        return 0
    return follow(client, address, job_id)


def follow(client, address: str, job_id: str) -> int:
    """Stream the job's logs to its end (Ctrl-C stops following, not the job), then its outcome."""
    from ray.job_submission import JobStatus

    async def stream() -> None:
        async for lines in client.tail_job_logs(job_id):
            sys.stdout.write(lines)
            sys.stdout.flush()

    try:
        asyncio.run(stream())
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job_id} goes on. {hints(address, job_id)}", file=sys.stderr)
        return 130
    status = client.get_job_status(job_id)
    print(f"job {job_id}: {status.value}", file=sys.stderr)
    return 0 if status == JobStatus.SUCCEEDED else 1


def list_jobs(address: str | None) -> list[dict]:
    """This tool's jobs on the cluster, oldest first: id, status, output URI, start time."""
    _, client = client_for(address)
    jobs = [j for j in client.list_jobs() if (j.submission_id or "").startswith(PREFIX)
            and not j.submission_id.startswith(PROBE_PREFIX)]
    return [{"job_id": j.submission_id, "status": j.status.value, "out": (j.metadata or {}).get("out"),
             "start_time": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j.start_time / 1000)) if j.start_time else None}
            for j in sorted(jobs, key=lambda j: j.start_time or 0)]


def stop(address: str | None, job_id: str) -> str:
    """Stop one of this tool's jobs; what happened, in one line."""
    if not job_id.startswith(PREFIX):
        raise ConfigError(f"{job_id} is not an induction-sweep job id (they start with {PREFIX})")
    address, client = client_for(address)
    try:
        stopped = client.stop_job(job_id)
    except RuntimeError as exc:
        raise ConfigError(f"no job {job_id} at {shown(address)}: {str(exc).splitlines()[0][:200]}") from None
    status = client.get_job_status(job_id).value
    return (f"job {job_id} at {shown(address)}: stop asked, {status} now" if stopped
            else f"job {job_id} at {shown(address)} was not running ({status})")

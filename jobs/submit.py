"""``submit``: the same run as a Ray Job on a cluster (Ray's JobSubmissionClient).

The project directory travels as the job's ``working_dir``; the cluster's nodes have the
project's requirements installed (cluster.yaml's setup commands). Only non-secret settings are
forwarded (``AWS_ENDPOINT_URL``, the region, retries): credentials come from the cluster's own
chain. As `ray job submit`, the cluster is --address, RAY_API_SERVER_ADDRESS or RAY_ADDRESS; the
job is named by the output URI and the config hash, so a second submit of a run is recognised.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from jobs.errors import ConfigError
from storage.store import FORWARDED_ENV

PROJECT_ROOT = Path(__file__).resolve().parent.parent
AGENT_WAIT_S = 60
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
    return f"induction-sweep-{hashlib.sha256(out.rstrip('/').encode()).hexdigest()[:10]}-"


def next_attempt(client, out: str, config_hash: str) -> int:
    """1 for a new run. Refused: any pending or running job writing to ``out`` (whatever its config:
    ``--precision auto`` is resolved only on the cluster), and a succeeded job of this run. A failed
    or stopped one is submitted again under the next attempt number (it resumes)."""
    from ray.job_submission import JobStatus

    jobs = {job.submission_id: job.status for job in client.list_jobs()
            if (job.submission_id or "").startswith(output_prefix(out))}
    for job_id, status in jobs.items():
        if status in (JobStatus.PENDING, JobStatus.RUNNING):
            raise ConfigError(f"job {job_id} is already {status.value.lower()} for {out}; follow it with "
                              "`ray job logs --follow`, or stop it with `ray job stop`")
    ours = [job_id for job_id in jobs if job_id == submission_id(out, config_hash)
            or job_id.startswith(submission_id(out, config_hash) + "-")]
    for job_id in ours:
        if jobs[job_id] == JobStatus.SUCCEEDED:
            raise ConfigError(f"job {job_id} already completed this run at {out}; read it with `induction-sweep fetch`")
    attempts = [int(j.rsplit("-", 1)[1]) if j != submission_id(out, config_hash) else 1 for j in ours]
    return max(attempts, default=0) + 1


def shown(address: str) -> str:
    """The address without any user:password part, for printing."""
    parts = urlsplit(address)
    return parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")).geturl() if parts.hostname else address


def submit(address: str | None, run_args: list[str], out: str, config_hash: str, wait: bool = False,
           python: str = "python") -> int:
    from ray.job_submission import JobStatus, JobSubmissionClient

    address = cluster_address(address)
    try:
        client = JobSubmissionClient(address)
    except Exception as exc:
        raise ConfigError(f"cannot reach the Ray Jobs API at {shown(address)}: {str(exc).splitlines()[0][:200]}") from None
    job_id = submission_id(out, config_hash, next_attempt(client, out, config_hash))
    # no terminal in a job: the run logs a progress line every few seconds (jobs/pool.py Progress)
    entrypoint = shlex.join([python, "-m", "jobs.cli", "run", *run_args])
    env = {"PYTHONUNBUFFERED": "1", **{k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}}
    runtime_env = {"working_dir": str(PROJECT_ROOT), "excludes": EXCLUDES, "env_vars": env}
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:  # a head that has just started answers "No available agent" for a few seconds
        try:
            client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=job_id)
            break
        except RuntimeError as exc:
            if "No available agent" in str(exc) and time.monotonic() < deadline:
                time.sleep(1)
                continue
            raise ConfigError(f"the Ray Jobs API refused the job: {str(exc).strip().splitlines()[0][:300]}") from None
    print(job_id, flush=True)
    print(f"dashboard: {shown(address).rstrip('/')}/#/jobs/{job_id}", flush=True)
    print(f"logs: ray job logs --address {shown(address)} --follow {job_id}", flush=True)
    if not wait:
        return 0
    import asyncio

    async def stream() -> None:
        async for lines in client.tail_job_logs(job_id):
            sys.stdout.write(lines)
            sys.stdout.flush()

    asyncio.run(stream())
    status = client.get_job_status(job_id)
    print(f"job {job_id}: {status}", file=sys.stderr)
    return 0 if status == JobStatus.SUCCEEDED else 1

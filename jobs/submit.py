"""``submit``: the same run as a Ray Job on a cluster (Ray's JobSubmissionClient).

The project directory travels as the job's ``working_dir``; the cluster's nodes have the
project's requirements installed (cluster.yaml's setup commands). Only non-secret settings are
forwarded (``AWS_ENDPOINT_URL``, the region): credentials come from the cluster's own chain.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path

from jobs.errors import ConfigError
from storage.store import FORWARDED_ENV

PROJECT_ROOT = Path(__file__).resolve().parent.parent
AGENT_WAIT_S = 60
EXCLUDES = [".venv", ".git", "runs", "out", "**/__pycache__", "*.egg-info", ".pytest_cache"]


def submit(address: str, run_args: list[str], wait: bool = False, python: str = "python") -> int:
    from ray.job_submission import JobStatus, JobSubmissionClient

    try:
        client = JobSubmissionClient(address)
    except Exception as exc:
        raise ConfigError(f"cannot reach the Ray Jobs API at {address}: {str(exc).splitlines()[0][:200]}") from None
    entrypoint = shlex.join([python, "-m", "jobs.cli", "run", "--quiet", *run_args])
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    runtime_env = {"working_dir": str(PROJECT_ROOT), "excludes": EXCLUDES, "env_vars": env}
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:  # a head that has just started answers "No available agent" for a few seconds
        try:
            job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
            break
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(1)
    print(job_id, flush=True)
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

"""``induction-sweep``: the command line (README.md, "Running").

Exit status: 0 done; 2 bad input (one line on stderr, nothing written); 1 a failure during the
run (rerunning the same command resumes). Heavy imports (Ray, TransformerLens) happen inside the
commands, so ``bench`` and ``--help`` need neither Ray nor a cluster.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import replace

PROG = "induction-sweep"


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse would print the whole usage)
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def add_run_options(p: argparse.ArgumentParser) -> None:
    from jobs.config import DEFAULTS  # the run's defaults live on RunConfig
    from workers.experiments import REGISTRY

    d = DEFAULTS
    p.add_argument("--model", required=True, help="toy-2l, a TransformerLens name, or a checkpoint directory (local or s3://)")
    p.add_argument("--out", required=True, help="output URI: a local path or s3://bucket/prefix")
    p.add_argument("--experiment", default="all", help="an experiment (" + ", ".join(REGISTRY) + "), "
                   "all (the post's three, default), controls, or a comma-separated list")
    p.add_argument("--tokens", default=None, help="fixed tokens are ids 4..4+N-1; 'all' for the whole vocabulary "
                   f"(default: {d['tokens']}, or all where the vocabulary is smaller)")
    p.add_argument("--seqs", default=d["seqs"], help="sequences per token and role (default %(default)s)")
    p.add_argument("--pairs", default=d["pairs"], help="sequences per scenario of the other experiments (default %(default)s)")
    p.add_argument("--neighbors", default=d["neighbors"], help="K nearest neighbours of B to score (default %(default)s)")
    p.add_argument("--seed", default=d["seed"])
    p.add_argument("--precision", default=d["precision"], help="auto (bf16 on GPU, fp32 on CPU), fp32, tf32 or bf16")
    p.add_argument("--batch-size", default=d["batch_size"], help="sequences per forward (default: by device)")
    p.add_argument("--shard-size", default=d["shard_size"], help="sequences per shard file (default %(default)s)")
    p.add_argument("--actors", default=None, help="N or auto (one per GPU, or per --resources-per-actor slot, that "
                   "the cluster holds or its autoscaler reports it can reach; else one per 2 CPUs); actors that do not "
                   "fit yet wait for the cluster to grow")
    p.add_argument("--gpus-per-actor", default=d["gpus_per_actor"], help="GPUs per actor, fractions allowed")
    p.add_argument("--resources-per-actor", default=None, metavar="JSON",
                   help='Ray custom resources each actor needs, e.g. \'{"gpu_node": 1}\' (places actors on chosen node types)')
    p.add_argument("--address", default=d["address"], help="join a running Ray cluster (default: start a local one)")
    p.add_argument("--save-tokens", action="store_true", help="store each row's exact model inputs")
    p.add_argument("--heads", action="store_true", help="store per-head attention and logit attribution "
                   "of the last layer in every row (attention-only models)")
    p.add_argument("--overwrite", action="store_true", help="start again: delete the run at --out (its manifest, shards, "
                   "aggregates, plots, report; nothing else there) first. Without it a run of this config resumes, or "
                   "is reported already complete, and a run of another config is refused")
    p.add_argument("--pair-a", default=None, help='fixed A: a token string (" Fab") or an id')
    p.add_argument("--pair-b", default=None, help='fixed B: a token string ("ien") or an id')
    p.add_argument("--bos", default=None, help="BOS id, or 'tokenizer' (default: 1 for the attn-only-Nl models and "
                   "toy-2l, as in the post; else the checkpoint's or the tokenizer's BOS)")
    p.add_argument("--processing", default=d["processing"], help="exact (default: only weight processing that keeps "
                   "the function, checked at load) or tl-default (TransformerLens' defaults, as the post loaded its model)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_aws_options(p: argparse.ArgumentParser) -> None:
    """The AWS CLI's names for the S3 settings (each also read from the environment as the AWS tools do)."""
    g = p.add_argument_group("S3 (as for the AWS CLI)")
    g.add_argument("--profile", default=None, help="a profile of ~/.aws/config or credentials (default: AWS_PROFILE, "
                   "else boto3's standard chain)")
    g.add_argument("--region", default=None, help="the bucket's region (default: AWS_REGION, AWS_DEFAULT_REGION or the profile's)")
    g.add_argument("--endpoint-url", default=None, metavar="URL",
                   help="an S3-compatible endpoint, e.g. http://minio:9000 (default: AWS_ENDPOINT_URL)")


def apply_aws_options(args: argparse.Namespace) -> None:
    """Set the S3 options as the environment variables boto3 reads (actors and jobs get the region and
    endpoint through storage.store FORWARDED_ENV); ConfigError for a profile or endpoint that cannot be."""
    import os
    import re

    from jobs.errors import ConfigError
    from jobs.inputs import redact, shown_value

    profile, region, endpoint = (getattr(args, k, None) for k in ("profile", "region", "endpoint_url"))
    if profile is not None:
        import botocore.session

        known = botocore.session.Session().available_profiles
        if profile not in known:
            raise ConfigError(f"--profile {shown_value(profile)}: no such AWS profile (known: {', '.join(known) or 'none'})")
        os.environ["AWS_PROFILE"] = profile
    if region is not None:
        if not re.fullmatch(r"[a-z]{2}(-[a-z0-9]+)+", region):
            raise ConfigError(f"--region must be an AWS region name such as us-east-1, not {shown_value(region)}")
        os.environ["AWS_REGION"] = os.environ["AWS_DEFAULT_REGION"] = region
    if endpoint is not None:
        from urllib.parse import urlsplit

        parts = urlsplit(endpoint)
        try:
            parts.port  # noqa: B018 - a port that is not a number raises
        except ValueError:
            parts = parts._replace(netloc="")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"--endpoint-url must be http(s)://HOST[:PORT], not {shown_value(redact(endpoint))}")
        os.environ["AWS_ENDPOINT_URL"] = endpoint


def build_parser() -> Parser:
    parser = Parser(prog=PROG, description="Measure induction strength across a vocabulary, on Ray.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    p = sub.add_parser("run", help="run a sweep (local Ray cluster unless --address)")
    add_run_options(p)
    p.add_argument("--json", action="store_true", help="print the run's summary as JSON")
    add_aws_options(p)

    p = sub.add_parser("plan", help="shards, forwards, rows, bytes and estimated time of a run; writes nothing")
    add_run_options(p)
    add_aws_options(p)
    p.add_argument("--rates", default=None, metavar="FILE",
                   help="a `bench --json` output to estimate from (default: jobs/rates.json, the measured rates)")
    p.add_argument("--json", action="store_true", help="one JSON object")

    p = sub.add_parser("submit", help="submit a run to a Ray cluster as a Ray Job")
    p.add_argument("--address", default=None, help="the cluster's dashboard, http://HEAD:8265 (default: "
                   "RAY_API_SERVER_ADDRESS or RAY_ADDRESS, as for `ray job submit`)")
    p.add_argument("--wait", action=argparse.BooleanOptionalAction, default=True,
                   help="stream the job's logs and return its outcome (default, as `ray job submit`); --no-wait "
                        "returns once the job is submitted")
    p.add_argument("--python", default="python", help="the job's interpreter on the cluster, which must import the "
                   "project's requirements (checked before submitting; default: python)")
    add_aws_options(p)
    p.add_argument("run_args", nargs=argparse.REMAINDER, help="the run's options (as for `run`)")
    for name, text in (("list", "this tool's Ray Jobs on the cluster"), ("stop", "stop one of this tool's Ray Jobs")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--address", default=None, help="the cluster's dashboard, http://HEAD:8265 (default: "
                       "RAY_API_SERVER_ADDRESS or RAY_ADDRESS)")
        if name == "stop":
            p.add_argument("job_id")
        else:
            p.add_argument("--json", action="store_true", help="one JSON list")

    p = sub.add_parser("status", help="shards done/total of a run, and its rate and time left while it runs")
    p.add_argument("uri")
    p.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    add_aws_options(p)
    p = sub.add_parser("fetch", help="copy a run's aggregates, plots and report to a directory, skipping files "
                       "already there with the same size and ETag")
    p.add_argument("uri")
    p.add_argument("--to", required=True, help="a local directory (created if needed)")
    p.add_argument("--shards", action="store_true", help="the shards too")
    p.add_argument("--dry-run", action="store_true", help="list what would be copied, with sizes; write nothing")
    add_aws_options(p)
    p = sub.add_parser("report", help="merge a run's shard partials again and rewrite its aggregates and report")
    p.add_argument("uri")
    p.add_argument("--from-rows", action="store_true", help="recompute every aggregate from the shards' rows "
                   "instead of their footers' partials (a check: both give the same)")
    p.add_argument("--json", action="store_true", help="print the run's summary as JSON")
    add_aws_options(p)

    p = sub.add_parser("compare", help="per-token A and B power of runs side by side, each against the first")
    p.add_argument("uris", nargs="+", metavar="RUN", help="finished runs with token powers (local or s3://); the first is the reference")
    p.add_argument("--out", required=True, help="where compare.html, tokens.parquet and compare.json go (local or s3://)")
    add_aws_options(p)

    p = sub.add_parser("bench", help="forwards per second of the default scorer against the plain TransformerLens loop")
    p.add_argument("--model", default=None, help="a model to bench (default: toy-2l on a CPU, random weights of --shape on a GPU)")
    p.add_argument("--shape", default=None,
                   help="random weights of this hub model's shape: attn-only-2l (the default on a GPU), gelu-2l, gpt2-small, "
                        "pythia-160m or llama-1b")
    p.add_argument("--layers", default=None, help="with --shape: this many layers instead of the shape's")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--precisions", type=lambda v: v.split(","), default=None, help="comma-separated (default: all)")
    p.add_argument("--batches", default=None,
                   help="comma-separated batch sizes to try (default 256,1024 on CPU; 8192,32768,65536 on CUDA); the plain "
                        "loop runs the post's 256 sequences, or the smallest of these where smaller")
    p.add_argument("--seconds", default=None, help="time per measurement (default 1 on CPU, 2 on GPU)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line (what plan --rates reads)")

    p = sub.add_parser("export-model", help="write a model as a checkpoint directory (local or s3://)")
    p.add_argument("model")
    p.add_argument("dir")
    add_aws_options(p)
    return parser


def run_config(args: argparse.Namespace, join: bool = True):
    """The full, resolved RunConfig of ``run``'s options, and the model's description: every check
    that needs no cluster, before any work. ``join``: the cluster address (--address, RAY_ADDRESS) is
    this process's to join, and is checked to answer (not for ``submit``: the job joins its own)."""
    from jobs import manifest
    from jobs.address import cluster_address
    from jobs.config import RunConfig, parse_experiments, parse_gpus, parse_int, parse_resources, resolve
    from storage import open_store
    from workers.model import source

    cfg = RunConfig(
        model=args.model, out=args.out, experiments=parse_experiments(args.experiment),
        seqs=parse_int("seqs", args.seqs), pairs=parse_int("pairs", args.pairs), neighbors=parse_int("neighbors", args.neighbors),
        seed=parse_int("seed", args.seed), precision=args.precision, save_tokens=args.save_tokens,
        shard_size=parse_int("shard_size", args.shard_size), heads=args.heads, batch_size=parse_int("batch_size", args.batch_size),
        actors=parse_int("actors", args.actors, "auto"), gpus_per_actor=parse_gpus(args.gpus_per_actor),
        address=args.address, overwrite=args.overwrite, processing=args.processing,
        resources_per_actor=parse_resources(args.resources_per_actor))
    parse_int("tokens", args.tokens, "all")  # before the model is read
    store = open_store(cfg.out)
    store.check()
    manifest.read(store)  # a run there has a manifest this tool can read
    if join:
        cfg = replace(cfg, address=cluster_address(cfg.address))  # answers, or refused before Ray starts
    info = source.describe(cfg.model)
    return resolve(cfg, info, args.tokens, args.pair_a, args.pair_b, args.bos), info


def cmd_run(args) -> int:
    from jobs import driver
    from jobs.phases import Phases

    phases = Phases()
    with phases.phase("validate"):
        cfg, info = run_config(args)
    done = already_complete(cfg)
    if done is not None:
        print(json.dumps(done, indent=2) if args.json else summary_table(done))
        print(f"{cfg.out}: already complete (config {done['config_hash']}); nothing to do. "
              f"--overwrite computes it again; report: {cfg.out.rstrip('/')}/report.html")
        return 0
    try:
        summary = driver.run(cfg, info, progress=not args.quiet, phases=phases)
    finally:
        driver.stop_embedded(phases)
    finished(summary.as_dict(), phases, cfg.out, args.json)
    return 0


def already_complete(cfg) -> dict | None:
    """The stored summary of a complete run of this config at ``cfg.out`` (None: there is work, or
    --overwrite asks to start again)."""
    from jobs import manifest
    from jobs.config import possible_hashes
    from storage import open_store

    store = open_store(cfg.out)
    found = manifest.read(store)
    if cfg.overwrite or not found or found.get("status") != "complete" or found.get("config_hash") not in possible_hashes(cfg):
        return None
    try:
        return json.loads(store.get("aggregates/summary.json"))
    except FileNotFoundError:  # a complete manifest without its summary: the run is redone
        return None


def summary_table(summary: dict) -> str:
    """The headline numbers, one line per experiment and figure, 4 significant digits."""
    def leaves(value, path: str):
        if isinstance(value, dict):
            for key, inner in value.items():
                yield from leaves(inner, f"{path} {key}".strip())
        else:
            yield path, f"{value:.4g}" if isinstance(value, float) else str(value)

    rows = [(k, v) for section, value in summary.items() if section not in ("config_hash", "model", "seed")
            for k, v in leaves(value, section)]
    width = max((len(k) for k, _ in rows), default=0)
    head = f"model {summary.get('model')}, seed {summary.get('seed')}, config {summary.get('config_hash')}"
    return "\n".join([head, *(f"  {k:<{width}}  {v:>10}" for k, v in rows)])


def finished(summary: dict, phases, out: str, as_json: bool) -> None:
    """How ``run`` and ``report`` end: the headline numbers (JSON with --json), the time breakdown, the report's path."""
    print(json.dumps(summary, indent=2) if as_json else summary_table(summary))
    print(phases.text())
    print(f"report: {out.rstrip('/')}/report.html")


def cmd_plan(args) -> int:
    from jobs import estimate
    from jobs.pool import plan_actors
    from workers.scoring.variant import resolve_precision

    cfg, info = run_config(args)
    plan = plan_actors(cfg, *cluster_resources(cfg.address))
    rates = estimate.read_rates(args.rates) if args.rates else None
    result = estimate.estimate(cfg, info, plan, resolve_precision(cfg.precision, plan.device), rates)
    print(json.dumps(result.as_dict()) if args.json else result.text())
    return 0


def cluster_resources(address: str | None) -> tuple[dict, dict | None]:
    """(resources now, what the autoscaler can reach): a running cluster's (--address), else this
    machine's, without starting Ray."""
    if address:
        from jobs import driver
        from jobs.pool import reachable_resources

        ray = driver.connect(address)
        return ray.cluster_resources(), reachable_resources(ray)
    import os
    from pathlib import Path

    gpus = Path("/proc/driver/nvidia/gpus")  # NVIDIA's driver lists its GPUs here: no torch import to count them
    return {"CPU": float(os.cpu_count() or 1), "GPU": float(len(list(gpus.iterdir())) if gpus.is_dir() else 0)}, None


def cmd_submit(args) -> int:
    from jobs import submit

    run_args = [a for a in args.run_args if a != "--"]
    cfg, _ = run_config(build_parser().parse_args(["run", *run_args]), join=False)  # refuse bad options before submitting
    return submit.submit(args.address, run_args, cfg, wait=args.wait, python=args.python)


def cmd_list(args) -> int:
    from jobs import submit

    jobs = submit.list_jobs(args.address)
    if args.json:
        print(json.dumps(jobs))
    for job in [] if args.json else jobs:
        print(f"{job['job_id']}  {job['status']:<9}  {job['start_time'] or '-'}  {job['out'] or '-'}")
    return 0


def cmd_stop(args) -> int:
    from jobs import submit

    print(submit.stop(args.address, args.job_id))
    return 0


def cmd_status(args) -> int:
    from jobs import results

    print(json.dumps(results.status(args.uri)) if args.json else results.status_text(args.uri))
    return 0


def cmd_fetch(args) -> int:
    from jobs import fetch

    fetch.fetch(args.uri, args.to, shards=args.shards, dry_run=args.dry_run)
    return 0


def cmd_report(args) -> int:
    from jobs import driver
    from jobs.phases import Phases
    from storage import open_store

    phases = Phases()
    summary = driver.report(open_store(args.uri), from_rows=args.from_rows, phases=phases)
    finished(summary.as_dict(), phases, args.uri, args.json)
    return 0


def cmd_compare(args) -> int:
    from jobs import compare

    summary = compare.compare(args.uris, args.out)
    for c in summary["correlations"]:
        print(f"run {c['run']} against run 0, {c['power']} power: Pearson {c['pearson']:.3f}, Spearman {c['spearman']:.3f} "
              f"over {c['tokens']} tokens")
    print(f"compare: {args.out.rstrip('/')}/compare.html")
    return 0


def cmd_bench(args) -> int:
    from jobs import bench

    return bench.main(args)


def cmd_export(args) -> int:
    from storage import open_store
    from workers.model import hooked

    open_store(args.dir).check()  # before the model is loaded
    hooked.export_model(hooked.load_model(args.model, "cpu"), args.dir)
    print(f"exported {args.model} to {args.dir}")
    return 0


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


COMMANDS = {"run": cmd_run, "plan": cmd_plan, "submit": cmd_submit, "list": cmd_list, "stop": cmd_stop,
            "status": cmd_status, "fetch": cmd_fetch, "report": cmd_report, "compare": cmd_compare, "bench": cmd_bench,
            "export-model": cmd_export}


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("induction-sweep")
    except PackageNotFoundError:
        return "unknown (not installed)"


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    from jobs.errors import ConfigError, RunFailed, Terminated
    from jobs.inputs import redact
    from storage import StorageError, StorageInputError
    from workers.model.source import ModelInputError

    def terminate(signum, frame):
        raise Terminated("terminated by SIGTERM")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, terminate)
    try:
        apply_aws_options(args)
        return COMMANDS[args.command](args)
    except (ConfigError, ModelInputError, StorageInputError) as exc:
        sys.stderr.write(f"{PROG}: error: {redact(one_line(exc))}\n")
        return 2
    except (RunFailed, StorageError) as exc:
        retry = ("; rerunning the same command resumes" if args.command == "run" else "; the command can be retried") \
            if getattr(exc, "resumable", True) else ""
        sys.stderr.write(f"{PROG}: {'run failed' if args.command == 'run' else 'failed'}: {redact(one_line(exc))}{retry}\n")
        return 1
    except (KeyboardInterrupt, Terminated) as exc:
        resumes = "; rerunning the same command resumes" if args.command == "run" else ""
        sys.stderr.write(f"{PROG}: {'interrupted' if isinstance(exc, KeyboardInterrupt) else exc}{resumes}\n")
        return 130 if isinstance(exc, KeyboardInterrupt) else 143


if __name__ == "__main__":
    sys.exit(main())

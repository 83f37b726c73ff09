"""End to end on a local Ray cluster with 2 actors: local and S3 (moto) storage, resume, status, fetch."""


import pyarrow.dataset as pads
import pytest

from jobs import driver, fetch, manifest, results
from jobs.config import RunConfig, plan_shards
from jobs.errors import ConfigError
from storage import open_store
from tests.helpers import assert_same_aggregates, resolved
from workers import experiments
from workers.model import source

SMALL = dict(model="toy-2l", seqs=4, pairs=48, neighbors=5, shard_size=32, actors=2, batch_size=64)


def small_run(out, tokens=None, **overrides) -> RunConfig:
    return resolved(RunConfig(out=out, **{**SMALL, **overrides}), tokens)


def aggregates_of(uri):
    return results.open_run(uri).aggregates


@pytest.fixture(scope="module")
def s3_run(ray_cluster, moto_server):
    from storage.store import s3_client

    s3_client().create_bucket(Bucket="sweep-runs")
    uri = "s3://sweep-runs/run"
    summary = driver.run(small_run(uri, "24"), progress=False)
    return uri, summary


def test_s3_run_writes_every_row_once(s3_run):
    uri, summary = s3_run
    run = results.open_run(uri)
    assert run.manifest["status"] == "complete"
    rows = run.shards("token-powers").to_table().to_pandas()
    assert len(rows) == 24 * 4 * 2  # tokens × seqs × roles
    assert not rows.duplicated(["scenario", "fixed_token", "seq"]).any()
    assert set(rows.fixed_token) == set(range(4, 28))
    fixed = run.shards("fixed-pair").to_table(columns=["scenario", "target"]).to_pandas()
    assert len(fixed) == 4 * 48 * 6
    neigh = run.shards("neighbors").to_table(filter=pads.field("target") == "N5").to_pandas()
    assert len(neigh) == 48
    tp = run.aggregates.token_powers
    assert list(tp.columns) == ["token", "token_str", "a_power", "a_sem", "a_n", "b_power", "b_sem", "b_n"]
    assert (tp.a_n == 4).all() and (tp.b_n == 4).all() and tp.token_str.iloc[0] == "#4"
    assert summary.token_powers["mean_b_power"] == pytest.approx(tp.b_power.mean())
    keys = open_store(uri).list()
    for key in ("report.html", "plots/token_powers.png", "plots/neighbors.png", "plots/fixed_pair_strength.png",
                "aggregates/histograms.parquet", "aggregates/fixed_pair.parquet", "aggregates/neighbors.parquet",
                "aggregates/summary.json", "manifest.json"):
        assert key in keys
    a_power, b_power = run.aggregates.histogram("token-powers/A/B"), run.aggregates.histogram("token-powers/B/B")
    assert a_power.counts.sum() == 24 and len(b_power.counts) == 30
    assert run.manifest["model_loading"]["loader"] == "safetensors"  # toy-2l: read without TransformerLens
    phases = {p["phase"] for p in run.manifest["phases"]["phases"]}  # where the time went, in the manifest
    assert {"ray start", "plan", "actor start-up", "scoring", "aggregation", "report"} <= phases
    assert len(run.manifest["phases"]["actors"]) == 2 and run.manifest["phases"]["shards"]["count"] == len(
        plan_shards(manifest.config_of(open_store(uri))))


def test_status_and_fetch(s3_run, tmp_path):
    uri, _ = s3_run
    text = results.status_text(uri)
    n = len(plan_shards(manifest.config_of(open_store(uri))))
    assert f"shards {n}/{n} done" in text and "complete" in text
    got = tmp_path.resolve() / "got"
    paths = {i.path.relative_to(got).as_posix() for i in fetch.fetch(uri, str(got), echo=lambda line: None)}
    assert {"report.html", "manifest.json", "aggregates/token_powers.parquet", "plots/token_powers.png"} <= paths
    assert not any(p.startswith("shards/") for p in paths)
    with_shards = fetch.fetch(uri, str(tmp_path / "all"), shards=True, echo=lambda line: None)
    assert sum(i.path.as_posix().count("/shards/") for i in with_shards) == n


def test_resume_recomputes_only_what_is_missing_and_matches(ray_cluster, tmp_path):
    interrupted = str(tmp_path / "interrupted")
    cfg = small_run(interrupted, "16", experiments=("token-powers", "neighbors"))
    driver.run(cfg, progress=False)
    whole = aggregates_of(interrupted)
    store = open_store(interrupted)
    shards = sorted(store.list("shards/"))
    kept = {k: store.get(k) for k in shards[::2]}
    for key in shards[1::2]:  # as if the run had died half-way
        store.delete_prefix(key)
    store.delete_prefix("aggregates/")
    driver.run(cfg, progress=False)
    assert sorted(store.list("shards/")) == shards
    assert all(store.get(k) == v for k, v in kept.items())  # finished shards were not redone
    assert_same_aggregates(whole, aggregates_of(interrupted))


def test_more_gpus_than_the_cluster_has_is_refused(ray_cluster, tmp_path):
    with pytest.raises(ConfigError, match="more GPUs than the cluster has"):
        driver.run(small_run(str(tmp_path / "g"), gpus_per_actor=1.0), progress=False)
    assert not (tmp_path / "g").exists()


def test_results_api_reads_a_local_run(toy_runs):
    run = results.open_run(toy_runs["seed0"])  # token-powers (64 tokens × 256), fixed-pair (64 pairs), neighbours (15)
    fp = run.aggregates.fixed_pair
    assert set(fp.scenario) == {"A+B", "A only", "B only", "none"} and (fp.n == 64).all()
    assert run.shards().filter(pads.field("experiment") == "fixed-pair").count_rows() == 4 * 64 * 6  # B, A, N1-N3, R


def test_mechanism_controls_run_and_are_compared_with_induction(ray_cluster, tmp_path):
    out = str(tmp_path / "controls")
    summary = driver.run(small_run(out, "16", experiments=("token-powers", "neighbors", "no-b", "b-elsewhere", "no-first-a"),
                                   heads=True), progress=False)
    controls = results.open_run(out).aggregates.controls
    assert set(controls.experiment) == {"no-b", "b-elsewhere", "no-first-a"} and (controls.n == 48).all()
    assert list(controls[controls.experiment == "no-b"].target) == ["B", "A", "N1", "N2", "N3", "R"]
    # toy-2l predicts B from the A→B pair, not from B's mere presence
    assert summary.neighbors["B"] > 5 and summary.controls["no-b"]["B"] < 1
    assert {"plots/controls.png", "plots/heads.png"} <= set(open_store(out).list("plots/"))
    heads = results.open_run(out).aggregates.heads
    assert set(heads.experiment) == {"token-powers", "neighbors", "no-b", "b-elsewhere", "no-first-a"}
    assert (heads[heads.experiment != "token-powers"].n == 48).all() and (heads[heads.experiment == "token-powers"].n == 64).all()
    plain = heads[heads.experiment == "neighbors"].set_index("head")
    assert list(plain.index) == ["h0", "h1", "h2", "h3", "rest"] and plain.loc["h0":"h3", "attn_b"].max() > 0.5
    rows = results.open_run(out).shards("neighbors").to_table(columns=["h0_attn_b", "h3_dla_b_shuf", "rest_dla_b"])
    assert rows.num_rows == 48 * 7
    circuits = results.open_run(out).aggregates.circuits  # per-token circuit scores joined with the powers
    assert list(circuits.token) == list(range(4, 20)) and {"a_power", "b_power", "ov_rank_h0", "qk_rank_best"} <= set(circuits)
    assert set(summary.circuits) == {"ov_rank_best vs a_power", "ov_rank_best vs b_power",
                                        "qk_rank_best vs a_power", "qk_rank_best vs b_power"}
    assert "plots/circuits.png" in open_store(out).list("plots/")


def test_report_from_rows_equals_the_merged_footer_partials(ray_cluster, tmp_path):
    """Every experiment, the controls and --heads: aggregates merged from the shards' footers during the
    run equal those recomputed from every row by ``report --from-rows`` (1e-6)."""
    out = str(tmp_path / "every")
    everything = experiments.group("all") + experiments.group("controls")
    driver.run(small_run(out, "12", experiments=everything, heads=True), progress=False)
    combined = aggregates_of(out)
    assert combined.heads is not None and combined.circuits is not None and len(combined.logodds) == 4
    summary = driver.report(open_store(out), from_rows=True)
    assert_same_aggregates(combined, aggregates_of(out), exact=False)
    assert summary.token_powers["tokens"] == 12
    footers = driver.report(open_store(out))  # and back from the footers alone
    assert footers == summary


def test_tl_default_processing_is_its_own_config_and_is_recorded(ray_cluster, tmp_path):
    out = str(tmp_path / "tl")
    cfg = small_run(out, experiments=("neighbors",), processing="tl-default")
    assert cfg.config_hash != small_run(out, experiments=("neighbors",)).config_hash
    driver.run(cfg, progress=False)
    run = results.open_run(out)
    assert run.manifest["config"]["processing"] == "tl-default"
    loading = run.manifest["model_loading"]
    assert loading["loader"] == "transformer_lens" and loading["max_abs_diff_log_prob"] < 1e-4  # toy-2l: LNPre, centred W_pos
    assert "<b>tl-default</b> processing" in open_store(out).get("report.html").decode()


def test_strengths_that_are_not_finite_fail_the_run_loudly(ray_cluster, tmp_path, capsys):
    """A model that gives half its vocabulary no probability at all (a bias of -inf): their log-odds are
    -inf after both sequences and their strength NaN. The run stops: exit 1, one line with the count
    and the first (experiment, scenario, token, sequence), status "failed" with the same in the
    manifest, no aggregate, and a rerun says the same (it cannot help)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from jobs.cli import main

    path = tmp_path / "banned"
    shutil.copytree(source.TOY_DIR, path)
    state = load_file(str(path / "model.safetensors"))
    state["unembed.b_U"][1000:] = float("-inf")
    save_file(state, str(path / "model.safetensors"))
    out = str(tmp_path / "run")
    argv = ["run", "--model", str(path), "--out", out, "--experiment", "token-powers", "--tokens", "8", "--seqs", "8",
            "--shard-size", "16", "--actors", "1", "--quiet"]
    for _ in range(2):
        assert main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "strength(s) are not finite" in err and "rerunning the same command resumes" not in err
        assert "the first: experiment token-powers, scenario A, target B, token " in err and "--precision fp32" in err
        found = manifest.read(open_store(out))
        assert found["status"] == "failed" and found["failure"]["nonfinite"]["count"] > 0
        assert found["failure"]["nonfinite"]["example"]["experiment"] == "token-powers"
        assert not open_store(out).list("aggregates/")
    assert results.status(out)["failure"]["reason"].startswith(f"{found['failure']['nonfinite']['count']} strength(s)")


def test_the_manifest_records_every_actors_load_check_and_the_neighbours(s3_run):
    uri, _ = s3_run
    found = results.open_run(uri).manifest
    checks = found["load_checks"]
    assert 1 <= len(checks) <= SMALL["actors"]
    for check in checks:
        assert check["path"] == "compact" and 0 < check["max_abs_diff_logodds"] <= check["bound"] == 1e-3
        assert set(check["per_experiment"]) == set(experiments.group("all"))
    assert found["neighbors"] == {"k": SMALL["neighbors"], "definition": experiments.NEIGHBORS_DEFINITION}

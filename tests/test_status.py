"""`status`, and how `run` ends, on a real run (local Ray cluster; local storage and moto S3)."""

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import manifest, results
from jobs.cli import main
from storage import open_store

ROOT = Path(__file__).resolve().parent.parent
RUN = ["--model", "toy-2l", "--experiment", "neighbors", "--pairs", "48", "--neighbors", "3", "--shard-size", "16",
       "--actors", "2", "--batch-size", "16", "--quiet"]


@pytest.fixture(scope="module")
def finished(ray_cluster, tmp_path_factory):
    """A complete run through the command line, and what it printed."""
    out = tmp_path_factory.mktemp("status") / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["run", *RUN, "--out", str(out)])
    assert code == 0, printed.getvalue()
    return out, printed.getvalue()


def as_interrupted(out: Path, drop: int) -> tuple[int, int]:
    """The run as a driver killed mid-run leaves it: the manifest says running and ``drop`` shards are
    not there yet. Returns (shards, sequences) of the whole run."""
    store = open_store(str(out))
    found, cfg = manifest.read_run(store)
    for key in sorted(store.list("shards/"))[:drop]:
        store.delete_prefix(key)
    manifest.write(store, cfg, found["shards"], "running")
    from jobs.config import plan_shards

    return found["shards"], sum(s.n_sequences for s in plan_shards(cfg))


def progress_from_a_process(out: Path, done: int, total: int, before: int, todo: int, exits: bool) -> subprocess.Popen:
    """The driver's own progress writer (jobs.pool.Progress) in another process: it has done ``done``
    shards holding ``before`` sequences before this process, then finishes one more shard."""
    code = (f"import sys, time; from jobs.pool import Progress; from jobs.phases import Phases; from storage import open_store\n"
            f"p = Progress(False, {todo}, {done}, {total}, 0.0, Phases(), open_store({str(out)!r}), {before})\n"
            f"p.tick(1, 1); p.shard_done(16)\n"
            f"print('ready', flush=True)\n"
            f"{'' if exits else 'time.sleep(600)'}")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_run_ends_with_a_short_table_and_a_clean_output(finished):
    out, printed = finished
    assert not printed.lstrip().startswith("{") and "neighbors B" in printed and "report:" in printed
    assert not (out / ".tmp").exists()
    assert results.status_text(str(out)).endswith("complete")


def test_a_complete_run_is_not_run_again(finished, capsys):
    out, _ = finished
    before = json.loads((out / "manifest.json").read_text())
    assert main(["run", *RUN, "--out", str(out), "--json"]) == 0
    said = capsys.readouterr().out
    assert "already complete" in said and "--overwrite" in said
    assert json.loads(said[: said.rindex("}") + 1])["neighbors"]["B"] > 0  # --json: the summary as JSON
    assert json.loads((out / "manifest.json").read_text()) == before  # nothing rewritten


def test_status_imports_neither_torch_nor_ray(finished):
    out, _ = finished
    code = ("import sys; from jobs.cli import main; main(['status', sys.argv[1]]); "
            "assert not {'torch', 'ray'} & set(sys.modules), sorted({'torch', 'ray'} & set(sys.modules))")
    done = subprocess.run([sys.executable, "-c", code, str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "complete" in done.stdout, done.stderr[-2000:]


def test_status_of_a_run_whose_driver_is_gone(finished, tmp_path, monkeypatch):
    """Pending, not missing; the whole run's shards and sequences (not this driver's alone); and a
    stale progress whose driver process has exited is called so."""
    out = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(finished[0]), str(out)], check=True)
    shards, sequences = as_interrupted(out, drop=2)
    before = (shards - 2) * 16
    progress_from_a_process(out, shards - 2, shards, before, sequences - before, exits=True).wait(60)
    s = results.status(str(out))
    assert (s["status"], s["shards_done"], s["shards_pending"], s["shards_total"]) == ("running", shards - 2, 2, shards)
    assert (s["sequences_done"], s["sequences_total"]) == (before + 16, sequences)
    assert s["seq_per_s"] > 0 and "stale" not in s  # a rate from the first shard
    monkeypatch.setattr(results, "STALE_S", -1.0)
    s = results.status(str(out))
    assert s["stale"] and s["driver"]["state"] == "gone"
    text = results.status_text(str(out))
    assert "2 pending" in text and f"pid {s['driver']['pid']}" in text and "is gone" in text and "resumes" in text


def test_status_of_a_stale_run_whose_driver_is_alive(finished, tmp_path, monkeypatch):
    out = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(finished[0]), str(out)], check=True)
    shards, sequences = as_interrupted(out, drop=1)
    proc = progress_from_a_process(out, shards - 1, shards, 0, sequences, exits=False)
    try:
        monkeypatch.setattr(results, "STALE_S", -1.0)
        s = results.status(str(out))
        assert s["driver"]["state"] == "alive" and "still there" in results.status_text(str(out))
    finally:
        proc.kill()
        proc.wait()


def test_status_on_s3(finished, bucket):
    """The same run copied to a moto S3 bucket, interrupted: status reads it through S3."""
    local = open_store(str(finished[0]))
    uri = f"s3://{bucket}/run"
    store = open_store(uri)
    for key in local.list():
        store.put(key, local.get(key))
    found = manifest.read(store)
    victim = sorted(store.list("shards/"))[0]
    store.delete_prefix(victim)
    manifest.write(store, manifest.config_of(store), found["shards"], "running")
    s = results.status(uri)
    assert (s["shards_done"], s["shards_pending"], s["corrupt"]) == (found["shards"] - 1, 1, [])
    assert "1 pending" in results.status_text(uri) and "starting" not in results.status_text(uri)


def test_overwrite_computes_a_complete_run_again(finished, tmp_path, capsys):
    out = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(finished[0]), str(out)], check=True)
    (out / "notes.txt").write_text("mine")
    shard = sorted((out / "shards").rglob("*.parquet"))[0]
    shard.write_bytes(b"a stale shard")  # would be recomputed by a resume too: here everything is
    before = json.loads((out / "manifest.json").read_text())
    assert main(["run", *RUN, "--out", str(out), "--overwrite", "--seed", "1"]) == 0  # another config, in place of the old
    assert "already complete" not in capsys.readouterr().out
    after = json.loads((out / "manifest.json").read_text())
    assert after["phases"]["shards"]["count"] == before["shards"]  # every shard computed again
    assert (before["config"]["seed"], after["config"]["seed"]) == (0, 1)
    assert (out / "notes.txt").read_text() == "mine"  # only the run's own files are deleted


def test_version_from_the_package_metadata(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"induction-sweep {version('induction-sweep')}"

import torch

from workers import experiments
from workers.sequences import (
    A_POS,
    B_POS,
    FIRST_TOKEN,
    SEQ_LEN,
    draws,
    make_batch,
    sequence_keys,
    splitmix64,
    uniform_tokens,
)

MASK = (1 << 64) - 1


def splitmix64_reference(x: int) -> int:
    """The published splitmix64 step, on Python integers."""
    z = (x + 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def batch_of(n, d_vocab=1000, seed=0, experiment="neighbors", a=-1, b=-1, offset=0):
    seq = torch.arange(offset, offset + n)
    keys = sequence_keys(seed, experiments.get(experiment).code, 0, torch.full_like(seq, -1), seq)
    return make_batch(keys, d_vocab, 1, torch.full_like(seq, a), torch.full_like(seq, b))


def test_splitmix64_matches_reference_including_wraparound():
    values = [0, 1, 12345, (1 << 63) - 1, -1, -(1 << 63), 0x0123456789ABCDEF]
    got = splitmix64(torch.tensor(values, dtype=torch.int64)).tolist()
    assert [g & MASK for g in got] == [splitmix64_reference(v & MASK) for v in values]


def test_layout_bos_a_b_fillers_and_final_a():
    b = batch_of(500, d_vocab=1000)
    assert b.tokens.shape == (500, SEQ_LEN) == (500, 24)
    assert (b.tokens[:, 0] == 1).all()
    assert (b.tokens[:, A_POS] == b.a).all() and (b.tokens[:, -1] == b.a).all()
    assert (b.tokens[:, B_POS] == b.b).all()
    body = b.tokens[:, 1:]
    assert body.min() >= FIRST_TOKEN and body.max() < 1000
    assert b.r.min() >= FIRST_TOKEN and b.r.max() < 1000


def test_fixed_tokens_are_placed():
    b = batch_of(64, a=77, b=99)
    assert (b.tokens[:, A_POS] == 77).all() and (b.tokens[:, -1] == 77).all() and (b.tokens[:, B_POS] == 99).all()


def test_shuffle_permutes_inner_tokens_only():
    b = batch_of(300)
    assert (b.shuffled[:, 0] == b.tokens[:, 0]).all()
    assert (b.shuffled[:, -1] == b.tokens[:, -1]).all()
    assert torch.equal(b.shuffled[:, 1:-1].sort(1).values, b.tokens[:, 1:-1].sort(1).values)
    # each sequence has its own permutation: B rarely stays right after A
    assert (b.shuffled[:, 1:-1] != b.tokens[:, 1:-1]).any(1).all()
    still_adjacent = (b.shuffled[:, B_POS] == b.b) & (b.shuffled[:, A_POS] == b.a)
    assert still_adjacent.float().mean() < 0.05


def test_shuffle_positions_are_uniform():
    """Where does the first A (position 11) land? Uniform over the 22 inner slots."""
    n = 22000
    b = batch_of(n, d_vocab=10**6)  # distinct tokens almost surely
    landed = (b.shuffled[:, 1:-1] == b.tokens[:, A_POS : A_POS + 1]).float().argmax(1)
    counts = torch.bincount(landed, minlength=22).float()
    assert counts.min() > 0.8 * n / 22 and counts.max() < 1.2 * n / 22


def test_sequences_do_not_depend_on_batching():
    whole = batch_of(1000)
    parts = [batch_of(n, offset=o) for o, n in ((0, 7), (7, 500), (507, 493))]
    for field in ("tokens", "shuffled", "a", "b", "r"):
        assert torch.equal(getattr(whole, field), torch.cat([getattr(p, field) for p in parts]))


def test_identity_changes_the_sequence():
    base = batch_of(100)
    assert not torch.equal(base.tokens, batch_of(100, seed=1).tokens)
    assert not torch.equal(base.tokens, batch_of(100, experiment="fixed-pair").tokens)
    assert torch.equal(base.tokens, batch_of(100).tokens)


def test_uniform_tokens_cover_the_range_evenly():
    keys = torch.arange(20000)
    toks = uniform_tokens(draws(keys, 0, 1)[:, 0], 14)
    counts = torch.bincount(toks, minlength=14)[FIRST_TOKEN:].float()
    assert counts.min() > 0.9 * 2000 and counts.max() < 1.1 * 2000
    assert torch.bincount(toks, minlength=14)[:FIRST_TOKEN].sum() == 0


def control_batch(control, n=400):
    experiment = experiments.get(control)
    seq = torch.arange(n)
    keys = sequence_keys(0, experiment.code, 0, torch.full_like(seq, -1), seq)
    none = torch.full_like(seq, -1)
    return make_batch(keys, 1000, 1, none, none, experiment.rule), make_batch(keys, 1000, 1, none, none)


def test_control_no_b_removes_the_first_b():
    ctl, plain = control_batch("no-b")
    assert (ctl.tokens[:, B_POS] != ctl.b).float().mean() > 0.99  # equal only by chance
    keep = [p for p in range(SEQ_LEN) if p != B_POS]
    assert torch.equal(ctl.tokens[:, keep], plain.tokens[:, keep])
    assert torch.equal(ctl.shuffled[:, 1:-1].sort(1).values, ctl.tokens[:, 1:-1].sort(1).values)


def test_control_no_first_a_keeps_b_without_the_pair():
    ctl, _ = control_batch("no-first-a")
    assert (ctl.tokens[:, B_POS] == ctl.b).all() and (ctl.tokens[:, -1] == ctl.a).all()
    assert (ctl.tokens[:, A_POS] != ctl.a).float().mean() > 0.99


def test_control_b_elsewhere_moves_b_to_a_filler_position():
    ctl, plain = control_batch("b-elsewhere")
    assert (ctl.tokens[:, B_POS] != ctl.b).float().mean() > 0.99
    moved = (ctl.tokens != plain.tokens)
    moved[:, B_POS] = False
    assert (moved.sum(1) <= 1).all() and moved.any(1).float().mean() > 0.99  # one filler slot now holds B
    rows = moved.any(1)  # (elsewhere the filler there was B already, by chance)
    where = moved.float().argmax(1)[rows]
    assert (ctl.tokens[rows][torch.arange(len(where)), where] == ctl.b[rows]).all()
    assert set(where.tolist()) <= set(range(1, A_POS)) | set(range(B_POS + 1, SEQ_LEN - 1))
    assert len(set(where.tolist())) == 20  # every filler position is used

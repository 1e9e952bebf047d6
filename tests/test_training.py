"""Training: data and splits, evaluation protocol, determinism, DDP, and the acceptance run
(an LSTM trained for a minute on CPU beats popularity and Markov on every metric of both
protocols)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from clickvec import eventfile
from clickvec.devtools.synth import SynthConfig, generate_table
from clickvec.training.baselines import Markov, Popularity
from clickvec.training.checkpoint import read_checkpoint
from clickvec.training.config import TrainConfig
from clickvec.training.data import bucket_batches, make_split, pad_batch
from clickvec.training.evaluate import _tie_metrics, evaluate, sample_negatives
from clickvec.training.model import Encoder, ModelConfig
from clickvec.training.objective import Objective
from clickvec.training.readers import load_histories
from clickvec.training.train import model_config, train

ROOT = Path(__file__).resolve().parents[1]

torch.set_num_threads(2)


def tiny_table(n_users: int = 60, seed: int = 1):
    return generate_table(SynthConfig(n_users=n_users, n_items=200, n_categories=8, seed=seed, anomaly_fraction=0.0))


def tiny_cfg(tmp_path: Path, **kw) -> TrainConfig:
    base = dict(data="in-memory synthetic table", out=str(tmp_path / "run"), epochs=2, batch_size=16, hidden=32, z_dim=8,
                item_dim=16, progress=False, num_threads=2, max_len=20)
    base.update(kw)
    return TrainConfig(**base)


# ------------------------------------------------------------------------- data


def test_leave_one_out_split_and_vocab_from_training_only():
    hist = load_histories({"a": ["x", "y", "z", "w"], "b": ["x", "y"], "c": ["q", "x", "v"]})
    split = make_split(hist, "loo")
    # "w", "z" (a's test/valid) and "v" (c's test) are not in training: they map to OOV (1).
    assert set(split.spec.items) == {"x", "y", "q"}
    idx = split.spec.item_index
    assert [c.user for c in split.test] == ["a", "c"]
    a_test, a_valid = split.test[0], split.valid[0]
    assert a_test.inputs[:, 0].tolist() == [idx("x"), idx("y"), 1]
    assert a_test.target_item == 1
    assert a_valid.inputs[:, 0].tolist() == [idx("x"), idx("y")]
    # b (2 events) trains only; c's training part has a single event: nothing to predict.
    assert sorted(s[:, 0].tolist() for s in split.train) == sorted([[idx("x"), idx("y")], [idx("x"), idx("y")]])
    # One-minute views in the sequence format: gap target log1p(60 s).
    assert math.isclose(a_test.target_log_gap, math.log1p(60.0), rel_tol=1e-6)


def test_time_split():
    tab = tiny_table(80)
    hist = load_histories(tab)
    split = make_split(hist, "time", cutoff_quantile=0.8)
    cut = split.info["cutoff_ts"]
    assert split.test and split.valid
    for c in split.test:  # test input = all of the user's pre-cutoff events
        h = hist[c.user]
        n_pre = int(np.searchsorted(h.ts, cut, side="left"))
        assert len(c.inputs) == n_pre and h.ts[n_pre] >= cut


def test_hash_buckets():
    split = make_split(load_histories(tiny_table(30)), "loo", hash_buckets=64)
    assert split.spec.n_items == 66
    assert all(s[:, 0].min() >= 2 and s[:, 0].max() < 66 for s in split.train)


def test_batches_are_time_major_truncated_and_sharded():
    seqs = [np.stack([np.arange(2, 2 + n), np.full(n, 2), np.full(n, 3), np.ones(n)], 1).astype(float)
            for n in (3, 10, 40, 5)]
    b = pad_batch(seqs, max_len=8)
    assert b.item.shape == (8, 4)  # (T, B)
    assert b.lengths.tolist() == [2, 8, 8, 4]
    # Truncation keeps the most recent events; targets are the inputs shifted by one.
    assert b.item[:8, 2].tolist() == list(range(33, 41)) and b.next_item[7, 2] == 41
    assert (b.next_item[2:, 0] == 0).all()
    rng = [np.random.default_rng(0) for _ in range(2)]
    shards = [list(bucket_batches(seqs * 3, 2, 8, rng[r], rank=r, world=2)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 3


def test_sequence_file_reader_equals_event_file_reader(tmp_path):
    tab = tiny_table(50)
    eventfile.write_events(tab, tmp_path / "ev.parquet")
    eventfile.write_events(tab, tmp_path / "ev.jsonl")
    eventfile.write_sequence_file(tab, tmp_path / "ev.seq")
    from_seq = load_histories(tmp_path / "ev.seq")
    for path in (tmp_path / "ev.parquet", tmp_path / "ev.jsonl"):
        from_ev = load_histories(path)
        assert from_ev.keys() == from_seq.keys()
        assert all(from_ev[u].items == from_seq[u].items for u in from_ev)
        assert all(np.all(np.diff(h.ts) >= 0) for h in from_ev.values())
    # ... and both match the in-memory table and the shared sequence reader.
    assert {u: h.items for u, h in load_histories(tab).items()} == eventfile.sequences_from_table(tab)


# --------------------------------------------------------------------- evaluation


def test_warm_start_scores_like_the_transitions():
    """`item_init="transitions"` (training/warmstart.py): before any training step, the
    encoder's z after item i ranks i's successor among its few neighbours in the training
    sequences (a ring of 40 items walked forward); a random start does not."""
    from clickvec.training.warmstart import init_from_transitions

    rng = np.random.default_rng(0)
    n_items = 42  # 0 padding, 1 OOV, items 2..41 on a ring
    train = []
    for _ in range(200):
        walk = (rng.integers(40) + np.arange(12)) % 40 + 2
        train.append(np.stack([walk, np.ones(12), np.zeros(12), np.zeros(12)], 1).astype(np.int64))
    ranks = {}
    for init in ("random", "transitions"):
        torch.manual_seed(0)
        enc = Encoder(ModelConfig(n_items, 2, 4, item_dim=16, hidden=32, z_dim=16)).eval()
        if init == "transitions":
            init_from_transitions(enc, train)
        items = torch.arange(2, n_items)
        with torch.no_grad():
            y, _ = enc.hidden_seq(items[None], torch.ones_like(items[None]), torch.zeros_like(items[None]))
            scores = enc.item_logits(enc.z(y[0]))[:, 2:]  # (40, 40): after item i, every item
        succ = (items - 2 + 1) % 40
        ranks[init] = (scores > scores[torch.arange(40), succ][:, None]).sum(1).float()
    # Window 3 both ways: the successor shares the top with i itself and 5 other neighbours.
    assert float(ranks["transitions"].max()) <= 6, ranks["transitions"]
    assert float(ranks["random"].median()) > 6


def test_tie_metrics_expectation():
    m = _tie_metrics(np.array([0, 9, 0, 20]), np.array([0, 1, 19, 0]), 10, np.array([True, True, True, True]))
    assert m["hr"].tolist() == [1.0, 0.5, 0.5, 0.0]
    assert math.isclose(m["ndcg"][1], 0.5 / math.log2(11))
    assert math.isclose(m["rr"][0], 1.0)


def test_negatives_reject_history_and_are_seeded():
    split = make_split(load_histories(tiny_table(40)), "loo")
    a = sample_negatives(split.test, split.spec.n_items, 100, seed=3)
    b = sample_negatives(split.test, split.spec.n_items, 100, seed=3)
    assert (a == b).all() and a.min() >= 2 and a.max() < split.spec.n_items
    for c, row in zip(split.test, a, strict=True):
        assert not np.isin(row, c.inputs[:, 0]).any() and c.target_item not in row


def test_baselines_and_evaluate_dict(tmp_path):
    split = make_split(load_histories(tiny_table(60)), "loo")
    pop, mk = Popularity(split.train, split.spec.n_items), Markov(split.train, split.spec.n_items)
    last = np.array([split.train[0][0, 0]], dtype=np.int64)
    assert pop.scores(last).shape == (1, split.spec.n_items)
    nxt = int(split.train[0][1, 0])
    assert mk.scores(last)[0, nxt] >= 1.0  # the observed transition outranks the tie-break
    model = Encoder(model_config(tiny_cfg(tmp_path), split))
    m1 = evaluate(model, split, "test", seed=7)
    m2 = evaluate(model, split, "test", seed=7)
    assert m1 == m2
    for who in ("model", "popularity", "markov"):
        assert set(m1[who]["sampled"]) == {"hr@10", "ndcg@10"}
        assert set(m1[who]["full"]) == {"hr@10", "ndcg@10", "mrr"}
        assert set(m1[who]["full_seen_excluded"]) == {"hr@10", "ndcg@10", "mrr"}
    assert {"time_mae_s", "time_rmse_s", "time_mae_log", "time_rmse_log", "type_acc"} <= set(m1["model"])
    comp = m1["compression"]
    assert comp["vector_bytes_f32"] == 8 * 4 and comp["mean_history_events"] > 0
    assert "sampled.hr@10_vs_markov" in m1["margins"]


@pytest.mark.parametrize("loss,vae", [("full", False), ("sampled", True)])
def test_objectives_backprop(tmp_path, loss, vae):
    cfg = tiny_cfg(tmp_path, loss=loss, vae=vae, num_negatives=32)
    split = make_split(load_histories(tiny_table(30)), "loo")
    enc = Encoder(model_config(cfg, split))
    enc.train()
    b = next(bucket_batches(split.train, 8, cfg.max_len, np.random.default_rng(0)))
    arrs = (b.item, b.etype, b.gap, b.next_item, b.next_type, b.next_log_gap)
    loss_v, parts = Objective(enc, cfg)(*[torch.from_numpy(a) for a in arrs])
    loss_v.backward()
    assert torch.isfinite(loss_v) and enc.item_emb.weight.grad is not None
    assert (parts["kl"] > 0) == vae


# ------------------------------------------------------------------- train runs


def test_same_seed_same_metrics_and_resume(tmp_path, capsys):
    tab = tiny_table(60)
    r1 = train(tiny_cfg(tmp_path / "a"), tab)
    r2 = train(tiny_cfg(tmp_path / "b"), tab)
    assert r1["test"] == r2["test"]
    assert [h["train_loss"] for h in r1["history"]] == [h["train_loss"] for h in r2["history"]]
    out = Path(tmp_path / "a" / "run")
    for name in ("config.json", "recipe.json", "vocab.json", "best.pt", "last.pt", "metrics.json", "report.md", "loss.png",
                 "metrics.png"):
        assert (out / name).exists(), name
    assert json.loads((out / "config.json").read_text())["seed"] == 0
    last = read_checkpoint(out / "last.pt")
    assert "optimizer" in last and last["epoch"] == 1
    _check_no_pickle(out, tmp_path, capsys)
    # Resume: one more epoch on top of last.pt.
    r3 = train(replace(tiny_cfg(tmp_path / "a"), epochs=3, resume=True), tab)
    assert r3["epochs_run"] == 3 and [h["epoch"] for h in r3["history"]] == [0, 1, 2]


def _check_no_pickle(run: Path, tmp_path: Path, capsys) -> None:
    """Checkpoints are safetensors (tensors + JSON metadata, no pickle); a pickled one is
    refused by `clickvec export` with one line naming the file, and never unpickled."""
    import pickle

    from safetensors.torch import load_file

    from clickvec.export.cli import main as export_main

    for name in ("best.pt", "last.pt"):
        raw = (run / name).read_bytes()
        assert not raw.startswith(b"PK") and b"\x80\x02" not in raw[:16], name  # no zip/pickle container
        assert any(k.startswith("model.item_emb") for k in load_file(str(run / name))), name
    evil = tmp_path / "evil" / "best.pt"
    evil.parent.mkdir()
    ran = tmp_path / "unpickled"
    # Unpickling this would create `ran`: the proof that a loader ran pickle.
    evil.write_bytes(pickle.dumps(_Touch(str(ran))))
    torch.save({"state_dict": {}}, tmp_path / "evil" / "last.pt")
    for target in (evil, tmp_path / "evil" / "last.pt"):
        assert export_main([str(target), "--out", str(tmp_path / "bundle")]) == 1
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and str(target) in err and "not a clickvec checkpoint" in err, err
    assert not ran.exists() and not (tmp_path / "bundle").exists()


class _Touch:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_ddp_two_processes(tmp_path):
    data = tmp_path / "ev.parquet"
    eventfile.write_events(tiny_table(64), data)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "clickvec.training.cli", "--data", str(data), "--out", str(tmp_path / "ddp"), "--epochs", "2",
           "--batch-size", "8", "--hidden", "16", "--z-dim", "8", "--item-dim", "16", "--device", "cpu",
           "--num-threads", "1", "--no-progress"]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=170)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    m = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["epochs_run"] == 2
    assert 0.0 <= m["test"]["model"]["sampled"]["hr@10"] <= 1.0


# ------------------------------------------------------------------- acceptance

ACCEPT_DATA = dict(n_users=3000, n_items=300, n_categories=10, seed=0)
# Everything else (max_len, weight_decay, repeat_weight, model size) is TrainConfig's default.
ACCEPT_TRAIN = dict(epochs=8, batch_size=32, lr=5e-3, patience=3)
ACCEPT_METRICS = (("sampled", "hr@10"), ("sampled", "ndcg@10"), ("full", "hr@10"), ("full", "ndcg@10"),
                  ("full", "mrr"), ("full_seen_excluded", "hr@10"), ("full_seen_excluded", "ndcg@10"),
                  ("full_seen_excluded", "mrr"))


@pytest.mark.slow
def test_lstm_beats_popularity_and_markov_on_both_protocols(tmp_path):
    tab = generate_table(SynthConfig(**ACCEPT_DATA))
    cfg = TrainConfig(data="in-memory synthetic table", out=str(tmp_path / "accept"), progress=False, num_threads=2, **ACCEPT_TRAIN)
    r = train(cfg, tab)
    t = r["test"]
    print(f"\nacceptance ({ACCEPT_DATA}, {ACCEPT_TRAIN}, {r['training_seconds']:.0f} s):")
    for who in ("model", "markov", "popularity"):
        print(f"  {who:<10} " + "  ".join(f"{p} {t[who][p]}" for p in t["protocols"]))
    for base in ("markov", "popularity"):
        print(f"  model / {base}:", {f"{proto} {m}": round(t["model"][proto][m] / t[base][proto][m], 3)
                                     for proto, m in ACCEPT_METRICS})
    beaten = {(base, proto, m): t["model"][proto][m] > t[base][proto][m]
              for base in ("popularity", "markov") for proto, m in ACCEPT_METRICS}
    assert all(beaten.values()), [k for k, ok in beaten.items() if not ok]
    assert t["model"]["sampled"]["hr@10"] >= 1.3 * t["markov"]["sampled"]["hr@10"], r["margins"]

"""`clickvec recommend` end to end on the real broker, with a model trained in the test."""

from __future__ import annotations

import json

import numpy as np
import pytest
from stream_util import TopicReader, wait_for
from test_alerts import committed_equals_end, run_cli, table_events

from clickvec.bundle.reader import load_bundle
from clickvec.stream.consumers.recommend import ItemIndex


def test_ann_index_agrees_with_exact(trained):
    bundle = load_bundle(trained[0], providers="cpu", warmup=False)
    z = np.random.default_rng(0).normal(size=(64, bundle.z_dim)).astype(np.float32)
    exact_i, exact_s = ItemIndex(bundle).topk(z, 10)
    ann = ItemIndex(bundle, ann_threshold=0)
    assert ann.kind == "faiss-hnsw"
    ann_i, _ = ann.topk(z, 10)
    assert exact_i.min() >= 2 and ann_i.min() >= 2  # padding and OOV never recommended
    assert np.all(np.diff(exact_s, axis=1) <= 0)
    ref = bundle.score_items(z)[:, 2:]
    assert np.allclose(exact_s[:, 0], ref.max(1), atol=1e-4)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact_i, ann_i, strict=True)])
    assert overlap >= 0.9, overlap


@pytest.mark.broker
@pytest.mark.slow
def test_recommend_end_to_end(kafka_bootstrap, new_topic, new_group, trained, streamed_held, tmp_path):
    bundle_path, held = trained
    events = table_events(held)
    from clickvec.eventfile import write_events

    events_file = write_events(held, tmp_path / "events.parquet")
    vec, vectors = streamed_held
    catalogue = set(load_bundle(bundle_path, providers="cpu", warmup=False).spec.items)
    out = new_topic(4, "recs")
    group = new_group()
    base = ["--brokers", kafka_bootstrap, "--model", str(bundle_path), "--in", vec, "--out", out,
            "--group", group, "--k", "10", "--idle-exit", "4", "--batch", "256"]
    run_cli("recommend", *base, "--summary", str(tmp_path / "r1.json"), "--eval-events", str(events_file))
    s1 = json.loads((tmp_path / "r1.json").read_text())
    assert s1["loop"]["consumed"] == len(vectors) and s1["recommended"] == len(vectors)
    assert committed_equals_end(kafka_bootstrap, group, vec) == (len(vectors), len(vectors))

    reader = TopicReader(kafka_bootstrap, out)
    wait_for(reader, lambda m: len(m) >= len(vectors), 30)
    recs = [json.loads(v) for _, v in reader.messages]
    assert {(r["user_id"], r["seq"]) for r in recs} == {(m.user_id, m.seq) for m in vectors}
    for (key, _), r in zip(reader.messages, recs, strict=True):
        assert key == r["user_id"].encode()
        assert len(r["items"]) == len(r["scores"]) == 10 and len(set(r["items"])) == 10
        assert set(r["items"]) <= catalogue, r["items"]
        assert r["scores"] == sorted(r["scores"], reverse=True)
        assert r["model_id"] == vectors[0].model_id

    ev = s1["evaluation"]
    print("recommend hit rate:", json.dumps(ev))
    assert ev["cases"] == len(events) - len({e.user_id for e in events})
    assert ev["hit_rate"] > 3 * ev["random_items_hit_rate"], ev

    # Restart with the same group after new vectors: only the new ones are read.
    more = vectors[:50]
    from clickvec.devtools.produce import produce_records

    produce_records([(m.user_id.encode(), m.to_bytes()) for m in more], kafka_bootstrap, vec)
    run_cli("recommend", *base, "--summary", str(tmp_path / "r2.json"))
    s2 = json.loads((tmp_path / "r2.json").read_text())
    assert s2["loop"]["consumed"] == len(more), s2
    reader.poll(2.0)
    reader.close()
    assert len(reader.messages) == len(vectors) + len(more)

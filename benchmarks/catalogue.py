"""Surprise and the catalogue: exact vs approximate surprise at several catalogue sizes.

For each training run given (`--run NAME=RUN_DIR`, e.g. 1k, 20k and 200k items) it exports
two bundles, `--surprise exact` and `--surprise approx` (export/surprise.py), then measures

  accuracy  the approximate surprise against the exact one on synthetic users' real
            sequences (the generator the run was trained on, encoded with its vocabulary):
            absolute and relative error (mean, p99, max) and Spearman rank correlation
  step      user-steps/s of the step graph alone (T = 1, one ORT thread) at B = 64, 1024
            and 8192 (exact skipped where its (B, N) log-softmax would pass `--max-cells`)
  worker    the `clickvec stream` process draining a backlog of those users' events on a
            local Kafka broker (benchmarks/pipeline.py's backlog_run): events/s and worker
            CPU ms per event; plus the model alone (pipeline.model_only) and, once, the
            confluent-kafka ceiling and (`--naive`) the one-call-per-event Faust agent

Writes benchmarks/results/catalogue.json.

    nice -n 10 .venv/bin/python -m benchmarks.catalogue --run 1k=runs/a --run 200k=runs/b
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python benchmarks/catalogue.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks import common
from clickvec.logsetup import configure

log = logging.getLogger("catalogue")
BATCHES = (64, 1024, 8192)


def resized_run(run: str, n_items: int, out: Path, seed: int = 0) -> Path:
    """The run's checkpoint grown to `n_items` hash buckets: each new item a copy of a
    random trained item's embedding (plus noise of a tenth of the embeddings' spread) and
    bias, so the catalogue keeps the trained one's structure (topics, popularity spread) at
    a size the synthetic generator cannot train in minutes."""
    import torch

    from clickvec.features import FeatureSpec
    from clickvec.training.checkpoint import load_checkpoint, save_checkpoint
    from clickvec.training.model import Encoder, ModelConfig

    model, spec, payload = load_checkpoint(run)
    sd = model.state_dict()
    emb, bias = sd["item_emb.weight"], sd["item_bias"]
    rng = np.random.default_rng(seed)
    n_old = emb.shape[0]
    src = torch.as_tensor(rng.integers(2, n_old, n_items + 2 - n_old))
    noise = torch.as_tensor(rng.standard_normal((len(src), emb.shape[1])), dtype=emb.dtype) * emb[2:].std() * 0.1
    sd["item_emb.weight"] = torch.cat([emb, emb[src] + noise])
    sd["item_bias"] = torch.cat([bias, bias[src]])
    big_spec = FeatureSpec(hash_buckets=n_items)
    cfg = {**model.cfg.to_dict(), "n_items": big_spec.n_items}
    big = Encoder(ModelConfig(**cfg))
    big.load_state_dict(sd)
    tc = {**payload.get("train_config", {}), "resized_from": str(run), "resized_items": n_items}
    save_checkpoint(out / "best.pt", big.eval(), big_spec, tc)
    del spec
    return out


def synthetic_users(payload: dict[str, Any], users: int) -> Any:
    """A synthetic event table from the generator settings the run was trained with (its
    catalogue: a resized run is scored on the users of the run it was grown from)."""
    from clickvec.training.data import synthetic_table

    tc = payload.get("train_config", {})
    return synthetic_table(users, int(tc.get("seed", 0)), int(tc.get("synthetic_items", 0)))


def sequences(table: Any, spec: Any, max_len: int) -> list[np.ndarray]:
    """Each user's encoded (item, type, gap) sequence, its first `max_len` events."""
    cols = table.select(["user_id", "item_id", "event_type", "ts"]).to_pydict()
    by_user: dict[str, list[int]] = {}
    for i, u in enumerate(cols["user_id"]):
        by_user.setdefault(u, []).append(i)
    out = []
    for rows in by_user.values():
        rows = rows[:max_len]
        out.append(spec.encode_sequence([cols["item_id"][i] for i in rows], [cols["event_type"][i] for i in rows],
                                        [cols["ts"][i] for i in rows]))
    return out


def events(table: Any, n: int) -> list[tuple[bytes, bytes]]:
    """The table's first `n` events (time order) as contract JSON keyed by user."""
    cols = table.select(["user_id", "item_id", "event_type", "ts"]).slice(0, n).to_pydict()
    return [(u.encode(), json.dumps({"user_id": u, "item_id": it, "event_type": et, "ts": int(ts)},
                                    separators=(",", ":")).encode())
            for u, it, et, ts in zip(cols["user_id"], cols["item_id"], cols["event_type"], cols["ts"], strict=True)]


def step_rows(bundle_dir: Path, n_items: int, max_cells: float, seconds: float,
              passes: int = 3) -> list[dict[str, Any]]:
    from benchmarks.step_throughput import time_batch
    from clickvec.bundle.reader import load_bundle

    bundle = load_bundle(bundle_dir, providers="cpu", intra_op_threads=1)
    exact = bundle.manifest["surprise"]["mode"] == "exact"
    rng = np.random.default_rng(0)
    rows = []
    for B in BATCHES:
        if exact and B * n_items > max_cells:
            rows.append({"batch": B, "skipped": f"(B, N) log-softmax of {B * n_items / 1e6:.0f}M floats"})
            continue
        # passes: the one with the lowest CPU per user-step is kept (other load only adds)
        r = min((time_batch(bundle, B, rng, seconds / passes, min_calls=3) for _ in range(passes)),
                key=lambda x: x["cpu_us_per_user_step"])
        rows.append(r)
        log.info("step %s N=%d B=%d: %.0f user-steps/s, %.1f us CPU per user-step", "exact" if exact else "approx",
                 n_items, B, r["user_steps_per_s"], r["cpu_us_per_user_step"])
    return rows


def accuracy(exact_dir: Path, approx_dir: Path, seqs: list[np.ndarray]) -> dict[str, Any]:
    from clickvec.bundle.reader import load_bundle
    from clickvec.export.parity import pack
    from clickvec.export.surprise import error_figures

    ex, ap = (load_bundle(d, providers="cpu") for d in (exact_dir, approx_dir))
    s_ex, s_ap = [], []
    t_ex = t_ap = 0.0
    for i in range(0, len(seqs), 4):  # small calls: the exact graph holds (T, B, N)
        chunk = seqs[i : i + 4]
        items, types, gaps, lengths = pack(chunk)
        zero = np.zeros((ex.layers, len(chunk), ex.hidden), np.float32)
        t0 = time.perf_counter()
        e = ex.step(items, types, gaps, lengths, zero, zero)[4]
        t1 = time.perf_counter()
        a = ap.step(items, types, gaps, lengths, zero, zero)[4]
        t_ex, t_ap = t_ex + t1 - t0, t_ap + time.perf_counter() - t1
        for b, s in enumerate(chunk):
            s_ex.append(e[: len(s), b])
            s_ap.append(a[: len(s), b])
    fig = error_figures(np.concatenate(s_ex), np.concatenate(s_ap))
    fig["users"] = len(seqs)
    fig["exact_surprise"] = {"mean": float(np.concatenate(s_ex).mean()),
                             "p99": float(np.quantile(np.concatenate(s_ex), 0.99))}
    top = np.concatenate(s_ex) >= np.quantile(np.concatenate(s_ex), 0.99)
    top_ap = np.concatenate(s_ap) >= np.quantile(np.concatenate(s_ap), 0.99)
    fig["top1pct_overlap"] = float((top & top_ap).sum() / max(1, top.sum()))
    return fig


def export_pair(run: Path, root: Path, approx: str) -> dict[str, Any]:
    from clickvec.export.writer import export_bundle

    out = {}
    for mode in ("exact", approx):
        t0 = time.time()
        name = "exact" if mode == "exact" else "approx"
        m = export_bundle(run, root / name, surprise=mode, force=True)
        out[name] = {"dir": root / name, "export_s": time.time() - t0, "label": m["surprise"]["label"],
                     "encoder_bytes": m["files"]["encoder.onnx"]["bytes"]}
    return out


def worker_runs(bundles: dict[str, dict[str, Any]], load: list[tuple[bytes, bytes]], ctx: dict[str, Any],
                cap_s: float) -> dict[str, Any]:
    from benchmarks.pipeline import backlog_run, model_only

    res = {}
    for name, b in bundles.items():
        ctx = {**ctx, "bundle": b["dir"]}
        r = backlog_run("clickvec", load, ctx, cap_s)
        r["load_average_1m"] = os.getloadavg()[0]
        r["model_only"] = model_only(b["dir"])
        res[name] = r
    return res


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", required=True,
                   help="NAME=RUN_DIR[:N_ITEMS][@APPROX] (repeat): N_ITEMS resizes the run to N hash "
                        "buckets; APPROX overrides --approx for this run")
    p.add_argument("--approx", default="approx", help="the --surprise value of the cheap mode")
    p.add_argument("--users", type=int, default=300, help="users whose sequences score the error")
    p.add_argument("--max-len", type=int, default=60)
    p.add_argument("--step-seconds", type=float, default=2.0)
    p.add_argument("--max-cells", type=float, default=2.2e8, help="largest exact (B, N) measured")
    p.add_argument("--events", type=int, default=20_000, help="backlog events per worker run (0: no worker)")
    p.add_argument("--cap-s", type=float, default=30.0)
    p.add_argument("--no-worker", nargs="*", default=[], metavar="NAME", help="runs measured without the worker")
    p.add_argument("--naive", action="store_true", help="also the naive Faust agent on the largest catalogue")
    p.add_argument("--out", type=Path, default=common.RESULTS / "catalogue.json")
    a = p.parse_args(argv)
    configure(logging.INFO)
    from clickvec.training.checkpoint import load_checkpoint

    t_begin = time.time()
    res: dict[str, Any] = {"benchmark": "catalogue", "what": __doc__.split("\n\n")[1].strip(), "sizes": {},
                           "machine": {**common.machine_info(), "load_average_before": list(os.getloadavg())},
                           "versions": common.versions(), "approx": a.approx}
    with tempfile.TemporaryDirectory(prefix="clickvec-catalogue-") as tmp:
        work = Path(tmp)
        with common.kafka(work, start=bool(a.events)) as bootstrap:
            for spec_arg in a.run:
                name, _, run = spec_arg.partition("=")
                run, _, approx = run.partition("@")
                run, _, resize = run.partition(":")
                # sequences encoded with the trained vocabulary: a resized model keeps the
                # trained rows first, so they score as the trained model's users would
                _, spec, payload = load_checkpoint(run)
                if resize:
                    run = str(resized_run(run, int(resize), work / f"run-{name}"))
                model = load_checkpoint(run)[0]
                n_items = model.cfg.n_items
                del model
                bundles = export_pair(Path(run), work / name, approx or a.approx)
                table = synthetic_users(payload, max(a.users, 2000))
                seqs = sequences(table, spec, a.max_len)[: a.users]
                entry: dict[str, Any] = {"run": run, "n_items": n_items,
                                         "export": {k: {kk: vv for kk, vv in v.items() if kk != "dir"}
                                                    for k, v in bundles.items()}}
                entry["accuracy"] = accuracy(bundles["exact"]["dir"], bundles["approx"]["dir"], seqs)
                log.info("%s accuracy: %s", name, json.dumps(entry["accuracy"]))
                entry["step"] = {k: step_rows(v["dir"], n_items, a.max_cells, a.step_seconds)
                                 for k, v in bundles.items()}
                if a.events and name not in a.no_worker:
                    ctx = {"bootstrap": bootstrap, "work": work, "partitions": 4}
                    load = events(table, a.events)
                    entry["worker"] = worker_runs(bundles, load, ctx, a.cap_s)
                    if a.naive and spec_arg == a.run[-1]:
                        from benchmarks.pipeline import backlog_run

                        entry["naive"] = {k: backlog_run("naive", load, {**ctx, "bundle": v["dir"]}, a.cap_s)
                                          for k, v in bundles.items()}
                    if spec_arg == a.run[0]:
                        from benchmarks.pipeline import backlog_run

                        res["ceiling"] = backlog_run("ceiling", load, {**ctx, "bundle": bundles["exact"]["dir"]},
                                                     a.cap_s)
                res["sizes"][name] = entry
                a.out.parent.mkdir(parents=True, exist_ok=True)
                a.out.write_text(json.dumps(res, indent=1, default=str) + "\n")  # partial results survive
    res["machine"]["load_average_after"] = list(os.getloadavg())
    res["wall_s"] = time.time() - t_begin
    a.out.write_text(json.dumps(res, indent=1, default=str) + "\n")
    print(json.dumps({k: {"n_items": v["n_items"], "spearman": v["accuracy"]["spearman"],
                          "abs_mean": v["accuracy"]["abs"]["mean"]} for k, v in res["sizes"].items()}, indent=1))


if __name__ == "__main__":
    main()

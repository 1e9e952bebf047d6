"""The figures of a `clickvec run` and its summary files (run_summary.json and .md)."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clickvec.run.build import training_warnings
from clickvec.run.traffic import base_user

if TYPE_CHECKING:
    from clickvec.run.job import Job

# Worker series measured from the events' own timestamps: on replayed or synthetic data
# they report the data's age, not the pipeline's latency, so the summary leaves them out.
EVENT_TIME_SERIES = ("clickvec_end_to_end_seconds",)


def figures(job: Job) -> dict[str, Any]:
    """Everything the run measured, as the summary's dict (partial when it failed early)."""
    out: dict[str, Any] = {"brokers": job.bootstrap, "local_broker": job.cfg.brokers is None,
                           "topics": job.topics}
    b = job.b
    if b is not None:
        out["model"] = {"model_id": b.model_id, "bundle": str(b.bundle), "training_run": str(b.run_dir),
                        "training_report": str(b.run_dir / "report.md"), "training": b.training}
        out["training_warnings"] = training_warnings(b.training)
        out["paths"] = {"workdir": str(job.work), "events": str(b.events), "train_events": str(b.train_events),
                        "logs": str(job.logs), "summary_json": str(job.work / "run_summary.json"),
                        "summary_md": str(job.work / "run_summary.md")}
    out["components"] = {n: c.status for n, c in job.children.items()}
    out["lookup"] = job.lookup.summary()
    if job.producer is None or job.observer is None:
        return out
    out.update(_stream_figures(job))
    for name in ("alerts", "recommend", "serve-redis"):
        p = job.work / f"{name}_summary.json"
        with contextlib.suppress(OSError, ValueError):
            if p.stat().st_mtime >= time.time() - (time.monotonic() - job.t_stream):
                out[f"{name}_summary"] = {k: v for k, v in json.loads(p.read_text()).items() if k != "config"}
    if job.observer.error:
        out["observer_error"] = job.observer.error
    return out


def _stream_figures(job: Job) -> dict[str, Any]:
    prod, obs, meter = job.producer, job.observer, job.meter
    assert prod is not None and obs is not None
    secs = max(1e-6, (job.t_stream_end or time.monotonic()) - job.t_stream)
    out_secs = max(1e-6, obs.last_vector_at - job.t_stream)
    with obs.lock:
        counts = dict(obs.counts)
        alert_users = {base_user(u) for u in obs.alert_users}
        dead = dict(obs.dead)
        model_ids = sorted(obs.model_ids)
    out: dict[str, Any] = {}
    out["counts"] = {
        "events_produced": prod.delivered,
        "malformed_produced": prod.delivered_bad,
        "messages_produced": prod.delivered + prod.delivered_bad,
        "produce_failures": prod.failed,
        "replay_passes": prod.passes,
        "vectors_published": counts["out"],
        "vectors_undecodable": obs.undecodable,
        "dead_letters": counts["dlq"],
        "dead_letters_by_reason": dead,
        "alerts": counts["alerts"],
        "recommendations": counts["recs"],
    }
    out["throughput"] = {
        "streaming_seconds": round(secs, 2),
        "events_per_s": round(prod.delivered / secs, 1),
        # over the time until the last vector arrived (the worker catches up after the producer stops)
        "vectors_per_s": round(counts["out"] / out_secs, 1),
        "seconds_to_last_vector": round(out_secs, 2),
        "drain": "waited for the pipeline" if job.drained else "none (nothing waited for a vector)",
    }
    out["latency_ms"] = {"measured_from": "produce time (Kafka CreateTime), whole run",
                         "produce_to_vector_received": meter.latency.summary(),
                         "produce_to_vector_emitted": meter.emit_latency.summary(),
                         "unmatched_vectors": meter.unmatched}
    out["vector_model_ids"] = model_ids
    anomalous = set(job.b.labels) if job.b is not None else set()
    if anomalous:
        out["alerts_vs_planted_anomalies"] = alert_quality(alert_users, anomalous)
    if meter.metrics:
        out["worker_metrics"] = {k: v for k, v in meter.metrics.items()
                                 if k.startswith("clickvec_") and not k.endswith("_created")
                                 and not k.startswith(EVENT_TIME_SERIES)}
    return out


def alert_quality(alerted: set[str], planted: set[str]) -> dict[str, Any]:
    """Recall (planted anomalous users alerted) and precision (alerted users that are
    planted anomalies)."""
    hit = len(alerted & planted)
    return {
        "alerted_users": len(alerted),
        "alerted_planted_anomalous": hit,
        "planted_anomalous_users": len(planted),
        "recall": round(hit / len(planted), 3) if planted else None,
        "precision": round(hit / len(alerted), 3) if alerted else None,
    }


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.0f} %"


def summary_markdown(s: dict[str, Any]) -> str:
    c = s.get("counts", {})
    t = s.get("throughput", {})
    lat = s.get("latency_ms", {}).get("produce_to_vector_received", {})
    emit = s.get("latency_ms", {}).get("produce_to_vector_emitted", {})
    m = s.get("model", {})
    lines = [
        f"# clickvec run {s['run_id']}",
        "",
        f"- stopped by: {s.get('stopped_by')}; brokers {s.get('brokers')}"
        f"{' (local, started by this run)' if s.get('local_broker') else ''}",
        f"- model `{m.get('model_id', '?')[:16]}` — bundle `{m.get('bundle')}`, training report "
        f"`{m.get('training_report')}`; build {'reused' if s.get('build', {}).get('reused') else 'fresh'} "
        f"({s.get('build', {}).get('seconds')} s)",
        *(f"- **warning: {w}**" for w in s.get("training_warnings", [])),
        f"- components: {s.get('components')}",
        "",
        "| figure | value |",
        "|---|---|",
        f"| events produced | {c.get('events_produced')} (+{c.get('malformed_produced')} malformed) |",
        f"| vectors published | {c.get('vectors_published')} |",
        f"| dead letters | {c.get('dead_letters')} {c.get('dead_letters_by_reason', '')} |",
        f"| alerts | {c.get('alerts')} |",
        f"| recommendations | {c.get('recommendations')} |",
        f"| streaming seconds | {t.get('streaming_seconds')} (drain: {t.get('drain')}) |",
        f"| throughput | {t.get('events_per_s')} ev/s in, {t.get('vectors_per_s')} vec/s out |",
        f"| latency produce → vector received, whole run | p50 {lat.get('p50')} ms, p95 {lat.get('p95')} ms, "
        f"p99 {lat.get('p99')} ms (n={lat.get('n')}) |",
        f"| latency produce → vector emitted, whole run | p50 {emit.get('p50')} ms, p95 {emit.get('p95')} ms, "
        f"p99 {emit.get('p99')} ms |",
    ]
    lk = s.get("lookup", {})
    if lk.get("available"):
        lat_l = lk.get("latency_ms", {})
        lines.append(f"| lookup RedisLookup.get(user), once a second | p50 {lat_l.get('p50')} ms, p99 "
                     f"{lat_l.get('p99')} ms (n={lk.get('lookups')}, found {lk.get('found')}) |")
    elif lk:
        lines.append(f"| lookup | off: {lk.get('why')} |")
    a = s.get("alerts_vs_planted_anomalies")
    if a:
        lines.append(f"| alerts vs planted anomalies | recall {_pct(a.get('recall'))} "
                     f"({a['alerted_planted_anomalous']} of {a['planted_anomalous_users']} planted users alerted), "
                     f"precision {_pct(a.get('precision'))} ({a['alerted_planted_anomalous']} of "
                     f"{a['alerted_users']} alerted users are planted) |")
    lines += ["", "Latencies are measured from each event's produce time (its Kafka CreateTime), over the "
              "whole run; the live view's figures are over its last 10 s.",
              "", f"Topics: {s.get('topics')}", "", f"Logs: `{s.get('paths', {}).get('logs')}`", ""]
    return "\n".join(lines)


def write_summary(work: Path, s: dict[str, Any]) -> Path:
    """run_summary.{json,md}; a failed run's go to run_summary.failed.{json,md}, so the
    summary of the last good run (which describes the build still in place) stays."""
    name = "run_summary.failed" if "error" in s else "run_summary"
    if "error" not in s:
        for ext in (".json", ".md"):  # a later good run makes an old failure moot
            (work / f"run_summary.failed{ext}").unlink(missing_ok=True)
    for ext, text in ((".json", json.dumps(s, indent=2, default=str) + "\n"), (".md", summary_markdown(s))):
        tmp = work / f"{name}{ext}.tmp"
        tmp.write_text(text)
        tmp.replace(work / f"{name}{ext}")
    return work / f"{name}.json"

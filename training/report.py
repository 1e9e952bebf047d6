"""Run report: loss and metric curves (PNG, matplotlib Agg) and report.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clickvec.training.config import PROTOCOLS, TrainConfig


def _plots(out: Path, history: list[dict[str, Any]], k: int) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return []
    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ep, [h["train_loss"] for h in history], marker="o", label="train loss")
    ax.plot(ep, [h.get("model.item_nll", float("nan")) for h in history], marker="s", label="valid next-item NLL")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for who, style in (("model", "-"), ("markov", "--"), ("popularity", ":")):
        for proto, marker in zip(PROTOCOLS, "oxs", strict=True):
            key = f"{who}.{proto}.hr@{k}"
            if key in history[0]:
                ax.plot(ep, [h[key] for h in history], style, marker=marker, label=f"{who} {proto} HR@{k}")
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"valid HR@{k}")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "metrics.png", dpi=100)
    plt.close(fig)
    return ["loss.png", "metrics.png"]


def _table(test: dict[str, Any], k: int) -> list[str]:
    protos = test["protocols"]
    head = " | ".join(f"{p} {m}" for p in protos for m in test["model"][p])
    rows = [f"| scorer | {head} |", "|---|" + "---|" * sum(len(test["model"][p]) for p in protos)]
    for who in ("model", "markov", "popularity"):
        if who in test:
            rows.append(f"| {who} | " + " | ".join(f"{v:.4f}" for p in protos for v in test[who][p].values()) + " |")
    return rows


def _aux_lines(m: dict[str, Any], comp: dict[str, Any], k: int) -> list[str]:
    """Only the figures the data supports (no type accuracy without event types, no gap
    error without timestamps)."""
    lines = [f"Next-item NLL {m['item_nll']:.3f}."]
    if "type_acc" in m:
        lines.append(f"Next event type accuracy {m['type_acc']:.4f}.")
    if "time_mae_s" in m:
        lines.append(f"Time to next event MAE {m['time_mae_s']:.1f} s, RMSE {m['time_rmse_s']:.1f} s; log1p space "
                     f"MAE {m['time_mae_log']:.3f}, RMSE {m['time_rmse_log']:.3f}.")
    lines.append(f"Compression: a {comp['vector_bytes_f32']}-byte float32 vector summarises "
                 f"{comp['mean_history_events']:.1f} events"
                 + (f" ({comp['mean_history_json_bytes']:.0f} JSON bytes; {comp['compression_ratio']:.0f}x)"
                    if "compression_ratio" in comp else "")
                 + f"; recall@{k} of the last {k} distinct items from z "
                 f"({comp['recall_head']} head): {comp[f'recall@{k}_last_{k}_distinct']:.4f}.")
    return lines


def write_report(out: str | Path, result: dict[str, Any], cfg: TrainConfig) -> None:
    out = Path(out)
    k = cfg.eval_k
    pngs = _plots(out, result.get("history", []), k)
    test = result["test"]
    lines = [
        f"# Training run `{out.name}`",
        "",
        f"- data: {cfg.data or f'synthetic, {cfg.synthetic_users} users'}; split `{cfg.split}`; "
        f"{result['split'].get('users')} users, {result['split'].get('train_events')} training events, "
        f"{result['split'].get('n_items')} item indices",
        f"- recipe: `{result['recipe']['name']}` ({result['recipe']['reason']})",
        f"- model: {result['model']['parameters']:,} parameters; hidden {cfg.hidden}, z {cfg.z_dim}, "
        f"layers {cfg.layers}, vae {cfg.vae}; loss `{cfg.loss}`",
        f"- {result['epochs_run']} of {result['epochs_planned']} epochs (stopped: {result['stop_reason']}; best "
        f"{result['best_epoch']} by valid {result['select_metric']}), {result['training_seconds']:.1f} s "
        f"training on {result['device']} x{result['world_size']}; "
        f"{result['throughput']['sequences_per_s']:.0f} sequences/s, "
        f"{result['throughput']['events_per_s']:.0f} events/s",
        f"- beats Markov on every headline figure of the test split: {result['beats_markov']}",
        "",
        f"## Test split ({test['n_users']} users; sampled: 1 true item vs {test['num_negatives']} unseen; "
        "full: whole catalogue; full_seen_excluded: catalogue less the user's history)",
        "",
        *_table(test, k),
        "",
        "Margins (model / baseline): " + ", ".join(
            f"{name} {v:.2f}x" for name, v in sorted(result.get("margins", {}).items()) if "hr@" in name),
        "",
        *_aux_lines(test["model"], result["compression"], k),
        "",
        *[f"![{p}]({p})" for p in pngs],
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))

"""``report.json`` and ``report.md``: the contract other tools read.

Federated runs (written by the aggregator, completed by the CLI) and
``fedcrm baseline`` produce the same shape, so they compare line by line:

- ``rounds_completed``, ``participants`` (identity, status, rounds taken part in),
- ``metrics`` {accuracy, precision, recall, f1, auc} and ``metrics_source``
  (``test`` when ``--test-data`` was given, else ``validation``: the aggregated
  validation splits),
- ``history`` [{round, loss, accuracy, f1, auc, participants, duration_s,
  bytes_up_per_client, bytes_down_per_client}],
- ``bytes_per_client_per_round``: mean of up + down bytes over every
  participant-round (serialized gRPC message sizes),
- ``privacy`` {mode, epsilon_spent, delta, noise_multiplier, clipping_norm} (nulls when differential
  privacy is off), plus ``privacy_audit`` once ``fedcrm audit`` ran,
- ``status`` (succeeded | failed), ``partial`` and ``message``,
- ``warnings``: a model that learned nothing (one class predicted, validation loss rising at the end).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedcrm.files import atomic_write
from fedcrm.training.health import model_warnings

__all__ = ["RoundRecord", "build_report", "read_report", "render_markdown", "write_report"]

METRIC_KEYS = ("accuracy", "precision", "recall", "f1", "auc")
NO_PRIVACY = {"mode": "none", "epsilon_spent": None, "delta": None, "noise_multiplier": None, "clipping_norm": None}


@dataclass
class RoundRecord:
    round: int
    loss: float | None
    accuracy: float | None
    f1: float | None
    auc: float | None
    precision: float | None
    recall: float | None
    participants: int
    duration_s: float
    bytes_up_per_client: float
    bytes_down_per_client: float
    train_loss: float | None = None
    dropped: list[str] = field(default_factory=list)
    epsilon_spent: float | None = None  # cumulative, after this round (None without differential privacy)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def build_report(
    *,
    kind: str,
    federation: str,
    status: str,
    message: str,
    rounds_planned: int,
    history: list[RoundRecord],
    participants: list[dict[str, Any]],
    metrics: dict[str, float | None],
    metrics_source: str,
    model_digest: str | None,
    privacy: dict[str, Any] | None = None,
    partial: bool | None = None,
    duration_s: float | None = None,
    bytes_per_participant_round: list[float] | None = None,
) -> dict[str, Any]:
    per_round = bytes_per_participant_round or []
    return {
        "kind": kind,
        "federation": federation,
        "status": status,
        "partial": status != "succeeded" if partial is None else partial,
        "message": message,
        "rounds_planned": rounds_planned,
        "rounds_completed": len(history),
        "participants": participants,
        "metrics": {k: metrics.get(k) for k in METRIC_KEYS},
        "metrics_source": metrics_source,
        "history": [asdict(r) for r in history],
        "bytes_per_client_per_round": _mean(per_round),
        "privacy": privacy or dict(NO_PRIVACY),
        "model_digest": model_digest,
        "duration_s": duration_s,
        "warnings": model_warnings(metrics, [r.loss for r in history]),
    }


def write_report(out_dir: Path, report: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "report.json", (json.dumps(report, indent=2) + "\n").encode())
    atomic_write(out_dir / "report.md", render_markdown(report).encode())


def read_report(out_dir: Path) -> dict[str, Any]:
    return json.loads((Path(out_dir) / "report.json").read_text())


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{100 * v:.2f}%" if pct else f"{v:.4f}"
    return str(v)


def _bytes(v: float | None) -> str:
    if v is None:
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(v) < 1024 or unit == "GiB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return str(v)


def _privacy_line(p: dict[str, Any]) -> str:
    if p.get("mode", "none") == "none":
        return "differential privacy none"
    eps, sigma = p.get("epsilon_spent"), p.get("noise_multiplier")
    return (f"differential privacy {p['mode']}, epsilon spent {_fmt(eps)} of {p.get('epsilon_budget', '–')} "
            f"(delta {p.get('delta')}, noise multiplier {'–' if sigma is None else f'{sigma:.3g}'}, "
            f"clipping norm {p.get('clipping_norm')})")


def _audit_lines(audit: dict[str, Any] | None) -> list[str]:
    if not audit:
        return []
    parts = [f"{name.replace('_', '-')} attack AUC {a['auc']:.4f} (advantage {a['advantage']:.4f}, "
             f"TPR at 1% FPR {a['tpr_at_1pct_fpr']:.4f})" for name, a in
             (("loss_threshold", audit["loss_threshold"]), ("shadow", audit["shadow"]))]
    return [f"- Membership-inference audit: {'; '.join(parts)}"]


def render_markdown(report: dict[str, Any]) -> str:
    m = report["metrics"]
    title = "Baseline (central training on pooled data)" if report["kind"] == "baseline" else "Federated training"
    lines = [
        f"# {title}: {report['federation']}",
        "",
        f"- Status: **{report['status']}**" + (" (partial results)" if report["partial"] else ""),
    ]
    if report.get("message"):
        lines.append(f"- {report['message']}")
    for warning in report.get("warnings") or []:
        lines.append(f"- **Warning:** {warning}")
    lines += [
        f"- Rounds: {report['rounds_completed']} of {report['rounds_planned']}",
        f"- Participants: {len(report['participants'])}",
        f"- Metrics on the {report['metrics_source']} set: accuracy {_fmt(m['accuracy'], True)}, "
        f"precision {_fmt(m['precision'], True)}, recall {_fmt(m['recall'], True)}, "
        f"F1 {_fmt(m['f1'], True)}, ROC AUC {_fmt(m['auc'])}",
        f"- Traffic per participant per round (up + down): {_bytes(report['bytes_per_client_per_round'])}",
        f"- Privacy: {_privacy_line(report['privacy'])}",
        *_audit_lines(report.get("privacy_audit")),
        f"- Model digest: `{report['model_digest']}`",
        "",
        "| Round | Loss | Accuracy | F1 | AUC | Participants | Seconds | Up / client | Down / client |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["history"]:
        lines.append(
            f"| {r['round']} | {_fmt(r['loss'])} | {_fmt(r['accuracy'], True)} | {_fmt(r['f1'], True)} | "
            f"{_fmt(r['auc'])} | {r['participants']} | {r['duration_s']:.2f} | "
            f"{_bytes(r['bytes_up_per_client'])} | {_bytes(r['bytes_down_per_client'])} |"
        )
    if report["participants"]:
        lines += ["", "| Participant | Status | Rounds | Note |", "|---|---|---:|---|"]
        for p in report["participants"]:
            lines.append(f"| {p['identity']} | {p['status']} | {p['rounds']} | {p.get('message', '')} |")
    if report.get("personalization"):
        lines += ["", "Personalization: each participant's own validation rows, the global model against its "
                  "fine-tuned copy (collected from the participants' own files; never sent to the aggregator).", "",
                  "| Participant | Validation rows | Accuracy global → personalized | F1 | AUC |", "|---|---:|---|---|---|"]
        for identity, r in sorted(report["personalization"].items()):
            g, q = r["global"], r["personalized"]
            lines.append(f"| {identity} | {r['validation_rows']} | {_fmt(g['accuracy'], True)} → "
                         f"{_fmt(q['accuracy'], True)} | {_fmt(g['f1'], True)} → {_fmt(q['f1'], True)} | "
                         f"{_fmt(g['auc'])} → {_fmt(q['auc'])} |")
    return "\n".join(lines) + "\n"

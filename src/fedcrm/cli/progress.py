"""Live progress of a run: one line per round, a bar on a terminal, dropouts as they happen.

Reads the aggregator's ``events.jsonl`` (the same events a cluster exports as
metrics), so what the user sees is what the aggregator recorded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

__all__ = ["RunProgress", "human_bytes", "pct"]


def pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.2f}%"


def human_bytes(v: float | None) -> str:
    if v is None:
        return "–"
    for unit in ("B", "KiB", "MiB"):
        if v < 1024:
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return f"{v:.1f} GiB"


class RunProgress:
    def __init__(self, console: Console, rounds: int, participants: int, *, private: bool = False) -> None:
        self.console = console
        self.private = private  # show the epsilon spent so far in every round line
        self.rounds = rounds
        self.participants = participants
        self.progress = Progress(
            TextColumn("[bold]training"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
            disable=not console.is_terminal,
        )
        self.task = self.progress.add_task("rounds", total=rounds, status="waiting for participants")

    def __enter__(self) -> RunProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)  # type: ignore[arg-type]

    def _print(self, text: str) -> None:
        self.progress.console.print(text, highlight=False, soft_wrap=True)

    def feed_events(self, path: Path, offset: int) -> int:
        """Handle events appended since ``offset``; returns the new offset (only whole lines are consumed)."""
        try:
            with open(path, "rb") as fh:
                fh.seek(offset)
                chunk = fh.read()
        except FileNotFoundError:
            return offset
        end = chunk.rfind(b"\n")
        if end < 0:
            return offset
        for line in chunk[: end + 1].splitlines():
            if line.strip():
                self.handle(json.loads(line))
        return offset + end + 1

    def handle(self, e: dict[str, Any]) -> None:
        kind = e["event"]
        if kind == "enrolled":
            missing = e.get("missing") or []
            self._print(f"enrolled {len(e['participants'])} of {self.participants} participants"
                        + (f" (missing: {', '.join(missing)})" if missing else ""))
            self.progress.update(self.task, status="computing global statistics")
        elif kind == "statistics":
            self._print(f"global statistics from {e['participants']} participants over {e['rows']:,} rows; "
                        f"model has {e['parameters']:,} parameters")
            self._print(f"{'round':>9}  {'val loss':>8}  {'accuracy':>8}  {'F1':>6}  {'AUC':>6}  "
                        f"{'parts':>5}  {'secs':>6}  {'up/client':>10}  {'down/client':>11}"
                        + (f"  {'epsilon':>8}" if self.private else ""))
        elif kind == "round":
            f1 = "–" if e["f1"] is None else f"{e['f1']:.3f}"
            auc = "–" if e["auc"] is None else f"{e['auc']:.3f}"
            loss = "–" if e["loss"] is None else f"{e['loss']:.4f}"
            self._print(
                f"{e['round']:>4}/{e['rounds']:<4}  {loss:>8}  {pct(e['accuracy']):>8}  {f1:>6}  {auc:>6}  "
                f"{e['participants']:>5}  {e['duration_s']:>6.2f}  {human_bytes(e['bytes_up_per_client']):>10}  "
                f"{human_bytes(e['bytes_down_per_client']):>11}"
                + (f"  {e['epsilon_spent']:>8.4f}" if e.get("epsilon_spent") is not None else "")
            )
            eps = e.get("epsilon_spent")
            self.progress.update(self.task, completed=e["round"], status=f"accuracy {pct(e['accuracy'])}"
                                 + ("" if eps is None else f", epsilon {eps:.3f}"))
        elif kind == "resumed":
            abandoned = e.get("abandoned")
            self._print(f"[yellow]aggregator resumed after round {e['round']}[/]"
                        + (f"; round {abandoned} is re-run with fresh keys" if abandoned and abandoned > e["round"] else ""))
        elif kind == "secagg_abandoned":
            self._print(f"[red]round {e['round']} {e['phase']}: secure aggregation abandoned, no sum released:[/] {e['reason']}")
        elif kind == "secagg_members_restarted":
            self._print(f"[yellow]secure aggregation: {', '.join(e['left_out'])} did not answer the member-list "
                        f"agreement ({e['step']} step) and sit the secure sums out; {e['members']} members go on[/]")
        elif kind == "privacy_warning":
            self._print(f"[yellow]warning: {e['message']}[/]")
        elif kind == "privacy_budget_exhausted":
            self._print(f"[yellow]{e['message']}[/]")
        elif kind == "dropout":
            self._print(f"[yellow]round {e['round']} {e['stage']}: {e['identity']} dropped out ({e['reason']})[/]")
        elif kind == "participant_failed":
            self._print(f"[red]{e['identity']} cannot take part:[/] {e['message']}")
        elif kind == "finished" and e["status"] != "succeeded":
            self._print(f"[red]federation failed:[/] {e['message']}")

    def data_checked(self, rows: dict[str, int]) -> None:
        self._print(f"every participant loaded and mapped its own data: {sum(rows.values()):,} rows in "
                    f"{len(rows)} processes")
        self.progress.update(self.task, status="enrolling")

    def aggregator_restarted(self, how: str, restart: int, limit: int) -> None:
        self._print(f"[yellow]the aggregator process ended ({how}); restarting it from its checkpoint "
                    f"(restart {restart} of {limit})[/]")

    def participant_exited(self, identity: str, how: str) -> None:
        self._print(f"[yellow]participant {identity} process ended ({how}); treated as a dropout[/]")

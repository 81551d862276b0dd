"""The federation's round loop, as the aggregator runs it.

Stages, in order: enrolment (wait for participants), statistics (global
preprocessing from summed counts, a secure sum when secure aggregation is on),
then per round FIT (participants train from the global model and send weighted
updates) and EVALUATE (participants score the new global model on their
validation splits and send counts).

Every stage waits for its cohort until all have answered, left, or the
round timeout passes; the ones that did not answer are dropouts of that stage.
The federation goes on while at least ``minParticipants`` answer, and
otherwise stops with a message that names who was missing.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import numpy as np

from fedcrm.errors import FederationFailed, RoundAbandoned
from fedcrm.models.artifacts import save_model
from fedcrm.models.layout import ModelLayout
from fedcrm.protocol import from_vector, pb, to_vector
from fedcrm.reporting import RoundRecord, build_report, write_report
from fedcrm.privacy.plans import statistics_noise_multiplier, statistics_shares
from fedcrm.spec.manifests import Federation
from fedcrm.training.fedavg import fedavg_step, ordered_sum
from fedcrm.training.health import model_warnings
from fedcrm.training.metrics import EVAL_SIZE, metrics_from_counts
from fedcrm.training.preprocessing import Preprocessing, StatisticsLayout, training_rows
from fedcrm.training.server_optimizers import ServerOptimizerState
from fedcrm.training.secure_vectors import StatisticsEncoding, client_dp_fit_vector, expand_fit, fit_support, fit_vector
from fedcrm_aggregator.checkpoints import (
    Checkpoint,
    load_checkpoint,
    mark_in_progress,
    next_incarnation,
    save_checkpoint,
)
from fedcrm_aggregator.privacy import BudgetExhausted, PrivacyLedger
from fedcrm_aggregator.secure_sums import SecureSums
from fedcrm_aggregator.sessions import Session
from fedcrm_aggregator.stage_runner import Receiver

__all__ = ["STAGE_NAMES", "Coordinator", "Receiver"]

log = logging.getLogger("fedcrm.aggregator")

#: How many times a round whose secure sum was abandoned (nothing released) is tried before the federation fails:
#: a participant that drops out mid-round, or sends one corrupt share, costs a retry, not the whole federation.
ROUND_ATTEMPTS = 3

STAGE_NAMES = {
    pb.Task.STATISTICS: "statistics",
    pb.Task.FIT: "training",
    pb.Task.EVALUATE: "evaluation",
    pb.Task.SECAGG_SHARE_KEYS: "secure aggregation (share keys)",
    pb.Task.SECAGG_MASKED_INPUT: "secure aggregation (masked input)",
    pb.Task.SECAGG_CONSISTENCY: "secure aggregation (consistency check)",
    pb.Task.SECAGG_UNMASK: "secure aggregation (unmasking)",
    pb.Task.SECAGG_MEMBERS: "secure aggregation (member list)",
}

# Decodes one participant's answer to a stage (raising ValueError to refuse it).


class Coordinator:
    """Owns the sessions and the stage in progress; the gRPC servicer feeds it."""

    def __init__(self, federation: Federation, participants: list[str], out_dir: Path) -> None:
        self.federation = federation
        self.expected = sorted(participants)
        self.out_dir = out_dir
        self.spec = federation.spec
        self.stats_layout = StatisticsLayout(self.spec.task)
        #: How each round's aggregate moves the model (FedAvg, FedAvgM, FedAdam); its moments are checkpointed.
        self.server = ServerOptimizerState(self.spec.training.server_optimizer)
        sigma = statistics_noise_multiplier(self.spec)
        #: Under differential privacy each participant noises its statistics per record (public parameters).
        self.statistics_noise = None if sigma is None else self.stats_layout.noise(
            sigma, shares=statistics_shares(self.spec, len(self.expected)))
        #: Sample-level DP without secure aggregation: each participant's exact training rows, sent beside its
        #: noised statistics (the accountant's plan depends on them).
        self._statistics_rows: dict[str, int] = {}
        self._cond = threading.Condition()
        self._sessions: dict[str, Session] = {}
        self._stage: tuple[int, int] | None = None  # (task kind, round)
        self._results: dict[str, Any] = {}
        self._refused: dict[str, str] = {}  # malformed answers in the stage in progress, with why
        self._cohort: set[str] = set()
        self._silent_this_round: set[str] = set()
        self._receiver: Receiver | None = None
        # Set by the secure-aggregation driver when spec.privacy.secureAggregation is enabled.
        self.secure: SecureSums | None = None
        self._finished = threading.Event()
        self._events = open(out_dir / "events.jsonl", "a", buffering=1, encoding="utf-8")
        self._events_lock = threading.Lock()
        self.preprocessing: Preprocessing | None = None
        self.layout: ModelLayout | None = None
        self.weights: np.ndarray | None = None
        self.version = 0
        self.history: list[RoundRecord] = []
        self.last_metrics: dict[str, float | None] = {}
        self._started = time.monotonic()
        self._dropped_reasons: dict[str, str] = {}
        self._carried_rounds: dict[str, int] = {}
        # This process start, counted durably before any release (privacy releases are keyed round@incarnation).
        self.incarnations = next_incarnation(out_dir, federation.key)
        self.release = ""  # the key of the round in progress
        self._budget_spent: set[str] = set()  # participants whose own privacy ledger is full
        self.state, self.outcome_message, self.model_digest = "enrolling", "", None
        self.privacy = PrivacyLedger(federation, self.expected, out_dir)
        self._stopped_early = False
        if self.spec.privacy.secure_aggregation.enabled:
            # A fresh incarnation per process start: a restarted aggregator never reuses a round id.
            self.secure = SecureSums(self, self.spec.privacy.secure_aggregation, incarnation=uuid.uuid4().hex)

    # ----------------------------------------------------------------- events
    def emit(self, event: str, **fields: Any) -> None:
        """Append one event to ``events.jsonl`` (gRPC threads and the round loop both write)."""
        line = json.dumps({"event": event, "time": time.time(), **fields}) + "\n"
        with self._events_lock:
            self._events.write(line)

    # ----------------------------------------------------------------- sessions (called from gRPC threads)
    def connect(self, identity: str) -> Session:
        with self._cond:
            old = self._sessions.get(identity)
            if old is not None and old.connected:
                old.connected = False
                old.send(pb.Task(kind=pb.Task.FINISH, succeeded=False, message="replaced by a newer connection"))
            session = Session(identity=identity, rounds=self._carried_rounds.get(identity, 0))
            if old is not None:
                session.rounds, session.bytes_up, session.bytes_down = old.rounds, old.bytes_up, old.bytes_down
            self._sessions[identity] = session
            self.emit("connected", identity=identity)
            if self.state in ("succeeded", "failed"):
                # Over before this participant came (a pod started late or restarted; the aggregator serves on
                # after the end in a cluster): told at once, or it would wait for a task that never comes.
                session.send(pb.Task(kind=pb.Task.FINISH, succeeded=self.state == "succeeded",
                                     message=self.outcome_message))
            self._cond.notify_all()
        log.info("participant %s connected", identity)
        return session

    def disconnect(self, session: Session) -> None:
        with self._cond:
            if not session.connected:
                return
            session.connected = False
            self._cond.notify_all()
        if not self._finished.is_set():
            log.warning("participant %s disconnected", session.identity)
            self.emit("disconnected", identity=session.identity)

    def report_failure(self, identity: str, message: str) -> None:
        with self._cond:
            session = self._sessions.get(identity)
            if session is not None:
                session.failed = message
            self._dropped_reasons[identity] = message
            self._cond.notify_all()
        log.error("participant %s cannot take part: %s", identity, message)
        self.emit("participant_failed", identity=identity, message=message)

    def report_budget_spent(self, identity: str, message: str, *, releases: int) -> None:
        """A participant's own ledger is full: adopt its count (it may have seen a release this ledger missed, an
        update sent just before a crash) and let the round loop stop at the budget rather than fail."""
        missed = self.privacy.reconcile(identity, releases, incarnation=self.incarnations)
        if missed:
            log.warning("participant %s counts %d release(s) this ledger did not see (sent before a restart); "
                        "counted now", identity, missed)
        with self._cond:
            self._budget_spent.add(identity)
        self.report_failure(identity, message)

    def count_up(self, identity: str, round_: int, size: int) -> None:
        with self._cond:
            session = self._sessions.get(identity)
            if session is not None:
                session.bytes_up[round_] += size

    def submit(self, kind: int, identity: str, message: Any) -> pb.Ack:
        """Accept a result for the stage in progress; anything else is refused with a reason."""
        with self._cond:
            if self._stage is None or self._stage[0] != kind or self._stage[1] != message.round:
                current = "none" if self._stage is None else f"{STAGE_NAMES[self._stage[0]]} of round {self._stage[1]}"
                return pb.Ack(accepted=False, message=f"not expecting this result; the stage in progress is {current}")
            if identity in self._results:
                return pb.Ack(accepted=False, message="a result for this stage was already received")
            session = self._sessions.get(identity)
            if session is None or not session.usable or identity not in self._cohort:
                return pb.Ack(accepted=False, message="this participant is not part of the stage")
            try:
                assert self._receiver is not None
                self._results[identity] = self._receiver(identity, message)
            except BudgetExhausted as err:
                # The budget ran out while the round was under way (a participant's ledger showed a release this
                # one missed): the update is not used, and the round loop stops at the budget.
                log.warning("did not use the %s result from %s: %s", STAGE_NAMES[kind], identity, err)
                self._refused[identity] = f"not used, the privacy budget has no release left: {err}"
                self._cond.notify_all()
                return pb.Ack(accepted=False, message=f"not used, the privacy budget has no release left: {err}")
            except ValueError as err:
                # Out of this round at once (the stage does not wait for it); asked again next round.
                log.warning("refused a malformed %s result from %s: %s", STAGE_NAMES[kind], identity, err)
                self._refused[identity] = f"sent a malformed {STAGE_NAMES[kind]} result: {err}"
                self._cond.notify_all()
                return pb.Ack(accepted=False, message=f"malformed result: {err}")
            self._cond.notify_all()
        return pb.Ack(accepted=True)

    # ----------------------------------------------------------------- receivers (called under the lock)
    def _receive_statistics(self, identity: str, message: pb.StatisticsResult) -> np.ndarray:
        vector = from_vector(message.statistics, expected_length=self.stats_layout.size).astype(np.float64)
        self.stats_layout.check(vector, noise=self.statistics_noise)
        if self.privacy.mode == "sample":
            self._statistics_rows[identity] = training_rows(message.rows)
        return vector

    def _receive_plain_fit(self, identity: str, message: pb.FitResult) -> np.ndarray:
        assert self.layout is not None
        if message.model_version != self.version:
            raise ValueError(f"update is for model version {message.model_version}, current is {self.version}")
        if self.privacy.noise is not None:
            return self._receive_client_dp_fit(message)
        if not np.isfinite(message.examples) or message.examples <= 0:
            raise ValueError("the number of examples must be positive")
        delta = from_vector(message.delta, expected_length=self.layout.size)
        if not np.all(np.isfinite(delta)):
            raise ValueError("the update contains NaN or infinite values")
        return fit_vector(delta, examples=int(message.examples), loss_sum=message.loss_sum, clip=np.inf)

    def count_exposure(self) -> None:
        """Count this round's client-level release the moment a noised update can first be seen.

        That is when the first plain update arrives, or, under secure aggregation, just before the unmasking
        shares are asked for. Counted (and persisted) then, a crash before the round's end cannot lose it. Raises
        :class:`BudgetExhausted` instead when the budget no longer funds the release: a plain update is then
        refused without being decoded or summed, and under secure aggregation no unmasking share is asked for.
        """
        if self.privacy.noise is not None:
            self.privacy.expose(self.release)

    def _receive_client_dp_fit(self, message: pb.FitResult) -> np.ndarray:
        """A client-level DP update: clipped, integer, noised; every participant weighs 1 (DP-FedAvg)."""
        noise = self.privacy.noise
        assert noise is not None
        self.count_exposure()
        ints = from_vector(message.delta, expected_length=noise.dimension)
        if not np.all(np.isfinite(ints)) or np.any(np.abs(ints) > noise.element_bound) or np.any(ints != np.rint(ints)):
            raise ValueError("a client-level DP update must be integers within the mechanism's element bound")
        return client_dp_fit_vector(ints, loss_mean=float(message.loss_sum) if np.isfinite(message.loss_sum) else 0.0)

    def _receive_plain_evaluation(self, identity: str, message: pb.EvaluationResult) -> np.ndarray:
        return from_vector(message.counts, expected_length=EVAL_SIZE)

    # ----------------------------------------------------------------- stages
    def _task(self, session: Session, kind: int, round_: int, deadline: float) -> pb.Task:
        task = pb.Task(kind=kind, round=round_, deadline_unix=deadline)
        if kind in (pb.Task.FIT, pb.Task.EVALUATE):
            assert self.weights is not None and self.preprocessing is not None and self.layout is not None
            task.model_version = self.version
            if session.model_version != self.version:
                task.model.CopyFrom(to_vector(self.weights))
                session.model_version = self.version
            if not session.has_preprocessing:
                task.preprocessing_json = json.dumps(
                    {"preprocessing": json.loads(self.preprocessing.shared().to_json()), "layout": self.layout.to_dict(),
                     "participants": len(self.expected)}
                )
                session.has_preprocessing = True
        return task

    def run_stage(
        self,
        kind: int,
        round_: int,
        receiver: Receiver,
        *,
        cohort: Collection[str] | None = None,
        customize: Callable[[Session, pb.Task], None] | None = None,
    ) -> dict[str, Any]:
        """Send the stage's task to the cohort and collect answers until all are in or the deadline passes.

        ``cohort`` defaults to every usable participant; ``customize`` adds what
        each participant's task needs; ``receiver`` decodes (and may consume) each
        answer as it arrives, under the lock, raising ValueError to refuse it.
        """
        timeout = self.spec.training.round_timeout_seconds
        deadline_mono = time.monotonic() + timeout
        deadline_unix = time.time() + timeout
        with self._cond:
            members = [
                s for _, s in sorted(self._sessions.items())
                if s.usable and (cohort is None or s.identity in cohort) and s.identity not in self._silent_this_round
            ]
            self._stage = (kind, round_)
            self._results = {}
            self._refused = {}
            self._cohort = {s.identity for s in members}
            self._receiver = receiver
            for s in members:
                task = self._task(s, kind, round_, deadline_unix)
                if customize is not None:
                    customize(s, task)
                s.send(task)
            while True:
                waiting = [s for s in members
                           if s.identity not in self._results and s.identity not in self._refused and s.usable]
                remaining = deadline_mono - time.monotonic()
                if not waiting or remaining <= 0:
                    break
                self._cond.wait(timeout=min(remaining, 1.0))
            results = dict(self._results)
            self._stage, self._receiver, self._cohort = None, None, set()
            missing = [s for s in members if s.identity not in results]
            for s in missing:
                if s.identity in self._refused:
                    reason = self._refused[s.identity]
                    self._silent_this_round.add(s.identity)
                elif s.failed:
                    reason = f"failed: {s.failed}"
                elif not s.connected:
                    reason = "disconnected"
                else:
                    reason = f"no answer within roundTimeoutSeconds ({timeout:g}s)"
                    # Not asked again this round (one deadline per round is enough); next round it is,
                    # with the model sent afresh.
                    s.model_version = None
                    self._silent_this_round.add(s.identity)
                self._dropped_reasons[s.identity] = reason
                log.warning("round %d %s: participant %s dropped out (%s)", round_, STAGE_NAMES[kind], s.identity, reason)
                self.emit("dropout", identity=s.identity, round=round_, stage=STAGE_NAMES[kind], reason=reason)
        return results

    def _require(self, count: int, what: str) -> None:
        need = self.spec.training.min_participants
        if count < need:
            gone = ", ".join(f"{k} ({v})" for k, v in sorted(self._dropped_reasons.items())) or "none reported"
            raise FederationFailed(
                f"{what}: {count} participant(s) answered, minParticipants is {need}; dropouts: {gone}"
            )

    def wait_for_enrolment(self) -> None:
        timeout = self.spec.training.round_timeout_seconds
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                usable = {i for i, s in self._sessions.items() if s.usable}
                # A participant that reported why it cannot take part will not come: stop waiting for it.
                failed = {i for i, s in self._sessions.items() if s.failed is not None}
                remaining = deadline - time.monotonic()
                if usable | failed >= set(self.expected) or remaining <= 0:
                    break
                self._cond.wait(timeout=min(remaining, 1.0))
            missing = sorted(set(self.expected) - usable)
        for m in missing:
            self._dropped_reasons.setdefault(m, f"did not connect within roundTimeoutSeconds ({timeout:g}s)")
        self.emit("enrolled", participants=sorted(usable), missing=missing)
        self._require(len(usable), "enrolment")

    # ----------------------------------------------------------------- the loop
    def run(self) -> dict[str, Any]:
        """Run the whole federation; returns the report (also written to ``out_dir``)."""
        status, message = "succeeded", ""
        try:
            self.emit("started", federation=self.federation.key, rounds=self.spec.training.rounds,
                      expected=self.expected)
            resumed = self._resume()
            self.wait_for_enrolment()
            self.state = "training"
            if not resumed:
                self._statistics()
            for round_ in range(len(self.history) + 1, self.spec.training.rounds + 1):
                try:
                    for attempt in range(ROUND_ATTEMPTS):
                        self.privacy.check_round(self._usable())
                        mark_in_progress(self.out_dir, round_)
                        try:
                            self._round(round_, attempt)
                            break
                        except RoundAbandoned as err:
                            left = ROUND_ATTEMPTS - attempt - 1
                            log.warning("%s; %s", err, f"running round {round_} again ({left} more tries)" if left
                                        else "giving up")
                            self.emit("round_abandoned", round=round_, attempt=attempt, reason=str(err))
                            if not left:
                                raise FederationFailed(f"{err} ({ROUND_ATTEMPTS} tries)") from None
                except BudgetExhausted as err:
                    self._stopped_early = True
                    message = f"stopped before round {round_} to stay within the privacy budget: {err}"
                    log.warning("%s", message)
                    self.emit("privacy_budget_exhausted", round=round_, message=message)
                    break
            else:
                message = f"trained {len(self.history)} rounds"
        except FederationFailed as err:
            status, message = "failed", str(err)
            log.error("federation failed: %s", message)
        self._finished.set()
        report = self._write_outputs(status, message)
        with self._cond:  # with connect(): every participant, connected now or later, is told once
            self.state, self.outcome_message, self.model_digest = status, message, report.get("model_digest")
            for s in self._sessions.values():
                if s.connected:
                    s.send(pb.Task(kind=pb.Task.FINISH, succeeded=status == "succeeded", message=message))
        self.emit("finished", status=status, message=message)
        return report

    def _usable(self) -> list[str]:
        with self._cond:
            return sorted(i for i, s in self._sessions.items() if s.usable)

    usable = _usable  # the StageRunner interface: secure sums fix their member list from it

    def _setup_privacy(self, train_rows: dict[str, int]) -> None:
        assert self.layout is not None
        try:
            warnings = self.privacy.setup(dimension=self.layout.size, train_rows=train_rows,
                                          pooled_rows=self.preprocessing.rows if self.preprocessing else 0)
        except ValueError as err:
            raise FederationFailed(f"spec.privacy.differentialPrivacy: {err}") from None
        for w in warnings:
            log.warning("%s", w)
            self.emit("privacy_warning", message=w)

    def _resume(self) -> bool:
        """Continue from the checkpoint of an earlier incarnation, if there is one."""
        try:
            cp = load_checkpoint(self.out_dir, self.federation.key)
        except (ValueError, OSError, KeyError) as err:
            raise FederationFailed(f"cannot resume from the checkpoint: {err}") from None
        if cp is None:
            return False
        if self.privacy.mode != "none" and not self.privacy.path.exists():
            # Resuming would restart the spend at zero: the rounds already released would be forgotten.
            raise FederationFailed(
                f"cannot resume differentially private training after round {cp.rounds_completed}: the privacy "
                f"ledger {self.privacy.path.relative_to(self.out_dir)} is missing from the checkpoint volume, so the "
                "budget already spent is unknown. Restore it from a backup, or start a new Federation"
            )
        self.preprocessing, self.layout, self.weights = cp.preprocessing, cp.layout, cp.weights
        self.server.restore(cp.server_state)
        self.version = cp.rounds_completed
        self.history = cp.history
        if cp.history:
            last = cp.history[-1]
            self.last_metrics = {k: getattr(last, k) for k in ("loss", "accuracy", "precision", "recall", "f1", "auc")}
        self._dropped_reasons.update(cp.dropped)
        self._carried_rounds = cp.participant_rounds
        self._setup_privacy({})
        note = ""
        if cp.in_progress is not None and cp.in_progress > cp.rounds_completed:
            note = (f"; round {cp.in_progress} was in progress and is re-run from the start with fresh keys "
                    "(its secure sum was never finished, so nothing of it was released)")
        log.warning("resuming after round %d from the checkpoint (incarnation %d)%s",
                    cp.rounds_completed, self.incarnations, note)
        self.emit("resumed", round=cp.rounds_completed, incarnation=self.incarnations, abandoned=cp.in_progress)
        return True

    def _checkpoint(self) -> None:
        assert self.weights is not None and self.preprocessing is not None and self.layout is not None
        with self._cond:
            rounds = {i: s.rounds for i, s in self._sessions.items()}
        save_checkpoint(self.out_dir, Checkpoint(
            federation=self.federation.key, rounds_completed=len(self.history), weights=self.weights,
            preprocessing=self.preprocessing, layout=self.layout, history=self.history,
            participant_rounds=rounds, dropped=dict(self._dropped_reasons), incarnations=self.incarnations,
            server_state=self.server.arrays(),
        ))

    def _statistics(self) -> None:
        if self.secure is not None:
            contributors, total = self._secure_statistics()
            # Sample-level DP: each contributor's training rows, sent in the clear beside its masked statistics.
            rows = {i: self.secure.statistics_rows[i] for i in contributors if i in self.secure.statistics_rows}
        else:
            results = self.run_stage(pb.Task.STATISTICS, 0, self._receive_statistics)
            self._require(len(results), "statistics")
            contributors, total = sorted(results), ordered_sum(results.items())
            # Each vector starts with its training rows, summed in the clear anyway; sample-mode accounting needs them
            # exactly, so under DP (the vector noised) they come beside it.
            rows = {i: self._statistics_rows.get(i, max(1, int(round(float(v[0]))))) for i, v in results.items()}
        if self.statistics_noise is not None:
            # Noised per record by each participant: made consistent again, the exact row count where sample-level
            # DP sends it anyway (post-processing, no privacy cost).
            total = self.stats_layout.clamped(total, rows=sum(rows.values()) if self.privacy.mode == "sample" else None)
        self.preprocessing = self.stats_layout.preprocessing(total)
        self.layout = ModelLayout.build(self.spec.model, self.preprocessing)
        self._setup_privacy(rows)
        self.weights = self.layout.initial(self.spec.training.seed)
        self.version = 0
        self.emit("statistics", rows=self.preprocessing.rows, participants=len(contributors),
                  parameters=self.layout.size, masked=self.secure is not None)
        log.info("global statistics from %d participants%s, %d rows; model has %d parameters",
                 len(contributors), " (securely summed)" if self.secure is not None else "",
                 self.preprocessing.rows, self.layout.size)

    def _secure_statistics(self) -> tuple[list[str], np.ndarray]:
        """The statistics as a secure sum: the aggregator learns only the pooled vector, which it checks.

        An abandoned sum (a dropout below the threshold, a corrupt share) is tried again like a round; a sum no
        honest cohort could produce fails the federation, since no single sender can be told apart in it.
        """
        assert self.secure is not None
        for attempt in range(ROUND_ATTEMPTS):
            try:
                contributors, total = self.secure.run(pb.Task.STATISTICS, 0, attempt)
                break
            except RoundAbandoned as err:
                left = ROUND_ATTEMPTS - attempt - 1
                log.warning("%s; %s", err, f"summing the statistics again ({left} more tries)" if left else "giving up")
                self.emit("round_abandoned", round=0, attempt=attempt, reason=str(err))
                if not left:
                    raise FederationFailed(f"{err} ({ROUND_ATTEMPTS} tries)") from None
        self._require(len(contributors), "statistics")
        if self.privacy.mode == "sample" and set(contributors) - set(self.secure.statistics_rows):
            raise FederationFailed("statistics: sample-level differential privacy needs every contributor's "
                                   "training rows, and some did not send them")
        encoding = self.secure.quantizer(pb.Task.STATISTICS)
        assert isinstance(encoding, StatisticsEncoding)
        try:
            self.stats_layout.check_sum(total, contributors=len(contributors),
                                        resolution=encoding.resolution * len(contributors),
                                        noise=self.statistics_noise)
        except ValueError as err:
            raise FederationFailed(
                f"statistics: the secure sum of {len(contributors)} participants' statistics is not one honest "
                f"participants could produce ({err}); a participant sent out-of-range values, and under secure "
                "aggregation it cannot be told apart") from None
        return contributors, total

    def _sum(self, kind: int, round_: int, attempt: int = 0) -> tuple[list[str], np.ndarray]:
        """Who contributed and the sum of their FIT or EVALUATE vectors, securely when configured."""
        if self.secure is not None:
            return self.secure.run(kind, round_, attempt)
        receiver = self._receive_plain_fit if kind == pb.Task.FIT else self._receive_plain_evaluation
        results = self.run_stage(kind, round_, receiver)
        if not results:
            return [], np.zeros(0)
        return sorted(results), ordered_sum(results.items())

    def _round(self, round_: int, attempt: int = 0) -> None:
        """One round. Raises RoundAbandoned when its training sum was given up (nothing released); ``attempt``
        counts earlier abandoned tries of this round, each a release of its own for the ledger."""
        assert self.weights is not None and self.layout is not None
        started = time.monotonic()
        with self._cond:
            self._silent_this_round = set()
        release = self.release = f"{round_}@{self.incarnations}" + (f".{attempt}" if attempt else "")
        if self.privacy.mode == "sample":  # each participant spends as soon as it trains
            self.privacy.record(release, self._usable())
        contributors, fit_total = self._sum(pb.Task.FIT, round_, attempt)
        if self.secure is not None and contributors:
            # keepFraction: the sum covers the round's shared support only; derived here as each participant did
            support = fit_support(self.spec, federation=self.federation.key, round_=round_,
                                  parameters=self.layout.size)
            try:
                fit_total = expand_fit(fit_total, support, self.layout.size,
                                       rescale=self.spec.privacy.secure_aggregation.rescale_kept)
            except ValueError as err:
                raise FederationFailed(f"round {round_}: {err}") from None
        if self.privacy.noise is not None and contributors:
            # The noised sum is out (already counted when the first update or the unmasking shares came in,
            # see count_exposure; recording a release twice counts it once).
            self.privacy.record(release, contributors)
            fit_total = fit_total.copy()
            fit_total[: self.layout.size] = self.privacy.noise.decode(fit_total[: self.layout.size])
            if self.privacy.mode == "client":
                # Each update is in the sum with probability samplingRate, by its participant's secret coin:
                # dividing by the expected number of updates (rate x contributors) is the unbiased mean, and the
                # aggregator never needs to know who was sampled.
                fit_total[: self.layout.size] /= self.privacy.dp.rate
        with self._cond:
            spent = sorted(self._budget_spent)
        if spent and len(contributors) < self.spec.training.min_participants:
            raise BudgetExhausted(f"the own privacy ledgers of {', '.join(spent)} have no release left "
                                  f"(epsilon spent {self.privacy.spent() or 0:.4f})")
        self._require(len(contributors), f"round {round_} training")
        try:
            step = fedavg_step(self.weights, fit_total)
            direction = step.delta
            if self.privacy.mode == "pooled":
                # The decoded sum is the noised sum of clipped per-record gradients over a Poisson sample of all
                # records; its expected size is the rate times the (noised) pooled rows.
                direction = -fit_total[: self.layout.size] / (self.privacy.dp.rate * max(self.preprocessing.rows, 1))
            self.weights = self.server.step(self.weights, direction)
        except ValueError as err:
            raise FederationFailed(f"round {round_}: {err}") from None
        self.version = round_
        train_loss = step.train_loss
        try:
            evaluators, eval_total = self._sum(pb.Task.EVALUATE, round_, attempt)
        except RoundAbandoned as err:  # the model step stands; only this round's metrics are missing
            log.warning("%s; the round's model is kept, without metrics", err)
            evaluators, eval_total = [], np.zeros(0)
        metrics = metrics_from_counts(eval_total) if evaluators else {}
        with self._cond:
            for identity in contributors:
                self._sessions[identity].rounds += 1
            took_part = [self._sessions[i] for i in contributors]
            ups = [s.bytes_up.get(round_, 0) for s in took_part]
            downs = [s.bytes_down.get(round_, 0) for s in took_part]
        record = RoundRecord(
            round=round_,
            loss=metrics.get("loss"),
            accuracy=metrics.get("accuracy"),
            f1=metrics.get("f1"),
            auc=metrics.get("auc"),
            precision=metrics.get("precision"),
            recall=metrics.get("recall"),
            participants=len(contributors),
            duration_s=round(time.monotonic() - started, 4),
            bytes_up_per_client=sum(ups) / len(ups),
            bytes_down_per_client=sum(downs) / len(downs),
            train_loss=train_loss,
            dropped=[i for i in self.expected if i not in contributors],
            epsilon_spent=self.privacy.spent(),
        )
        self.history.append(record)
        self.last_metrics = metrics
        self._checkpoint()
        self._save_model(partial=round_ < self.spec.training.rounds)
        self.emit("round", rounds=self.spec.training.rounds, **{
            k: v for k, v in record.__dict__.items() if k != "dropped"
        }, dropped=record.dropped)
        log.info("round %d/%d: %d participants, validation loss %.4f accuracy %.4f",
                 round_, self.spec.training.rounds, len(contributors), metrics.get("loss") or float("nan"),
                 metrics.get("accuracy") or float("nan"))

    # ----------------------------------------------------------------- outputs
    def _save_model(self, *, partial: bool) -> str | None:
        if self.weights is None or self.layout is None or self.preprocessing is None:
            return None
        return save_model(
            self.out_dir / "model",
            weights=self.weights,
            layout=self.layout,
            preprocessing=self.preprocessing.shared(),  # the model goes to every participant
            task=self.spec.task,
            metadata={
                "federation": self.federation.key,
                "rounds_completed": len(self.history),
                "rounds_planned": self.spec.training.rounds,
                "partial": partial,
                "seed": self.spec.training.seed,
            },
        )

    def _participants_summary(self) -> list[dict[str, Any]]:
        out = []
        with self._cond:
            for identity in self.expected:
                s = self._sessions.get(identity)
                rounds = s.rounds if s else 0
                completed = rounds == len(self.history) and len(self.history) > 0
                entry: dict[str, Any] = {
                    "identity": identity,
                    "status": "completed" if completed else ("dropped" if identity in self._dropped_reasons else "partial"),
                    "rounds": rounds,
                }
                if identity in self._dropped_reasons and not completed:
                    entry["message"] = self._dropped_reasons[identity]
                out.append(entry)
        return out

    def _write_outputs(self, status: str, message: str) -> dict[str, Any]:
        digest = self._save_model(partial=status != "succeeded" or self._stopped_early)
        with self._cond:
            per_pr = [
                float(s.bytes_up.get(r.round, 0) + s.bytes_down.get(r.round, 0))
                for r in self.history
                for s in self._sessions.values()
                if s.bytes_up.get(r.round, 0)
            ]
        report = build_report(
            kind="federated",
            federation=self.federation.key,
            status=status,
            message=message,
            rounds_planned=self.spec.training.rounds,
            history=self.history,
            participants=self._participants_summary(),
            metrics={k: v for k, v in self.last_metrics.items() if v is not None},
            metrics_source="validation",
            model_digest=digest,
            privacy=self.privacy.summary(),
            partial=status != "succeeded" or len(self.history) < self.spec.training.rounds,
            duration_s=round(time.monotonic() - self._started, 3),
            bytes_per_participant_round=per_pr,
        )
        write_report(self.out_dir, report)
        return report

    def progress(self) -> dict[str, Any]:
        """A snapshot for the status endpoint, which the operator copies into the Federation's status."""
        with self._cond:
            active = sum(1 for s in self._sessions.values() if s.connected)
            last = self.history[-1] if self.history else None
        return {
            "federation": self.federation.key,
            "state": self.state,
            "round": len(self.history),
            "rounds": self.spec.training.rounds,
            "expected_participants": len(self.expected),
            "active_participants": last.participants if last else active,
            "connected_participants": active,
            "metrics": {k: v for k, v in self.last_metrics.items() if v is not None},
            "round_duration_s": last.duration_s if last else None,
            "bytes_up_per_client": last.bytes_up_per_client if last else None,
            "epsilon_spent": self.privacy.spent(),
            "epsilon_budget": self.privacy.dp.epsilon,  # None unless differential privacy is on (the spec insists)
            "model_digest": self.model_digest,
            "message": self.outcome_message,
            "warnings": model_warnings(self.last_metrics, [r.loss for r in self.history]),
        }

    def close(self) -> None:
        self._events.close()

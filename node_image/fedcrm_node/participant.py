"""A participant's side of the protocol: its data stays here, only sums and updates leave.

The node loads and maps its own records, then follows the aggregator's task
stream: statistics of the training split, local training from each global
model, evaluation of each new global model on its validation split.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import numpy as np

from fedcrm.data.canonical import CanonicalData
from fedcrm.data.credentials import Credentials, read_credentials_dir
from fedcrm.data.loaders import load_participant_data
from fedcrm.data.splits import train_validation_split
from fedcrm.errors import DataError, FedcrmError, ManifestError
from fedcrm.exit_codes import NodeExitCode
from fedcrm.privacy.plans import noise_participants
from fedcrm.protocol import PROTOCOL_VERSION, TlsFiles, client_channel, from_vector, pb, rpc, to_vector
from fedcrm.secagg.member_lists import MemberAgreement
from fedcrm.secagg.signing import PeerVerifier, Signer
from fedcrm.spec.loading import check_membership, parse_manifest
from fedcrm.spec.manifests import Federation, Participant
from fedcrm.spec.terms import terms_differences, terms_digest
from fedcrm_node import retries
from fedcrm_node.release_ledger import ReleaseLedger

if TYPE_CHECKING:  # imported where used: pandas and the preprocessing load only once data does
    from fedcrm.training.preprocessing import StatisticsLayout

__all__ = ["NodeExit", "ParticipantNode"]

log = logging.getLogger("fedcrm.node")


class NodeExit(FedcrmError):
    """Ends the node with an exit code and a message for its log."""

    def __init__(self, message: str, code: NodeExitCode) -> None:
        super().__init__(message)
        self.code = code


class _Lost(Exception):
    """The connection to the aggregator broke; worth reconnecting."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class _Split:
    train: object  # EncodedData once preprocessing is known
    validation: object


class ParticipantNode:
    def __init__(
        self,
        participant: Participant,
        *,
        manifest_dir: Path,
        data_root: Path | None = None,
        aggregator: str,
        tls: TlsFiles,
        server_name: str | None = None,
        connect_timeout: float = 60.0,
        credentials_dir: Path | None = None,
        own_federation: Federation,
        state_dir: Path | None = None,
        report_file: Path | None = None,
    ) -> None:
        self.participant = participant
        self.report_file = report_file  # what stays with this participant (personalization), if asked for
        # This participant's own copy of the Federation (mounted beside it in a pod): its data is checked
        # against this task, and the aggregator must serve exactly these terms (see _check_terms).
        self.own_federation = own_federation
        self.manifest_dir = manifest_dir
        self.data_root = data_root
        self.aggregator = aggregator
        self.tls = tls
        self.server_name = server_name
        self.connect_timeout = connect_timeout
        self.credentials_dir = credentials_dir
        self.identity = participant.identity
        self.federation: Federation | None = None
        self.data: CanonicalData | None = None
        self.frames: tuple[object, object] | None = None
        self.encoded: _Split | None = None
        self.model = None
        self.weights: np.ndarray | None = None
        self.version: int | None = None
        self.secagg_id = 0
        self.contribution = None  # the secure sum in progress, if any
        # Secure aggregation: the signer follows renewals of the certificate files (read at the fingerprint kept
        # beside it); the verifier of peers is made once.
        self._signer: tuple[Signer, tuple[tuple[int, int, int, int], ...]] | None = None
        self._verifier: PeerVerifier | None = None
        self._agreement: MemberAgreement | None = None  # the federation's member list, agreed once
        self.participants = 0  # how many the federation expects (public; sizes client-level DP noise)
        self.private = None  # the DP-SGD trainer (sample mode), kept across rounds so its accountant keeps counting
        self.augmentation = None  # synthetic training rows (spec.augmentation.gan): made once, kept here, never sent
        # Training results let out: a plain update sent, or the shares that unmask a secure sum of updates. Each
        # is one release of the privacy budget; a masked update never unmasked is none. Kept in state_dir, the
        # count survives a restarted pod.
        self.ledger = ReleaseLedger(state_dir, federation=own_federation.key, terms=terms_digest(own_federation.spec))

    # ----------------------------------------------------------------- protocol
    def load_data(self) -> int:
        """Load and map this participant's records for its own Federation's task; returns the row count.

        Raises :class:`DataError` (or :class:`ManifestError`) naming what to fix, before any connection.
        """
        check_membership(self.own_federation, self.participant)
        self.data = load_participant_data(
            self.participant, self.own_federation.spec.task, base_dir=self.manifest_dir, pvc_root=self.data_root,
            credentials=self._credentials(),
        )
        return len(self.data)

    def run(self) -> None:
        """Take part until the federation finishes.

        If the aggregator goes away mid-federation (a restart of its pod or
        process), reconnect for up to ``connect_timeout`` seconds: the restarted
        aggregator resumes from its checkpoint and sends what this node needs.
        """
        connected_once = False
        while True:
            try:
                if self._session(first=not connected_once):
                    return
                reason = "the aggregator closed the connection before the federation finished"
            except _Lost as lost:
                reason = lost.reason
            connected_once = True
            log.warning("%s; reconnecting for up to %gs", reason, self.connect_timeout)

    def _session(self, *, first: bool) -> bool:
        """One connection: True when the federation finished, raises _Lost when the aggregator went away."""
        ref = self.participant.spec.federation_ref
        files = self.tls.fingerprint()  # a channel keeps the credentials it was made with, reconnecting too
        try:
            channel = client_channel(self.aggregator, self.tls, server_name=self.server_name)
        except FileNotFoundError as err:
            raise NodeExit(str(err), NodeExitCode.CONFIG) from None
        if not _wait_until_ready(channel, self.aggregator, self.connect_timeout,
                                 stale=lambda: self.tls.fingerprint() != files):
            channel.close()
            if self.tls.fingerprint() != files:  # renewed while waiting: connect again with the new files
                raise _Lost("this participant's certificate was renewed while it connected")
            raise NodeExit(
                f"cannot reach the aggregator at {self.aggregator} within {self.connect_timeout:g}s. Check the address, "
                "that the aggregator runs, and that this participant's certificate was issued by the federation's CA",
                NodeExitCode.UNREACHABLE,
            )
        log.info("%s the aggregator at %s", "connected to" if first else "reconnected to", self.aggregator)
        stub = rpc.FederatedTrainingStub(retries.intercept(channel))  # results refused for room are sent again
        request = pb.ConnectRequest(protocol_version=PROTOCOL_VERSION, federation=f"{ref.namespace}/{ref.name}")
        try:
            for task in stub.Connect(request):
                if not self._handle(stub, task):
                    return True
        except grpc.RpcError as err:
            if err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):  # type: ignore[attr-defined]
                raise _Lost(self._describe_rpc_error(err)) from None
            raise NodeExit(self._describe_rpc_error(err), NodeExitCode.UNREACHABLE) from None
        finally:
            channel.close()
        return False

    def _describe_rpc_error(self, err: grpc.RpcError) -> str:
        code = err.code() if hasattr(err, "code") else None
        detail = err.details() if hasattr(err, "details") else str(err)
        if code == grpc.StatusCode.UNAVAILABLE:
            return (
                f"cannot reach the aggregator at {self.aggregator}: {detail}. Check the address, that the "
                "aggregator runs, and that this participant's certificate was issued by the federation's CA"
            )
        if code == grpc.StatusCode.PERMISSION_DENIED:
            return f"the aggregator refused this participant: {detail}"
        return f"the aggregator connection failed ({code.name if code else 'unknown'}): {detail}"

    def _handle(self, stub: rpc.FederatedTrainingStub, task: pb.Task) -> bool:
        kind = task.kind
        if kind == pb.Task.WELCOME:
            self._welcome(stub, task)
        elif kind == pb.Task.STATISTICS:
            self._check_task(stub, task)
            self._ack(stub.SubmitStatistics(self._statistics(task)), task)
        elif kind == pb.Task.FIT:
            self._check_task(stub, task)
            self._receive_model(task)
            self._ack(stub.SubmitFit(self._fit(task)), task)
        elif kind == pb.Task.EVALUATE:
            self._check_task(stub, task)
            self._receive_model(task)
            self._ack(stub.SubmitEvaluation(self._evaluate(task)), task)
        elif kind in (pb.Task.SECAGG_SHARE_KEYS, pb.Task.SECAGG_MASKED_INPUT, pb.Task.SECAGG_CONSISTENCY,
                      pb.Task.SECAGG_UNMASK):
            self._ack(stub.SubmitSecAgg(self._secure_answer(stub, task)), task)
        elif kind == pb.Task.SECAGG_MEMBERS:
            self._ack(stub.SubmitSecAgg(self._answer_members(task)), task)
        elif kind == pb.Task.FINISH:
            if task.succeeded:
                log.info("federation finished: %s", task.message)
                self._personalize()
                return False
            raise NodeExit(f"the federation stopped: {task.message}", NodeExitCode.STOPPED)
        else:
            log.warning("ignoring a task of unknown kind %d (is the aggregator newer than this node?)", kind)
        return True

    def _personalize(self) -> None:
        """Fine-tune the final global model on this participant's own rows, for itself (nothing is sent)."""
        from fedcrm.training.personalization import personalize

        assert self.federation is not None
        training = self.federation.spec.training
        if not training.personalization_epochs:
            return
        if self.weights is None or self.encoded is None or self.model is None:
            log.warning("personalization skipped: this participant holds no global model")
            return
        result = personalize(self.model.layout, self.weights, self.encoded.train, self.encoded.validation,  # type: ignore[attr-defined]
                             epochs=training.personalization_epochs, batch_size=training.batch_size,
                             learning_rate=training.learning_rate, seed=training.seed, identity=self.identity)
        g, p = result.global_metrics, result.personalized_metrics
        log.info("personalized: %d epochs on the global model of round %s; on this participant's %d validation rows "
                 "accuracy %.4f -> %.4f, F1 %s -> %s, AUC %s -> %s (stays here; nothing was sent)",
                 result.epochs, self.version, result.validation_rows, g["accuracy"] or 0.0, p["accuracy"] or 0.0,
                 _fmt(g["f1"]), _fmt(p["f1"]), _fmt(g["auc"]), _fmt(p["auc"]))
        if self.report_file is not None:
            self.report_file.parent.mkdir(parents=True, exist_ok=True)
            np.save(self.report_file.with_suffix(".npy"), result.weights)
            tmp = self.report_file.with_name(self.report_file.name + ".tmp")
            tmp.write_text(json.dumps({"identity": self.identity, "model_version": self.version, **result.as_dict()}))
            tmp.replace(self.report_file)

    def _ack(self, ack: pb.Ack, task: pb.Task) -> None:
        if not ack.accepted:
            log.warning("round %d: the aggregator did not accept this result: %s", task.round, ack.message)

    def _welcome(self, stub: rpc.FederatedTrainingStub, task: pb.Task) -> None:
        if task.identity != self.identity:
            raise NodeExit(
                f"this node's certificate says {task.identity!r} but its manifest is {self.identity!r}; "
                "use the certificate issued for this participant", NodeExitCode.CONFIG,
            )
        try:
            served = parse_manifest(json.loads(task.federation_json), Federation, "the aggregator's federation")
        except ManifestError as err:
            raise self._refuse(stub, f"the aggregator's Federation does not parse: {err}") from None
        self._check_terms(stub, served)
        if self.federation is not None:
            # A reconnection: the data is loaded; the model and preprocessing arrive again with the next task.
            self.version, self.weights, self.contribution = None, None, None
            return
        if self.data is None:
            try:
                self.load_data()
            except (ManifestError, DataError) as err:
                stub.ReportFailure(pb.FailureReport(message=str(err)))
                raise NodeExit(str(err), NodeExitCode.CONFIG) from None
        assert self.data is not None
        for note in self.data.notes:
            log.warning("%s", note)
        self.federation = self.own_federation  # from here on, only this participant's own copy counts
        self.secagg_id = task.secagg_id
        training = self.federation.spec.training
        self.frames = train_validation_split(
            self.data.frame, fraction=training.validation_fraction, seed=training.seed, identity=self.identity
        )
        log.info("joined %s (terms %s) with %d training and %d validation rows", self.federation.key,
                 terms_digest(self.federation.spec)[:12], len(self.frames[0]), len(self.frames[1]))  # type: ignore[arg-type]

    # ----------------------------------------------------------------- this participant's own terms
    def _refuse(self, stub: rpc.FederatedTrainingStub, reason: str, *, budget_spent: bool = False) -> NodeExit:
        """Tell the aggregator why (it shows in the federation's report) and end with TERMS_REFUSED.

        ``budget_spent``: no fault, the own ledger is full; the aggregator learns this participant's count of
        releases and stops at the budget instead of failing.
        """
        message = f"refusing the aggregator's request: {reason}"
        try:
            stub.ReportFailure(pb.FailureReport(message=message, budget_spent=budget_spent, releases=self.ledger.count))
        except grpc.RpcError:
            pass  # the refusal stands whether or not the aggregator listens
        return NodeExit(message, NodeExitCode.TERMS_REFUSED)

    def _check_terms(self, stub: rpc.FederatedTrainingStub, served: Federation) -> None:
        """The aggregator must serve exactly this participant's own Federation terms."""
        own = self.own_federation
        if served.key != own.key:
            raise self._refuse(stub, f"it serves federation {served.key}, this participant joined {own.key}")
        differences = terms_differences(own.spec, served.spec)
        if differences:
            raise self._refuse(
                stub, "its Federation differs from this participant's own manifest in " + "; ".join(differences)
                + ". Nothing was trained or sent; if the coordinator changed the Federation, the tenant must review "
                "the change and mount the new manifest",
            )

    def _check_task(self, stub: rpc.FederatedTrainingStub, task: pb.Task) -> None:
        """Before summarising, training or evaluating: masking as the own terms require, with their parameters (the
        statistics' and pooled training sums' moduli are fixed in code, see sum_bits); no extra rounds."""
        from fedcrm.training.secure_vectors import sum_bits

        assert self.federation is not None
        privacy = self.federation.spec.privacy
        secure = privacy.secure_aggregation
        what = {pb.Task.FIT: "training", pb.Task.EVALUATE: "evaluation"}.get(task.kind, "statistics")
        if secure.enabled and not task.HasField("secagg"):
            raise self._refuse(stub, f"round {task.round}: an unmasked {what} result was asked for, but this "
                               "participant's Federation requires secure aggregation")
        if task.HasField("secagg"):
            s = task.secagg
            phase = {pb.Task.FIT: pb.SecAggTask.FIT, pb.Task.EVALUATE: pb.SecAggTask.EVALUATE}.get(
                task.kind, pb.SecAggTask.STATISTICS)
            asked = {"phase": s.phase, "threshold": s.threshold, "neighbours": s.neighbours, "bits": s.bits,
                     "clip": s.clip}
            agreed = {"phase": phase, "threshold": secure.threshold, "neighbours": str(secure.neighbours),
                      "bits": sum_bits(self.federation.spec, statistics=task.kind == pb.Task.STATISTICS,
                                       fit=task.kind == pb.Task.FIT, members=len(s.members)), "clip": secure.clip}
            if secure.enabled and asked != agreed:
                wrong = ", ".join(f"{k} {asked[k]} (agreed {agreed[k]})" for k in asked if asked[k] != agreed[k])
                raise self._refuse(stub, f"round {task.round}: secure aggregation with other parameters: {wrong}")
        if task.kind == pb.Task.FIT:
            self._check_budget(stub, task.round)

    def _check_noised_survivors(self, stub: rpc.FederatedTrainingStub, task: pb.Task) -> None:
        """With client-level DP and a complete graph, the unmasking request lists every survivor: refuse to unmask
        a sum of fewer than t_min noised updates (each carries only 1/t_min of the noise). A sparse graph shows a
        participant only its neighbourhood; there the aggregator's own check is what holds."""
        assert self.federation is not None
        spec = self.federation.spec
        statistics = task.secagg.phase == pb.SecAggTask.STATISTICS
        mode = spec.privacy.differential_privacy.mode
        if mode not in (("pooled",) if statistics else ("client", "pooled")) \
                or spec.privacy.secure_aggregation.neighbours != "complete":
            return
        from fedcrm.privacy.plans import noise_participants, survivors_min

        # Before the model arrives (statistics) the count is the member list's, as the noise share was sized.
        need = survivors_min(spec, noise_participants(spec, len(task.secagg.members)) if statistics
                             else self.participants)
        survivors = len(task.secagg.survivors)
        if survivors < need:
            raise self._refuse(stub, f"round {task.round}: unmasking a sum of {survivors} noised updates; "
                               f"{spec.privacy.differential_privacy.mode}-mode differential privacy needs at least "
                               f"t_min = {need}")

    def _check_budget(self, stub: rpc.FederatedTrainingStub, round_: int) -> None:
        """With differential privacy, at most spec.training.rounds releases: the budget was planned for that many."""
        assert self.federation is not None
        rounds = self.federation.spec.training.rounds
        if self.federation.spec.privacy.differential_privacy.enabled and self.ledger.count >= rounds:
            raise self._refuse(
                stub, f"round {round_}: this participant has already released {self.ledger.count} training results; its "
                f"privacy budget was planned for spec.training.rounds = {rounds}", budget_spent=True,
            )

    def _credentials(self) -> Credentials | None:
        """The mounted Secret's keys, read only when the data source references a Secret."""
        name = self.participant.spec.credentials_secret_name()
        if name is None or self.credentials_dir is None:
            return None
        return read_credentials_dir(self.credentials_dir, origin=f"Secret {self.participant.metadata.namespace}/{name}")

    def _receive_model(self, task: pb.Task) -> None:
        from fedcrm.models.layout import ModelLayout
        from fedcrm.models.mlp import TabularMLP
        from fedcrm.training.preprocessing import Preprocessing, encode

        if task.preprocessing_json:
            raw = json.loads(task.preprocessing_json)
            prep = Preprocessing.from_json(json.dumps(raw["preprocessing"]))
            layout = ModelLayout.from_dict(raw["layout"])
            assert self.federation is not None
            self.participants = noise_participants(self.federation.spec, int(raw.get("participants", 0)))
            assert self.frames is not None
            self.encoded = _Split(encode(self.frames[0], prep), encode(self.frames[1], prep))  # type: ignore[arg-type]
            self._augment(prep)
            if self.model is None or self.model.layout.to_dict() != layout.to_dict():  # type: ignore[attr-defined]
                # A reconnection keeps the model (and a DP-SGD trainer's accountant) of the same layout.
                self.model, self.private = TabularMLP(layout), None
        if self.model is None:
            raise NodeExit("protocol error: a model arrived before the preprocessing", NodeExitCode.UNREACHABLE)
        if task.HasField("model"):
            self.weights = from_vector(task.model, expected_length=self.model.layout.size).astype(np.float32)
            self.version = task.model_version
        if self.version != task.model_version or self.weights is None:
            raise NodeExit(f"protocol error: asked to use model version {task.model_version}, holding {self.version}", NodeExitCode.UNREACHABLE)

    def _fit(self, task: pb.Task) -> pb.FitResult:
        from fedcrm.models.mlp import get_flat, set_flat
        from fedcrm.training.local import derive_seed, train_epochs

        assert self.federation is not None and self.encoded is not None and self.weights is not None
        training = self.federation.spec.training
        set_flat(self.model, self.weights)  # type: ignore[arg-type]
        dp = self.federation.spec.privacy.differential_privacy
        started = time.perf_counter()
        if dp.mode == "pooled":
            return self._pooled_fit(task, started)
        if dp.mode == "sample":
            outcome = self._train_private()
        else:
            outcome = train_epochs(
                self.model,  # type: ignore[arg-type]
                self._training_rows(),  # type: ignore[arg-type]
                epochs=training.local_epochs,
                batch_size=training.batch_size,
                learning_rate=training.learning_rate,
                seed=derive_seed(training.seed, self.identity, task.round),
                proximal_mu=training.proximal_mu if training.algorithm == "fedprox" else 0.0,
            )
            if self.augmentation is not None:  # FedAvg's weight and the loss sent count the real rows only
                from fedcrm.training.augmentation import counted_as_real

                outcome = counted_as_real(outcome, len(self.encoded.train))  # type: ignore[arg-type]
        delta = get_flat(self.model) - self.weights  # type: ignore[arg-type]
        took = time.perf_counter() - started
        log.info("round %d: trained on %d rows in %.2fs, loss %.4f",
                 task.round, outcome.examples, took, outcome.loss_sum / max(outcome.examples, 1))
        if dp.mode == "sample" and self.private is not None:
            log.info("round %d: DP-SGD spend so far epsilon %.4f (delta %g, Opacus RDP accountant)",
                     task.round, self.private.epsilon(dp.delta), dp.delta)  # type: ignore[attr-defined]
        if dp.mode == "client":
            return self._client_dp_fit(task, delta, outcome.loss_sum / max(outcome.examples, 1), took)
        if task.HasField("secagg"):
            from fedcrm.secagg.sparsification import gather
            from fedcrm.training.secure_vectors import fit_quantizer, fit_support, fit_vector, quantized_fit

            s = task.secagg
            # keepFraction: the round's shared support, derived here from this participant's own terms (checked
            # equal to the aggregator's) and the round, never taken from the aggregator
            support = fit_support(self.federation.spec, federation=self.federation.key, round_=task.round,
                                  parameters=delta.size)
            sent = delta if support is None else gather(delta, support)
            values = fit_vector(sent, examples=outcome.examples, loss_sum=outcome.loss_sum, clip=s.clip)
            # s.bits was checked against this participant's own sum_bits (_check_task); n is the signed member list
            contributors = len(s.members) if quantized_fit(self.federation.spec) is not None else None
            quantizer = fit_quantizer(parameters=sent.size, weight_bound=s.weight_bound, clip=s.clip, bits=s.bits,
                                      contributors=contributors)
            keys = self._start_secure_sum(task, quantizer, values)
            return pb.FitResult(round=task.round, model_version=task.model_version, secagg_keys=keys)
        self.ledger.record()
        return pb.FitResult(
            round=task.round,
            model_version=task.model_version,
            delta=to_vector(delta),
            examples=float(outcome.examples),
            loss_sum=outcome.loss_sum,
            train_seconds=took,
        )

    def _augment(self, prep: object) -> None:
        """spec.augmentation.gan of this participant's own Federation: train the GAN on the encoded training rows
        once per run (a reconnection keeps them), log what was added per class and what the GAN spent."""
        own = self.own_federation.spec
        gan = own.augmentation.gan
        if not gan.enabled or (self.augmentation is not None and self.augmentation[0] == prep):
            return
        from fedcrm.training.augmentation import augment

        assert self.encoded is not None
        made = augment(self.encoded.train, prep, gan, batch_size=own.training.batch_size,  # type: ignore[arg-type]
                       seed=own.training.seed, identity=self.identity)
        self.augmentation = (prep, made)
        log.info("%s", made.summary())
        log.info("%s", made.privacy_summary(own.privacy.differential_privacy.mode))

    def _training_rows(self) -> object:
        """What local training uses: the real training rows, then this participant's synthetic rows, if any."""
        from fedcrm.training.augmentation import with_synthetic

        assert self.encoded is not None
        return with_synthetic(self.encoded.train, self.augmentation[1] if self.augmentation else None)  # type: ignore[arg-type]

    def _train_private(self) -> object:
        """One round of DP-SGD (Opacus), with the noise multiplier the aggregator derives too."""
        from fedcrm.privacy.dpsgd import PrivateTrainer
        from fedcrm.privacy.plans import sample_plan

        assert self.federation is not None and self.encoded is not None and self.frames is not None
        spec = self.federation.spec
        if self.private is None:
            plan = sample_plan(spec, len(self.frames[0]))  # type: ignore[arg-type]
            self.private = PrivateTrainer(
                self.model, self.encoded.train, plan, batch_size=spec.training.batch_size,  # type: ignore[arg-type]
                learning_rate=spec.training.learning_rate, clipping_norm=spec.privacy.differential_privacy.clip,
            )
            log.info("DP-SGD: Poisson rate %.5f, %d steps per round, noise multiplier %.4f",
                     plan.sample_rate, plan.steps_per_round, plan.noise_multiplier)
        return self.private.train_round(spec.training.local_epochs)  # type: ignore[attr-defined]

    def _pooled_fit(self, task: pb.Task, started: float) -> pb.FitResult:
        """Pooled DP-SGD: this participant's Poisson sample, its clipped gradients summed, its share of one central
        step's noise, masked (the terms require secure aggregation; an unmasked FIT was refused before)."""
        from fedcrm.privacy.plans import pooled_noise
        from fedcrm.privacy.pooled_gradients import clipped_gradient_sum
        from fedcrm.training.secure_vectors import client_dp_fit_quantizer, client_dp_fit_vector

        assert self.federation is not None and self.encoded is not None and self.weights is not None
        dp = self.federation.spec.privacy.differential_privacy
        if not task.HasField("secagg"):
            raise NodeExit(f"round {task.round}: pooled DP-SGD sends only masked sums", NodeExitCode.UNREACHABLE)
        part = clipped_gradient_sum(self.model, self.encoded.train, rate=dp.rate, clip=dp.clip)  # type: ignore[arg-type]
        noise = pooled_noise(self.federation.spec, participants=self.participants, dimension=part.gradient_sum.size)
        noised = noise.privatize(part.gradient_sum)
        log.info("round %d: pooled DP-SGD, sampled %d of %d rows (rate %g) in %.2fs; noise multiplier %.4f shared "
                 "by at least %d", task.round, part.sampled, len(self.encoded.train), dp.rate,
                 time.perf_counter() - started, noise.noise_multiplier, noise.survivors_min)
        loss_mean = part.loss_sum / part.sampled if part.sampled else 0.0
        keys = self._start_secure_sum(task, client_dp_fit_quantizer(noise), client_dp_fit_vector(noised, loss_mean=loss_mean))
        return pb.FitResult(round=task.round, model_version=task.model_version, secagg_keys=keys)

    def _client_dp_fit(self, task: pb.Task, delta: np.ndarray, loss_mean: float, took: float) -> pb.FitResult:
        """Clip, discretise and noise the update (this participant's share of the noise), then send or mask it."""
        from fedcrm.privacy.mechanisms import takes_part
        from fedcrm.privacy.plans import client_noise
        from fedcrm.training.secure_vectors import client_dp_fit_quantizer, client_dp_fit_vector

        assert self.federation is not None
        if self.participants < 1:
            raise NodeExit("protocol error: the aggregator did not say how many participants the federation has", NodeExitCode.UNREACHABLE)
        noise = client_noise(self.federation.spec, participants=self.participants, dimension=delta.size)
        rate = self.federation.spec.privacy.differential_privacy.rate
        if rate < 1:
            sampled = takes_part(rate)
            # Not sampled: the update is replaced by zeros, while the noise share, the training and so the timing
            # stay the same, and the masked vector does not tell the aggregator which way the coin fell.
            log.info("round %d: %s (participant sampling rate %g, a secret coin)", task.round,
                     "update sampled" if sampled else "update not sampled: sending zeros under the noise share", rate)
            if not sampled:
                delta = np.zeros_like(delta)
        noised = noise.privatize(delta)
        if task.HasField("secagg"):
            keys = self._start_secure_sum(task, client_dp_fit_quantizer(noise), client_dp_fit_vector(noised, loss_mean=loss_mean))
            return pb.FitResult(round=task.round, model_version=task.model_version, secagg_keys=keys)
        self.ledger.record()
        return pb.FitResult(round=task.round, model_version=task.model_version,
                            delta=to_vector(noised.astype(np.float64)), examples=1.0, loss_sum=loss_mean,
                            train_seconds=took)

    def _statistics(self, task: pb.Task) -> pb.StatisticsResult:
        """Counts and sums of the training split: in the clear, or masked with each numeric value clipped to its
        feature's bound (how many were clipped is logged per feature); under differential privacy, noised per
        record first, in the clear or masked."""
        from fedcrm.training.preprocessing import StatisticsLayout

        assert self.federation is not None and self.frames is not None
        layout = StatisticsLayout(self.federation.spec.task)
        private = self.own_federation.spec.privacy.differential_privacy.enabled
        if not task.HasField("secagg") and not private:
            return pb.StatisticsResult(round=task.round, statistics=to_vector(layout.local(self.frames[0])))  # type: ignore[arg-type]
        from fedcrm.training.secure_vectors import StatisticsEncoding

        if private:
            stats = self._noised_statistics(layout, members=len(task.secagg.members))
        else:
            stats = self._bounded_statistics(layout)
        # Only sample-level DP needs the row count (each participant's accountant); otherwise nothing in the clear.
        rows = len(self.frames[0]) if self.federation.spec.privacy.differential_privacy.mode == "sample" else 0  # type: ignore[arg-type]
        if not task.HasField("secagg"):
            return pb.StatisticsResult(round=task.round, statistics=to_vector(stats), rows=rows)
        # The bounds come from the member list this participant's own id is checked against, never from weight_bound.
        encoding = StatisticsEncoding(layout, participants=len(task.secagg.members))
        keys = self._start_secure_sum(task, encoding, stats)
        return pb.StatisticsResult(round=task.round, secagg_keys=keys, rows=rows)

    def _bounded_statistics(self, layout: StatisticsLayout) -> np.ndarray:
        """:meth:`StatisticsLayout.bounded`, logging what was clipped per feature."""
        assert self.federation is not None and self.frames is not None
        stats, clipped = layout.bounded(self.frames[0])  # type: ignore[arg-type]
        for name, count in clipped.items():
            if count:
                log.warning("statistics: clipped %d value(s) of %s to +-%g (its spec bound) before summing",
                            count, name, self.federation.spec.task.feature(name).bound)
        return stats

    def _noised_statistics(self, layout: StatisticsLayout, *, members: int) -> np.ndarray:
        """The statistics under differential privacy: bounded, noised once with this participant's own noise
        (from its own terms; its share of it in pooled mode, sized from the member list it checks its own id
        against), and the same vector every time after (kept in the release ledger)."""
        from fedcrm.privacy.plans import statistics_epsilon, statistics_noise_multiplier, statistics_shares

        if self.ledger.statistics is not None and len(self.ledger.statistics) == layout.size:
            log.info("statistics: sending the noised statistics already released, not a fresh draw")
            return np.asarray(self.ledger.statistics, dtype=np.float64)
        spec = self.own_federation.spec
        sigma = statistics_noise_multiplier(spec)
        assert sigma is not None
        shares = statistics_shares(spec, members)
        noised = layout.noise(sigma, shares=shares).privatize(self._bounded_statistics(layout))
        self.ledger.keep_statistics(noised.tolist())
        log.info("statistics: noised per record (noise multiplier %.3g; epsilon %.4g of the budget, delta %g)",
                 sigma, statistics_epsilon(spec), spec.privacy.differential_privacy.delta)
        return noised

    def _evaluate(self, task: pb.Task) -> pb.EvaluationResult:
        from fedcrm.models.mlp import set_flat
        from fedcrm.training.local import evaluate

        assert self.encoded is not None and self.weights is not None
        set_flat(self.model, self.weights)  # type: ignore[arg-type]
        counts = evaluate(self.model, self.encoded.validation)  # type: ignore[arg-type]
        if task.HasField("secagg"):
            from fedcrm.training.secure_vectors import evaluation_quantizer

            s = task.secagg  # weight_bound is the public bound on pooled validation rows here
            keys = self._start_secure_sum(task, evaluation_quantizer(validation_rows_bound=s.weight_bound, bits=s.bits), counts)
            return pb.EvaluationResult(round=task.round, model_version=task.model_version, secagg_keys=keys)
        return pb.EvaluationResult(round=task.round, model_version=task.model_version, counts=to_vector(counts))

    # ----------------------------------------------------------------- secure aggregation
    def _start_secure_sum(self, task: pb.Task, quantizer: object, values: np.ndarray) -> pb.SecAggKeys:
        from fedcrm_node.secure_sums import SecureContribution

        assert self.federation is not None
        signer, verifier = self._secagg_credentials()
        try:
            self.contribution = SecureContribution(
                client_id=self.secagg_id, round_=task.round, secagg=task.secagg, quantizer=quantizer, values=values,  # type: ignore[arg-type]
                federation=self.federation.key, signer=signer, verifier=verifier, agreement=self._member_agreement(),
            )
        except ValueError as err:  # ProtocolViolation: a member list that does not give this participant its id
            raise NodeExit(f"round {task.round}: refusing a secure-aggregation request: {err}", NodeExitCode.UNREACHABLE) from None
        return self.contribution.keys()

    def _member_agreement(self) -> MemberAgreement:
        """The federation's member-list agreement, made once; the fewest members a list may have is the own terms'."""
        if self._agreement is None:
            assert self.federation is not None
            signer, verifier = self._secagg_credentials()
            self._agreement = MemberAgreement(
                federation=self.federation.key, terms=terms_digest(self.federation.spec), client_id=self.secagg_id,
                signer=signer, verifier=verifier, minimum=max(2, self.federation.spec.training.min_participants))
        return self._agreement

    def _answer_members(self, task: pb.Task) -> pb.SecAggResult:
        from fedcrm_node.secure_sums import answer_members

        try:
            return answer_members(self._member_agreement(), task)
        except ValueError as err:  # ProtocolViolation: a member list or transcript this participant will not back
            raise NodeExit(f"round {task.round}: refusing the member list: {err}", NodeExitCode.UNREACHABLE) from None

    def _secagg_credentials(self) -> tuple[Signer, PeerVerifier]:
        """This participant's signer (its mutual-TLS certificate and key, as the files hold them now) and a verifier
        of peers against the federation CA.

        The operator renews the certificate (a new key) at two thirds of its life, while a run may go on; a signer
        kept from the start would be refused by every peer once its certificate expired, and a neighbour that
        refuses a roster leaves the round. So each secure sum starts with the files' current certificate: peers
        accept any certificate the federation CA issued to the identity the member list names, checked again in
        each sum. Within one sum the signer does not change (the survivor set is checked against the key that
        signed the round's keys), and the member-list agreement keeps the signer it was made with for the whole
        federation (peers check its echo against the key it signed the list with; the agreement's certificates
        are checked once, when it is settled). A renewal that cannot be used -- files read mid-swap, a key that
        is not its certificate's, another identity -- is logged and the previous signer kept. The verifier is made
        once: it caches peers' checked certificates across rounds, and the CA is not rotated (docs/operator.md).
        """
        files = self.tls.fingerprint()
        if self._signer is None or self._signer[1] != files:
            try:
                ca, cert, key = self.tls.read()
                if self.tls.fingerprint() != files:
                    raise ValueError("the files changed while they were read")
                signer = Signer.from_pem(cert, key)
                if self._signer is not None and signer.identity != self._signer[0].identity:
                    raise ValueError(f"the new certificate is {signer.identity!r}'s, not {self._signer[0].identity!r}'s")
            except (OSError, ValueError) as err:
                if self._signer is None:
                    raise
                log.warning("secure aggregation: the renewed certificate files cannot be used yet (%s); signing with "
                            "the certificate read before", err)
            else:
                if self._signer is not None:
                    log.info("secure aggregation: signing with the renewed certificate from the next secure sum")
                self._signer = (signer, files)
                if self._verifier is None:
                    self._verifier = PeerVerifier(ca)
        assert self._verifier is not None
        return self._signer[0], self._verifier

    def _secure_answer(self, stub: rpc.FederatedTrainingStub, task: pb.Task) -> pb.SecAggResult:
        if self.contribution is None or not self.contribution.matches(task):
            raise NodeExit(f"protocol error: a secure-aggregation task for round {task.round} arrived outside its exchange", NodeExitCode.UNREACHABLE)
        unmasks_update = task.kind == pb.Task.SECAGG_UNMASK and task.secagg.phase == pb.SecAggTask.FIT
        if unmasks_update:
            self._check_budget(stub, task.round)  # these shares let the round's sum of updates out
            self._check_noised_survivors(stub, task)
        elif task.kind == pb.Task.SECAGG_UNMASK and task.secagg.phase == pb.SecAggTask.STATISTICS:
            self._check_noised_survivors(stub, task)  # pooled mode shares the statistics' noise too
        try:
            answer = self.contribution.answer(task)
        except ValueError as err:
            # A tampered share or a request to reveal too much: refuse, and let the round go on without us.
            raise NodeExit(f"round {task.round}: refusing a secure-aggregation request: {err}", NodeExitCode.UNREACHABLE) from None
        if unmasks_update:
            self.ledger.record()
        return answer


#: How often a node still waiting for its aggregator says so.
def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


WAITING_LOG_INTERVAL_S = 30.0


def _wait_until_ready(channel: grpc.Channel, target: str, timeout: float, every: float = WAITING_LOG_INTERVAL_S,
                      *, stale: Callable[[], bool] = lambda: False) -> bool:
    """Wait for the channel to connect; say every ``every`` seconds that it has not, with gRPC's state for it.
    False also when ``stale()`` says, at one of those times, that the channel's credentials were renewed.

    gRPC retries name resolution, TCP and TLS silently; without these lines a pod
    whose aggregator name does not resolve, or whose NetworkPolicy drops the
    connection, shows nothing in ``kubectl logs`` until the timeout (15 minutes
    by default in a cluster)."""
    states: list[grpc.ChannelConnectivity] = []
    record = states.append
    channel.subscribe(record, try_to_connect=True)
    try:
        began = time.monotonic()
        while True:
            left = timeout - (time.monotonic() - began)
            if left <= 0:
                return False
            try:
                grpc.channel_ready_future(channel).result(timeout=min(every, left))
                return True
            except grpc.FutureTimeoutError:
                if stale():
                    return False
                waited = time.monotonic() - began
                if waited < timeout:
                    state = states[-1].name if states else "IDLE"
                    log.warning("still connecting to the aggregator at %s after %.0fs of %gs (gRPC state %s): check "
                                "that the name resolves from this pod, that the aggregator runs, and that "
                                "NetworkPolicies allow this pod to reach it", target, waited, timeout, state)
    finally:
        channel.unsubscribe(record)

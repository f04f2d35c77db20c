"""A run's facts: what it is and where it came from, beside its weights (pure data, no I/O).

`RunFacts` travels in every checkpoint's meta.json (flat, next to the architecture) and feeds the
summary. `TicketInfo` is what an Early-Bird search found (ticket.json, the `ticket` event,
summary.json's `ticket_info`); `PrunedFrom` is the dense run a prune-from-run baseline was cut from
(its time counts in the baseline's). Their `to_dict()` is the JSON on disk; `from_dict()` reads it
back (keys it does not know are ignored, so older run folders still resume).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


def _known(cls, d: dict) -> dict:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


@dataclass
class TicketInfo:
    """An Early-Bird search's outcome. A drawn ticket (also one extracted anyway when the search budget
    ran out: found=False) has every field but `checks`; a miss (on_miss=continue-dense: nothing was
    extracted) has found=False, its iteration and how many `checks` ran."""

    found: bool
    iteration: int
    check: int | None = None
    max_distance: float | None = None
    ratio: float | None = None
    criterion: str | None = None
    eta: float | None = None
    queue: int | None = None
    check_every: int | None = None
    mask_source: str | None = None
    reinit: bool | None = None
    round_channels: int | None = None
    search_seconds: float | None = None
    check_seconds_mean: float | None = None
    check_seconds_max: float | None = None
    extract_seconds: float | None = None
    dense: dict | None = None  # {"params", "macs"} of the dense model
    ticket: dict | None = None  # {"params", "macs"} of the ticket
    pruned_channel_fraction: float | None = None
    checks: int | None = None  # a miss only

    @property
    def extracted(self) -> bool:
        return self.ticket is not None

    @classmethod
    def miss(cls, iteration: int, checks: int) -> "TicketInfo":
        return cls(found=False, iteration=iteration, checks=checks)

    def to_dict(self) -> dict:
        if not self.extracted:
            return {"found": self.found, "iteration": self.iteration, "checks": self.checks}
        return {k: v for k, v in asdict(self).items() if k != "checks"}

    @classmethod
    def from_dict(cls, d: dict | None) -> "TicketInfo | None":
        return None if d is None else cls(**_known(cls, d))


@dataclass
class PrunedFrom:
    """The finished dense run a dense-then-prune baseline was pruned from, and how."""

    run: str
    checkpoint: str
    iteration: int
    train_s: float | None = None  # the dense run's training time (part of the baseline's cost)
    criterion: str | None = None
    ratio: float | None = None
    weights: str | None = None  # ema | online
    reinit: bool | None = None
    method: str | None = None  # prune-finetune | scratch
    pruned_channel_fraction: float | None = None
    round_channels: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "PrunedFrom | None":
        return None if d is None else cls(**_known(cls, d))


@dataclass
class RunFacts:
    """What meta.json records about a run besides its architecture and plan. Fields that are None (or
    empty) are left out of meta.json, as a run that has no such fact never wrote them."""

    image_shape: list | None = None  # what the model generates (C, H, W), latents for a latent run
    latent: dict | None = None  # what decodes a latent run's samples: autoencoder, scale
    ticket: TicketInfo | None = None
    dense_size: dict | None = None  # {"params", "macs"} of the dense architecture
    pruned_from: PrunedFrom | None = None
    skipped_steps: int | None = None  # steps train.nonfinite=skip dropped
    compile_decisions: list = field(default_factory=list)  # train.compile=auto's choice per model shape
    identity: dict | None = None  # config.run_identity: what must not change on --resume

    @property
    def dependency_s(self) -> float:
        """Training time this run depends on but did not spend itself: the dense run a prune-from-run
        baseline was cut from (0 otherwise)."""
        return float(self.pruned_from.train_s or 0.0) if self.pruned_from else 0.0

    def to_meta(self) -> dict:
        out = {"image_shape": self.image_shape, "latent": self.latent,
               "ticket": self.ticket.to_dict() if self.ticket else None, "dense_size": self.dense_size,
               "pruned_from": self.pruned_from.to_dict() if self.pruned_from else None,
               "skipped_steps": self.skipped_steps, "compile_decisions": self.compile_decisions or None,
               "identity": self.identity}
        return {k: v for k, v in out.items() if v is not None}

    @classmethod
    def carried(cls, meta: dict) -> "RunFacts":
        """The facts a resume carries over from a checkpoint's meta.json (the rest are decided anew)."""
        return cls(ticket=TicketInfo.from_dict(meta.get("ticket")), dense_size=meta.get("dense_size"),
                   pruned_from=PrunedFrom.from_dict(meta.get("pruned_from")),
                   skipped_steps=meta.get("skipped_steps"))

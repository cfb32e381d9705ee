"""Jacobian-based synthetic queries: JBDA (Papernot et al. 2017), JB-self and JB-top3 (Juuti et al. 2019).

All three start from a small seed set of the victim's domain, query it, train a substitute on the answers,
and grow the query set round by round with steps along the substitute's input gradient:
- ``jbda``: x + lam * sign(d F_sub(x)[c] / dx), c the seed's ground-truth label (inherited by every point
  grown from it);
- ``jb_self``: the same step with c the victim's top-1 answer for x (no ground truth needed);
- ``jb_top3``: for each of the substitute's top-3 classes c other than the victim's top-1, a targeted step
  x - lam * sign(d CE(F_sub(x), c) / dx): three new points per point.
The step's sign flips every ``tau`` rounds (Papernot's periodic step size). Each round queries only the
new points (a seeded subset when they outnumber the budget left); the substitute is retrained from scratch
each round. Queries are sent as 8-bit images, like every query.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from sim import models
from sim.errors import ConfigError
from sim.registry import Param, register
from sim.training import predict_probs, to_float, train_classifier

from .base import Attack, AttackContext, TransferSet, load_pool, sent_per_round
from .jacobian_mad_code import APPLIES, OPTIONAL, MadCodeJacobian

VARIANTS = ("jbda", "jb_self", "jb_top3")


def jacobian_step(model: torch.nn.Module, x: torch.Tensor, classes: torch.Tensor, lam: float) -> torch.Tensor:
    """x + lam * sign(grad_x model(x)[class]) per image, clipped to [0, 1] (x float in [0, 1])."""
    x = x.detach().clone().requires_grad_(True)
    score = model(x).gather(1, classes[:, None]).sum()
    (grad,) = torch.autograd.grad(score, x)
    return (x + lam * grad.sign()).clamp(0, 1).detach()


def targeted_step(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, lam: float) -> torch.Tensor:
    """x - lam * sign(grad_x CE(model(x), target)): a step toward class ``target``, clipped to [0, 1]."""
    x = x.detach().clone().requires_grad_(True)
    loss = F.cross_entropy(model(x), target, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x)
    return (x - lam * grad.sign()).clamp(0, 1).detach()


def seeds_spend_all(values: dict, budget: int) -> int | None:
    """The seed count, where a Jacobian attack's seeds alone would spend ``budget`` and leave no round to run (its
    parameters ``values``, dotted as ``jacobian.seed_size``); None where the budget leaves room for rounds."""
    rounds = values["jacobian.variant"] == "mad_code" or values["jacobian.rounds"] > 0
    return values["jacobian.seed_size"] if rounds and budget <= values["jacobian.seed_size"] else None


def quantize(x: torch.Tensor) -> np.ndarray:
    return (x * 255).round().clamp(0, 255).to(torch.uint8).numpy()


class JacobianAttack:
    """A stepwise query source (``propose`` / ``observe`` / ``transfer_set``) for the three variants."""

    def __init__(self, variant: str, seeds: np.ndarray, seed_labels: np.ndarray, budget: int, *, arch: str,
                 num_classes: int, lam: float = 0.1, rounds: int = 6, tau: int = 3, substitute_epochs: int = 10,
                 seed: int = 0):
        if variant not in VARIANTS:
            raise ValueError(f"attack={variant!r} is not a Jacobian attack; expected one of: {', '.join(VARIANTS)}")
        self.variant = variant
        self.arch, self.num_classes = arch, num_classes
        self.lam, self.rounds, self.tau, self.epochs = lam, rounds, tau, substitute_epochs
        self.seed = seed
        self._rng = np.random.default_rng(seed)
        self._budget = budget
        self._sent = 0
        self.round = 0  # augmentation rounds done
        self._pending = np.asarray(seeds, np.uint8)[:budget]
        self._pending_labels = np.asarray(seed_labels, np.int64)[:budget]  # ground truth, inherited (jbda)
        self.collected = TransferSet(self._pending.shape[1:])
        self._labels: list[np.ndarray] = []
        self._in_flight: np.ndarray | None = None
        self.queries_per_round: list[int] = [len(self._pending)]

    @property
    def remaining(self) -> int:
        if not len(self._pending) and self.round >= self.rounds:
            return 0
        return self._budget - self._sent

    def propose(self, n: int) -> np.ndarray:
        if not len(self._pending):
            self._grow()
        n = min(n, len(self._pending), self.remaining)
        x, self._pending = self._pending[:n], self._pending[n:]
        self._in_flight, self._pending_labels = self._pending_labels[:n], self._pending_labels[n:]
        self._sent += n
        return x

    def observe(self, x: np.ndarray, probs: np.ndarray, answered: np.ndarray) -> None:
        self.collected.add(x, probs, answered)
        self._labels.append(self._in_flight[answered])

    def transfer_set(self) -> tuple[np.ndarray, np.ndarray]:
        return self.collected.arrays()

    def stats(self) -> dict:
        return {"rounds": self.round, "queries_per_round": sent_per_round(self.queries_per_round, self._sent)}

    def substitute(self) -> torch.nn.Module:
        """A substitute trained from scratch on every answer so far."""
        x, y = self.transfer_set()
        torch.manual_seed(self.seed + self.round)
        model = models.build(self.arch, tuple(x.shape[1:]), self.num_classes)
        return train_classifier(model, x, y, epochs=self.epochs, seed=self.seed + self.round)

    def _grow(self) -> None:
        """One augmentation round: the next queries, grown from every point queried so far."""
        if self.round >= self.rounds or not any(len(lab) for lab in self._labels):
            self._pending = self._pending[:0]
            self.round = self.rounds
            return
        model = self.substitute()
        x_all, y_all = self.transfer_set()
        truth = np.concatenate(self._labels)
        lam = self.lam * (-1) ** (self.round // self.tau)
        xf = to_float(x_all)
        new, labels = [], []
        for start in range(0, len(xf), 256):
            xb, sl = xf[start:start + 256], slice(start, start + 256)
            top1 = torch.as_tensor(y_all[sl].argmax(1))
            if self.variant == "jbda":
                new.append(jacobian_step(model, xb, torch.as_tensor(truth[sl]), lam))
                labels.append(truth[sl])
            elif self.variant == "jb_self":
                new.append(jacobian_step(model, xb, top1, lam))
                labels.append(truth[sl])
            else:
                order = torch.as_tensor(predict_probs(model, xb)).argsort(1, descending=True)
                others = [row[row != t] for row, t in zip(order, top1)]
                for k in range(min(3, self.num_classes - 1)):
                    new.append(targeted_step(model, xb, torch.stack([o[k] for o in others]), abs(lam)))
                    labels.append(truth[sl])
        grown = quantize(torch.cat(new))
        grown_labels = np.concatenate(labels)
        left = self._budget - self._sent
        if len(grown) > left:
            keep = np.sort(self._rng.choice(len(grown), left, replace=False))
            grown, grown_labels = grown[keep], grown_labels[keep]
        self._pending, self._pending_labels = grown, grown_labels
        self.round += 1
        self.queries_per_round.append(len(grown))


class JacobianAugmentation(Attack):
    """The three Jacobian attacks' declaration: their settings, and one source per actor, each growing its own
    shard of the seed set. The seeds come from the victim's test split (which it never trained on) and are left
    out of the replicas' evaluation, or from ``jacobian.seed_pool``, the attacker's own data."""

    params = {
        "jacobian.seed_size": Param(150, int, low=1, help="seed images from the victim's test split (never trained "
                                                          "on)"),
        "jacobian.lam": Param(0.1, low=0, high=1, low_open=True, help="step size of the Jacobian augmentation"),
        "jacobian.rounds": Param(6, int, low=0, help="augmentation rounds (mad_code: as many as the budget allows)"),
        "jacobian.tau": Param(3, int, low=1, help="the step's sign flips every tau rounds"),
        "jacobian.substitute_epochs": Param(10, int, low=1, help="substitute training epochs per round"),
        "jacobian.variant": Param("default", str, choices=("default", "mad_code"),
                                  help="mad_code: the MAD authors' code, quirks included (seeds from the training "
                                       "split, rounds until the budget is spent)"),
        "jacobian.seed_pool": Param(None, str, help="draw the seeds from this pool (a dataset, as a Knockoff pool: "
                                                    "the attacker's own data) instead of the victim's test split"),
        "jacobian.without": Param(None, list, choices=OPTIONAL,
                                  help="mad_code only: quirks turned off, to measure each one's share "
                                       "(docs/attacks.md)"),
    }

    @classmethod
    def _inert(cls, values: dict) -> dict[str, str]:
        # the MAD code draws its seeds from the victim's training split and runs rounds until the budget is spent
        if values["jacobian.variant"] == "mad_code":
            return {"jacobian.seed_pool": "jacobian.variant=default", "jacobian.rounds": "jacobian.variant=default"}
        return {"jacobian.without": "jacobian.variant=mad_code"}

    def sources(self, ctx: AttackContext) -> list:
        v, ds, actors = self.values, ctx.dataset, len(ctx.budgets)
        size = v["jacobian.seed_size"]
        if v["jacobian.variant"] == "mad_code":
            return self._mad_code_sources(ctx)
        if size < actors:
            raise ConfigError(f"{ctx.owner}.jacobian.seed_size={size} is less than actors={actors}; expected at "
                              f"least one seed per actor")
        own = v["jacobian.seed_pool"] is not None
        if own:
            x, y = self._seed_pool(ctx)
        elif size > len(ds.x_test) // 2:
            raise ConfigError(f"{ctx.owner}.jacobian.seed_size={size} would take more than half of the "
                              f"{len(ds.x_test)} test images; expected at most {len(ds.x_test) // 2}")
        else:
            x, y = ds.x_test, ds.y_test
        self._room_for_rounds(ctx)
        idx = np.random.default_rng(ctx.seed("seeds")).choice(len(x), size, replace=False)
        if not own:  # test images queried as seeds stay out of the replicas' evaluation
            ctx.held_out.update(idx.tolist())
        return [JacobianAttack(self.name, x[idx[i::actors]], y[idx[i::actors]], b, arch=ctx.arch,
                               num_classes=ds.num_classes, lam=v["jacobian.lam"], rounds=v["jacobian.rounds"],
                               tau=v["jacobian.tau"], substitute_epochs=v["jacobian.substitute_epochs"],
                               seed=ctx.seed("jacobian", i))
                for i, b in enumerate(ctx.budgets)]

    def _room_for_rounds(self, ctx: AttackContext) -> None:
        """A budget the seeds alone would spend runs no Jacobian round: a natural-image attack in disguise."""
        budget = sum(ctx.budgets)
        seeds = seeds_spend_all(self.values, budget)
        if seeds is not None:
            raise ConfigError(f"{ctx.owner}.budget={budget} leaves no query for a Jacobian round after the "
                              f"{seeds} seeds ({ctx.owner}.jacobian.seed_size); expected a budget "
                              f"above seed_size (or jacobian.rounds=0 for the seeds alone)")

    def _seed_pool(self, ctx: AttackContext) -> tuple[np.ndarray, np.ndarray]:
        """The images and labels of ``jacobian.seed_pool``: the victim's image shape and classes (JBDA's seeds carry
        their true label), at least ``seed_size`` of them."""
        v, ds = self.values, ctx.dataset
        name, size = v["jacobian.seed_pool"], v["jacobian.seed_size"]
        x, y = load_pool(ctx, "jacobian.seed_pool", name)
        if ds.name in name.split("+"):
            raise ConfigError(f"{ctx.owner}.jacobian.seed_pool={name!r} holds the victim's own dataset; expected the "
                              f"attacker's own data (unset, the seeds come from the victim's test split, held out)")
        if self.name == "jbda" and ((y < 0).any() or (y >= ds.num_classes).any()):  # JBDA steps along the true label
            raise ConfigError(f"{ctx.owner}.jacobian.seed_pool={name!r} has labels {int(y.min())} to {int(y.max())}; "
                              f"expected a labelled pool of the victim's classes 0 to {ds.num_classes - 1} (jbda "
                              f"steps along each seed's true label)")
        if size > len(x):
            raise ConfigError(f"{ctx.owner}.jacobian.seed_size={size} exceeds the {len(x)} images of seed_pool "
                              f"{name!r}; expected at most {len(x)}")
        return x, y

    def _mad_code_sources(self, ctx: AttackContext) -> list:
        """The MAD code's attacks (:mod:`actors.attacks.jacobian_mad_code`): seeds drawn from the victim's training
        split (without ``train_seeds``: from its test split, held out), each actor growing its own shard of them."""
        v, ds, actors = self.values, ctx.dataset, len(ctx.budgets)
        size, without = v["jacobian.seed_size"], tuple(v["jacobian.without"] or ())
        if set(without) - set(APPLIES[self.name]):
            raise ConfigError(f"{ctx.owner}.jacobian.without={list(without)}: {self.name} has no quirk "
                              f"{', '.join(sorted(set(without) - set(APPLIES[self.name])))}; expected quirks among "
                              f"{', '.join(APPLIES[self.name])}")
        split, pool = ("test", ds.x_test) if "train_seeds" in without else ("training", ds.x_train)
        if size < actors or size > len(pool):
            raise ConfigError(f"{ctx.owner}.jacobian.seed_size={size}; expected between actors={actors} and the "
                              f"{len(pool)} {split} images (jacobian.variant=mad_code draws seeds from them)")
        self._room_for_rounds(ctx)
        idx = np.random.default_rng(ctx.seed("seeds")).choice(len(pool), size, replace=False)
        if split == "test":
            ctx.held_out.update(idx.tolist())
        return [MadCodeJacobian(self.name, pool[idx[i::actors]], b, arch=ctx.arch, num_classes=ds.num_classes,
                                lam=v["jacobian.lam"], tau=v["jacobian.tau"],
                                substitute_epochs=v["jacobian.substitute_epochs"], seed=ctx.seed("jacobian", i),
                                without=without)
                for i, b in enumerate(ctx.budgets)]


@register("attack")
class JBDA(JacobianAugmentation):
    """JBDA (Papernot et al. 2017): steps x + lam * sign of the substitute's input gradient for the seed's true
    class, grown from a few natural seeds round by round."""

    name = "jbda"


@register("attack")
class JBSelf(JacobianAugmentation):
    """JB-self (Juuti et al. 2019): JBDA with the victim's top-1 answer in place of the true class."""

    name = "jb_self"


@register("attack")
class JBTop3(JacobianAugmentation):
    """JB-top3 (Juuti et al. 2019): a targeted step toward each of the substitute's top-3 classes other than the
    victim's top-1, three new points per point."""

    name = "jb_top3"

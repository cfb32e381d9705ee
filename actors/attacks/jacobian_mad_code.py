"""The Jacobian attacks as the MAD authors' code runs them (``jacobian.variant=mad_code``): a reference mode that shows
where the MAD paper's JBDA, JB-self and JB-top3 numbers come from (Orekondy et al., ICLR 2020; their repository
``tribhuvanesh/prediction-poisoning``, ``defenses/adversary/jacobian.py``). Every behaviour below is the code's,
quirks included, each named as the docs name it (docs/attacks.md, "The MAD code's Jacobian attacks"):

- ``train_seeds``: the seeds are the victim's own training images (the code draws them from the training split).
- ``normalised_step``: the step works on images normalised with MNIST's mean 0.1307 and std 0.3081, so a step of
  ``lam`` moves a pixel by ``lam`` x 0.3081.
- ``normalised_clamp``: the stepped point is clipped to [0, 1] *in normalised units*, i.e. to pixel values 0.1307 to
  0.4388: after one round every stored image is a low-contrast grey image.
- ``away_from_label``: the step raises the cross-entropy of the stored answer's top-1 class (an untargeted FGSM step
  away from it), for JBDA as for JB-self; no ground truth is used.
- ``aliasing``: JBDA and JB-self step every stored point, write the stepped points and their answers over the points
  they came from, then join the set with the rows just written: the set doubles and holds each point twice, the
  earlier points are lost, and every round queries every copy (100 x 2^r queries in round r).
- ``self_query``: JB-self queries the point stepped the other way, x - delta, unclipped, but stores x + delta.
- ``top3_pgd``: JB-top3 takes, per point, the substitute's top three classes other than the stored top-1 and runs 8
  steps of 0.01 of targeted PGD on each class's logit, the step bounded by ``lam`` (a negative bound sets every
  element to it, as torch.clamp does when min > max), clipped to no range; the new points join the set (4x a round).
- ``round_sign``: the step's sign is (-1)^round(rho / tau) with Python's round, rho the round's index: with tau 5 it
  is negative in rounds 3 to 7.
- ``fresh_substitute``: each round trains a fresh substitute for ``substitute_epochs`` epochs with SGD, learning rate
  0.1, momentum 0.9, weight decay 5e-4, batch 64, on soft labels. Rounds go on until the budget is spent (the last
  round steps only as many points as the budget has queries left; JB-top3: a third of them).

Every quirk but ``top3_pgd`` can be turned off (``jacobian.without``), alone or with others, to measure its share of
what the mode does to a replica (``benchmarks/attacks.py --variant mad_code --without QUIRK...``); everything not
turned off stays the code's. Turned off:

- ``train_seeds``: the seeds come from the victim's test split, as the clean mode draws them (held out from the
  replica's evaluation);
- ``normalised_step``: ``lam`` is in pixels (a step moves a pixel by ``lam``; JB-top3's PGD step and bound too);
- ``normalised_clamp``: the stepped point is clipped to [0, 1] *pixels*;
- ``away_from_label``: the step lowers the cross-entropy of the stored top-1 class (toward it, as Papernot's step
  raises that class's score);
- ``aliasing``: the stepped points join D beside the points they came from (D still doubles each round, every
  point distinct, the seeds kept);
- ``self_query``: JB-self queries the point it stores, x + delta;
- ``round_sign``: the sign is (-1)^floor(rho / tau), Papernot's periodic step size (the clean mode's);
- ``fresh_substitute``: the substitute (still fresh each round, ``substitute_epochs`` epochs) trains as the clean
  mode's does: Adam, learning rate 1e-3, batch 64, no weight decay.

Queries are 8-bit images here, as every query of this tool: points outside [0, 1] pixels (JB-self's x - delta,
JB-top3's unclipped steps) are clipped when they are sent and stored, and stored points are rounded to 8 bits
(the code keeps floats). A refused query leaves its row as it was (the code is never refused).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from sim import models
from sim.training import to_float, train_classifier

from .base import sent_per_round

MEAN, STD = 0.1307, 0.3081  # the MAD code's normalisation of MNIST-family images (knockoffnets datasets)
PGD_STEPS, PGD_ALPHA = 8, 0.01
QUIRKS = ("train_seeds", "normalised_step", "normalised_clamp", "away_from_label", "aliasing", "self_query",
          "top3_pgd", "round_sign", "fresh_substitute")
OPTIONAL = tuple(q for q in QUIRKS if q != "top3_pgd")  # the quirks ``without`` can turn off (module docstring)
APPLIES = {"jbda": tuple(q for q in OPTIONAL if q != "self_query"), "jb_self": OPTIONAL,  # per attack, the quirks
           "jb_top3": ("train_seeds", "normalised_step", "round_sign", "fresh_substitute")}  # its code has


def round_sign(rho: int, tau: int) -> int:
    """The sign of round ``rho``'s step: (-1)^round(rho / tau), Python's round (half to even)."""
    return -1 if round(rho / tau) % 2 else 1


def periodic_sign(rho: int, tau: int) -> int:
    """Papernot's periodic sign, (-1)^floor(rho / tau): the sign without ``round_sign``."""
    return -1 if (rho // tau) % 2 else 1


def to_pixels(xn: torch.Tensor) -> np.ndarray:
    """Normalised images -> 8-bit images (clipped to [0, 1] pixels, as every query here)."""
    return ((xn * STD + MEAN) * 255).round().clamp(0, 255).to(torch.uint8).numpy()


def normalised(x: np.ndarray) -> torch.Tensor:
    return (to_float(x) - MEAN) / STD


def fgsm_step(model: torch.nn.Module, xn: torch.Tensor, classes: torch.Tensor, lam: float,
              clamp: str = "normalised") -> torch.Tensor:
    """The code's ``fgsm_untargeted``: delta = lam * sign(d CE(model(x), class) / dx) in normalised units, cut so
    that x + delta lies in [0, 1] normalised (``clamp="pixels"``: in [0, 1] pixels, i.e. without
    ``normalised_clamp``). The model takes pixels in [0, 1]: the gradient's sign is the same. A negative ``lam``
    steps toward the class (without ``away_from_label``, the caller flips it)."""
    x = (xn * STD + MEAN).detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x), classes), x)
    delta = lam * grad.sign()
    low, high = (0.0, 1.0) if clamp == "normalised" else (-MEAN / STD, (1 - MEAN) / STD)
    return torch.minimum(torch.maximum(delta, low - xn), high - xn).detach()


def targeted_pgd(model: torch.nn.Module, xn: torch.Tensor, target: torch.Tensor, bound: float,
                 alpha: float = PGD_ALPHA) -> torch.Tensor:
    """The code's ``pgd_linf_targ``: 8 steps of ``alpha`` (0.01) up the target's logit, delta clamped to
    [-bound, bound] as torch.clamp does it (bound < 0: every element becomes bound), in normalised units, no range
    clipping."""
    delta = torch.zeros_like(xn)
    for _ in range(PGD_STEPS):
        d = delta.clone().requires_grad_(True)
        score = model((xn + d) * STD + MEAN).gather(1, target[:, None]).sum()
        (grad,) = torch.autograd.grad(score, d)
        delta = torch.clamp(delta + alpha * grad.sign(), min=-bound, max=bound)
    return delta


class MadCodeJacobian:
    """A stepwise query source (``propose`` / ``observe`` / ``transfer_set``) for ``jbda``, ``jb_self`` and ``jb_top3``
    as the MAD code runs them (module docstring). Its transfer set is the code's set D, not every answered query."""

    def __init__(self, variant: str, seeds: np.ndarray, budget: int, *, arch: str, num_classes: int,
                 lam: float = 0.1, tau: int = 5, substitute_epochs: int = 20, seed: int = 0,
                 without: tuple[str, ...] = ()):
        if set(without) - set(APPLIES[variant]):
            raise ValueError(f"without={list(without)}; expected quirks of {variant} among "
                             f"{', '.join(APPLIES[variant])}")
        self.variant, self.arch, self.num_classes = variant, arch, num_classes
        self.without = tuple(without)
        self.lam, self.tau, self.epochs, self.seed = lam, tau, substitute_epochs, seed
        self._budget, self._sent = budget, 0
        self.round = 0  # augmentation rounds done (the code's rho)
        seeds = np.asarray(seeds, np.uint8)[:budget]
        self._x = seeds[:0]  # the set D: images and the answers stored with them
        self._y = np.zeros((0, num_classes), np.float32)
        # the round in flight: what to send, what to store, and (jbda, jb_self) the rows it writes over
        self._queue, self._store = seeds, seeds
        self._rows: np.ndarray | None = None
        self._answers = np.full((len(seeds), num_classes), np.nan, np.float32)
        self._asked = 0  # queries of the round in flight proposed so far
        self.queries_per_round: list[int] = [len(seeds)]

    @property
    def remaining(self) -> int:
        if self._asked >= len(self._queue) and not len(self._x) and (
                self._answers is None or np.isnan(self._answers).any(1).all()):
            return 0  # every query so far refused: nothing to step from
        return self._budget - self._sent

    def propose(self, n: int) -> np.ndarray:
        if self._asked >= len(self._queue):
            self._finish_round()
            self._grow()
        n = min(n, len(self._queue) - self._asked, self.remaining)
        x = self._queue[self._asked:self._asked + n]
        self._asked += n
        self._sent += n
        return x

    def observe(self, x: np.ndarray, probs: np.ndarray, answered: np.ndarray) -> None:
        if not self._answers.flags.writeable:  # an actor's source arrives read-only from Ray's object store
            self._answers = self._answers.copy()
        end = self._asked
        start = end - len(x)
        self._answers[start:end][answered] = probs[answered]

    def transfer_set(self) -> tuple[np.ndarray, np.ndarray]:
        self._finish_round()
        return self._x, self._y

    def stats(self) -> dict:
        x, _ = self.transfer_set()
        return {"rounds": self.round, "queries_per_round": sent_per_round(self.queries_per_round, self._sent),
                "transfer_set": len(x), "distinct_images": int(len(np.unique(x.reshape(len(x), -1), axis=0)))}

    def _finish_round(self) -> None:
        """Store what the round in flight got back (once): the code's writes into D."""
        if self._answers is None:
            return
        got = ~np.isnan(self._answers).any(1)
        store, answers = self._store[:len(self._answers)], self._answers
        if self._rows is None:  # the seeds, JB-top3's new points (or any, without aliasing): they join D
            x = np.concatenate([self._x, store[got]])
            y = np.concatenate([self._y, answers[got]])
            self._x, self._y = x[:self._budget], y[:self._budget]
        else:  # JBDA, JB-self: over the rows they came from, then D joined with those rows again (aliasing)
            rows = self._rows[got]
            self._x, self._y = self._x.copy(), self._y.copy()
            self._x[rows], self._y[rows] = store[got], answers[got]
            n = len(self._rows)
            self._x = np.concatenate([self._x, self._x[:n]])
            self._y = np.concatenate([self._y, self._y[:n]])
        self._answers = None

    def substitute(self) -> torch.nn.Module:
        """A fresh substitute trained on D (``fresh_substitute``; without it, as the clean mode trains one)."""
        torch.manual_seed(self.seed + self.round)
        model = models.build(self.arch, tuple(self._x.shape[1:]), self.num_classes)
        code = {} if "fresh_substitute" in self.without else {"lr": 0.1, "optimizer": "sgd", "weight_decay": 5e-4}
        return train_classifier(model, self._x, self._y, epochs=self.epochs, batch_size=64,
                                seed=self.seed + self.round, **code)

    def _grow(self) -> None:
        """One augmentation round: step D's points (the first ones, when the budget left is smaller)."""
        left = self._budget - self._sent
        if left <= 0 or not len(self._x):
            self._queue = self._store = self._x[:0]
            self._answers, self._rows, self._asked = None, None, 0
            return
        model = self.substitute()
        sign = periodic_sign if "round_sign" in self.without else round_sign
        unit = 1 / STD if "normalised_step" in self.without else 1.0  # lam in pixels, not in normalised units
        lam = self.lam * unit * sign(self.round, self.tau)
        top1 = torch.as_tensor(self._y.argmax(1))
        if self.variant == "jb_top3":
            n = len(self._x) if 3 * len(self._x) + self._sent < self._budget else math.ceil(left / 3)
            xn = normalised(self._x[:n])
            with torch.no_grad():
                order = model(xn * STD + MEAN).argsort(1, descending=True)
            others = torch.stack([row[row != t][:3] for row, t in zip(order, top1[:n])])
            # per point its three classes in turn, as the code queries them
            steps = [xn + targeted_pgd(model, xn, others[:, k], lam, PGD_ALPHA * unit) for k in range(others.shape[1])]
            points = torch.stack(steps, 1).reshape(-1, *xn.shape[1:])
            self._queue = self._store = to_pixels(points)
            self._rows = None
        else:
            n = min(len(self._x), left)
            xn = normalised(self._x[:n])
            clamp = "pixels" if "normalised_clamp" in self.without else "normalised"
            toward = -1 if "away_from_label" in self.without else 1
            delta = fgsm_step(model, xn, top1[:n], toward * lam, clamp)
            self._store = to_pixels(xn + delta)
            self_query = self.variant == "jb_self" and "self_query" not in self.without
            self._queue = to_pixels(xn - delta) if self_query else self._store
            self._rows = None if "aliasing" in self.without else np.arange(n)  # None: the new points join D
        self._answers = np.full((len(self._queue), self.num_classes), np.nan, np.float32)
        self._asked = 0
        self.round += 1
        self.queries_per_round.append(len(self._queue))

"""DFME, data-free model extraction (Truong et al. 2021): no natural images at all.

A generator G turns noise into images; a student S learns to copy the victim V on them. Each iteration:
- generator phase (``generator_steps`` times): B images x = G(z), queried together with B x m perturbed copies
  x + step * u_i (u_i random unit directions). The disagreement L(x) = |S(x) - V(x)|_1 (mean over classes) has
  no gradient through the black-box V, so it is estimated by forward differences,
      grad_x L ~ (d / m) * sum_i (L(x + step * u_i) - L(x)) / step * u_i,
  and G takes an Adam step up that gradient (toward images where S and V disagree);
- student phase (``student_steps`` times): B fresh images G(z), queried; S takes an SGD step down L on them.
V's "logits" are recovered from its probabilities as mean-corrected log-probabilities, log p - mean(log p)
(the softmax is shift-invariant, so this is all an API leaks); S's logits are mean-corrected the same way.
Queries per iteration: B * (generator_steps * (m + 1) + student_steps).

The victim's API takes 8-bit images, so every query is rounded to the 256-level grid and the estimate uses the
displacement the victim actually saw (the rounded perturbed image minus the rounded base image). The paper's
step of 1e-3 (for float inputs) rounds away entirely at 8 bits (every perturbed query equals its base): the
default step is instead one gray level per pixel in root mean square, sqrt(C*H*W) / 255. ``stats()`` reports
the fraction of perturbed queries that rounded back onto their base.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from sim import models
from sim.errors import ConfigError
from sim.registry import Param, register
from sim.training import fixed_threads, to_float

from .base import Attack, AttackContext, TransferSet


class Generator(nn.Module):
    """Noise (N, nz) -> images (N, C, H, W) in [0, 1]: a linear map to (2w, H/4, W/4), two 2x upsampling
    convolution blocks with batch norm, a convolution to C channels and a tanh rescaled to [0, 1]."""

    def __init__(self, input_shape: tuple[int, int, int], nz: int = 100, width: int = 64):
        super().__init__()
        c, h, w = input_shape
        if h % 4 or w % 4:
            raise ConfigError(f"DFME's generator needs image sides divisible by 4, got {h}x{w}")
        self.nz, self.start = nz, (2 * width, h // 4, w // 4)
        self.fc = nn.Linear(nz, 2 * width * (h // 4) * (w // 4))
        self.body = nn.Sequential(
            nn.BatchNorm2d(2 * width),
            nn.Upsample(scale_factor=2), nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width),
            nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2), nn.Conv2d(2 * width, width, 3, padding=1), nn.BatchNorm2d(width),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width, c, 3, padding=1),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return (torch.tanh(self.body(self.fc(z).view(len(z), *self.start))) + 1) / 2


def mean_corrected_logits(probs: torch.Tensor) -> torch.Tensor:
    """log p - mean_k log p: the victim's logits up to the shift the softmax removes (p clamped away from 0)."""
    logp = probs.clamp_min(1e-8).log()
    return logp - logp.mean(1, keepdim=True)


def disagreement(student_logits: torch.Tensor, victim_probs: torch.Tensor) -> torch.Tensor:
    """Per image: mean over classes of |S - V| on mean-corrected logits."""
    s = student_logits - student_logits.mean(1, keepdim=True)
    return (s - mean_corrected_logits(victim_probs)).abs().mean(1)


def quantize(x: torch.Tensor) -> np.ndarray:
    return (x.detach() * 255).round().clamp(0, 255).to(torch.uint8).numpy()


class DFME:
    """A stepwise query source (``propose`` / ``observe`` / ``transfer_set``): the phases above, in order."""

    def __init__(self, input_shape: tuple[int, int, int], budget: int, *, arch: str, num_classes: int,
                 batch_size: int = 64, directions: int = 1, step: float | None = None, generator_steps: int = 1,
                 student_steps: int = 5, lr_student: float = 0.1, lr_generator: float = 1e-4, nz: int = 100,
                 seed: int = 0):
        self.input_shape = tuple(input_shape)
        self.dim = int(np.prod(self.input_shape))
        self.batch_size, self.directions = batch_size, directions
        self.step = math.sqrt(self.dim) / 255 if step is None else step
        self.generator_steps, self.student_steps = generator_steps, student_steps
        self._budget, self._sent = budget, 0
        self._gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.generator = Generator(self.input_shape, nz)
        self.student = models.build(arch, self.input_shape, num_classes)
        self._opt_g = torch.optim.Adam(self.generator.parameters(), lr=lr_generator)
        self._opt_s = torch.optim.SGD(self.student.parameters(), lr=lr_student, momentum=0.9, weight_decay=5e-4)
        self._phases_started = 0
        self._phase: dict | None = None  # the phase whose queries are out: kind, z, queries, answers
        self._queue = np.zeros((0, *self.input_shape), np.uint8)
        self.collected = TransferSet(self.input_shape)
        self.iterations = 0  # full iterations done
        self.generator_updates = self.student_updates = 0
        self._perturbed = self._unmoved = 0

    @property
    def queries_per_iteration(self) -> int:
        return self.batch_size * (self.generator_steps * (self.directions + 1) + self.student_steps)

    @property
    def remaining(self) -> int:
        return self._budget - self._sent

    def _next_phase(self) -> tuple[str, bool]:
        """The next phase's kind and whether it ends an iteration."""
        cycle = self.generator_steps + self.student_steps
        i = self._phases_started % cycle
        self._phases_started += 1
        return ("generator" if i < self.generator_steps else "student"), i == cycle - 1

    def _sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.randn(n, self.generator.nz, generator=self._gen)
        with torch.no_grad():
            self.generator.train()
            return z, self.generator(z)

    def _start_phase(self) -> None:
        kind, last = self._next_phase()
        b, m = self.batch_size, self.directions
        if kind == "generator" and self.remaining < b * (m + 1):  # the budget's tail: no room for a full estimate
            b = self.remaining // (m + 1)
            if b == 0:
                kind, b = "student", self.remaining
        if kind == "student":
            b = min(b, self.remaining)
        z, x = self._sample(b)
        base = quantize(x)
        queries = [base]
        if kind == "generator":
            u = torch.randn(b, m, self.dim, generator=self._gen)
            u = u / u.norm(dim=2, keepdim=True)
            moved = to_float(base).reshape(b, 1, self.dim) + self.step * u
            queries.append(quantize(moved.clamp(0, 1)).reshape(b * m, *self.input_shape))
        queries = np.concatenate(queries)
        self._phase = {"kind": kind, "last": last, "z": z, "b": b, "queries": queries, "probs": [], "answered": []}
        self._queue = queries

    def propose(self, n: int) -> np.ndarray:
        if not len(self._queue):
            self._start_phase()
        n = min(n, len(self._queue), self.remaining)
        x, self._queue = self._queue[:n], self._queue[n:]
        self._sent += n
        return x

    def observe(self, x: np.ndarray, probs: np.ndarray, answered: np.ndarray) -> None:
        self.collected.add(x, probs, answered)
        phase = self._phase
        phase["probs"].append(np.asarray(probs, np.float32))
        phase["answered"].append(np.asarray(answered, bool))
        if sum(len(a) for a in phase["answered"]) == len(phase["queries"]):
            probs, answered = np.concatenate(phase["probs"]), np.concatenate(phase["answered"])
            if phase["kind"] == "generator":
                self._generator_update(phase, probs, answered)
            else:
                self._student_update(phase, probs, answered)
            self.iterations += phase["last"]
            self._phase = None

    @fixed_threads
    def _generator_update(self, phase: dict, probs: np.ndarray, answered: np.ndarray) -> None:
        b, m = phase["b"], self.directions
        base_x, moved_x = to_float(phase["queries"][:b]), to_float(phase["queries"][b:])
        displacement = (moved_x.reshape(b, m, self.dim) - base_x.reshape(b, 1, self.dim))
        length = displacement.norm(dim=2)  # (b, m)
        self._perturbed += b * m
        self._unmoved += int((length == 0).sum())
        ok = answered[:b] & answered[b:].reshape(b, m).all(1)  # a refused query voids its image's estimate
        if ok.any():  # (a perturbation that rounded away has length 0 and adds nothing)
            p = torch.as_tensor(np.nan_to_num(probs))
            with torch.no_grad():
                self.student.eval()
                loss = disagreement(self.student(torch.cat([base_x, moved_x])), p)
            slope = (loss[b:].reshape(b, m) - loss[:b, None]) / length.clamp_min(1e-12)  # directional derivatives
            grad = (self.dim / m) * (slope[:, :, None] * displacement / length.clamp_min(1e-12)[:, :, None]).sum(1)
            grad = grad * torch.as_tensor(ok, dtype=grad.dtype)[:, None]
            self.generator.train()
            x = self.generator(phase["z"])
            self._opt_g.zero_grad(set_to_none=True)
            x.reshape(b, self.dim).backward(-grad / int(ok.sum()))  # ascend the disagreement
            self._opt_g.step()
            self.generator_updates += 1

    @fixed_threads
    def _student_update(self, phase: dict, probs: np.ndarray, answered: np.ndarray) -> None:
        if answered.any():
            self.student.train()
            x = to_float(phase["queries"][answered])
            loss = disagreement(self.student(x), torch.as_tensor(probs[answered])).mean()
            self._opt_s.zero_grad(set_to_none=True)
            loss.backward()
            self._opt_s.step()
            self.student_updates += 1

    def transfer_set(self) -> tuple[np.ndarray, np.ndarray]:
        return self.collected.arrays()

    def extracted(self) -> nn.Module:
        """The student: the model DFME itself extracts, which the paper scores (the replica is another model, trained
        afresh on every query DFME sent and its answer)."""
        return self.student.eval()

    def stats(self) -> dict:
        return {"iterations": self.iterations, "queries_per_iteration": self.queries_per_iteration,
                "generator_updates": self.generator_updates, "student_updates": self.student_updates,
                "step": round(self.step, 6),
                "unmoved_perturbations": round(self._unmoved / self._perturbed, 4) if self._perturbed else None}


@register("attack")
class DataFreeExtraction(Attack):
    """DFME (Truong et al. 2021), data-free: a generator's images, steered by a zeroth-order estimate of where
    the student and the victim disagree; each actor its own generator and student."""

    name = "dfme"
    params = {
        "dfme.batch": Param(64, int, low=1, help="generator images per step (B)"),
        "dfme.directions": Param(1, int, low=1, help="random directions per image of the gradient estimate (m)"),
        "dfme.step": Param(None, low=0, high=1, low_open=True,
                           help="forward-difference step, L2 norm in [0, 1] pixel units (unset: sqrt(C*H*W)/255, "
                                "one gray level RMS)"),
        "dfme.generator_steps": Param(1, int, low=1, help="generator updates per iteration"),
        "dfme.student_steps": Param(5, int, low=1, help="student updates per iteration"),
        "dfme.lr_student": Param(0.1, low=0, low_open=True, help="student SGD learning rate (momentum 0.9)"),
        "dfme.lr_generator": Param(1e-4, low=0, low_open=True, help="generator Adam learning rate"),
        "dfme.nz": Param(100, int, low=1, help="generator noise dimension"),
    }

    def sources(self, ctx: AttackContext) -> list:
        v = {k.removeprefix("dfme."): value for k, value in self.values.items()}
        return [DFME(ctx.dataset.input_shape, b, arch=ctx.arch, num_classes=ctx.dataset.num_classes,
                     batch_size=v["batch"], directions=v["directions"], step=v["step"],
                     generator_steps=v["generator_steps"], student_steps=v["student_steps"],
                     lr_student=v["lr_student"], lr_generator=v["lr_generator"], nz=v["nz"], seed=ctx.seed("dfme", i))
                for i, b in enumerate(ctx.budgets)]

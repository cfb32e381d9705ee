"""MAD and MAD-argmax prediction poisoning (Orekondy, Schiele, Fritz, ICLR 2020).

The attacker trains on the returned vector y~ and moves its weights along G^T y~, where
G = grad_w log F_sur(x; w) is the (K, D) Jacobian of a surrogate's log-probabilities. MAD returns
y~ = (1 - a) y + a y*, where the simplex vertex y* maximises the angular deviation
H(y~) = || G^T y~ / |G^T y~| - G^T y / |G^T y| ||^2 and a is chosen so that dist(y, y~) = eps
(or a = 1 when the vertex is closer than eps). MAD-argmax shortens each step so the top-1 label stays (this
project's search); with ``variant=mad_code`` it searches as the authors' code does instead (:func:`corner_poison`).

The paper's ablation is the ``objective`` parameter: ``identity`` replaces G by the identity (the vertex
farthest in angle from y itself, i.e. the least likely class) and ``random`` steps toward a vertex drawn at
random; both keep the same eps and interpolation, so only the choice of vertex differs from MAD.

Everything H needs is the Gram matrix M = G G^T (K x K per query): <G^T a, G^T b> = a^T M b.
- Over the last linear layer's weight (the default), row k of G is (e_k - p) (x) h, where p is the
  surrogate's softmax output and h the layer's input, so M = |h|^2 (I - 1 p^T - p 1^T + |p|^2 1 1^T).
  The |h|^2 factor cancels in every angle, so one batched surrogate forward pass gives M exactly.
- Over all parameters (``jacobian=all``) M comes from per-sample Jacobians (``torch.func``), in chunks.
:func:`reference_perturb` is the straightforward per-sample version (K autograd calls per query, an
explicit G), kept as the executable specification for tests and the benchmark.
"""

from __future__ import annotations

import copy
import functools
import itertools

import torch
from torch import nn

from ..errors import ConfigError
from ..registry import register
from ..training import device_of, to_float
from .base import Defense, Param, one_hot


def default_surrogate(victim: nn.Module, seed: int) -> nn.Module:
    """A copy of the victim's architecture with fresh, seeded random weights, frozen, in eval mode."""
    model = copy.deepcopy(victim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def last_linear(model: nn.Module) -> nn.Linear:
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not layers:
        raise ValueError(f"MAD with jacobian=last_layer needs a surrogate with an nn.Linear layer; "
                         f"{type(model).__name__} has none (use jacobian=all)")
    return layers[-1]


def last_layer_gram(surrogate: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """M / |h|^2 for G over the last linear layer's weight, (N, K, K) float64."""
    with torch.inference_mode():
        p = torch.softmax(surrogate(to_float(x).to(device_of(surrogate))), dim=1).to(torch.float64).cpu()
    k = p.shape[1]
    if last_linear(surrogate).out_features != k:
        raise ValueError(f"MAD with jacobian=last_layer needs the surrogate's last nn.Linear to be its output layer "
                         f"({k} classes), but it has {last_linear(surrogate).out_features} outputs (use jacobian=all)")
    eye = torch.eye(k, dtype=p.dtype)
    sq = (p * p).sum(1)[:, None, None]
    return eye - p[:, None, :] - p[:, :, None] + sq


def full_gram(surrogate: nn.Module, x: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    """M = G G^T with G over all parameters, from per-sample Jacobians, (N, K, K) float64."""
    from torch.func import functional_call, jacrev, vmap

    params = {name: p.detach() for name, p in surrogate.named_parameters()}
    buffers = dict(surrogate.named_buffers())

    def log_probs(prm, xi):
        return torch.log_softmax(functional_call(surrogate, (prm, buffers), (xi[None],)), dim=1)[0]

    jac_fn = vmap(jacrev(log_probs), in_dims=(None, 0))
    xf = to_float(x).to(device_of(surrogate))
    out = []
    with torch.enable_grad():
        for start in range(0, len(xf), chunk):
            jac = jac_fn(params, xf[start:start + chunk])
            grams = [j.flatten(2).to(torch.float64) for j in jac.values()]
            out.append(sum(g @ g.transpose(1, 2) for g in grams).cpu())
    return torch.cat(out)


def vertex_distances(y: torch.Tensor, norm: str) -> torch.Tensor:
    """dist(y, e_j) for every vertex j, (N, K)."""
    if norm == "l1":  # |1 - y_j| + sum of the others (exact even when float rounding left sum(y) != 1)
        return 1 + y.sum(1, keepdim=True) - 2 * y
    return ((y * y).sum(1, keepdim=True) - 2 * y + 1).clamp_min(0).sqrt()


def deviations(gram: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """H(e_j) for every vertex j, (N, K): 2 - 2 cos(G^T e_j, G^T y)."""
    my = (gram @ y[:, :, None])[:, :, 0]
    yy = (y * my).sum(1, keepdim=True)
    diag = gram.diagonal(dim1=1, dim2=2)
    cos = my / (diag * yy).clamp_min(1e-300).sqrt()
    return 2 - 2 * cos


TOP1_MARGIN = 1e-5  # MAD-argmax keeps the top-1 value at least this far above every other


def poison(gram: torch.Tensor | None, y: torch.Tensor, eps: float, norm: str, keep_top1: bool,
           pick: torch.Tensor | None = None) -> torch.Tensor:
    """The extreme-point oracle plus the interpolation, batched.

    MAD picks the vertex with the largest H(e_j), then steps toward it until dist = eps. MAD-argmax
    first shortens each step toward e_j to where the top-1 label would still hold, then picks the
    candidate point with the largest H (evaluated at that point, through M) and returns it. Given ``pick``
    (N,) the vertices are those instead (``gram`` is then unused), with the same step length and cap.
    """
    n, k = y.shape
    dv = vertex_distances(y, norm)
    alpha = torch.where(dv > eps, eps / dv.clamp_min(1e-300), torch.ones_like(dv))
    if pick is not None:
        j = pick
        if keep_top1:
            top = y.argmax(1, keepdim=True)
            gap = y.gather(1, top) - y
            cap = ((gap - TOP1_MARGIN) / (1 + gap)).clamp_min(0)
            alpha = torch.where(torch.arange(k)[None, :] == top, alpha, torch.minimum(alpha, cap))
    elif not keep_top1:
        j = deviations(gram, y).argmax(1)
    else:
        top = y.argmax(1, keepdim=True)
        gap = y.gather(1, top) - y
        cap = ((gap - TOP1_MARGIN) / (1 + gap)).clamp_min(0)  # (1-a)*gap - a > margin  <=>  a < cap
        alpha = torch.where(torch.arange(k)[None, :] == top, alpha, torch.minimum(alpha, cap))
        my = (gram @ y[:, :, None])[:, :, 0]
        yy = (y * my).sum(1, keepdim=True)
        diag = gram.diagonal(dim1=1, dim2=2)
        dot = (1 - alpha) * yy + alpha * my  # <G^T y~_j, G^T y>
        sq = (1 - alpha) ** 2 * yy + 2 * alpha * (1 - alpha) * my + alpha ** 2 * diag  # |G^T y~_j|^2
        j = (dot / (sq * yy).clamp_min(1e-300).sqrt()).argmin(1)  # largest H = smallest cosine
    a = alpha.gather(1, j[:, None])
    return (1 - a) * y + a * one_hot(j, k, y)


def _cosines(gram: torch.Tensor, y: torch.Tensor, cands: torch.Tensor) -> torch.Tensor:
    """cos(G^T c, G^T y) for every candidate c of ``cands`` (N, C, K): (N, C), +inf where G^T c vanishes."""
    my = (gram @ y[:, :, None])[:, :, 0]
    yy = (y * my).sum(1, keepdim=True)
    cc = ((cands @ gram) * cands).sum(2)
    cos = (cands @ my[:, :, None])[:, :, 0] / (cc * yy).clamp_min(1e-300).sqrt()
    return torch.where(cc > 0, cos, torch.full_like(cos, float("inf")))


@functools.lru_cache(maxsize=4)
def _subsets(k: int) -> torch.Tensor:
    """For each class t, the 0/1 rows over k classes that hold t, in the order ``itertools.product`` lists them:
    (k, 2**(k-1), k)."""
    rows = torch.tensor(list(itertools.product((0.0, 1.0), repeat=k)), dtype=torch.float64)
    return torch.stack([rows[rows[:, t] > 0] for t in range(k)])


def _corners(sets: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """The argmax-preserving corners of 0/1 rows ``sets`` (N, C, K) that hold each query's ``top`` class: the uniform
    mix of the set, its top class raised by TOP1_MARGIN so that it stays the strict top, as the authors' code makes
    them."""
    out = sets.clone()
    out.scatter_add_(2, top[:, None, None].expand(-1, out.shape[1], 1), torch.full_like(out[:, :, :1], TOP1_MARGIN))
    return out / out.sum(2, keepdim=True)


EXHAUSTIVE_UP_TO = 10  # classes up to which the authors' code tries every corner (2**(K-1) of them)
GREEDY_CANDIDATES = 1024  # corners the greedy search of larger K scores at most, as the code's max_iters


def corner_poison(gram: torch.Tensor, y: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """MAD-argmax as the MAD authors' code computes it (``bb_mad.py``, ``oracle_argmax_preserving``, ``objmax``): y* is
    the corner of the region where the top class still wins (the uniform mix of the top class with a subset of the
    others) whose G^T y* deviates most from G^T y, tried over every subset up to 10 classes and grown greedily one
    class at a time beyond (until some 1,024 corners are scored, or every class is in); then the closed-form step
    a = min(1, eps / (dist(y, y*) + 1e-7)) spends the whole budget where the corner is farther. Batched over queries.

    Two quirks of the code are kept: the greedy search scores against y + 1e-8, renormalised (its guard against
    underflow); and the step's 1e-7. One is not: the code's greedy loop fails once every class is in before 1,024
    corners (K from 11 to 45), where this one stops with the best corner so far."""
    n, k = y.shape
    top = y.argmax(1)
    if k <= EXHAUSTIVE_UP_TO:
        cands = _corners(_subsets(k)[top], top)
        best = cands[torch.arange(n), _cosines(gram, y, cands).argmin(1)]  # largest H, the first of ties
    else:
        scored = (y + 1e-8) / (y + 1e-8).sum(1, keepdim=True)
        chosen = torch.zeros(n, k, dtype=torch.bool).scatter_(1, top[:, None], True)
        best, best_cos, tried = torch.zeros_like(y), torch.full((n,), float("inf"), dtype=y.dtype), 0
        while tried < GREEDY_CANDIDATES and not chosen.all():
            rest = (~chosen).nonzero()[:, 1].view(n, -1)  # each query's classes not yet in, in order
            sets = chosen.to(y.dtype)[:, None, :].repeat(1, rest.shape[1], 1).scatter_(2, rest[:, :, None], 1.0)
            cands = _corners(sets, top)
            cos = _cosines(gram, scored, cands)
            i = cos.argmin(1)
            c = cos.gather(1, i[:, None])[:, 0]
            better = c < best_cos
            best[better] = cands[better, i[better]]
            best_cos = torch.minimum(best_cos, c)
            chosen.scatter_(1, rest.gather(1, i[:, None]), True)
            tried += rest.shape[1]
    dist = (best - y).abs().sum(1) if norm == "l1" else (best - y).norm(dim=1)
    a = (eps / (dist + 1e-7)).clamp(0, 1)[:, None]
    return (1 - a) * y + a * best


@register("defense")
class MAD(Defense):
    """MAD prediction poisoning (Orekondy et al. 2020): a step of length eps toward the simplex vertex that
    maximises the angular deviation of a surrogate's gradient."""

    name = "mad"
    keep_top1 = False
    needs_inputs = True
    params = {"eps": Param(1.0, low=0, help="distance budget per answer"),
              "norm": Param("l1", str, choices=("l1", "l2"), help="distance the budget is measured in"),
              "jacobian": Param("last_layer", str, choices=("last_layer", "all"),
                                help="the surrogate's parameters the gradient is taken over (objective=angle)"),
              "seed": Param(0, int, low=0, help="seed of the surrogate's random weights (a copy of the victim's "
                                                "architecture) and of objective=random's draws"),
              "objective": Param("angle", str, choices=("angle", "identity", "random"),
                                 help="how the vertex is chosen: angle (MAD: the surrogate gradient's largest "
                                      "angular deviation), identity (the same with the Jacobian replaced by the "
                                      "identity) or random (a vertex drawn at random); the paper's ablation")}
    neutral = {"eps": 0.0}

    @classmethod
    def _inert(cls, values: dict) -> dict[str, str]:
        return {} if values["objective"] == "angle" else {"jacobian": "objective=angle"}

    def __init__(self, surrogate: nn.Module | None = None, victim: nn.Module | None = None, **params):
        self._given, self._victim = surrogate, victim
        self.surrogate: nn.Module | None = None
        self._seed_built: int | None = None
        super().__init__(**params)

    def _configure(self):
        if self._given is not None:
            self.surrogate = self._given.eval()
        elif self._victim is not None and self._seed_built != self.values["seed"]:
            self.surrogate = default_surrogate(self._victim, self.values["seed"]).to(self.device)
            self._seed_built = self.values["seed"]
        if self.surrogate is not None and self.values["jacobian"] == "last_layer":
            last_linear(self.surrogate)
        self._gen = torch.Generator().manual_seed(self.values["seed"])

    def gram(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.surrogate is None:
            raise ValueError(f"defense {self.name} needs a surrogate model: build({self.name!r}, surrogate=net) "
                             f"or victim=net for a randomly initialised copy of it")
        if self.values["jacobian"] == "last_layer":
            return last_layer_gram(self.surrogate, inputs)
        return full_gram(self.surrogate, inputs)

    def objective_gram(self, y: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """The Gram matrix the vertex is chosen by: the surrogate's (objective=angle) or the identity's."""
        n, k = y.shape
        return self.gram(inputs) if self.values["objective"] == "angle" else torch.eye(k, dtype=y.dtype).expand(n, k, k)

    def search(self, y: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """The poisoned answers, before MAD-argmax's float32 check."""
        n, k = y.shape
        if self.values["objective"] == "random":
            pick = torch.randint(k, (n,), generator=self._gen)
            return poison(None, y, self.values["eps"], self.values["norm"], self.keep_top1, pick=pick)
        return poison(self.objective_gram(y, inputs), y, self.values["eps"], self.values["norm"], self.keep_top1)

    def _perturb(self, y, inputs):
        out = self.search(y, inputs)
        if self.keep_top1:  # a near-tie could still flip once rounded to float32: answer those clean
            flipped = out.float().argmax(1) != y.float().argmax(1)
            out[flipped] = y[flipped]
        return out


@register("defense")
class MADArgmax(MAD):
    """MAD-argmax: MAD restricted to the steps that keep the top-1 label."""

    name = "mad_argmax"
    keep_top1 = True
    params = {**MAD.params,
              "variant": Param("default", str, choices=("default", "mad_code"),
                               help="default: steps toward each vertex, shortened where the top-1 label would flip "
                                    "(this project's search); mad_code: the MAD authors' code, the corners of the "
                                    "region where the top class wins, each step spending the whole eps")}

    @classmethod
    def _check_params(cls, values: dict, owner: str) -> None:
        if values["variant"] == "mad_code" and values["objective"] == "random":
            raise ConfigError(f"{owner}.variant=mad_code has no objective=random (the MAD authors' code draws its "
                              f"random vertex without keeping the top-1 label); expected objective=angle or identity, "
                              f"or variant=default")

    def search(self, y: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        if self.values["variant"] == "default":
            return super().search(y, inputs)
        return corner_poison(self.objective_gram(y, inputs), y, self.values["eps"], self.values["norm"])


def reference_perturb(y: torch.Tensor, inputs: torch.Tensor, surrogate: nn.Module, eps: float,
                      norm: str = "l1", keep_top1: bool = False, jacobian: str = "last_layer",
                      corners: bool = False) -> torch.Tensor:
    """One query at a time with an explicit Jacobian G (K autograd calls), as the paper's reference
    code does; returns float64 (N, K). Slow by design: the specification for :class:`MAD`. ``corners``: MAD-argmax as
    the authors' code searches (:func:`corner_poison`; up to 10 classes, every corner)."""
    params = ([last_linear(surrogate).weight] if jacobian == "last_layer"
              else list(surrogate.parameters()))
    flags = [p.requires_grad for p in params]
    y = y.to(torch.float64)
    k = y.shape[1]
    out = torch.empty_like(y)
    for i in range(len(y)):
        with torch.enable_grad():
            for p in params:
                p.requires_grad_(True)
            logp = torch.log_softmax(surrogate(to_float(inputs[i:i + 1])), dim=1)[0]
            rows = []
            for c in range(k):
                grads = torch.autograd.grad(logp[c], params, retain_graph=c < k - 1)
                rows.append(torch.cat([g.reshape(-1) for g in grads]).to(torch.float64))
        g = torch.stack(rows)  # (K, D)
        u = g.T @ y[i]
        u = u / u.norm().clamp_min(1e-300)
        best, best_h = None, float("-inf")
        top = int(y[i].argmax())
        if corners:  # every subset of classes holding the top one, in itertools.product's order; H at the corner
            for bits in itertools.product((0.0, 1.0), repeat=k):
                if bits[top] == 0:
                    continue
                corner = torch.tensor(bits, dtype=torch.float64)
                corner[top] += TOP1_MARGIN
                corner = corner / corner.sum()
                v = g.T @ corner
                h = float(((v / v.norm().clamp_min(1e-300)) - u).pow(2).sum())
                if h > best_h:
                    best, best_h = corner, h
            d = (best - y[i]).abs().sum() if norm == "l1" else (best - y[i]).norm()
            a = min(1.0, max(0.0, eps / (float(d) + 1e-7)))
            out[i] = (1 - a) * y[i] + a * best
            continue
        for j in range(k):
            vertex = torch.zeros(k, dtype=torch.float64)
            vertex[j] = 1.0
            d = (vertex - y[i]).abs().sum() if norm == "l1" else (vertex - y[i]).norm()
            a = 1.0 if d <= eps else eps / float(d)
            if keep_top1 and j != top:  # the longest step toward e_j that keeps the top-1 label
                gap = float(y[i, top] - y[i, j])
                a = min(a, max(0.0, (gap - TOP1_MARGIN) / (1 + gap)))
            cand = (1 - a) * y[i] + a * vertex
            v = g.T @ (cand if keep_top1 else vertex)  # MAD-argmax judges the point it would return
            h = float(((v / v.norm().clamp_min(1e-300)) - u).pow(2).sum())
            if h > best_h:
                best, best_h = cand, h
        out[i] = best
    for p, flag in zip(params, flags):
        p.requires_grad_(flag)
    return out

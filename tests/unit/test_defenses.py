"""Output defenses: property tests over random probability batches, MAD against a brute-force oracle."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from sim import defenses, registry
from sim.defenses.mad import poison, reference_perturb
from sim.errors import ConfigError

SHAPE = (1, 4, 4)  # tiny images: the surrogate and misinformation models here are small MLPs
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def tiny_net(k: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, k)).eval()


def make(name: str, classes: int, **params) -> defenses.Defense:
    return defenses.build(name, victim=tiny_net(classes), misinformation=tiny_net(classes, seed=1), **params)


@st.composite
def batches(draw, min_k=2, max_k=12):  # also exact one-hot rows, ties and float32 rounding
    """A batch of probability vectors (from logits at a random temperature, so some are near one-hot)
    and matching uint8 images."""
    n = draw(st.integers(1, 16))
    k = draw(st.integers(min_k, max_k))
    seed = draw(st.integers(0, 2**31 - 1))
    temp = draw(st.sampled_from([0.3, 1.0, 3.0, 10.0]))
    gen = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(n, k, generator=gen) * temp, dim=1)
    if draw(st.booleans()):  # exact one-hot rows and exact ties, the edges of the simplex
        probs[0] = torch.nn.functional.one_hot(torch.tensor(k - 1), k).float()
        if n > 1:
            probs[1] = torch.full((k,), 1.0 / k)
    images = torch.randint(0, 256, (n, *SHAPE), generator=gen, dtype=torch.uint8)
    return probs, images


def assert_on_simplex(out: torch.Tensor):
    assert torch.isfinite(out).all()
    assert (out >= 0).all()
    torch.testing.assert_close(out.double().sum(1), torch.ones(len(out), dtype=torch.float64), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", defenses.names())
@SETTINGS
@given(batch=batches())
def test_every_defense_returns_probability_vectors_of_the_same_shape(name, batch):
    probs, images = batch
    out = make(name, probs.shape[1])(probs, images)
    assert out.shape == probs.shape and out.dtype == probs.dtype
    assert_on_simplex(out)
    if name == "labels_only":
        assert torch.equal(out, torch.nn.functional.one_hot(probs.argmax(1), probs.shape[1]).float())


@pytest.mark.parametrize("name", defenses.names())
@SETTINGS
@given(batch=batches())
def test_same_seed_same_answers(name, batch):
    probs, images = batch
    a = make(name, probs.shape[1])(probs, images)
    b = make(name, probs.shape[1])(probs, images)
    assert torch.equal(a, b)


def test_only_the_defenses_no_setting_makes_the_identity_lack_a_neutral_one():
    built_in = [n for n in defenses.names() if registry.is_builtin("defense", n)]
    assert {n for n in built_in if defenses.get(n).neutral is None} == {"labels_only", "rounding"}


@pytest.mark.parametrize("name", sorted(n for n in defenses.names() if defenses.get(n).neutral is not None))
@SETTINGS
@given(batch=batches())
def test_zero_strength_is_the_identity(name, batch):
    probs, images = batch
    neutral = defenses.get(name).neutral
    out = make(name, probs.shape[1], **neutral)(probs, images)
    torch.testing.assert_close(out, probs, atol=1e-6, rtol=0)


def test_numpy_in_numpy_out():
    probs = np.array([[0.7, 0.2, 0.1]], np.float32)
    out = defenses.build("top_k", k=2)(probs)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.7 / 0.9, 0.2 / 0.9, 0.0]], rtol=1e-6)


# -- parameter validation ----------------------------------------------------------------------

@pytest.mark.parametrize("name,params,message", [
    ("top_k", {"k": 0}, "top_k.k must be an integer >= 1, got 0"),
    ("top_k", {"k": 1.5}, "top_k.k must be an integer >= 1, got 1.5"),
    ("rounding", {"decimals": 7}, r"rounding.decimals must be an integer in \[0, 6\], got 7"),
    ("rounding", {"renormalize": "yes"}, "rounding.renormalize must be true or false, got 'yes'"),
    ("reverse_sigmoid", {"beta": -0.1}, "reverse_sigmoid.beta must be a number >= 0, got -0.1"),
    ("reverse_sigmoid", {"gamma": 0}, "reverse_sigmoid.gamma must be a number > 0, got 0"),
    ("random_noise", {"norm": "linf"}, "random_noise.norm must be one of: l1, l2, got 'linf'"),
    ("random_noise", {"eps": float("nan")}, "random_noise.eps must be a number >= 0, got nan"),
    ("mad", {"eps": -0.5}, "mad.eps must be a number >= 0, got -0.5"),
    ("mad_argmax", {"jacobian": "first"}, "mad_argmax.jacobian must be one of: last_layer, all, got 'first'"),
    ("adaptive_misinformation", {"tau": 1.5}, r"adaptive_misinformation.tau must be a number in \[0, 1\], got 1.5"),
    ("confidence_gated", {"sharpness": -1}, "confidence_gated.sharpness must be a number > 0, got -1"),
    ("mad", {"epsilon": 1}, "mad.epsilon is not a parameter of defense mad; expected one of: eps, norm"),
    ("identity", {"eps": 1}, "identity.eps is not a parameter of defense identity; expected one of: none"),
    ("top_k", {"k": float("inf")}, "top_k.k must be an integer >= 1, got inf"),
    ("mad", {"seed": float("nan")}, "mad.seed must be an integer >= 0, got nan"),
])
def test_bad_parameters_are_one_line_errors_at_construction_and_on_set_params(name, params, message):
    with pytest.raises(ConfigError, match=message):
        defenses.build(name, **params)
    d = defenses.build(name)
    before = dict(d.values)
    with pytest.raises(ConfigError, match=message):
        d.set_params(**params)
    assert d.values == before  # nothing changed


def test_set_params_changes_the_answer():
    probs = torch.tensor([[0.5, 0.3, 0.2]])
    d = defenses.build("top_k", k=1)
    assert (d(probs) > 0).sum() == 1
    d.set_params(k=2)
    assert (d(probs) > 0).sum() == 2


def test_set_params_is_all_or_nothing_even_when_the_new_setting_cannot_be_applied():
    conv_only = nn.Sequential(nn.Conv2d(1, 3, 4), nn.Flatten()).eval()  # 3 outputs, no nn.Linear
    d = defenses.build("mad", surrogate=conv_only, jacobian="all", eps=0.5)
    with pytest.raises(ValueError, match="needs a surrogate with an nn.Linear layer"):
        d.set_params(jacobian="last_layer", eps=0.3)
    assert d.values["jacobian"] == "all" and d.values["eps"] == 0.5
    x = torch.randint(0, 256, (2, *SHAPE), dtype=torch.uint8)
    assert d(torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]]), x).shape == (2, 3)


def test_integer_probabilities_are_refused_not_truncated():
    with pytest.raises(ValueError, match="probs must be floating point, got torch.int64"):
        defenses.build("reverse_sigmoid")(np.array([[1, 0, 0]]))


def test_defenses_that_need_images_or_models_say_so():
    probs = torch.tensor([[0.5, 0.3, 0.2]])
    with pytest.raises(ValueError, match="needs the queries' images"):
        defenses.build("mad")(probs)
    with pytest.raises(ValueError, match="needs a surrogate model"):
        defenses.build("mad")(probs, torch.zeros(1, *SHAPE, dtype=torch.uint8))
    with pytest.raises(ValueError, match="needs its misinformation model"):
        defenses.build("adaptive_misinformation")(probs, torch.zeros(1, *SHAPE, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"shape \(N, K\) with K >= 2"):
        defenses.build("identity")(torch.ones(3))


# -- the simple defenses -----------------------------------------------------------------------

@SETTINGS
@given(batch=batches(), k=st.integers(1, 5))
def test_top_k_keeps_the_k_largest_in_proportion(batch, k):
    probs, _ = batch
    out = defenses.build("top_k", k=k)(probs)
    kept = out > 0
    assert (kept.sum(1) <= k).all()
    top = probs.topk(min(k, probs.shape[1]), dim=1).indices
    assert kept.gather(1, top).all() | (probs.gather(1, top) == 0).any()
    ratio = out[kept] / probs[kept]
    rows = kept.nonzero()[:, 0]
    for r in rows.unique():  # one common scale factor per row
        torch.testing.assert_close(ratio[rows == r], ratio[rows == r][:1].expand(int((rows == r).sum())))


@SETTINGS
@given(batch=batches(), decimals=st.integers(0, 4))
def test_rounding_returns_multiples_of_the_unit(batch, decimals):
    probs, _ = batch
    unit = 10.0 ** -decimals
    out = defenses.build("rounding", decimals=decimals)(probs.double())
    assert torch.allclose(out / unit, torch.round(out / unit), atol=1e-6)
    assert ((out - probs.double()).abs() < unit + 1e-9).all()  # never more than one unit off
    plain = defenses.build("rounding", decimals=decimals, renormalize=False)(probs.double())
    torch.testing.assert_close(plain, torch.round(probs.double() / unit) * unit)


def test_reverse_sigmoid_matches_its_formula_and_handles_exact_zeros_and_ones():
    y = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.3, 0.1]], dtype=torch.float64)
    out = defenses.build("reverse_sigmoid", beta=0.5, gamma=2.0)(y)
    assert_on_simplex(out)
    p = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    raw = (p - 0.5 * (torch.sigmoid(2.0 * torch.log(p / (1 - p))) - 0.5)).clamp_min(0)
    torch.testing.assert_close(out[1], raw / raw.sum())


def test_reverse_sigmoid_divided_by_its_sum_can_leave_the_simplex_where_clamping_cannot():
    """y = (0.9, 0.1), beta 3, gamma 1: sigmoid(logit(y)) = y, so y - 3 (y - 1/2) = (-0.3, 1.3), which sums to 1."""
    y = torch.tensor([[0.9, 0.1]], dtype=torch.float64)
    summed = defenses.build("reverse_sigmoid", beta=3.0, gamma=1.0, normalize="sum")(y)
    torch.testing.assert_close(summed, torch.tensor([[-0.3, 1.3]], dtype=torch.float64))  # sums to 1, not >= 0
    clamped = defenses.build("reverse_sigmoid", beta=3.0, gamma=1.0)(y)
    torch.testing.assert_close(clamped, torch.tensor([[0.0, 1.0]], dtype=torch.float64))  # a probability vector


@pytest.mark.parametrize("norm", ["l1", "l2"])
@SETTINGS
@given(batch=batches(), eps=st.floats(0.01, 1.5))
def test_random_noise_moves_eps_unless_the_simplex_edge_comes_first(batch, eps, norm):
    probs, images = batch
    out = defenses.build("random_noise", eps=eps, norm=norm)(probs.double(), images)
    d = (out - probs).abs().sum(1) if norm == "l1" else (out - probs).norm(dim=1)
    assert_on_simplex(out)
    assert (d <= eps + 1e-6).all()
    at_edge = ((out <= 1e-9) & (out < probs.double())).any(1)  # a coordinate was driven to (about) 0
    # a row at a vertex (within rounding) gives the noise no direction to move it in: unmoved, as only such a row may be
    unmoved = ((out - probs.double()).abs().sum(1) < 1e-6) & (probs.double().max(1).values > 1 - 1e-4)
    assert torch.all(((d - eps).abs() < 1e-6) | at_edge | unmoved)


@pytest.mark.parametrize("variant", ["simplex", "mad_code"])
def test_random_noise_answers_a_query_the_same_whatever_its_batch_and_order(variant):
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(6, 5, generator=gen), 1)
    images = torch.randint(0, 256, (6, *SHAPE), generator=gen, dtype=torch.uint8)
    d = defenses.build("random_noise", eps=0.3, seed=3, variant=variant)
    first = d(probs, images)
    order = torch.tensor([5, 2, 0, 4, 1, 3])
    torch.testing.assert_close(d(probs[order], images[order]), first[order], atol=0, rtol=0)  # any arrival order
    torch.testing.assert_close(d(probs[2:3], images[2:3]), first[2:3], atol=0, rtol=0)  # alone, or repeated
    assert not torch.equal(first[0] - probs[0], first[1] - probs[1])  # other queries, other noise
    images_as_floats = images.double() / 255  # the same image given in [0, 1]
    torch.testing.assert_close(d(probs, images_as_floats), first, atol=0, rtol=0)
    assert not torch.equal(defenses.build("random_noise", eps=0.3, seed=4, variant=variant)(probs, images), first)


def test_random_noise_mad_code_is_uniform_logit_noise_projected_onto_the_l1_ball():
    """The MAD code's random noise, worked by hand from the query's uniform draws u: noise u * 2 eps / K in logit
    space (inside the eps ball here: its length is at most 2 eps), projected onto the L1 ball of eps, then
    sigmoid and division by the sum."""
    from sim.defenses.base import query_rngs

    y = torch.tensor([[0.7, 0.2, 0.1]], dtype=torch.float64)
    x = torch.zeros(1, *SHAPE, dtype=torch.uint8)
    eps, k = 0.6, 3
    u = torch.as_tensor(query_rngs(x, 0)[0].random(k))
    noise = u * 2 * eps / k
    if noise.sum() > eps:  # the projection: equal shrinkage of every coordinate, none reaching 0 here
        noise = noise - (noise.sum() - eps) / k
        assert (noise > 0).all()
    z = torch.log(y / (1 - y)) + noise
    expected = torch.sigmoid(z) / torch.sigmoid(z).sum()
    torch.testing.assert_close(defenses.build("random_noise", eps=eps, variant="mad_code")(y, x), expected)
    assert torch.equal(defenses.build("random_noise", eps=0.0, variant="mad_code")(y, x), y)


def test_l1_ball_projection_on_hand_worked_rows():
    from sim.defenses.basic import project_l1_ball

    v = torch.tensor([[3.0, -1.0, 0.0], [1.0, 1.0, 1.0], [0.2, -0.3, 0.1]], dtype=torch.float64)
    out = project_l1_ball(v, 1.5)
    # |v| sorted (3, 1, 0): only the first stays above theta = 1.5, so (1.5, 0, 0); (1, 1, 1): theta 0.5; inside
    torch.testing.assert_close(out, torch.tensor([[1.5, 0.0, 0.0], [0.5, 0.5, 0.5], [0.2, -0.3, 0.1]],
                                                 dtype=torch.float64))


def test_confidence_gated_leaves_confident_answers_and_perturbs_unsure_ones():
    y = torch.tensor([[0.99, 0.005, 0.005], [0.5, 0.3, 0.2]], dtype=torch.float64)
    out = defenses.build("confidence_gated", beta=0.9, rs_beta=0.7)(y)
    assert (out[0] - y[0]).abs().sum() < 1e-6
    assert (out[1] - y[1]).abs().sum() > 0.05


def test_adaptive_misinformation_mixes_in_the_misinformation_model_when_unsure():
    mis = tiny_net(3, seed=1)
    x = torch.randint(0, 256, (2, *SHAPE), dtype=torch.uint8)
    y = torch.tensor([[0.98, 0.01, 0.01], [0.4, 0.3, 0.3]], dtype=torch.float64)
    out = defenses.build("adaptive_misinformation", misinformation=mis, tau=0.5, nu=1000)(y, x)
    y_mis = torch.softmax(mis(x.float() / 255), 1).double()
    torch.testing.assert_close(out[0], y[0], atol=1e-9, rtol=0)  # confident: h ~ 0
    torch.testing.assert_close(out[1], y_mis[1], atol=1e-9, rtol=0)  # unsure: h ~ 1


# -- MAD ---------------------------------------------------------------------------------------

def explicit_jacobian(model: nn.Module, x: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """G (K, D) for one image, row by row with torch.autograd."""
    logp = torch.log_softmax(model(x[None].float() / 255), dim=1)[0]
    rows = []
    for k in range(len(logp)):
        grads = torch.autograd.grad(logp[k], params, retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in grads]).double())
    return torch.stack(rows)


def angular_deviation(g: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    u, v = g.T @ a, g.T @ b
    return float((u / u.norm() - v / v.norm()).pow(2).sum())


@pytest.mark.parametrize("jacobian", ["last_layer", "all"])
@SETTINGS
@given(batch=batches(max_k=8), eps=st.floats(0.05, 2.0))
def test_mad_picks_the_vertex_of_largest_angular_deviation(batch, eps, jacobian):
    probs, images = batch
    k = probs.shape[1]
    surrogate = tiny_net(k, seed=7)
    for p in surrogate.parameters():
        p.requires_grad_(True)
    params = [surrogate[-1].weight] if jacobian == "last_layer" else list(surrogate.parameters())
    out = defenses.build("mad", surrogate=surrogate, eps=eps, jacobian=jacobian)(probs.double(), images)
    y = probs.double()
    eye = torch.eye(k, dtype=torch.float64)
    for i in range(len(y)):
        g = explicit_jacobian(surrogate, images[i], params)
        h = [angular_deviation(g, eye[j], y[i]) for j in range(k)]
        step = out[i] - y[i]
        if step.abs().sum() < 1e-12:  # y is already the chosen vertex
            continue
        chosen = int(step.argmax())  # the only coordinate that grows is the vertex's
        assert h[chosen] >= max(h) - 1e-6


@pytest.mark.parametrize("norm", ["l1", "l2"])
@SETTINGS
@given(batch=batches(), eps=st.floats(0.0, 2.0))
def test_mad_distance_is_eps_unless_the_vertex_is_closer(batch, eps, norm):
    probs, images = batch
    y = probs.double()
    out = make("mad", probs.shape[1], eps=eps, norm=norm)(y, images)
    d = (out - y).abs().sum(1) if norm == "l1" else (out - y).norm(dim=1)
    is_vertex = (out.max(1).values > 1 - 1e-9)
    assert torch.all(((d - eps).abs() < 1e-9) | (is_vertex & (d <= eps + 1e-9)))


@pytest.mark.parametrize("norm", ["l1", "l2"])
@SETTINGS
@given(batch=batches(), eps=st.floats(0.0, 2.0))
def test_mad_argmax_never_changes_the_top1_label(batch, eps, norm):
    probs, images = batch
    out = make("mad_argmax", probs.shape[1], eps=eps, norm=norm)(probs, images)
    assert torch.equal(out.argmax(1), probs.argmax(1))
    d = (out - probs).double().abs().sum(1) if norm == "l1" else (out - probs).double().norm(dim=1)
    assert (d <= eps + 1e-5).all()


@pytest.mark.parametrize("name", ["mad", "mad_argmax"])
@pytest.mark.parametrize("objective", ["identity", "random"])
@SETTINGS
@given(batch=batches(), eps=st.floats(0.0, 2.0))
def test_the_ablation_objectives_keep_the_simplex_and_the_budget(name, objective, batch, eps):
    probs, images = batch
    y = probs.double()
    out = make(name, probs.shape[1], eps=eps, objective=objective)(y, images)
    assert_on_simplex(out)
    d = (out - y).abs().sum(1)
    is_vertex = out.max(1).values > 1 - 1e-9
    if name == "mad":
        assert torch.all(((d - eps).abs() < 1e-9) | (is_vertex & (d <= eps + 1e-9)))
    else:
        assert torch.equal(out.argmax(1), y.argmax(1)) and (d <= eps + 1e-9).all()


def test_identity_objective_steps_toward_the_least_likely_class_and_random_draws_vary():
    y = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.05, 0.75]], dtype=torch.float64)
    images = torch.zeros(2, *SHAPE, dtype=torch.uint8)
    out = make("mad", 3, eps=0.2, objective="identity")(y, images)
    assert (out - y).argmax(1).tolist() == [2, 1]
    draws = make("mad", 30, eps=0.1, objective="random", seed=3)
    y = torch.full((200, 30), 1 / 30, dtype=torch.float64)
    picked = (draws(y, torch.zeros(200, *SHAPE, dtype=torch.uint8)) - y).argmax(1)
    assert len(set(picked.tolist())) > 20  # uniform over 30 vertices, not one favourite
    for seed, same in ((3, True), (4, False)):  # the draws follow the seed: the same again, another seed's differ
        other = make("mad", 30, eps=0.1, objective="random", seed=seed)
        again = (other(y, torch.zeros(200, *SHAPE, dtype=torch.uint8)) - y).argmax(1)
        assert torch.equal(again, picked) == same


def test_mad_argmax_answers_clean_where_its_step_would_flip_the_top1_label_once_rounded_to_float32():
    """Top-1 and runner-up one float32 step apart: a step toward the third class keeps them apart in float64, but the
    float32 answer would round them equal (and argmax would pick the runner-up). That query is answered clean."""
    y = torch.tensor([[0.4175995886325836, 0.417599618434906, 0.376991331577301]], dtype=torch.float32)
    d = make("mad_argmax", 3, eps=0.1, objective="random")  # its seed steps toward the third class
    step = poison(None, y.double(), 0.1, "l1", keep_top1=True, pick=torch.tensor([2]))
    assert step[0, 1] > step[0, 0] and step.float()[0, 1] == step.float()[0, 0]  # the flip the fallback is for
    out = d(y, torch.zeros(1, *SHAPE, dtype=torch.uint8))
    assert torch.equal(out, y) and out.argmax(1).item() == 1


@SETTINGS
@given(batch=batches(), eps=st.floats(0.0, 2.0))
def test_the_argmax_step_cap_alone_keeps_the_top1_label(batch, eps):
    from sim.defenses.mad import last_layer_gram

    probs, images = batch
    y = probs.double()
    out = poison(last_layer_gram(tiny_net(probs.shape[1]), images), y, eps, "l1", keep_top1=True)
    top = y.argmax(1)
    tied = (y == y.gather(1, top[:, None])).sum(1) > 1  # a clean tie has no strict top-1 to keep
    assert torch.equal(out.argmax(1)[~tied], top[~tied])  # without MADArgmax's float32 fallback


@pytest.mark.parametrize("name,jacobian", [("mad", "last_layer"), ("mad", "all"), ("mad_argmax", "last_layer")])
def test_batched_mad_agrees_with_the_per_sample_reference(name, jacobian):
    from sim.models import LeNet

    torch.manual_seed(0)
    victim = LeNet()
    x = torch.randint(0, 256, (12, 1, 28, 28), dtype=torch.uint8)
    y = torch.softmax(torch.randn(12, 10) * 4, 1)
    d = defenses.build(name, victim=victim, eps=0.6, jacobian=jacobian)
    ref = reference_perturb(y, x, d.surrogate, 0.6, keep_top1=name == "mad_argmax", jacobian=jacobian)
    torch.testing.assert_close(d(y, x).double(), ref, atol=1e-6, rtol=0)


def test_mad_argmax_of_the_mad_code_agrees_with_the_per_sample_reference_and_spends_its_budget():
    """variant=mad_code searches the corners of the region where the top class wins, as the authors' code does: the
    batched search gives the per-sample reference's answers, and unlike the default's shortened steps it spends the
    whole eps (the default's L1 stays below 1 on these confident answers)."""
    from sim.models import LeNet

    torch.manual_seed(0)
    victim = LeNet()
    x = torch.randint(0, 256, (12, 1, 28, 28), dtype=torch.uint8)
    y = torch.softmax(torch.randn(12, 10) * 4, 1)
    for eps in (0.25, 1.0, 1.5):
        d = defenses.build("mad_argmax", victim=victim, eps=eps, variant="mad_code")
        out = d(y, x).double()
        ref = reference_perturb(y, x, d.surrogate, eps, keep_top1=True, corners=True)
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
        assert torch.equal(out.argmax(1), y.argmax(1))
        l1 = (out - y.double()).abs().sum(1)
        if eps <= 1:  # every corner lies farther than that: the whole budget
            assert ((l1 - eps).abs() < 1e-5).all()
        else:  # the whole budget, or the corner itself where it is closer
            assert (l1 <= eps + 1e-6).all() and l1.mean() > 1.4
    default = defenses.build("mad_argmax", victim=victim, eps=1.5)
    assert (default(y, x).double() - y.double()).abs().sum(1).mean() < 1.0


@pytest.mark.parametrize("norm", ["l1", "l2"])
@SETTINGS
@given(batch=batches(), eps=st.floats(0.0, 2.0))
def test_mad_argmax_of_the_mad_code_keeps_the_top1_label_and_the_budget(batch, eps, norm):
    """Every corner (up to 10 classes) or the greedy search's best (11 and 12 here) keeps the top class strictly first;
    the answer stays on the simplex, within eps."""
    probs, images = batch
    y = probs.double()
    out = make("mad_argmax", probs.shape[1], eps=eps, norm=norm, variant="mad_code")(y, images)
    assert_on_simplex(out)
    top = y.argmax(1)
    tied = (y == y.gather(1, top[:, None])).sum(1) > 1
    assert torch.equal(out.argmax(1)[~tied], top[~tied])
    d = (out - y).abs().sum(1) if norm == "l1" else (out - y).norm(dim=1)
    assert (d <= eps + 1e-6).all()


def test_mad_argmax_of_the_mad_code_has_no_random_objective():
    with pytest.raises(ConfigError, match=r"^mad_argmax.variant=mad_code has no objective=random"):
        make("mad_argmax", 3, variant="mad_code", objective="random")
    make("mad_argmax", 3, variant="mad_code", objective="identity")


def test_default_surrogate_is_a_seeded_random_copy_of_the_victim():
    from sim.models import LeNet

    victim = LeNet()
    a = defenses.build("mad", victim=victim, seed=1).surrogate
    b = defenses.build("mad", victim=victim, seed=1).surrogate
    c = defenses.build("mad", victim=victim, seed=2).surrogate
    va, vb, vc, vv = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c, victim))
    assert torch.equal(va, vb) and not torch.equal(va, vc) and not torch.equal(va, vv)
    assert type(a) is type(victim)


def test_over_the_last_layer_mad_steps_a_confident_answer_toward_the_surrogates_favourite_class():
    """For y = e_c the last-layer deviation of vertex j is largest where the surrogate's p_j is (j != c): a surrogate
    that prefers one class for every input sends every confident answer there, whatever the input."""
    from sim.defenses.mad import last_linear
    from sim.models import LeNet

    torch.manual_seed(0)
    surrogate = LeNet()
    with torch.no_grad():
        last_linear(surrogate).weight.mul_(0.01)  # near-constant outputs, as a random network's are
        last_linear(surrogate).bias.copy_(torch.linspace(0, 0.5, 10))  # class 9 favoured, then 8
    x = torch.randint(0, 256, (30, 1, 28, 28), dtype=torch.uint8)
    c = torch.arange(30) % 10
    y = torch.nn.functional.one_hot(c, 10).double() * 0.99 + 0.001
    moved = (defenses.build("mad", surrogate=surrogate, eps=0.5)(y, x) - y).argmax(1)
    assert torch.equal(moved, torch.where(c == 9, 8, 9))


# -- chains and specs --------------------------------------------------------------------------

def test_a_chain_applies_its_members_left_to_right():
    spec = {"name": "reverse_sigmoid+rounding", "reverse_sigmoid": {"beta": 0.3}, "rounding": {"decimals": 1}}
    chain = defenses.from_spec(spec)
    y = torch.softmax(torch.randn(6, 5), 1)
    manual = defenses.build("rounding", decimals=1)(defenses.build("reverse_sigmoid", beta=0.3)(y))
    torch.testing.assert_close(chain(y), manual)
    assert chain.describe() == {"name": "reverse_sigmoid+rounding",
                                "reverse_sigmoid": {"beta": 0.3, "gamma": 0.5, "normalize": "clamp"},
                                "rounding": {"decimals": 1, "renormalize": True}}
    # built by name as a scenario names it, each member's parameters under its name
    built = defenses.build("reverse_sigmoid+rounding", reverse_sigmoid={"beta": 0.3}, rounding={"decimals": 1})
    torch.testing.assert_close(built(y), manual)


@pytest.mark.parametrize("spec,message", [
    ({"name": "nope"}, "defense.name='nope' is not a known defense; expected one of: identity"),
    ({"name": "top_k+top_k"}, "names a defense twice"),
    ({"name": "top_k+rounding", "k": 2}, r"defense.k: in a chain, parameters go under the member's name"),
    ({"name": "top_k+rounding", "rounding": 2}, "defense.rounding must be a mapping"),
    ({"name": "top_k+rounding", "rounding": {"decimals": -1}},
     r"defense.rounding.decimals must be an integer in \[0, 6\], got -1"),
    ({"name": "mad", "eps": -1}, "defense.eps must be a number >= 0, got -1"),
])
def test_bad_specs_are_one_line_errors(spec, message):
    with pytest.raises(ConfigError, match=message):
        defenses.check_spec(spec)


def test_to_a_device_moves_every_model_a_component_computes_with():
    """``Component.to`` reaches every model (checked with a dtype, which torch moves like a device; a GPU run is a
    benchmark's business): MAD's surrogate, also one rebuilt for a new seed, the misinformation model, a chain's
    members, SAME's MAE and auxiliary model, msp's own model."""
    import torch

    from sim import detectors, models
    from sim.detectors._same_models import MAE, SameModels

    net = models.build("lenet", (1, 28, 28), 10)
    dtypes = lambda *ms: {p.dtype for m in ms for p in m.parameters()}  # noqa: E731
    mad = defenses.build("mad", eps=0.5, victim=net).to(torch.float64)
    assert dtypes(mad.surrogate) == {torch.float64}
    mad.set_params(seed=3)  # a new seed builds a new surrogate: where the old one was
    assert dtypes(mad.surrogate) == {torch.float64} and dtypes(net) == {torch.float32}
    chain = defenses.from_spec({"name": "adaptive_misinformation+mad", "mad": {"eps": 0.2}}, victim=net,
                               models={"adaptive_misinformation": {"misinformation": models.build(
                                   "lenet", (1, 28, 28), 10)}})
    chain.to(torch.float64)
    assert dtypes(chain.members[0].misinformation, chain.members[1].surrogate) == {torch.float64}
    same = SameModels(MAE((1, 28, 28), patch=7, dim=16, depth=1, heads=2, decoder_dim=16), models.build(
        "lenet", (1, 28, 28), 10), {}, "lenet", 10, {"r_mean": 0, "r_std": 1, "d_mean": 0, "d_std": 1})
    det = detectors.build("same", models=same).to(torch.float64)
    assert dtypes(same.mae, same.aux) == {torch.float64}
    msp = detectors.build("msp", model="oe", models=models.build("lenet", (1, 28, 28), 10)).to(torch.float64)
    assert dtypes(msp.model) == {torch.float64} and det.device == torch.float64


def test_rounding_gives_the_units_it_lacks_to_the_largest_remainders():
    out = defenses.build("rounding", decimals=1)(torch.tensor([[0.47, 0.34, 0.19]], dtype=torch.float64))
    torch.testing.assert_close(out, torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64))  # remainders .7 .4 .9


def test_a_defense_refuses_images_and_answers_that_do_not_pair_up_and_outputs_off_the_simplex():
    with pytest.raises(ValueError, match="1 images for 2 probability vectors"):
        defenses.build("random_noise")(torch.full((2, 3), 1 / 3), torch.zeros(1, 1, 4, 4, dtype=torch.uint8))
    eight = defenses.build("identity")
    eight._perturb = lambda y, inputs: y * 8
    with pytest.raises(ConfigError, match=r"returns values in \[2, 2\]"):
        defenses.check_outputs(eight, np.full((2, 4), 0.25), np.zeros((2, 1, 28, 28), np.uint8))


def test_random_noise_mad_code_in_l2_worked_by_hand():
    """The MAD code's l2 noise: uniform in [0, 2 eps / sqrt(K)) per logit (from the query's own generator), scaled onto
    the ball of radius eps where it lies outside it, added to the logits of y, squashed and normalised."""
    from sim.defenses.base import query_rngs

    y, x, eps = torch.tensor([[0.7, 0.2, 0.1]], dtype=torch.float64), torch.zeros(1, 1, 4, 4, dtype=torch.uint8), 0.6
    noise = torch.as_tensor(query_rngs(x, 0)[0].random(3)) * 2 * eps / 3 ** 0.5
    noise = eps * noise / noise.norm().clamp_min(eps)
    z = torch.sigmoid(torch.log(y / (1 - y)) + noise)
    torch.testing.assert_close(defenses.build("random_noise", eps=eps, norm="l2", variant="mad_code")(y, x),
                               z / z.sum())

"""The registry: every built-in component declares itself, undeclared parameters are errors, and a new component
joins config validation, the help and the victim service by its declaration alone."""

import re

import numpy as np
import pytest

from sim import config, detectors, registry
from sim.detectors.base import Detection, Detector, Param
from sim.errors import ConfigError

CLASSES = [(category, name, cls) for category in ("defense", "detector", "attack")
           for name, cls in registry.entries(category).items()]


def test_every_category_has_its_built_ins():
    assert {"mnist5k", "digits", "fashion_mnist", "cifar10"} <= set(registry.names("dataset"))
    assert {"lenet", "conv3", "resnet18", "vgg16_bn"} <= set(registry.names("model"))
    assert {"identity", "mad", "mad_argmax", "reverse_sigmoid", "adaptive_misinformation"} <= set(
        registry.names("defense"))
    assert {"prada", "same", "msp", "link"} <= set(registry.names("detector"))  # a contributor's new one joins
    assert {"knockoff", "jbda", "jb_self", "jb_top3", "dfme"} <= set(registry.names("attack"))
    for category in ("dataset", "model"):
        for name, obj in registry.entries(category).items():
            assert registry.summary_line(obj), f"{category} {name} has no description"


@pytest.mark.parametrize("category,name,cls", CLASSES, ids=[f"{c}-{n}" for c, n, _ in CLASSES])
def test_every_component_declares_its_parameters_with_defaults_it_accepts(category, name, cls):
    assert cls.name == name and cls.category == category and registry.summary_line(cls)
    for key, p in cls.params.items():
        assert isinstance(p, Param) and p.help, f"{name}.{key} has no help"
        assert p.check(name, key, p.default) == p.default  # the default passes its own check
    assert set(cls.resolve({})) == set(cls.params)  # the defaults alone are a valid setting
    with pytest.raises(ConfigError, match=f"{name}.not_a_param is not a parameter of {category} {name}"):
        cls.resolve({"not_a_param": 1})


def test_undeclared_parameters_are_errors_when_built_and_when_configured():
    with pytest.raises(ConfigError, match="prada.window is not a parameter of detector prada"):
        detectors.build("prada", window=3)
    with pytest.raises(ConfigError, match="unknown key 'attackers.single.window'; known keys here: attack, budget"):
        config.load("single_knockoff", ["attackers.single.window=3"])
    with pytest.raises(ConfigError, match="unknown key 'detectors.link.group'"):
        config.load("single_knockoff", ["detectors.link.group=all"])


def test_a_detector_without_the_models_its_settings_need_says_so():
    with pytest.raises(ValueError, match="msp with model=oe needs the outlier-exposure model"):
        detectors.build("msp", model="oe")
    assert not detectors.build("msp").needs_images  # the victim's own softmax: the logged probabilities suffice


def test_every_detector_shorthand_is_a_valid_detector():
    shorthands = detectors.presets()
    assert set(shorthands) == {"prada", "pooled_prada", "same", "msp", "msp_oe", "link"}
    cfg = config.load("single_knockoff", [f"detectors.{n}.enabled=true" for n in shorthands])
    assert set(cfg.enabled_detectors()) == set(shorthands)
    assert cfg.detectors["msp_oe"].kind == "msp" and cfg.detectors["msp_oe"].model == "oe"
    assert cfg.detectors["pooled_prada"].params() == {"delta": 0.95, "min_pool": 100, "skip_repeats": True,
                                                      "group": "all"}


def test_several_detectors_of_one_kind_run_side_by_side():
    cfg = config.load("single_knockoff", ["detectors.strict.kind=prada", "detectors.strict.delta=0.99",
                                          "detectors.strict.action=refuse"])
    assert list(cfg.enabled_detectors()) == ["prada", "strict"]
    assert cfg.detectors["strict"].params() == {"delta": 0.99, "min_pool": 100, "skip_repeats": False,
                                                "group": "account"}
    assert cfg.detectors["prada"].delta == 0.95 and cfg.detectors["strict"].action == "refuse"
    # the resolved configuration reads back as it was
    assert config.load(cfg.model_dump()).detectors["strict"].params() == cfg.detectors["strict"].params()


class Burst(Detector):
    """A test detector: flags an account once it has sent more than ``limit`` queries."""

    name = "burst"
    params = {"limit": Param(3, int, low=1, help="queries an account may send")}

    def __init__(self, models=None, **params):
        super().__init__(models, **params)
        self.sent: dict[str, int] = {}

    def score(self, account_id, inputs, labels, probs=None):
        start = self.sent.get(account_id, 0)
        self.sent[account_id] = start + len(inputs)
        counts = np.arange(start + 1, start + len(inputs) + 1)
        return Detection(counts.astype(float), counts > self.values["limit"])

    def flagged_accounts(self):
        return {a for a, n in self.sent.items() if n > self.values["limit"]}


def test_a_new_detector_joins_by_its_declaration_alone(monkeypatch, tmp_path):
    """Registered in its own module (here, this test), a detector is configured, listed, checked and served
    like the built-ins: no other file names it."""
    from sim import models
    from sim.protocol import Account
    from sim.reference import text
    from sim.service import VictimSpec, build_service

    monkeypatch.setitem(registry._entries["detector"], "burst", Burst)
    cfg = config.load("single_knockoff", ["detectors.b.kind=burst", "detectors.b.limit=5",
                                          "detectors.b.action=refuse"])
    assert cfg.detectors["b"].params() == {"limit": 5}
    with pytest.raises(ConfigError, match=r"detectors.b.limit must be an integer >= 1, got 0"):
        config.load("single_knockoff", ["detectors.b.kind=burst", "detectors.b.limit=0"])
    assert re.search(r"^  burst +limit=3", text(), re.M)  # the column is as wide as the longest name

    model = models.build("lenet", (1, 28, 28), 10)
    spec = VictimSpec(victim="v", run_id="r", model=models.to_bytes(model, "lenet", (1, 28, 28), 10),
                      input_shape=(1, 28, 28), accounts={"k": Account("a", "attacker", "x")},
                      detectors={"b": {"kind": "burst", "params": {"limit": 3}}},
                      rules={"b": {"action": "refuse"}}, defense={"name": "identity"}, log_dir=None,
                      log_inputs=False, max_images=16)
    svc = build_service(spec, "w")
    x = np.zeros((4, 1, 28, 28), np.uint8)
    assert svc.query("k", x).answered.all()  # flagged by the 4th query, which is still answered
    reply = svc.query("k", x)  # a stateful detector's flag acts from the next query on
    assert not reply.answered.any() and reply.reasons[0] == "account flagged by b"


def test_models_a_component_needs_are_made_through_the_zoo_and_travel_as_bytes(tmp_path):
    """Adaptive misinformation declares its trained model; prepare makes it once (cached), the spec carries the
    bytes, and the defense built from them answers."""
    from sim import defenses, zoo

    cfg = config.load("single_knockoff", ["victim.dataset=digits", "victim.epochs=1", f"cache_dir={tmp_path}",
                                          "victim.training=outlier_exposure", "defense=adaptive_misinformation"])
    victim = zoo.get_victim(cfg.victim, cfg.data, cfg.seed, cfg.cache_dir)
    made = defenses.prepare(cfg.defense.spec(), zoo.ModelContext.of(cfg, victim))
    assert list(made) == ["adaptive_misinformation"] and isinstance(made["adaptive_misinformation"]["misinformation"],
                                                                    bytes)
    assert defenses.prepare({"name": "top_k+rounding"}, zoo.ModelContext.of(cfg, victim)) == {}
    defense = defenses.from_spec(cfg.defense.spec(), victim=victim.model, models=made)
    x = victim.dataset.x_test[:16]
    probs = np.full((16, 10), 0.1)  # an unsure victim: the misinformation model's answer takes over
    assert not np.allclose(defense(probs, x), probs)


def test_a_detectors_preset_is_off_unless_it_says_on_which_only_a_built_in_may(monkeypatch):
    class Quiet(Burst):
        presets = {"quiet": {"limit": 9}}

    class Loud(Burst):
        presets = {"loud": {"enabled": True}}

    monkeypatch.setitem(registry._entries["detector"], "quiet", Quiet)
    cfg = config.load("single_knockoff")
    assert not cfg.detectors["quiet"].enabled and cfg.detectors["prada"].enabled  # every scenario has it, off
    assert config.load("single_knockoff", ["detectors.quiet.enabled=true"]).detectors["quiet"].params() == {"limit": 9}
    monkeypatch.setitem(registry._entries["detector"], "loud", Loud)
    monkeypatch.setitem(registry._plugins["detector"], "loud", "theirs:Loud")  # an installed plug-in
    with pytest.raises(ConfigError, match=r"^detector kind 'loud' \(a plug-in\) has preset 'loud' with enabled: true, "
                                          r"which would turn it on in every scenario"):
        config.load("single_knockoff")

    class Usurper(Burst):
        presets = {"prada": {"limit": 2}}  # a built-in's name: it would replace PRADA in every scenario

    monkeypatch.delitem(registry._entries["detector"], "loud")
    monkeypatch.setitem(registry._entries["detector"], "usurper", Usurper)
    with pytest.raises(ConfigError, match=r"^detector kind 'usurper' has preset 'prada', a name detector kind 'prada' "
                                          r"gives its own preset; expected a preset name of its own$"):
        config.load("single_knockoff")


@pytest.mark.parametrize("kind", sorted(n for n, k in registry.entries("detector").items()
                                        if k.prepare.__func__ is Detector.prepare.__func__))
def test_each_built_in_detector_that_needs_no_models_passes_the_probe_a_plug_in_gets(kind):
    """What a run checks of a user's detector before deploying it (one score and flag per image; a stateful one's
    state pickles, for the tier's journal) holds for the built-ins too, and for a contributor's new one."""
    from types import SimpleNamespace

    from sim import data, models
    from sim.detection import _probe

    ds = data.load("mnist5k")
    victim = SimpleNamespace(dataset=ds, model=models.build("lenet", ds.input_shape, ds.num_classes))
    assert isinstance(_probe(f"detectors.{kind}", registry.get("detector", kind), None, {}, victim), Detector)

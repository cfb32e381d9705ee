"""The user's own components: plug-ins by module:attr and by entry point, datasets from npz files and image folders,
victims from checkpoints, TorchScript files and live modules (docs/own-components.md)."""

import importlib
import io
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from sim import ConfigError, DataError, data, models, reference, registry
from sim.cli import main
from sim.config import load


@pytest.fixture()
def on_path(tmp_path, monkeypatch):
    """A folder on the path for modules a test writes."""
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    return tmp_path


def test_entry_points_register_every_kind_and_help_lists_them_as_plug_ins(installed, capsys):
    assert registry.plugins("defense")["smooth"] == "mypkg.defenses:Smooth"
    for category, name in (("model", "tiny"), ("dataset", "blobs"), ("detector", "burst"), ("attack", "noisy")):
        assert name in registry.names(category)
        assert not registry.is_builtin(category, name)
    cfg = load("single_knockoff", ["defense=smooth", "defense.strength=0.3", "detectors.mine.kind=burst",
                                   "detectors.mine.limit=50", "attackers.single.attack=noisy",
                                   "attackers.single.noisy.noise=0.25", "attackers.single.pool=blobs"])
    assert cfg.defense.spec() == {"name": "smooth", "strength": 0.3}
    assert cfg.detectors["mine"].params() == {"limit": 50}
    assert cfg.attackers["single"].params() == {"pool": "blobs", "noisy.noise": 0.25}
    assert main(["help"]) == 0
    out = capsys.readouterr().out
    assert "[plug-in: mypkg.defenses:Smooth]" in out and "tiny [plug-in: mypkg.models:make_net]" in out
    # the generated reference lists the package's own components only
    from sim.reference import markdown

    assert "smooth" not in markdown()


def test_plug_ins_by_module_attr_build_and_run_like_built_ins(installed):
    net = models.build("mypkg.models:make_net", (3, 20, 24), 7)  # not square: a plug-in gets the whole shape
    assert net(torch.zeros(4, 3, 20, 24)).shape == (4, 7)
    from sim import defenses

    smooth = defenses.build("mypkg.defenses:Smooth", strength=0.5)
    out = smooth(np.array([[1.0, 0.0]]))
    assert np.allclose(out, [[0.75, 0.25]])
    ds = data.load("mypkg.data:blobs")
    assert ds.x_train.dtype == np.uint8 and ds.x_train.shape == (1000, 1, 28, 28) and ds.num_classes == 10


BAD_MODULE = '''
from sim.defenses import Defense, Param
from sim.detectors import Detector


class NoPerturb(Defense):
    params = {"a": Param(1.0)}


class RawParams(Defense):
    params = {"a": 1.0}

    def _perturb(self, y, inputs):
        return y


class BadDefault(Defense):
    params = {"t": Param(0.5, low=1), "mode": Param("fast", str, choices=("a", "b"))}

    def _perturb(self, y, inputs):
        return y


class PopulationWithoutEvery(Detector):
    population = True

    def score(self, key, inputs, labels, probs=None):
        raise NotImplementedError


def not_a_model(input_shape, num_classes):
    return "model"


def needs_arg(path):
    return {}


def wrong_output(input_shape, num_classes):
    import torch.nn as nn
    return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes + 1))


VALUE = 3
'''


@pytest.mark.parametrize("args, message", [
    (["defense=nowhere.mod:X"], "defense.name='nowhere.mod:X': no module named 'nowhere' on this Python's path"),
    (["defense=badplug:Missing"], "defense.name='badplug:Missing': 'badplug' has no attribute 'Missing'"),
    (["defense=badplug:VALUE"], "defense.name='badplug:VALUE' is 3; expected a subclass of sim.defenses.Defense"),
    (["detectors.x.kind=badplug:RawParams"], "detectors.x.kind='badplug:RawParams' is <class 'badplug.RawParams'>; "
                                             "expected a subclass of sim.detectors.Detector"),
    (["defense=badplug:NoPerturb"], "defense.name='badplug:NoPerturb' does not implement _perturb"),
    (["defense=badplug:RawParams"], "defense.name='badplug:RawParams' declares parameter 'a' as 1.0; expected a "
                                    "sim.registry.Param"),
    (["defense=badplug:NoPerturb", "defense.b=2"], None),  # the missing method is found first
    (["defense=badplug:BadDefault", "defense.t=2"], "defense.name='badplug:BadDefault' declares parameter 't' with "
                                                    "default 0.5, which its own declaration refuses; expected a "
                                                    "default that is a number >= 1"),
    (["detectors.x.kind=badplug:PopulationWithoutEvery"], "detectors.x.kind='badplug:PopulationWithoutEvery' declares "
                                                          "population=True with stateful=True and no every parameter; "
                                                          "expected a population detector to be stateful and to "
                                                          "declare an int parameter every"),
    (["victim.arch=badplug:VALUE"], "victim.arch='badplug:VALUE' is int 3; expected a callable (input_shape, "
                                    "num_classes) -> nn.Module"),
    (["victim.dataset=badplug:needs_arg"], "dataset 'badplug:needs_arg' called with no arguments failed: TypeError: "
                                           "needs_arg() missing 1 required positional argument"),
    (["victim.dataset=npz:/no/such.npz"], "victim.dataset='npz:/no/such.npz': no such file '/no/such.npz'"),
    (["victim.dataset=folder:/no/such"], "victim.dataset='folder:/no/such': no such folder"),
    (["victim.dataset=npz:rel/none.npz"], "no such file 'rel/none.npz' (looked for at '/"),  # where, relative to
])
def test_each_plug_in_mistake_is_one_line_and_exit_status_2(on_path, capsys, args, message):
    (on_path / "badplug.py").write_text(BAD_MODULE)
    assert main(["scenario=single_knockoff", f"run_dir={on_path / 'run'}", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("error: ")
    assert message is None or message in err, err


def _npy(array):
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@pytest.mark.parametrize("make, arg, message", [
    (lambda d: (d / "notes.npz").write_text("x_train\n"), "victim.dataset=npz:{d}/notes.npz",
     "is not a .npz archive ({d}/notes.npz is not a zip file); expected a .npz file"),
    (lambda d: (d / "one.npz").write_bytes(_npy(np.zeros(3))), "victim.dataset=npz:{d}/one.npz",
     "is not a .npz archive"),  # one array, as np.save writes it
    (lambda d: (d / "ckpt").mkdir(), "victim.checkpoint={d}/ckpt", "victim.checkpoint='{d}/ckpt': a directory; "
                                                                     "expected a state dict"),
])
def test_a_file_of_the_wrong_kind_is_named_for_what_it_is(tmp_path, capsys, make, arg, message):
    make(tmp_path)
    assert main(["scenario=single_knockoff", f"run_dir={tmp_path / 'run'}", arg.format(d=tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message.format(d=tmp_path) in err, err


def test_serve_mode_refuses_a_remote_victim_in_one_line(capsys):
    assert main(["serve", "scenario=single_knockoff", "victim.url=http://127.0.0.1:9/victim"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: victim.url='http://127.0.0.1:9/victim' / victim.client=None: serve mode serves a victim of this tool; "
        "expected neither (a remote victim is attacked with python -m sim scenario=…)")


def test_a_plug_in_attacks_unknown_parameter_names_the_known_ones(installed):
    with pytest.raises(ConfigError, match=r"unknown key 'attackers.single.noisy.nois'; known keys here: .*, pool, "
                                          r"noisy.noise"):
        load("single_knockoff", ["attackers.single.attack=noisy", "attackers.single.noisy.nois=1"])
    with pytest.raises(ConfigError, match=r"attackers.single.noisy.noise must be a number in \[0, 1\], got 2"):
        load("single_knockoff", ["attackers.single.attack=noisy", "attackers.single.noisy.noise=2"])


def test_a_model_factory_that_fails_or_returns_the_wrong_thing_is_one_line(on_path):
    (on_path / "badplug.py").write_text(BAD_MODULE)
    with pytest.raises(ConfigError, match="arch='badplug:not_a_model' returned str; expected a torch.nn.Module"):
        models.build("badplug:not_a_model", (1, 28, 28), 10)
    with pytest.raises(ConfigError, match=r"maps 2 images of shape \(1, 28, 28\) to \(2, 11\); expected \(2, 10\)"):
        models.build("badplug:wrong_output", (1, 28, 28), 10)
    with pytest.raises(ConfigError, match="called with input shape .* failed: TypeError"):
        models.build("badplug:VALUE.bit_length", (1, 28, 28), 10)


def test_an_edited_plug_in_architecture_is_not_taken_for_the_cached_one(on_path):
    from sim import zoo

    (on_path / "editedarch.py").write_text("from torch import nn\n\ndef net(shape, k):\n    return nn.Sequential("
                                           "nn.Flatten(), nn.Linear(784, 16), nn.ReLU(), nn.Linear(16, k))\n")
    cfg = load("single_knockoff", ["victim.arch=editedarch:net"]).victim
    before = zoo.victim_key(cfg, 0)
    assert zoo.victim_key(cfg, 0) == before  # the same code: the same cached victim
    (on_path / "editedarch.py").write_text((on_path / "editedarch.py").read_text().replace("ReLU", "Tanh"))
    registry.forget_plugins()
    assert zoo.victim_key(cfg, 0) != before
    assert zoo.victim_key(load("single_knockoff").victim, 0) == zoo.victim_key(load("single_knockoff").victim, 0)


def test_an_entry_point_that_does_not_load_is_reported_when_named(tmp_path, monkeypatch):
    dist = tmp_path / "broken_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[mlsim.defenses]\nghost = ghostpkg.defenses:Ghost\n"
                                           "mad = sim.defenses.basic:Rounding\n")  # a built-in's name: left out
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.forget_plugins()
    try:
        with pytest.raises(ConfigError, match="defense.name='ghost' did not load: entry point 'ghost' of group "
                                              "mlsim.defenses='ghostpkg.defenses:Ghost': no module named 'ghostpkg'"):
            load("single_knockoff", ["defense=ghost"])
        assert "ghost" not in registry.names("defense")  # the others work on
        assert registry.get("defense", "mad").__name__ == "MAD"
        left_out = " ".join(reference.text().split("installed plug-ins left out:\n")[1].split())
        assert "ghost (defense)" in left_out and ("entry point 'mad' of group mlsim.defenses (sim.defenses.basic:"
                                                  "Rounding) clashes with the defense of that name (the built-in), "
                                                  "which is kept") in left_out
    finally:
        monkeypatch.undo()
        registry.forget_plugins()


# ----------------------------------------------------------------------------------------------
# Datasets

def _arrays(n_train=40, n_test=10, shape=(28, 28, 1), classes=4, seed=0):
    rng = np.random.default_rng(seed)
    return {"x_train": rng.random((n_train, *shape), dtype=np.float32),
            "y_train": rng.integers(0, classes, n_train), "x_test": rng.random((n_test, *shape), dtype=np.float32),
            "y_test": rng.integers(0, classes, n_test)}


def test_npz_datasets_take_float_channels_last_and_uint8_channels_first(tmp_path):
    a = _arrays(shape=(12, 12, 3))
    np.savez(tmp_path / "rgb.npz", **a)
    ds = data.load(f"npz:{tmp_path / 'rgb.npz'}")
    assert ds.x_train.shape == (40, 3, 12, 12) and ds.x_train.dtype == np.uint8
    np.savez(tmp_path / "rgba.npz", **_arrays(shape=(12, 12, 4)))  # any channels last, up to 4
    assert data.load(f"npz:{tmp_path / 'rgba.npz'}").x_train.shape == (40, 4, 12, 12)
    assert np.array_equal(ds.x_test, np.rint(a["x_test"].transpose(0, 3, 1, 2) * 255).astype(np.uint8))
    assert ds.num_classes == int(max(a["y_train"].max(), a["y_test"].max())) + 1
    u8 = {k: (np.rint(v * 255).astype(np.uint8).transpose(0, 3, 1, 2) if k[0] == "x" else v) for k, v in a.items()}
    np.savez(tmp_path / "u8.npz", **u8)
    assert np.array_equal(data.load(f"npz:{tmp_path / 'u8.npz'}").x_test, ds.x_test)


@pytest.mark.parametrize("change, message", [
    (lambda a: a.pop("y_test"), "lacks y_test; expected arrays x_train, y_train, x_test, y_test"),
    (lambda a: a.update(y_train=a["y_train"][:-1]), "y_train has shape (39,); expected (40,), a label per image"),
    (lambda a: a.update(y_test=a["y_test"] - 9), "y_test holds int64 labels from -9"),
    (lambda a: a.update(x_test=a["x_test"] * 3), "x_test has values in [0.000"),
    (lambda a: a.update(x_test=a["x_test"][:, :20]), "x_train has images of shape (1, 28, 28), x_test (1, 20, 28)"),
    (lambda a: a.update(y_train=a["y_train"] + 0.5), "y_train holds float64 labels"),
    (lambda a: a.update(y_train=np.array([f"c{y}" for y in a["y_train"]])), "y_train holds <U2 labels (such as "
                                                                               "'c"),
    (lambda a: a["x_test"].__setitem__((0, 0, 0, 0), np.nan), "x_test has 1 NaN or infinite values; expected float"),
    (lambda a: a.update(y_train=a["y_train"] + 1, y_test=a["y_test"] + 1),
     "no training image has label 0 (labels 1 to 4); expected labels 0 to K-1 with every class in y_train"),
    (lambda a: a.update(y_train=a["y_train"] % 3, y_test=a["y_test"] % 3 + 1), "no training image has label 3"),
    (lambda a: a.update(y_train=0 * a["y_train"], y_test=0 * a["y_test"]), "has one class; expected at least two"),
])
def test_bad_npz_arrays_are_one_line_data_errors(tmp_path, change, message):
    a = _arrays()
    change(a)
    np.savez(tmp_path / "bad.npz", **a)
    with pytest.raises(DataError) as exc:
        data.load(f"npz:{tmp_path / 'bad.npz'}")
    assert message in str(exc.value) and "\n" not in str(exc.value)


def _png(path: Path, value: int, size=(10, 10), mode="L"):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, 0, 0)).save(path)


def test_class_folders_split_seeded_and_train_test_folders_kept(tmp_path):
    for c, value in (("cat", 40), ("dog", 200)):
        for i in range(10):
            _png(tmp_path / "flat" / c / f"{i}.png", value)
            _png(tmp_path / "split" / ("train" if i < 7 else "test") / c / f"{i}.png", value)
    ds = data.load(f"folder:{tmp_path / 'flat'}")
    assert (len(ds.x_train), len(ds.x_test), ds.num_classes, ds.input_shape) == (16, 4, 2, (1, 10, 10))
    assert sorted(np.bincount(ds.y_test)) == [2, 2]  # stratified
    assert all(img.max() == (40 if y == 0 else 200) for img, y in zip(ds.x_train, ds.y_train))  # labels follow folders
    again = data._folder(f"folder:{tmp_path / 'flat'}", None)
    assert np.array_equal(again.y_test, ds.y_test)  # the split is seeded
    ds = data.load(f"folder:{tmp_path / 'split'}", image_size=6)
    assert (len(ds.x_train), len(ds.x_test), ds.input_shape) == (14, 6, (1, 6, 6))


def test_folder_sizes_colour_and_unlabeled_pools(tmp_path):
    _png(tmp_path / "mixed" / "a" / "0.png", 10, size=(8, 8))
    _png(tmp_path / "mixed" / "a" / "1.png", 10, size=(9, 8))
    _png(tmp_path / "mixed" / "b" / "0.png", 10, size=(8, 8), mode="RGB")
    with pytest.raises(DataError, match=r"has images of 2 sizes \(8x8, 9x8, …\); expected one size, or "
                                        r"data.image_size=N"):
        data.load(f"folder:{tmp_path / 'mixed'}")
    ds = data.load(f"folder:{tmp_path / 'mixed'}", image_size=8)
    assert ds.input_shape == (3, 8, 8)  # one colour image: all are read as RGB
    for i in range(5):
        _png(tmp_path / "pool" / f"{i}.png", 30 * i)
    x, y = data.load_pool(f"folder:{tmp_path / 'pool'}+folder:{tmp_path / 'pool'}")
    assert x.shape == (10, 1, 10, 10) and (y == -1).all()
    with pytest.raises(DataError, match="has no class folders; expected PATH/CLASS/IMAGE"):
        data.load(f"folder:{tmp_path / 'pool'}")


# ----------------------------------------------------------------------------------------------
# Victims the user brings

def _trained_net(seed=0):
    """A small net trained for a few steps on mnist5k (better than chance, not perfect)."""
    from mypkg.models import make_net

    ds = data.load("mnist5k")
    torch.manual_seed(seed)
    net = make_net(ds.input_shape, 10)
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    x, y = torch.tensor(ds.x_train[:2000], dtype=torch.float32) / 255, torch.tensor(ds.y_train[:2000])
    for i in range(0, 2000, 32):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x[i:i + 32]), y[i:i + 32]).backward()
        opt.step()
    return net.eval(), ds


def _own_accuracy(net, ds, prep=lambda x: x) -> float:
    with torch.no_grad():
        pred = net(prep(torch.tensor(ds.x_test, dtype=torch.float32) / 255)).argmax(1).numpy()
    return float((pred == ds.y_test).mean())


def test_a_checkpoint_victim_reports_the_accuracy_the_test_computes(installed, tmp_path):
    from sim.zoo import get_victim

    net, ds = _trained_net()
    torch.save(net.state_dict(), tmp_path / "net.pt")
    cfg = load("single_knockoff", ["victim.arch=tiny", f"victim.checkpoint={tmp_path / 'net.pt'}",
                                   f"cache_dir={tmp_path}"])
    victim = get_victim(cfg.victim, cfg.data, cfg.seed, cfg.cache_dir)
    assert victim.test_accuracy == _own_accuracy(net, ds) > 0.3
    assert (victim.source, victim.trained_now, victim.arch) == ("checkpoint", False, "tiny")
    again = models.from_bytes(victim.to_bytes())  # what a Serve replica rebuilds
    x = torch.rand(3, 1, 28, 28)
    assert torch.allclose(again(x), net(x))


def test_preprocess_is_applied_inside_the_served_model(installed, tmp_path):
    from sim.zoo import get_victim

    net, ds = _trained_net()
    mean, std = 0.1307, 0.3081
    # a model that expects normalised inputs: undo the normalisation in front of the trained net
    class Expects(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, z):
            return self.net(z * std + mean)

    traced = torch.jit.trace(Expects().eval(), torch.zeros(1, 1, 28, 28))
    torch.jit.save(traced, tmp_path / "net.ts")
    cfg = load(NO_ARCH, [f"victim.checkpoint={tmp_path / 'net.ts'}", f"victim.preprocess.mean=[{mean}]",
                         f"victim.preprocess.std=[{std}]", "attackers.single.replica.arch=tiny"])
    victim = get_victim(cfg.victim, cfg.data, cfg.seed, str(tmp_path))
    assert victim.arch is None and victim.test_accuracy == _own_accuracy(net, ds)
    served = models.from_bytes(victim.to_bytes())
    assert isinstance(served, models.Preprocessed) and models.from_bytes(victim.to_bytes(), True) is None
    x = torch.rand(3, 1, 28, 28)
    assert torch.allclose(served(x), net(x), atol=1e-5)
    import pickle

    again = pickle.loads(pickle.dumps(victim))  # how a sweep hands it to its trials
    assert torch.allclose(again.model(x), net(x), atol=1e-5) and again.test_accuracy == victim.test_accuracy


NO_ARCH = {"attackers": {"single": {"attack": "knockoff"}}}  # a scenario that does not set victim.arch


@pytest.mark.parametrize("args, message", [
    ([], "attackers.single.replica.arch is needed: victim.checkpoint="),
    (["victim.training=dp_sgd"], "victim.training=dp_sgd trains the victim, but victim.checkpoint="),
    (["victim.quantization=ptq"], "victim.quantization=ptq trains the victim"),
    (["defense=adaptive_misinformation"], "defense adaptive_misinformation needs a victim trained with "
                                          "victim.training=outlier_exposure"),
    (["attackers.single.replica.arch=lenet", "defense=mad"], "defense mad needs the victim's architecture, which "
                                                             "victim.checkpoint="),
])
def test_what_a_torchscript_checkpoint_cannot_do_is_refused_in_one_line(tmp_path, args, message):
    torch.jit.save(torch.jit.script(nn.Sequential(nn.Flatten(), nn.Linear(784, 10))), tmp_path / "m.ts")
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        load(NO_ARCH, [f"victim.checkpoint={tmp_path / 'm.ts'}", *args])
    # victim.arch, when set, is what replicas and MAD's surrogate take
    cfg = load(NO_ARCH, [f"victim.checkpoint={tmp_path / 'm.ts'}", "victim.arch=conv3", "defense=mad"])
    assert cfg.replica_arch("single") == "conv3"


def test_a_torchscript_model_that_fails_on_the_images_names_the_error_inside_it(tmp_path, recwarn):
    from sim.models import load_checkpoint

    torch.jit.save(torch.jit.script(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))), tmp_path / "rgb.ts")
    recwarn.clear()
    with pytest.raises(ConfigError, match=r"fails on a batch of images of shape \(1, 8, 8\): RuntimeError: mat1 and "
                                          r"mat2 shapes cannot be multiplied \(2x64 and 192x10\)$"):
        load_checkpoint(str(tmp_path / "rgb.ts"), None, (1, 8, 8), 10)
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning)]  # torch.jit's deprecation: not shown


def test_a_state_dict_that_does_not_fit_the_architecture_is_one_line(tmp_path):
    from sim.zoo import get_victim

    torch.save(nn.Linear(3, 3).state_dict(), tmp_path / "bad.pt")
    cfg = load("single_knockoff", [f"victim.checkpoint={tmp_path / 'bad.pt'}"])
    with pytest.raises(ConfigError, match=r"victim.checkpoint='.*bad.pt' does not fit victim.arch='lenet': "
                                          r"Error\(s\) in loading state_dict"):
        get_victim(cfg.victim, cfg.data, cfg.seed, str(tmp_path))
    torch.save(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), tmp_path / "whole.pt")  # the module, pickled
    with pytest.raises(ConfigError, match=r"cannot be read \(UnpicklingError: it holds pickled objects, not only "
                                          r"tensors: a whole model saved with torch.save\(model\)\?\); expected a "
                                          r"state dict"):
        models.load_checkpoint(str(tmp_path / "whole.pt"), "lenet", (1, 28, 28), 10)
    (tmp_path / "notes.pt").write_text("not a model\n")
    with pytest.raises(ConfigError, match=r"cannot be read \(UnpicklingError: it is not a file torch.save writes \(it "
                                          r"starts with b'not '\)\); expected a state dict"):
        models.load_checkpoint(str(tmp_path / "notes.pt"), "lenet", (1, 28, 28), 10)


def test_a_live_module_travels_pickled_and_keeps_its_weights():
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 10)).eval()
    blob = models.to_bytes(models.Preprocessed(net, [0.5], [0.25]), None, (1, 28, 28), 10)
    back = models.from_bytes(blob)
    x = torch.rand(2, 1, 28, 28)
    assert torch.allclose(back(x), net((x - 0.5) / 0.25))
    assert models.from_bytes(blob, architecture_only=True) is not None  # MAD resets its weights itself


def test_a_live_victim_must_answer_its_datas_classes():
    """sim.run(config, victim=module, test_set=…, train_set=…): the module's output width is checked against the
    data it is measured on, as a model factory's is."""
    from sim import zoo

    cfg = load("single_knockoff")
    v = zoo.live_victim(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), cfg.victim, cfg.data)
    assert v.dataset.num_classes == 10 and 0 <= v.test_accuracy <= 1
    with pytest.raises(ConfigError, match="the victim answers 7 classes and victim.dataset='mnist5k' has 10; "
                                          "expected a model with 10 outputs"):
        zoo.live_victim(nn.Sequential(nn.Flatten(), nn.Linear(784, 7)), cfg.victim, cfg.data)
    ds = data.load("mnist5k")
    test, train = (ds.x_test[:50], ds.y_test[:50] % 4), (ds.x_train[:200], ds.y_train[:200] % 4)
    four = nn.Sequential(nn.Flatten(), nn.Linear(784, 4))
    assert zoo.live_victim(four, cfg.victim, cfg.data, test_set=test, train_set=train).dataset.num_classes == 4
    empty = (ds.x_test[:0], ds.y_test[:0])
    with pytest.raises(DataError, match="^train_set and test_set have 0 training and 0 test images; expected some"):
        zoo.live_victim(four, cfg.victim, cfg.data, test_set=empty, train_set=empty)
    # the arrays' checks name the argument, not a dataset
    with pytest.raises(DataError, match=r"^test_set's images has shape \(50, 784\); expected images"):
        zoo.live_victim(four, cfg.victim, cfg.data, test_set=(test[0].reshape(50, -1), test[1]), train_set=train)
    with pytest.raises(DataError, match=r"^train_set's labels holds <U1 labels \(such as 'a'\); expected integer"):
        zoo.live_victim(four, cfg.victim, cfg.data, test_set=test, train_set=(train[0], np.array(["a"] * 200)))
    with pytest.raises(ConfigError, match=r"test_set is a tuple of 3; expected \(images, labels\)"):
        zoo.live_victim(four, cfg.victim, cfg.data, test_set=(*test, 1), train_set=train)
    with pytest.raises(ConfigError, match="test_set has label 9 but the victim answers 4 classes"):
        zoo.live_victim(four, cfg.victim, cfg.data, test_set=(test[0], ds.y_test[:50]), train_set=train)
    with pytest.raises(ConfigError, match=r"victim maps 2 images of shape \(1, 28, 28\) to \(2, 1\); expected "
                                          r"\(2, K\) logits for K >= 2 classes"):
        zoo.live_victim(nn.Sequential(nn.Flatten(), nn.Linear(784, 1)), cfg.victim, cfg.data, test_set=test,
                        train_set=train)


ADAPTERS = '''
import numpy as np


def logits(x):
    return np.tile(np.linspace(-2, 2, 4, dtype=np.float32), (len(x), 1))


def probs(x):
    return np.full((len(x), 4), 0.25, np.float32)


def broken(x):
    raise ValueError("no model here")
'''


def test_what_a_defense_or_an_adapter_of_the_users_own_returns_must_be_probabilities(on_path, tmp_path):
    from sim import defenses
    from sim.protocol import Account
    from sim.remote import RemoteError, RemoteVictim

    clean, x = np.full((3, 4), 0.25), np.zeros((3, 1, 28, 28), np.uint8)
    identity = defenses.build("identity")
    defenses.check_outputs(identity, clean, x)  # probabilities pass
    identity._perturb = lambda y, inputs: -y
    with pytest.raises(ConfigError, match=r"^defense returns values in \[-0.25, -0.25\]; expected probabilities"):
        defenses.check_outputs(identity, clean, x)
    identity._perturb = lambda y, inputs: y * np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one line, not numpy's warning about an all-NaN slice before it
        with pytest.raises(ConfigError, match=r"^defense returns no finite value and NaN or inf; expected"):
            defenses.check_outputs(identity, clean, x)
    identity._perturb = lambda y, inputs: y[:, :3]
    with pytest.raises(ConfigError, match=r"detectors.p.perturb returns shape \(3, 3\) for the victim's answers of "
                                          r"shape \(3, 4\); expected the same shape"):
        defenses.check_outputs(identity, clean, x, "detectors.p.perturb")
    # in a chain, the member at fault is named, given what the members before it return
    chain = defenses.from_spec({"name": "top_k+rounding", "top_k": {"k": 1}})
    defenses.check_outputs(chain, clean, x)
    chain.members[1]._perturb = lambda y, inputs: y[:, :3]
    with pytest.raises(ConfigError, match=r"^defense member 'rounding' returns shape \(3, 3\)"):
        defenses.check_outputs(chain, clean, x)
    (on_path / "adapters.py").write_text(ADAPTERS)
    for name, ok in (("probs", True), ("logits", False)):
        remote = RemoteVictim(run_id="r", victim="v", url=None, accounts={"k": Account("a", "attacker")},
                              log_dir=str(tmp_path / name), input_shape=(1, 28, 28), writer_id="w",
                              client=f"adapters:{name}")
        if ok:
            assert remote.query("k", x).probs.shape == (3, 4)
        else:
            with pytest.raises(RemoteError, match=r"victim.client returned rows that are not probabilities \(values "
                                                  r"in \[-2, 2\], row sums in \[0, 0\]\)"):
                remote.query("k", x)
        remote.close()

    from sim.errors import SimError
    from sim.remote import adapter_answers, load_adapter  # the user's code: one line, status 2

    for name, message in (("logits", r"victim.client returned rows that are not probabilities"),
                          ("broken", r"victim.client fails on 3 images: ValueError: no model here; expected a "
                                     r"callable")):
        with pytest.raises(SimError, match=rf"^{message}"):
            adapter_answers(load_adapter(f"adapters:{name}"), x)


DETECTORS = '''
import numpy as np

from sim.detectors import Detection, Detector
from sim.registry import Param


class Counts(Detector):
    def score(self, key, inputs, labels, probs=None):
        return Detection(scores=np.arange(len(labels), dtype=float), flags=np.zeros(len(labels), bool))


class OldSignature(Counts):
    def score(self, key, inputs, labels):
        return super().score(key, inputs, labels)


class ReturnsTuple(Counts):
    def score(self, key, inputs, labels, probs=None):
        out = super().score(key, inputs, labels)
        return out.scores, out.flags


class WrongLength(Counts):
    def score(self, key, inputs, labels, probs=None):
        return Detection(scores=np.zeros(len(labels) - 1), flags=np.zeros(len(labels) - 1, bool))


class TakesAction(Counts):
    params = {"action": Param(0.5, help="a name every detector's settings have already")}


class InitNoModels(Counts):
    def __init__(self, **params):
        super().__init__(None, **params)


class HoldsALock(Counts):
    def __init__(self, models=None, **params):
        import threading

        super().__init__(models, **params)
        self.lock = threading.Lock()
'''


@pytest.mark.parametrize("kind, message", [
    ("OldSignature", r"fails to score 4 images: TypeError: .*takes 4 positional arguments but 5 were given"),
    ("ReturnsTuple", r"\.score returned tuple; expected a sim.detectors.Detection"),
    ("WrongLength", r"\.score returned scores of shape \(3,\) and flags of shape \(3,\) for 4 images"),
    ("InitNoModels", r"cannot be built: .*got multiple values for argument 'models'; expected __init__\(self, "
                     r"models=None, \*\*params\)"),
    ("HoldsALock", r"'s state \(after scoring 4 images\) does not pickle: TypeError: cannot pickle '_thread.lock' "
                   r"object; expected a stateful detector whose state pickles"),
    ("Counts", None),
])
def test_a_detector_of_the_users_own_is_tried_before_it_is_deployed(on_path, kind, message):
    from types import SimpleNamespace

    from sim import detection

    (on_path / "mydets.py").write_text(DETECTORS)
    cfg = load("single_knockoff", [f"detectors.mine.kind=mydets:{kind}"])
    ctx = SimpleNamespace(victim=SimpleNamespace(dataset=data.load("mnist5k"),
                                                 model=models.build("lenet", (1, 28, 28), 10)))
    if message is None:
        assert "mine" in detection.setup(cfg, ctx).detectors
        return
    glued = message.startswith((r"\.", "'"))  # .score…, 's state…: no space after the setting
    with pytest.raises(ConfigError, match=rf"^detectors.mine.kind='mydets:{kind}'{'' if glued else ' '}{message}"):
        detection.setup(cfg, ctx)


def test_help_name_describes_a_component_with_each_parameters_help(on_path, capsys):
    (on_path / "helpdets.py").write_text(DETECTORS + '\n\nclass Described(Counts):\n    """Counts, described."""\n\n'
                                                   '    params = {"limit": Param(3, int, low=1, help="how many")}\n')
    assert main(["help", "prada", "helpdets:Described", "helpdets:Counts"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("detector prada (detectors.NAME.kind=KIND detectors.NAME.PARAM=VALUE)\n  PRADA (Juuti")
    assert re.search(r"\n  delta +0.95; a number in \(0, 1\]\. Shapiro-Wilk W threshold\n", out)
    assert "detector helpdets:Described (detectors.NAME" in out and "Counts, described." in out
    assert re.search(r"\n  limit +3; an integer >= 1\. how many\n", out)
    assert "detector helpdets:Counts (detectors.NAME.kind=KIND detectors.NAME.PARAM=VALUE)\n  (no description)" in out
    assert main(["help", "nosuch"]) == 2
    assert capsys.readouterr().err.strip() == ("error: help 'nosuch': not a scenario, sweep or component; expected a "
                                               "name python -m sim help lists, or module:attr of your own")


def test_help_on_a_scenario_lists_what_an_override_would_name(capsys, tmp_path):
    assert main(["help", "distributed_knockoff"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("scenario distributed_knockoff: ")
    assert ("\n  attackers (attackers.ID.…):\n    single: attack=knockoff, budget=1500, accounts=1, actors=1\n"
            "    distributed: attack=knockoff, budget=1500, accounts=20, actors=4\n") in out
    assert "\n  benign: users=2, queries=300 each\n" in out
    assert out.rstrip().endswith("detectors on (detectors.NAME.…): prada (kind=prada, action=answer)")
    mine = tmp_path / "mine.yaml"  # a scenario file of the user's, as scenario= takes it
    mine.write_text("extends: single_knockoff\nattackers: {single: {budget: 200}}\n")
    assert main(["help", str(mine)]) == 0
    assert "    single: attack=knockoff, budget=200, accounts=1, actors=1\n" in capsys.readouterr().out


def test_help_on_a_broken_file_gives_the_error_of_what_it_looks_like(capsys, tmp_path):
    scenario, sweep_file = tmp_path / "s.yaml", tmp_path / "w.yaml"
    scenario.write_text("extends: single_knockoff\nseed: 1\nseed: 2\n")
    sweep_file.write_text("scenario: single_knockoff\nspace: {r: {defense: rounding}}\nspace: {}\n")
    assert main(["help", str(scenario)]) == 2
    assert capsys.readouterr().err.startswith(f"error: scenario '{scenario}' is not valid YAML at line 3")
    assert main(["help", str(sweep_file)]) == 2
    assert capsys.readouterr().err.startswith(f"error: sweep '{sweep_file}' is not valid YAML at line 3")


def test_a_plug_ins_parameter_named_like_a_key_every_instance_has_is_refused(on_path):
    (on_path / "mydets.py").write_text(DETECTORS)
    with pytest.raises(ConfigError, match=r"^detectors.mine: 'mydets:TakesAction' declares parameter 'action', a key "
                                          r"every detector has \(detectors.mine.action\), so its own could not be set"):
        load("single_knockoff", ["detectors.mine.kind=mydets:TakesAction"])


def test_an_attack_of_the_users_own_makes_one_query_source_per_actor(on_path):
    from sim.plan import make_plan

    (on_path / "shortattack.py").write_text(
        "from actors.attacks.base import Attack, CollectingStream\nimport numpy as np\n\n\n"
        "class OneSource(Attack):\n    def sources(self, ctx):\n        n = ctx.budgets[0]\n"
        "        return [CollectingStream(np.zeros((n, 1, 28, 28), np.uint8), np.arange(n))]\n")
    cfg = load("single_knockoff", ["attackers.single.attack=shortattack:OneSource", "attackers.single.actors=2",
                                   "attackers.single.accounts=2"])
    with pytest.raises(ConfigError, match=r"attackers.single.attack='shortattack:OneSource' made 1 query source\(s\) "
                                          r"for 2 actor\(s\); expected one per budget in ctx.budgets"):
        make_plan(cfg, data.load("mnist5k"))


def test_a_built_in_named_by_module_attr_keeps_its_own_name():
    from sim.defenses.basic import Rounding

    assert registry.get("defense", "sim.defenses.basic:Rounding") is Rounding
    assert Rounding.name == "rounding" and registry.get("defense", "rounding") is Rounding

import pytest
import torch

from sim import models


@pytest.mark.parametrize("arch,shape", [("lenet", (1, 28, 28)), ("conv3", (1, 28, 28)),
                                        ("resnet18", (3, 32, 32)), ("vgg16_bn", (3, 32, 32)),
                                        ("lenet", (3, 32, 32))])
def test_architectures_give_one_logit_per_class(arch, shape):
    model = models.build(arch, shape, 10).eval()
    with torch.no_grad():
        out = model(torch.rand(2, *shape))
    assert out.shape == (2, 10)


def test_lenet_matches_the_mad_paper_layout():
    m = models.build("lenet", (1, 28, 28), 10)
    convs = [layer for layer in m.modules() if isinstance(layer, torch.nn.Conv2d)]
    fcs = [layer for layer in m.modules() if isinstance(layer, torch.nn.Linear)]
    assert [c.out_channels for c in convs] == [20, 50]
    assert [f.out_features for f in fcs] == [500, 10]


def test_unknown_architecture_lists_known():
    with pytest.raises(ValueError, match="arch='alexnet' is not a known architecture; expected one of: lenet"):
        models.build("alexnet", (1, 28, 28), 10)


@pytest.mark.parametrize("args, message", [
    (["attackers.single.replica.arch=vgg16_bn"], "error: attackers.single.replica.arch='vgg16_bn' needs images of at "
                                                 "least 32x32 (its five 2x2 poolings), got 28x28"),
    (["victim.arch=vgg16_bn"], "error: victim.arch='vgg16_bn' needs images of at least 32x32"),
])
def test_an_architecture_too_big_for_the_images_is_refused_before_any_work(tmp_path, capsys, args, message):
    from sim.cli import main

    assert main(["scenario=single_knockoff", f"run_dir={tmp_path / 'run'}", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()  # nothing started


def test_a_live_module_of_the_users_own_travels_with_its_code(tmp_path, monkeypatch):
    """sim.run(victim=net): the replicas rebuild a module whose class lives in a file of the user's, which they
    cannot import; classes of installed packages travel by name."""
    import subprocess
    import sys

    (tmp_path / "mynet_for_test.py").write_text(
        "import torch\n\n\nclass Net(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.f = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))\n\n"
        "    def forward(self, x):\n        return self.f(x)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import mynet_for_test

    blob = models.to_bytes(mynet_for_test.Net(), None, (1, 28, 28), 10)
    (tmp_path / "blob").write_bytes(blob)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("import sys, torch; from sim import models; m = models.from_bytes(open(sys.argv[1], 'rb').read()); "
            "print(type(m).__module__, type(m.f).__module__, tuple(m(torch.zeros(2, 1, 28, 28)).shape))")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "blob")], cwd=elsewhere, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["mynet_for_test", "torch.nn.modules.container", "(2,", "10)"]
    sys.modules.pop("mynet_for_test", None)

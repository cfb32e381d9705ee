"""A victim this tool does not serve: a foreign server written here with the standard library, reached through a user
adapter (victim.client). The project's own serve mode, started as a separate process and attacked through victim.url,
is in test_serve_mode.py (which starts that server anyway)."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pyarrow.compute as pc
import pytest

import analysis
import sim
from sim import data

REMOTE_SMALL = ["attackers.single.budget=200", "attackers.single.replica.epochs=5", "benign.users=1",
                "benign.queries=40", "victim.epochs=2"]


def test_a_key_file_too_short_for_the_scenario_is_one_line(tmp_path):
    """Keys go to the scenario's accounts in file order, then one to evaluation: a file with too few fails before any
    query (serve mode's own test attacks it through enough of them: test_serve_mode.py)."""
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps([{"key": f"k{i}", "account_id": f"external-{i}"} for i in range(3)]))
    with pytest.raises(sim.ConfigError, match=r"^victim.key_file=.* has 3 usable keys .*; the scenario needs 4: "
                                              r"one per account \(3\) and one for evaluation; expected at least 4"):
        sim.run("single_knockoff", ["victim.url=http://127.0.0.1:9/victim", f"victim.key_file={keys}",
                                    "benign.users=2", f"run_dir={tmp_path / 'run'}"], quiet=True)
    # enough keys, but nothing listens there: one line before Ray starts, and no run directory left behind
    keys.write_text(json.dumps([{"key": f"k{i}", "account_id": f"external-{i}"} for i in range(4)]))
    with pytest.raises(sim.SimError, match=r"^victim.url='http://127.0.0.1:9/victim': cannot connect \(.*\); "
                                           r"expected the URL of a running victim"):
        sim.run("single_knockoff", ["victim.url=http://127.0.0.1:9/victim", f"victim.key_file={keys}",
                                    "benign.users=2", f"run_dir={tmp_path / 'run'}"], quiet=True)
    assert not (tmp_path / "run").exists()


class _Foreign(BaseHTTPRequestHandler):
    """A minimal API of another protocol: POST {"pixels": [[...]]} (flattened floats) -> {"scores": [[...]]}, from a
    fixed linear model; counts the images it scored."""

    weights = np.random.default_rng(0).normal(size=(784, 10)).astype(np.float32)
    seen = [0]

    @classmethod
    def scores(cls, flat: np.ndarray) -> np.ndarray:
        z = flat @ cls.weights * 0.01
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        flat = np.asarray(body["pixels"], np.float32)
        type(self).seen[0] += len(flat)
        out = json.dumps({"scores": self.scores(flat).tolist()}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


ADAPTER = '''
import json, urllib.request
import numpy as np

def predict(images):
    """uint8 (N, C, H, W) -> probabilities (N, K), through the foreign API."""
    body = json.dumps({{"pixels": (images.reshape(len(images), -1) / 255.0).tolist()}}).encode()
    with urllib.request.urlopen(urllib.request.Request("http://127.0.0.1:{port}/", data=body)) as resp:
        return np.asarray(json.loads(resp.read())["scores"])
'''


def test_a_foreign_api_is_attacked_through_a_user_adapter(cache_dir, tmp_path, monkeypatch, ray_serve):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Foreign)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    (tmp_path / "adapters").mkdir()
    (tmp_path / "adapters" / "foreign_adapter.py").write_text(ADAPTER.format(port=server.server_address[1]))
    monkeypatch.syspath_prepend(str(tmp_path / "adapters"))
    try:
        run_dir = tmp_path / "run"
        s = sim.run("single_knockoff", ["victim.client=foreign_adapter:predict", *REMOTE_SMALL,
                                        f"cache_dir={cache_dir}", f"run_dir={run_dir}"], quiet=True)
    finally:
        server.shutdown()
    ds = data.load("mnist5k")
    own = float(np.mean(_Foreign.scores(ds.x_test.reshape(len(ds.x_test), -1) / 255.0).argmax(1) == ds.y_test))
    assert abs(s.victim.test_accuracy - own) < 1e-9 and s.victim.source == "remote"
    table = analysis.read_run(str(run_dir))
    assert _Foreign.seen[0] == table.num_rows == 240 + len(ds.x_test)  # every image scored once, and logged
    answered = table.filter(pc.equal(table.column("role"), "attacker"))
    probs = np.asarray(answered.column("returned_probs").to_pylist())
    x = analysis.decode_inputs(answered, ds.input_shape)
    np.testing.assert_allclose(probs, _Foreign.scores(x.reshape(len(x), -1) / 255.0), atol=1e-6)
    assert s.attackers[0].replica is not None and s.attackers[0].replica.fidelity > 0.3

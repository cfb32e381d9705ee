"""A victim this tool does not serve: the project's own serve mode started as a separate process (victim.url), and a
foreign server written here with the standard library, reached through a user adapter (victim.client)."""

import json
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pyarrow.compute as pc
import pytest

import analysis
import sim
from sim import data
from sim.serving import free_port

from .conftest import env_without_ray_address

REMOTE_SMALL = ["attackers.single.budget=200", "attackers.single.replica.epochs=10", "benign.users=1",
                "benign.queries=40", "victim.epochs=2"]


def _roles(table) -> dict:
    roles = table.column("role").to_pylist()
    return {r: roles.count(r) for r in set(roles)}


def test_a_separately_started_serve_mode_is_attacked_through_its_keys(cache_dir, tmp_path, ray_serve):
    port = free_port()
    served = tmp_path / "served"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sim", "serve", "scenario=single_knockoff", f"cache_dir={cache_dir}",
         f"run_dir={served}", f"serve.port={port}", "serve.accounts=3", "victim.epochs=2", "ray.num_cpus=1"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env_without_ray_address())
    try:
        lines, deadline = [], time.time() + 240
        while time.time() < deadline:
            line = proc.stdout.readline()
            assert line, f"serve exited early: {lines}"
            lines.append(line.strip())
            if line.startswith("Ctrl-C"):
                break
        served_accuracy = float(re.search(r"test accuracy ([0-9.]+)", lines[0]).group(1))
        url, keys = f"http://127.0.0.1:{port}/victim", served / "keys.json"

        # the scenario needs 3 keys (attacker, benign user, evaluation): one more account is one key too many
        with pytest.raises(sim.ConfigError, match=r"victim.key_file=.* has 3 usable keys .*; the scenario needs 4: "
                                                  r"one per account \(3\) and one for evaluation"):
            sim.run("single_knockoff", [f"victim.url={url}", f"victim.key_file={keys}", *REMOTE_SMALL,
                                        "benign.users=2", f"run_dir={tmp_path / 'short'}"], quiet=True)

        run_dir = tmp_path / "run"
        s = sim.run("single_knockoff", [f"victim.url={url}", f"victim.key_file={keys}", *REMOTE_SMALL,
                                        f"cache_dir={cache_dir}", f"run_dir={run_dir}"], quiet=True)
        assert (s.victim.source, s.victim.checkpoint) == ("remote", url)
        assert s.victim.test_accuracy == served_accuracy  # measured through the evaluation account
        assert s.defense.test_l1_mean is None and s.detection == {}
        assert s.queries.total == 240 and s.queries.answered == 240
        single = s.attackers[0]
        assert single.replica.test_accuracy > 0.5 and single.replica.fidelity > 0.5 and single.undefended is None
        table = analysis.read_run(str(run_dir))
        n_test = len(data.load("mnist5k").x_test)
        assert _roles(table) == {"attacker": 200, "benign": 40, "evaluation": n_test}
        assert table.column("clean_probs").null_count == table.num_rows  # no clean answers of a remote victim
        assert table.column("returned_probs").null_count == 0 and table.column("input").null_count == 0
        ours = set(table.column("account_id").to_pylist())
        assert ours == {"single-0000", "benign-0", "evaluation"}  # the scenario's names for the accounts
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    theirs = analysis.read_run(str(served))
    assert theirs.num_rows == table.num_rows  # every query we logged reached the server, and nothing else
    assert sorted(theirs.column("input_sha1").to_pylist()) == sorted(table.column("input_sha1").to_pylist())


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

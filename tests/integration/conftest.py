"""One Ray (and one Serve with its HTTP proxy on a free local port) for the whole test session."""

import os

# Serve's autoscaler counts requests where the replicas report them, not through the test driver's handles: runs in
# this process (sim.run) drop the driver's Serve client, after which a handle's reports would no longer arrive
os.environ.setdefault("RAY_SERVE_COLLECT_AUTOSCALING_METRICS_ON_HANDLE", "0")

import pytest  # noqa: E402

from sim.serving import free_port  # noqa: E402

# tiny budgets; the two benign accounts in one client actor (every actor is a process, seconds to start on two cores)
SMALL = [
    "victim.epochs=2",
    "attackers.single.budget=160",
    "attackers.single.replica.epochs=2",
    "benign.queries=40",
    "benign.users=1",
    "benign.accounts=2",
]


REQUEST_TIMEOUT_S = 15


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def ray_serve():
    import ray
    from ray import serve

    from sim.engine import init_local_ray

    init_local_ray(num_cpus=2, object_store_mb=300)
    port = free_port()
    # a request unfinished after 15 s is answered 408 (test_hardening waits for that): far above any test's latency
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": REQUEST_TIMEOUT_S})
    yield port
    ray.shutdown()


@pytest.fixture()
def small_overrides(cache_dir, tmp_path):
    return [f"cache_dir={cache_dir}", f"run_dir={tmp_path / 'run'}", *SMALL]


def env_without_ray_address():
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    return env

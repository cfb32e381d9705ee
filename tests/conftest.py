import os

os.environ.setdefault("RAY_DEDUP_LOGS", "0")


import compileall  # noqa: E402
import importlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# The project's bytecode, compiled once for the hundreds of processes the tests start (Ray's workers, the CLI's runs):
# where PYTHONDONTWRITEBYTECODE is set (this machine sets it), each would compile every module it imports again
for package in ("sim", "actors", "analysis"):
    compileall.compile_dir(ROOT / package, quiet=1)

EXAMPLE = ROOT / "docs" / "examples" / "mypkg"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The worked-example plug-in package (docs/examples/mypkg) installed with pip into a temporary target put on the
    path, never into the shared environment: its entry points register tiny, blobs, smooth, burst and noisy. Gone
    again afterwards."""
    import shutil

    from sim import data, registry

    target, source = tmp_path_factory.mktemp("site"), tmp_path_factory.mktemp("src") / "mypkg"
    shutil.copytree(EXAMPLE, source)  # pip builds in the source folder: a copy keeps the repository clean
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--target", str(target), str(source)], check=True, capture_output=True)
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    registry.forget_plugins()
    yield target
    sys.path.remove(str(target))
    for name in [m for m in sys.modules if m == "mypkg" or m.startswith("mypkg.")]:
        del sys.modules[name]
    registry.forget_plugins()
    data.load.cache_clear()

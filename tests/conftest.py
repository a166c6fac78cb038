"""Test set-up: 8 fake CPU devices (must be set before jax is imported anywhere)."""
import os
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Many tests build a Trainer for the same tiny configs (a run, then its crashed and resumed twin), in
# this process, in the other pytest-xdist worker and in subprocesses (the CLI, 2-process runs, the
# notebook's kernel): one persistent compilation cache per test session, set through the
# environment so every one of them compiles each identical program once. A size limit turns on
# jax's file lock around cache reads and writes, which processes sharing the cache need.
_session = os.environ.get("PYTEST_XDIST_TESTRUNUID") or str(os.getpid())
os.environ.setdefault("RETINA_JAX_TEST_COMPILE_CACHE",
                      os.path.join(tempfile.gettempdir(), f"retina_jax_xla_cache_{_session}"))
# The demo configs draw their synthetic corpora once into a render cache: one per test session too.
os.environ.setdefault("RETINA_JAX_CACHE", os.path.join(tempfile.gettempdir(), f"retina_jax_cache_{_session}"))
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["RETINA_JAX_TEST_COMPILE_CACHE"]
os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(8 * 2 ** 30)
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import jax  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)

import orbax.checkpoint as ocp  # noqa: E402
import pytest  # noqa: E402

# orbax splits every replicated array across its replicas to save them in parallel, compiling a
# slice program per array on each save (~25 s a checkpoint on 8 fake CPU devices). The tests' one
# host gains nothing from it; production keeps orbax's default.
ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False),
                                        override=True)


@pytest.fixture(scope="session")
def devices():
    assert jax.device_count() == 8, "tests expect 8 fake CPU devices (tests/conftest.py sets XLA_FLAGS)"
    return jax.devices()

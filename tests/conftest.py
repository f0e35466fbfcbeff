"""Shared setup: simulated devices, and tiny random GPT-2s written by transformers (PyTorch), the
numerical reference. No hub here or in CI: every model is built from a config and saved.

Nothing here needs torch at import: the fixtures that do skip their test where it is absent
(parity modules also skip themselves at the top), so the rest of the suite runs without it.
"""

import os

# The suite's models are tiny, so compiling is most of its time, and XLA's CPU backend compiles
# about a quarter faster with LLVM's optimizations off (``--xla_backend_optimization_level=0``:
# the same programs, less optimized machine code). Every process the suite starts gets these
# flags too (trainutil.CLI_ENV); DPO_JAX_SUITE_XLA_FLAGS="" runs the suite as users compile.
os.environ.setdefault("DPO_JAX_SUITE_XLA_FLAGS", "--xla_backend_optimization_level=0")
# Simulated devices for the sharding tests; must be set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      + os.environ["DPO_JAX_SUITE_XLA_FLAGS"])
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import pytest

from parity import TINY, WIDE_VOCAB, make_torch_gpt2


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """(torch model, folder) of a tiny random GPT-2 saved with save_pretrained."""
    pytest.importorskip("torch", reason="torch is the numerical reference for parity tests")
    model = make_torch_gpt2(**TINY)
    path = tmp_path_factory.mktemp("tiny_gpt2")
    model.save_pretrained(path)
    return model, path


@pytest.fixture(scope="session")
def wide_hf(tmp_path_factory):
    pytest.importorskip("torch", reason="torch is the numerical reference for parity tests")
    model = make_torch_gpt2(seed=1, **WIDE_VOCAB)
    path = tmp_path_factory.mktemp("wide_gpt2")
    model.save_pretrained(path)
    return model, path


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
    """A real GCS emulator on 127.0.0.1 for the session (tests/gcs_emulator.py); the tests
    that need it skip, saying why, where it cannot start."""
    try:
        from gcs_emulator import Emulator
        server = Emulator(tmp_path_factory.mktemp("gcs_root"),
                          tmp_path_factory.mktemp("gcs_log") / "fake-gcs-server.log")
    except Exception as e:  # no wheel, no binary for this platform, a port refused
        pytest.skip(f"the GCS emulator cannot start here ({type(e).__name__}: {e})")
    yield server
    server.stop()

"""Root pytest plugin: options, markers, Hypothesis profiles, shared fixtures (STYLE.md)."""
from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, Verbosity, settings

MARKERS = {
    "slow": "long-running; excluded by default (run with -m slow)",
    "gpu": "needs a CUDA device; excluded by default (run with --device cuda -m gpu)",
    "hf": "needs the optional transformers extra (skipped with a reason when missing)",
    "golden": "golden-file regression checks",
    "cpu_kernels": ("expectation depends on torch's native CPU kernels; CI reruns these under "
                    "ATEN_CPU_CAPABILITY=avx2 and default, without oneDNN half GEMMs "
                    "(benchmarks/cpu_capabilities.py)"),
}

settings.register_profile(
    "dev", max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile(
    "thorough", max_examples=500, deadline=None, print_blob=True, verbosity=Verbosity.normal,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def pytest_addoption(parser):
    g = parser.getgroup("gpt-parity")
    g.addoption("--device", default="cpu", help="device for fast-path tests: cpu | cuda")
    g.addoption("--max-examples", type=int, default=None,
                help="override Hypothesis max_examples of the chosen profile")
    g.addoption("--hypothesis-profile-name", default=None,
                help="Hypothesis profile: dev | ci | thorough (default: ci under CI=true, else dev)")
    g.addoption("--update-golden", action="store_true",
                help="regenerate golden files through `parity golden update`'s code path")


def pytest_configure(config):
    try:  # tiny models: one torch thread per xdist worker avoids spin contention on 2 cores
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    for name, doc in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {doc}")
    profile = config.getoption("--hypothesis-profile-name") or (
        "ci" if os.environ.get("CI") else "dev")
    settings.load_profile(profile)
    n = config.getoption("--max-examples")
    if n:
        settings.register_profile(profile + "-n", settings.get_profile(profile), max_examples=n)
        settings.load_profile(profile + "-n")
    config._parity_profile = settings.get_current_profile_name()
    # default run excludes slow and gpu tests (reasons in MARKERS) unless -m is given
    if not config.getoption("-m"):
        config.option.markexpr = "not slow and not gpu"


def pytest_report_header(config):
    return (f"gpt-parity: hypothesis profile={config._parity_profile} "
            f"(max_examples={settings().max_examples}), device={config.getoption('--device')}")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--device") != "cuda":
        skip = pytest.mark.skip(reason="needs --device cuda and a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def device(request):
    return request.config.getoption("--device")


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """The embedded tiny checkpoint of every family, made once per session: family -> path."""
    from parity.checkpoints.recipes import make_checkpoint
    import reference

    root = tmp_path_factory.mktemp("tiny")
    return {f: make_checkpoint(f, root / f) for f in reference.FAMILIES}

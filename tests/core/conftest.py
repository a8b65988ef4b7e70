"""Checks of the core that need no GPU but are slow enough to select on their own."""


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "compile_targets: compiles every ESamp Triton kernel for real NVIDIA targets with Triton's own compiler "
        "(no GPU needed; minutes): pytest -m compile_targets",
    )

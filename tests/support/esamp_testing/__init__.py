"""Test support of sgl-esamp, installed by the test setup (scripts/setup.sh), never with the product.

  harness        the backend driven in-process as SGLang's ModelRunner.sample drives it
  hooks          test-only hooks loaded into server processes (an SGLang plugin of its own,
                 `esamp_testing`), each behind its environment variable: none by default
  launches       counts the device launches of a piece of code
  traffic        mixed concurrent traffic (the reliability test, benchmarks/soak.py)
  triton_targets compiles the kernels for real NVIDIA targets on a machine without a GPU
"""

import os

# Triton kernels are tested on the CPU under Triton's interpreter, which is chosen when
# kernels are decorated, so it must be on before anything imports triton. Servers the
# tests start get an environment without it.
os.environ.setdefault("TRITON_INTERPRET", "1")

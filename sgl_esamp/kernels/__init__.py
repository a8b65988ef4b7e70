"""Triton kernels of ESamp; each has a torch reference in sgl_esamp/ that tests compare against."""

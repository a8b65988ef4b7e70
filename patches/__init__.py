"""Every place sgl-esamp touches SGLang (0.5.23), through SGLang's own extension points.

Installed as `sgl_esamp.patches`. The server side is loaded by SGLang itself from the
`sglang.srt.plugins` entry point (`plugin.register`); the frontend side is one import
in the user's program (`import sgl_esamp.patches.frontend`).
"""

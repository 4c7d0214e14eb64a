"""Compiled stand-ins for our networks: the same callables as the torch modules, run by another engine.

``openvino.py``: our denoiser network and autoencoder halves converted with ``openvino.convert_model`` and compiled
per input shape for CPUs. ``Pipeline.to_backend("openvino")`` uses them; the samplers never know.
"""

BACKENDS = ("torch", "openvino", "openvino-or-torch")  # the last: OpenVINO, and torch for a module it cannot convert

"""A stand-in of the parts of TensorRT-LLM kvbm's connector touches (tests only).

Mirrors NVIDIA/TensorRT-LLM @ 5a06f334f04fb515ff79f73b7f0f7726ad757361: the real names, import paths, base classes and dataclass fields; no CUDA, no C++.
"""

__version__ = "1.2.0rc2+kvbm-stand-in"

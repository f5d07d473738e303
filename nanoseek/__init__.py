"""nanoseek: DeepSeek-V3 / R1 in PyTorch: the model, its training objectives, inference and scale-out.

The names below, and the subpackages (``nanoseek.model``, ``nanoseek.hf``, ...), are imported on first use
(PEP 562), so that importing ``nanoseek.cli`` does not import torch before the ``nanoseek`` command can catch a
Ctrl-C."""

import importlib
import importlib.util

__version__ = "0.1.0"
_EXPORTS = {"ModelConfig": ".config", "DeepSeekV3": ".model", "ModelOutput": ".model", "generate": ".inference",
            "Tokenizer": ".tokenizer"}
__all__ = ["DeepSeekV3", "ModelConfig", "ModelOutput", "Tokenizer", "generate", "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f".{name}", __name__)  # nanoseek.model etc., as after an eager import
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # the next look-up does not come here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

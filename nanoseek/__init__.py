"""nanoseek: DeepSeek-V3 / R1 in PyTorch: the model, its training objectives, inference and scale-out."""

from .config import ModelConfig
from .model import DeepSeekV3, ModelOutput
from .inference import generate
from .tokenizer import Tokenizer

__version__ = "0.1.0"
__all__ = ["DeepSeekV3", "ModelConfig", "ModelOutput", "Tokenizer", "generate", "__version__"]

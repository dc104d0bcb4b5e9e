"""An independent Llama 2: Meta's layout and numerics in pure torch (never imports transformers)."""
from .model import ModelArgs, Transformer

__all__ = ["ModelArgs", "Transformer"]

"""Training loops on accelerate: DreamBooth-style subject adapters."""

from .config import DreamBoothConfig
from .dreambooth import ADAPTER_FILE, train_dreambooth

__all__ = ["ADAPTER_FILE", "DreamBoothConfig", "train_dreambooth"]

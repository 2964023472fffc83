"""Training loops on accelerate: DreamBooth-style subject adapters and control adapters."""

from .config import ControlConfig, DreamBoothConfig
from .control import ADAPTER_FILE as CONTROL_ADAPTER_FILE
from .control import train_control
from .dreambooth import ADAPTER_FILE, train_dreambooth

__all__ = ["ADAPTER_FILE", "CONTROL_ADAPTER_FILE", "ControlConfig", "DreamBoothConfig", "train_control",
           "train_dreambooth"]

"""ether-diffusion: personalise text-to-image diffusion models with ETHER / ETHER+ adapters."""

from .errors import AdapterFileError, EtherError
from .inject import (
    PRESETS,
    active_adapters,
    add_adapter,
    count_parameters,
    delete_adapter,
    disable_adapters,
    enable_adapters,
    fuse_and_unload,
    list_adapters,
    merge_adapters,
    route_adapters,
    set_adapters,
    unload_adapters,
    unmerge_adapters,
)
from .layers import AdapterConfig, EtherLayer

__version__ = "0.1.0"

"""The one hard rule of the lent GPU machines, in one place: NVLink multicast (NVLS) stays off.

A program that creates a multicast object there can take the shared host's GPUs out of service
for a day (DESIGN.md §6). Every GPU script calls ``forbid_multicast()`` before its first
collective, so NCCL, NVSHMEM and PyTorch and every subprocess they start inherit the settings."""
from __future__ import annotations

import os

NO_MULTICAST_ENV = {"NCCL_NVLS_ENABLE": "0", "NVSHMEM_DISABLE_NVLS": "1",
                    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}


def forbid_multicast() -> None:
    """Set (not merely default) the variables that keep NVLink multicast off."""
    os.environ.update(NO_MULTICAST_ENV)

"""kvpolicy as a vLLM plugin (docs/vllm.md).

vLLM runs `register` in every process (entry point group `vllm.general_plugins`). With
KVPOLICY_ARTIFACT set it installs kvpolicy's attention backend: in the CPU_ATTN registry slot on
the CPU (the CPU platform always picks that slot), as CUSTOM elsewhere (select it with
attention_backend="CUSTOM"). Without the variable it does nothing, so installing kvpolicy never
changes a plain vLLM run.
"""

from __future__ import annotations

import os

BACKEND_PATH = "kvpolicy.engines.vllm.backend.KVPolicyBackend"


def register() -> None:
    if not os.environ.get("KVPOLICY_ARTIFACT"):
        return
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    cpu = current_platform.is_cpu()
    register_backend(AttentionBackendEnum.CPU_ATTN if cpu else AttentionBackendEnum.CUSTOM,
                     BACKEND_PATH)

"""The vLLM plugin's entry point (``vllm.general_plugins``: ``bon_sr_fast_top_p``).

The plugin lives in ``bon_sr.sampling.vllm_plugin``; this path stays because installed
environments record it in their entry-point metadata.
"""

from .sampling.vllm_plugin import register

__all__ = ["register"]

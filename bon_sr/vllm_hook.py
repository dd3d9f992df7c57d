"""Compatibility shim: the hook lives in the package ``bon_sr.hook`` (see its docstring).

``worker_extension_cls="bon_sr.vllm_hook.HookWorkerExtension"`` (the documented spelling)
keeps working: vLLM imports this module in the worker and finds the class here.
"""

from .hook import *  # noqa: F401,F403
from .hook import __all__  # noqa: F401

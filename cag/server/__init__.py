"""``cag serve``: an OpenAI-compatible HTTP server over the cag store.

``create_app`` builds the ASGI app (FastAPI): routes in ``app``, request and response
models in ``schemas``, the single model worker in ``worker``, restored caches in
``contexts`` and Prometheus metrics in ``metrics``.
"""

from .app import ServerConfig, create_app
from .worker import WorkerConfig

__all__ = ["ServerConfig", "WorkerConfig", "create_app"]

"""`kontext-rt serve`: an OpenAI-compatible image-editing HTTP server over kontext_rt.Pipeline.

Needs the serve extra (pip install "kontext-rt[serve]": FastAPI, uvicorn, python-multipart, prometheus-client);
the rest of the package imports without it.

    app = create_app(pipe, Settings(max_queue=16, max_batch=4))   # an ASGI app; uvicorn.run(app) serves it
"""

from kontext_rt.serve.app import create_app
from kontext_rt.serve.schemas import Settings

__all__ = ["create_app", "Settings"]

"""``latentdiff serve``: an HTTP API (own, AUTOMATIC1111- and OpenAI-compatible) and a web page over a Pipeline.

``latentdiff.serve.app.create_app(pipe, ServeConfig(...))`` is the FastAPI app. It needs the ``serve`` extra
(``pip install 'latentdiff[serve]'``: fastapi, uvicorn, python-multipart); importing this package does not.
"""

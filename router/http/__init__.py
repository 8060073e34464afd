"""pdserve.router.http: the HTTP plumbing both APIs share: API keys (auth.py), request limits (body
size, content type, JSON shape, batch size: limits.py), the middlewares that count every answer and
put every error in one shape (middleware.py), server-sent events (sse.py) and the OpenAI-shaped
error body (errors.py).

May import: pdserve.router.serving (GenerationError and its types, the router's metrics), the
packages below it, and what pdserve.router may import. Never the APIs above it (pdserve.router.native,
pdserve.router.openai, pdserve.router.openapi).
"""

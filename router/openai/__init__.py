"""pdserve.router.openai: the OpenAI-compatible API: /v1/models, /v1/completions,
/v1/chat/completions (request parsing, chat templates, response and stream shapes).

May import: pdserve.router.http, pdserve.router.serving, pdserve.router.text, the router's state
(router/state.py), and what pdserve.router may import. Never pdserve.router.native or
pdserve.router.openapi (they sit above it).
"""

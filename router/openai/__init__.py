"""pdserve.router.openai: the OpenAI-compatible API: /v1/models, /v1/completions,
/v1/chat/completions (request parsing, chat templates, response and stream shapes).

May import: the rest of pdserve.router and what it may import.
"""

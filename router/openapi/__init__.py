"""pdserve.router.openapi: the OpenAPI 3.1 description of the router: the document built from the
registered routes (document.py, `/openapi.json`), its HTML page (docs_page.py, `/docs`), and the
JSON Schemas of the request bodies (schemas.py).

May import: pdserve.router.native and pdserve.router.openai (the request models it describes),
the packages below them, and what pdserve.router may import.
"""

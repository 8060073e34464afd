"""pdserve.router: the HTTP face (SGLang native API + OpenAI API). Arrives with issue 3."""

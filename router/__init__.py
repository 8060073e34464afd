"""pdserve.router: the HTTP face: SGLang's native API and the OpenAI API over ZMQ workers."""

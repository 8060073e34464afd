"""pdserve.router.text: text on the request path. Encoding and decoding through the Rust
`tokenizers` backend where that equals transformers (tokenizer_fast.py, with the ASCII byte-level
BPE split done in Python: ascii_bpe.py), incremental detokenization (detokenizer.py), stop strings
and stop regexes (stop_strings.py), tool calls and reasoning in model output (tool_call_parser.py
with a format per model family in tool_formats/, reasoning_parser.py, both over json_scan.py).

May import: nothing of pdserve outside router/text (it works on the tokenizer object it is handed); never aiohttp.
"""

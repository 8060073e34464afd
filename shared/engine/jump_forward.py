"""Jump-forward decoding: the text a grammar forces is appended at once instead of decoded token by token.

After a constrained request accepted a token, its matcher names the longest string the grammar
allows and no other from there (xgrammar's `find_jump_forward_string`: the `"name": "` after an
object's `{`, closing quotes and brackets, the only continuation of an enum). `JumpForward.jump`
turns that string into tokens with the worker's tokenizer, advances the matcher over them and
appends them to the request's output; the scheduler then moves the request to its prefilling
queue, so the next extend batch computes their KV and samples the token after them at the end of
that chunk, as for a prompt (scheduler.py `jump_forward`). A run of forced tokens costs one extend
instead of one decode step each.

The token boundary, as SGLang does it (retokenize, not the string alone): a string tokenized on
its own may split where the tokenizer would not (`{` + `"` where its vocabulary has `{"`), and a
model reads its own splits best. The last sampled token has no KV yet and has not been reported,
so it is retokenized together with the forced string and may be replaced (`{` becomes `{"`); the
tokens before it are kept (their KV is computed, the client may have them). Candidates, best first:
1. the last token's text + the forced string, encoded together;
2. the forced string encoded alone, appended.
A candidate counts only when its tokens decode to exactly the text it stands for (a tokenizer that
adds a space before a fragment fails that). At the other end, a last token that a longer token of
the vocabulary extends (`"` of `":`) is left to the model, as xgrammar's `find_jump_forward_tokens`
does: the text after it is free, and the model would likely write the two as one token. Its
tokens stop before a stop token, and where the
request's budget ends (`limit`: tokens it may still gain, keeping one for the token sampled after
the jump; max_new_tokens and the context length are never passed). The matcher must accept every
token: at the first it refuses, the jump stops there (it jumps less); a candidate that would not
move the output forward then is undone and the next one is tried (one that gains nothing even when
accepted whole ends the attempt: a worse split is not worth a step).

Requests that ask for logprobs never jump: each output token's logprob is reported from the step
that sampled it, and forced tokens would need a logits row each in the extend, mapped into the
output logprob lists; they decode as before. The prefill worker of a P/D pair never jumps (its
request is transferring once it has its first token); the decode worker jumps after it applied that
token (decode/decode_role.py). Opt-in, `--enable-jump-forward`: SGLang's `--disable-jump-forward`
left it on, but its overlap scheduler (on by default) turned it off, and SGLang 0.5 dropped it, so
its users get token-by-token constrained decoding unless they ask.
"""

from __future__ import annotations

from typing import Any

from pdserve.shared.engine.request import Req


class JumpForward:
    """Forced tokens for constrained requests; the tokenizer is loaded on the first jump."""

    def __init__(self, tokenizer_path: str, trust_remote_code: bool = False, tokenizer: Any = None):
        self._tokenizer_path = tokenizer_path
        self._trust_remote_code = trust_remote_code
        self._tokenizer = tokenizer
        self._token_prefixes: set[str] | None = None
        self.num_jumps = 0

    def jump(self, req: Req, limit: int) -> int:
        """Appends the tokens req's grammar forces (at most `limit` more than it had); returns how
        many its output gained. Its last token has no KV yet: the caller moves req where it gets it."""
        grammar = req.grammar
        if grammar is None or req.return_logprob or limit < 1 or not req.output_ids:
            return 0
        forced = grammar.forced_string()
        if not forced:
            return 0
        for replaced, tokens in self._candidates(req, forced):
            usable = self._usable(req, tokens, limit + replaced)
            if len(usable) <= replaced:  # the best split gains nothing yet: the model decodes on
                return 0
            gained = self._apply(req, replaced, usable)
            if gained > 0:
                self.num_jumps += 1
                return gained
        return 0

    def _candidates(self, req: Req, forced: str) -> list[tuple[int, list[int]]]:
        """(how many tokens at the end of the output it replaces, its tokens), best first."""
        found: list[tuple[int, list[int]]] = []
        last = req.output_ids[-1]
        if req.num_sent < len(req.output_ids):  # the last token is not reported: it may merge
            last_text = self._decode([last])
            merged = self._encode(last_text + forced)
            if "\ufffd" not in last_text and merged and self._decode(merged) == last_text + forced:
                found.append((0, merged[1:]) if merged[0] == last else (1, merged))
        alone = self._encode(forced)
        if alone and self._decode([last, *alone]) == self._decode([last]) + forced:
            found.append((0, alone))
        return found

    def _usable(self, req: Req, tokens: list[int], budget: int) -> list[int]:
        """tokens cut before the first that would stop req, before a last one that a longer token
        extends, and to `budget`."""
        p = req.params
        stops = set(p.stop_token_ids) | (set() if p.ignore_eos else set(req.eos_token_ids))
        for i, token in enumerate(tokens):
            if token in stops:
                tokens = tokens[:i]
                break
        if tokens and self._tok().convert_ids_to_tokens(tokens[-1]) in self._prefixes():
            tokens = tokens[:-1]
        return tokens[: max(budget, 0)]

    def _prefixes(self) -> set[str]:
        """Every proper prefix of an ordinary token of the vocabulary (built once)."""
        if self._token_prefixes is None:
            tok = self._tok()
            special = set(tok.all_special_tokens)
            self._token_prefixes = {
                piece[:i] for piece in tok.get_vocab() if piece not in special for i in range(1, len(piece))
            }
        return self._token_prefixes

    @staticmethod
    def _apply(req: Req, replaced: int, tokens: list[int]) -> int:
        """Advances req's matcher and output over tokens (after taking back the `replaced` last
        ones); returns the tokens gained, and leaves req as it was when that is not positive."""
        grammar = req.grammar
        assert grammar is not None
        removed = req.output_ids[len(req.output_ids) - replaced :]
        if replaced:
            grammar.rollback(replaced)
            del req.output_ids[-replaced:]
        accepted = 0
        for token in tokens:
            if not grammar.accept(token):
                grammar.rejected = False  # a trial: the request stays as it was before this token
                break
            accepted += 1
        if accepted - replaced > 0:
            req.output_ids.extend(tokens[:accepted])
            return accepted - replaced
        if accepted:
            grammar.rollback(accepted)
        for token in removed:
            grammar.accept(token)
        req.output_ids.extend(removed)
        return 0

    def _encode(self, text: str) -> list[int]:
        return list(self._tok().encode(text, add_special_tokens=False))

    def _decode(self, ids: list[int]) -> str:
        return str(self._tok().decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False))

    def _tok(self) -> Any:
        if self._tokenizer is None:
            from pdserve.shared.tokenizer import get_tokenizer

            self._tokenizer = get_tokenizer(self._tokenizer_path, trust_remote_code=self._trust_remote_code)
        return self._tokenizer

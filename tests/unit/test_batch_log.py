"""SGLang's batch log lines from a real engine (tiny random Llama on the CPU): a prefill line per
extend batch with its request, token and cache-hit counts, a decode line every
`decode_log_interval` decode steps, none with interval 0 (shared/engine/batch_log.py)."""

from __future__ import annotations

import logging
import re

import pytest

from pdserve.shared.args import EngineArgs
from pdserve.shared.engine.engine import Engine
from tests.helpers.tiny_models import make_tiny_model

PAGE = 16
POOL_TOKENS = 2048
PREFILL = re.compile(
    r"^Prefill batch\. #new-seq: (\d+), #new-token: (\d+), #cached-token: (\d+), token usage: (\d\.\d\d), "
    r"#running-req: (\d+), #queue-req: (\d+), $"
)
DECODE = re.compile(
    r"^Decode batch\. #running-req: (\d+), #token: (\d+), token usage: (\d\.\d\d), cpu graph: (True|False), "
    r"gen throughput \(token/s\): (\d+\.\d\d), #queue-req: (\d+), $"
)


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    model = make_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"))
    args = EngineArgs(
        model_path=str(model), device="cpu", dtype="float32", max_total_tokens=POOL_TOKENS, page_size=PAGE
    )
    return Engine(args)


def lines(caplog, pattern: re.Pattern) -> list[tuple[str, ...]]:
    return [m.groups() for r in caplog.records if (m := pattern.match(r.getMessage()))]


def run(engine: Engine, caplog, prompts: list[list[int]], max_new_tokens: int, interval: int) -> None:
    engine.batch_log.decode_log_interval = interval  # as the worker sets --decode-log-interval
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pdserve.shared.engine.batch_log"):
        engine.generate(prompts, {"max_new_tokens": max_new_tokens, "temperature": 0.0, "ignore_eos": True})
    engine.flush_cache()


def test_a_prefill_line_per_batch_with_sglangs_fields(engine, caplog):
    prompt = list(range(3, 43))  # 40 tokens
    run(engine, caplog, [prompt], max_new_tokens=1, interval=0)
    ((seqs, new, cached, usage, running, queued),) = lines(caplog, PREFILL)
    assert (seqs, new, cached, running, queued) == ("1", "40", "0", "0", "0")
    # the pages the prompt took, over the pool, as it starts
    assert float(usage) == pytest.approx(3 * PAGE / POOL_TOKENS, abs=0.005)

    # the prompt again (cached by this first request), extended, with a new one: one batch of two
    # sequences computing 10 + 10 tokens; the cached whole pages of the first are counted apart
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pdserve.shared.engine.batch_log"):
        engine.generate([prompt], {"max_new_tokens": 1})
        engine.generate([prompt + [7, 8], list(range(100, 110))], {"max_new_tokens": 1})
    engine.flush_cache()
    assert [g[:3] for g in lines(caplog, PREFILL)] == [("1", "40", "0"), ("2", "20", "32")]


def test_a_decode_line_every_interval_steps(engine, caplog):
    prompt = list(range(3, 23))  # 20 tokens: two pages, and room for the output in them
    run(engine, caplog, [prompt, prompt[::-1]], max_new_tokens=9, interval=4)  # 8 decode steps
    decode = lines(caplog, DECODE)
    assert len(decode) == 2
    for running, tokens, usage, graph, throughput, queued in decode:
        assert (running, tokens, graph, queued) == ("2", str(4 * PAGE), "False", "0")
        assert float(usage) == pytest.approx(4 * PAGE / POOL_TOKENS, abs=0.005)
    assert float(decode[1][4]) > 0  # tokens of the 4 steps since the first line, over their time
    assert len(lines(caplog, PREFILL)) == 1


def test_interval_zero_prints_no_decode_line(engine, caplog):
    run(engine, caplog, [[5, 6, 7]], max_new_tokens=6, interval=0)
    assert lines(caplog, DECODE) == [] and len(lines(caplog, PREFILL)) == 1

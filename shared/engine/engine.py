"""The in-process engine: validated requests in, one scheduling step at a time, typed outputs out.

    engine = Engine(EngineArgs(model_path=..., device="cpu"))
    engine.add_request(GenerateRequest(rid="a", input_ids=[...], sampling_params={"temperature": 0}))
    while engine.has_work():
        for out in engine.step(): ...          # RequestOutput per request that progressed
    engine.generate([[1, 2, 3]], {"max_new_tokens": 8})   # offline: runs to completion

Workers drive `step()` from their loop; tests and benchmarks use `generate()`. Everything that a
client can get wrong raises `RequestError` from `add_request` with a message naming the field.
A request's samples are built in request_intake.py, the outputs a step reports in output.py.

With overlap scheduling (on by default on CUDA; batch_pipeline.py) a step returns the outputs of the
decode step launched in the previous call while its own decode step runs on the device, and a
request that finishes on a stop token costs one extra (discarded) decode row.
"""

from __future__ import annotations

import importlib.metadata
import logging
import time
from typing import Any

from pdserve.shared.args import EngineArgs
from pdserve.shared.engine.batch_log import BatchLog
from pdserve.shared.engine.batch_pipeline import BatchPipeline
from pdserve.shared.engine.embedding import (
    EmbeddingMode,
    embedding_refused,
    generation_refused,
    matryoshka_dimensions,
)
from pdserve.shared.engine.engine_stats import EngineStats
from pdserve.shared.engine.grammar_compiles import GrammarCompiles
from pdserve.shared.engine.jump_forward import JumpForward
from pdserve.shared.engine.kv_cache_manager import KVCacheManager
from pdserve.shared.engine.latency_stats import RequestLatencies
from pdserve.shared.engine.model_runner import ModelRunner
from pdserve.shared.engine.offline import run_offline
from pdserve.shared.engine.output import build_output, output_due
from pdserve.shared.engine.radix_node import RadixListener
from pdserve.shared.engine.request import Req
from pdserve.shared.engine.request_intake import new_samples
from pdserve.shared.engine.request_validation import RequestError
from pdserve.shared.engine.sampling_params import SamplingParams
from pdserve.shared.engine.scheduled_batch import BatchKind, ScheduledBatch
from pdserve.shared.engine.scheduler import Scheduler, SchedulerConfig
from pdserve.shared.engine.scheduler_role import MixedRole
from pdserve.shared.engine.startup_log import slow_step
from pdserve.shared.engine.tp_weights import swap_weights
from pdserve.shared.engine.weight_swap import (
    UPDATE_OK,
    CheckedWeights,
    WeightsUpdateError,
    check_weights,
    next_weight_version,
)
from pdserve.shared.models.config import ModelConfig
from pdserve.shared.models.loader import meta_model
from pdserve.shared.models.resolver import resolve_model
from pdserve.shared.models.sequence_classification import classifier_facts
from pdserve.shared.protocol import FlushCacheResult, GenerateRequest, LoadReport, RequestOutput, ServerInfo
from pdserve.shared.protocol.embedding import EmbeddingOutput, EmbedRequest

logger = logging.getLogger(__name__)


def overlap_schedule_default(args: EngineArgs) -> bool:
    """Overlap scheduling is on unless --disable-overlap-schedule, where it pays: on CUDA, whose
    kernels run asynchronously. On the CPU the forward blocks the host, so there is nothing to hide."""
    return not args.disable_overlap_schedule and args.device.startswith("cuda")


class Engine:
    """`kv_listener` (optional) hears the prefix cache's page changes: a worker's KV event publisher.
    `overlap_schedule` overrides `overlap_schedule_default(args)` (tests force it on the CPU).
    `scheduler_role` decides what differs between roles inside the scheduler (the P/D roles pass
    theirs; default: the mixed role)."""

    def __init__(
        self,
        args: EngineArgs,
        kv_listener: RadixListener | None = None,
        overlap_schedule: bool | None = None,
        scheduler_role: MixedRole | None = None,
    ):
        args.validate()
        self.args = args
        with slow_step(f"resolving {args.model_path}"):  # a first run may convert or download it
            resolved = resolve_model(args.model_path)
        self.model_path = resolved.reported_path  # changes with update_weights_from_disk
        self.local_dir = resolved.local_dir
        self.tokenizer_path = args.effective_tokenizer_path  # fixed at launch, like SGLang's
        self.served_model_name = args.served_model_name or args.model_path
        self.model_config = ModelConfig.from_path(
            resolved.local_dir,
            dtype=args.dtype,
            device=args.device,
            context_length=args.context_length,
            trust_remote_code=args.trust_remote_code,
        )
        self.embedding = EmbeddingMode.for_model(args, resolved.local_dir, self.model_config)
        whole = self.embedding is not None and self.embedding.whole_prompts
        self.runner = ModelRunner(args, self.model_config, resolved.local_dir, self.embedding)
        self.kv = KVCacheManager(
            self.runner.pool.num_pages,
            args.page_size,
            enable_radix=not args.disable_radix_cache and not whole,
            listener=kv_listener,
        )
        self.scheduler = Scheduler(
            SchedulerConfig(
                page_size=args.page_size,
                max_running_requests=args.max_running_requests,
                max_prefill_tokens=max(args.max_prefill_tokens, self.context_length if whole else 0),
                chunked_prefill_size=-1 if whole else args.chunked_prefill_size,
                schedule_policy=args.schedule_policy,
                context_length=self.model_config.context_length,
                whole_prompts=whole,
            ),
            self.kv,
            scheduler_role,
        )
        self.stats = EngineStats()
        self.latency = RequestLatencies()  # for /metrics, like stats
        # SGLang's batch lines; a worker sets its decode_log_interval, a P/D role its fields
        self.batch_log = BatchLog(
            graph_label="cuda graph" if self.runner.device.type == "cuda" else "cpu graph"
        )
        overlap = overlap_schedule_default(args) if overlap_schedule is None else overlap_schedule
        self.pipeline = BatchPipeline(self.scheduler, self.runner, self.stats, overlap, self.batch_log)
        self.grammars = GrammarCompiles(  # a new grammar compiles on its thread while its request waits
            self.scheduler,
            self.tokenizer_path,
            self.model_config.vocab_size,
            self.model_config.eos_token_ids,
            args.trust_remote_code,
        )
        if args.enable_jump_forward:  # constrained requests skip what their grammar forces
            self.scheduler.jumper = JumpForward(self.tokenizer_path, args.trust_remote_code)
        self.weight_version = "default"
        self._live: dict[str, list[Req]] = {}
        self._embedded: list[EmbeddingOutput] = []  # answers not yet taken (take_embeddings)

    # ------------------------------------------------------------------ facts

    @property
    def max_total_num_tokens(self) -> int:
        return self.runner.pool.total_tokens

    @property
    def context_length(self) -> int:
        return self.model_config.context_length

    def has_work(self) -> bool:
        """Whether any request is live (computing, or waiting on a KV transfer in the roles), or a
        decode step is in flight."""
        return self.scheduler.has_work() or self.pipeline.in_flight is not None

    def has_compute(self) -> bool:
        """Whether a step may run a forward pass (or read one in flight); False while live requests
        only wait on transfers (a worker loop may then wait on its socket a little instead of spinning)."""
        return self.scheduler.has_compute() or self.pipeline.in_flight is not None

    def load(self, query_id: int = 0) -> LoadReport:
        kv = self.kv
        used_pages = kv.num_total_pages - kv.num_free_pages - kv.num_evictable_pages
        return LoadReport(
            query_id=query_id,
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            num_free_pages=kv.num_free_pages,
            num_evictable_pages=kv.num_evictable_pages,
            num_total_pages=kv.num_total_pages,
            page_size=self.args.page_size,
            num_used_tokens=used_pages * self.args.page_size,
            max_total_num_tokens=self.max_total_num_tokens,
            num_steps=self.stats.num_steps,
            generated_tokens=self.stats.generated_tokens,
        )

    # ------------------------------------------------------------------ requests

    def add_request(self, msg: GenerateRequest) -> None:
        """Queues a request (n samples share the prompt's pages); raises RequestError if invalid."""
        samples = self._new_samples(msg)
        self.grammars.attach(samples, self.scheduler.add)
        self._track(msg.rid, samples)

    def _new_samples(self, msg: GenerateRequest) -> list[Req]:
        """Validates msg and builds its n sample requests (queued nowhere yet); raises RequestError."""
        self._check_new_rid(msg.rid)
        if self.embedding is not None:
            raise RequestError(generation_refused(self.served_model_name))
        share_prompt = not self.args.disable_radix_cache
        return new_samples(msg, self.model_config, self.max_total_num_tokens, share_prompt, True)

    def _check_new_rid(self, rid: str) -> None:
        if rid in self._live:
            raise RequestError(f"Duplicate request id {rid!r}: a request with this rid is still running.")

    def add_embedding(self, msg: EmbedRequest) -> None:
        """Queues an embedding request (shared/engine/embedding.py); raises RequestError if invalid."""
        if self.embedding is None:
            raise RequestError(embedding_refused(self.served_model_name))
        self._check_new_rid(msg.rid)
        cfg = self.model_config
        req = self.embedding.new_request(msg, cfg.context_length, self.max_total_num_tokens, cfg.vocab_size)
        self.scheduler.add(req)
        self._track(msg.rid, [req])

    def take_embeddings(self) -> list[EmbeddingOutput]:
        """The answer of every embedding request that ended since the last call (one each)."""
        done, self._embedded = self._embedded, []
        return done

    def _remote_sample(self, msg: GenerateRequest, endpoint: object, partner: str) -> Req:
        """The one sample of a request whose KV crosses to or from the `partner` ("prefill" or
        "decode") worker at `endpoint` (queued nowhere yet); raises RequestError when refused."""
        if not isinstance(endpoint, str) or not endpoint:
            raise RequestError(f"{partner}_kv_endpoint must name the {partner} worker's KV endpoint.")
        samples = self._new_samples(msg)
        if len(samples) > 1:
            raise RequestError("n > 1 is not served disaggregated; it is prefilled where it decodes.")
        return samples[0]

    def _track(self, rid: str, samples: list[Req]) -> None:
        """Counts an accepted request; it stays live until every sample has finished (`_retire`)."""
        self._live[rid] = samples
        self.stats.num_requests += 1
        self.stats.prompt_tokens += len(samples[0].input_ids) * len(samples)

    def abort(self, rid: str, message: str = "Aborted by the client.") -> list[RequestOutput]:
        """Aborts every sample of rid; returns their final outputs (empty if rid is unknown)."""
        reqs = self.scheduler.abort(rid, message)
        self.stats.num_aborted += len(reqs)
        return self._outputs(reqs)

    def abort_all(self, message: str) -> list[RequestOutput]:
        """Aborts every live request (also after a failed step); a decode step in flight is dropped
        unread, since every request in it is finished now."""
        reqs = self.scheduler.abort_all(message)
        self.pipeline.forget()
        self.stats.num_aborted += len(reqs)
        return self._outputs(reqs)

    def step(self) -> list[RequestOutput]:
        """Ends the requests whose grammar failed to compile, then runs one batch; returns their outputs
        and one for every request that gained tokens or finished (with overlap: of the decode step
        launched in the previous call; batch_pipeline.py), but those `output_due` holds back."""
        self.stats.num_steps += 1
        return self.grammars.poll(self.abort) + self._outputs(self.pipeline.step())

    def finish_in_flight(self) -> list[RequestOutput]:
        """Reads the decode step in flight, if any, so nothing runs on the device unread (a worker
        that pauses generation calls it); returns the outputs that step made due."""
        return self._outputs(self.pipeline.drain())

    def _outputs(self, reqs: list[Req]) -> list[RequestOutput]:
        """The outputs due of generation requests; a finished embedding request's answer is kept
        for take_embeddings() instead."""
        outs = []
        for req in reqs:
            if not req.wants_embedding:
                if output_due(req):
                    outs.append(self._emit(req))
            elif req.is_finished:
                self._embedded.append(EmbeddingMode.output(req))
                self._retire(req)
        return outs

    def _emit(self, req: Req) -> RequestOutput:
        out = build_output(req)
        self.stats.generated_tokens += len(out.token_ids)
        if out.token_ids or req.is_finished:
            now = time.monotonic()
            if out.token_ids:
                self.latency.on_output(req, len(out.token_ids), now)
            if req.is_finished:
                self.latency.on_finish(req, now)
        if not req.reported:  # counted once, with the first output (cached_tokens is set at admission)
            self.stats.cached_tokens += req.cached_tokens
        if req.is_finished:
            self._retire(req)
        req.reported = True
        return out

    def _retire(self, req: Req) -> None:
        """Counts a finished sample; forgets its rid once every sample of it has finished."""
        self.stats.num_finished += 1
        samples = self._live.get(req.rid)
        if samples is not None and all(s.is_finished for s in samples):
            del self._live[req.rid]

    def warm_up(self) -> None:
        """One forward of one token outside the scheduler, so the first real request is fast; its page
        goes straight back and nothing enters the cache or the counters (every role can run it, also
        a prefill engine, which serves no GenerateRequest)."""
        pages = self.kv.allocate(1)
        if pages is None:
            return
        req = Req(rid="warm-up", input_ids=[0], params=SamplingParams(max_new_tokens=1, temperature=0.0))
        req.pages = pages
        try:
            self.runner.run(ScheduledBatch(BatchKind.EXTEND, [req], [0], [1]))
        finally:
            self.kv.release([], pages, None, cache=False)

    def flush_cache(self, query_id: int = 0) -> FlushCacheResult:
        if self.has_work():
            return FlushCacheResult(
                query_id, False, "Cache not flushed: there are running or queued requests."
            )
        ok = self.kv.flush()
        return FlushCacheResult(
            query_id, ok, "Cache flushed." if ok else "Cache not flushed: pages are in use."
        )

    # ------------------------------------------------------------------ admin

    def server_info(self, query_id: int = 0) -> ServerInfo:
        """The engine's facts; the worker adds its id, role and flags."""
        cfg = self.model_config
        return ServerInfo(
            query_id=query_id,
            args=self.args.to_dict(),
            model_path=self.model_path,
            tokenizer_path=self.tokenizer_path,
            served_model_name=self.served_model_name,
            model_type=cfg.model_type,
            architectures=list(cfg.architectures),
            context_length=self.context_length,
            vocab_size=cfg.vocab_size,
            max_total_num_tokens=self.max_total_num_tokens,
            page_size=self.args.page_size,
            kv_pool_bytes=self.runner.pool.nbytes,
            weight_version=self.weight_version,
            version=importlib.metadata.version("pdserve"),
            weight_bytes=self.runner.weight_bytes,
            is_generation=self.embedding is None,
            matryoshka_dimensions=matryoshka_dimensions(cfg.hf_config),
            hidden_size=cfg.hidden_size,
            **classifier_facts(cfg.hf_config, list(cfg.architectures)),  # type: ignore[arg-type]
        )

    def check_weights(self, model_path: str, load_format: str | None = None) -> CheckedWeights:
        """Checks a checkpoint against the live model (weight_swap.py); raises WeightsUpdateError.
        Reads parameter shapes only, so it may run in another thread while the engine steps."""
        # a rank's slices are cut as at load: the whole checkpoint must fit the whole model
        tp = self.runner.tp is not None
        model = meta_model(self.model_config, self.args.quantization) if tp else self.runner.model
        return check_weights(model, self.model_config, model_path, load_format, self.args.load_format)

    def update_weights_from_disk(
        self,
        model_path: str,
        load_format: str | None = None,
        weight_version: str | None = None,
        checked: CheckedWeights | None = None,
    ) -> tuple[bool, str]:
        """Replaces the weights, flushes the radix cache and sets weight_version; (success, message).

        Only an idle engine updates (a worker drains its requests first): with requests in flight
        this fails and changes nothing. `checked` skips the check when the caller already ran it."""
        if self.has_work():
            return False, "Failed to update weights: requests are still running."
        try:
            checked = checked or self.check_weights(model_path, load_format)
            swap_weights(self.runner, checked, self.local_dir)  # every rank's, all or nothing
        except WeightsUpdateError as exc:
            return False, str(exc)
        self.kv.flush()  # cached pages hold K/V computed by the old weights
        self.model_path, self.local_dir = checked.reported_path, checked.local_dir
        self.args.model_path, self.args.load_format = checked.reported_path, checked.load_format
        self.weight_version = next_weight_version(self.weight_version, weight_version)
        logger.info("weights updated from %s (version %s)", checked.local_dir, self.weight_version)
        return True, UPDATE_OK

    def note_new_weights(self, weight_version: str | None = None, flush_cache: bool = True) -> None:
        """After new values were copied into the idle engine's parameters (a tensor update): the
        cached pages hold K/V of the old values (flushed unless `flush_cache` is False, SGLang's
        choice to offer) and the version moves on, as after a reload from disk."""
        if flush_cache:
            self.kv.flush()
        self.weight_version = next_weight_version(self.weight_version, weight_version)
        logger.info("weights updated from tensors (version %s)", self.weight_version)

    # ------------------------------------------------------------------ offline use

    def generate(
        self,
        input_ids: list[list[int]],
        sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None,
        **logprob_args: Any,
    ) -> list[dict[str, Any]]:
        """Runs the prompts to completion in one continuous batch (offline.py says what it returns)."""
        return run_offline(self, input_ids, sampling_params, **logprob_args)

"""The router's arguments and its one state object, stored on the aiohttp app under STATE_KEY.

    state = request.app[STATE_KEY]
    state.generator.stream(GenerateInput(...))     # router/serving/generator_api.py's TextGenerator
    state.tokenizer, state.model_name, state.context_length, state.chat_template, state.pool
    state.admission                                # the queue for running slots
                                                   # (router/serving/admission_gate.py)

Model facts (model_path, tokenizer_path, context_length, vocab size, model_type, architectures,
weight_version) come from the first worker's ServerInfo; `--model-path`/`--tokenizer-path` take
precedence over what the worker says. The tokenizer loads (in a thread) from `--tokenizer-path`
at start-up when given, else from the first worker's tokenizer path. Until both a worker and the
tokenizer are known, `require_ready()` raises GenerationError 503 with a message saying which.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from aiohttp import web

from pdserve.router.cluster.pairing import DEFAULT_LOCAL_PREFILL_THRESHOLD, Pairing
from pdserve.router.cluster.policies import make_decode_policy, make_policy
from pdserve.router.cluster.worker_conn import Heartbeat
from pdserve.router.cluster.worker_pool import PoolConfig, WorkerPool
from pdserve.router.processes import capacity_share
from pdserve.router.serving.admission import AdmissionConfig, AdmissionQueue
from pdserve.router.serving.admission_gate import AdmissionGate
from pdserve.router.serving.dispatch import Dispatcher
from pdserve.router.serving.embedder import RouterEmbedder
from pdserve.router.serving.generator import RouterTextGenerator
from pdserve.router.serving.generator_api import GenerationError
from pdserve.router.serving.metrics import RouterMetrics
from pdserve.router.text.reasoning_parser import reasoning_format
from pdserve.router.text.tokenizer_fast import Encoder, fast_encoder
from pdserve.router.text.tool_formats import call_format
from pdserve.shared.args import EngineArgs
from pdserve.shared.protocol import ServerInfo

logger = logging.getLogger(__name__)

VERSION = "0.1.0"


@dataclass
class RouterArgs:
    """Every router flag (router/cli.py), with its default."""

    host: str = "127.0.0.1"
    port: int = 30000
    redis_url: str | None = None
    worker_addrs: list[str] = field(default_factory=list)
    policy: str = "cache_aware"  # mixed workers
    prefill_policy: str = "cache_aware"  # the prefill worker of a pair (router/cluster/pairing.py)
    decode_policy: str = "least_load"  # the decode worker: free KV pages, then load
    local_prefill_threshold: int = DEFAULT_LOCAL_PREFILL_THRESHOLD  # shorter prompts: prefill at decode
    api_key: str | None = None
    admin_api_key: str | None = None
    request_timeout: float | None = None  # seconds; None: no limit
    max_queued_requests: int | None = None  # router/serving/admission.py's queue bound; None: none
    enable_priority_scheduling: bool = False  # order that queue by the requests' `priority`
    schedule_low_priority_values_first: bool = False  # smaller priority values first (SGLang's flag)
    max_body_bytes: int = 32 * 1024 * 1024
    max_batch_size: int = 256
    model_path: str | None = None
    tokenizer_path: str | None = None
    served_model_name: str | None = None
    chat_template: str | None = None  # a file path (or an inline Jinja template)
    preferred_sampling_params: str | None = None  # JSON object
    tool_call_parser: str | None = None  # router/text/tool_formats name; None: from the chat template
    reasoning_parser: str | None = None  # router/text/reasoning_parser name; None: no split
    log_level: str = "info"
    max_attempts: int = 3  # workers tried per request before giving up (a move counts as one)
    disable_migration: bool = False  # a stream whose worker dies ends with an error instead of moving
    worker_liveness_timeout: float = 3.0  # seconds without a heartbeat answer: the worker is gone
    load_poll_interval: float = 0.5
    breaker_failure_threshold: int = 3
    breaker_cooldown: float = 10.0
    processes: int = 1  # router processes on one port (router/processes.py); each admits its share

    def validate(self) -> None:
        make_policy(self.policy)  # ValueError names the choices
        make_policy(self.prefill_policy)
        make_decode_policy(self.decode_policy)
        if self.local_prefill_threshold < 0:
            raise ValueError("--local-prefill-threshold must be >= 0")
        if self.preferred_sampling_params is not None:
            parse_preferred_sampling_params(self.preferred_sampling_params)
        if self.chat_template is not None:
            load_chat_template(self.chat_template)
        if self.tool_call_parser is not None:
            call_format(self.tool_call_parser)  # ValueError names the choices
        if self.reasoning_parser is not None:
            reasoning_format(self.reasoning_parser)
        names = ("max_body_bytes", "max_batch_size", "max_attempts", "breaker_failure_threshold", "processes")
        for name in names:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.worker_liveness_timeout <= 0:
            raise ValueError("--worker-liveness-timeout must be > 0")
        if self.max_queued_requests is not None and self.max_queued_requests < 0:
            raise ValueError("--max-queued-requests must be >= 0")
        if self.request_timeout is not None and self.request_timeout <= 0:
            raise ValueError("--request-timeout must be > 0")

    def to_public_dict(self) -> dict[str, Any]:
        """The arguments as /get_server_info shows them: keys are never shown, only whether set."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        for key in ("api_key", "admin_api_key"):
            out[key] = "<set>" if out[key] else None
        return out


def parse_preferred_sampling_params(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--preferred-sampling-params is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError("--preferred-sampling-params must be a JSON object")  # noqa: TRY004 (a flag error)
    return value


def load_chat_template(arg: str) -> str:
    """`--chat-template`: a file holding a Jinja template, or the template itself."""
    path = Path(arg)
    if path.is_file():
        return path.read_text()
    if "{%" in arg or "{{" in arg:
        return arg
    raise ValueError(f"--chat-template {arg!r} is neither a file nor a Jinja template")


@dataclass
class ModelFacts:
    """What the router knows of the served model, from a worker's ServerInfo."""

    model_path: str
    tokenizer_path: str
    served_model_name: str
    model_type: str
    architectures: list[str]
    context_length: int
    vocab_size: int
    weight_version: str
    is_generation: bool = True  # False: an embedding model (/encode, /v1/embeddings)
    matryoshka_dimensions: list[int] | None = None  # see ServerInfo
    hidden_size: int = 0
    labels: list[str] = field(default_factory=list)  # a classifier's labels (reward model, cross-encoder)
    cross_encoder: bool = False  # a classifier over text pairs (the worker says: shared/models/pooling.py)

    @property
    def kind(self) -> str:
        if self.is_generation:
            return "a generation model"
        if self.cross_encoder:
            return "a cross-encoder (rerank) model"
        return "a classification model" if self.labels else "an embedding model"

    @classmethod
    def from_server_info(cls, info: ServerInfo) -> ModelFacts:
        return cls(
            model_path=info.model_path,
            tokenizer_path=info.tokenizer_path or info.model_path,
            served_model_name=info.served_model_name or info.model_path,
            model_type=info.model_type,
            architectures=list(info.architectures),
            context_length=info.context_length,
            vocab_size=info.vocab_size,
            weight_version=info.weight_version,
            is_generation=info.is_generation,
            matryoshka_dimensions=info.matryoshka_dimensions,
            hidden_size=info.hidden_size,
            labels=list(info.labels),
            cross_encoder=info.cross_encoder,
        )


class RouterState:
    def __init__(self, args: RouterArgs):
        args.validate()
        self.args = args
        self.started_at = time.time()
        self.metrics = RouterMetrics()
        self.pool = WorkerPool(
            make_policy(args.policy),
            PoolConfig(
                poll_interval_s=args.load_poll_interval,
                heartbeat=Heartbeat(timeout_s=args.worker_liveness_timeout),
                breaker_failure_threshold=args.breaker_failure_threshold,
                breaker_cooldown_s=args.breaker_cooldown,
            ),
            on_server_info=self.learn,
        )
        self.prefill_policy = make_policy(args.prefill_policy)
        self.pairing = Pairing(
            self.pool,
            self.prefill_policy,
            make_decode_policy(args.decode_policy),
            args.local_prefill_threshold,
        )
        self.dispatcher = Dispatcher(
            self.pool,
            args.max_attempts,
            args.request_timeout,
            self.metrics,
            self.pairing,
            migrate=not args.disable_migration,
        )
        # Without a bound or priorities the router has no use for a queue: requests go to the
        # workers at once and wait in theirs (as SGLang's scheduler queues them).
        queueing = args.max_queued_requests is not None or args.enable_priority_scheduling
        self.admission = AdmissionGate(
            AdmissionQueue(
                AdmissionConfig(
                    args.max_queued_requests,
                    args.enable_priority_scheduling,
                    args.schedule_low_priority_values_first,
                ),
                self.cluster_slots if queueing else lambda: None,
            ),
            self.metrics,
            args.request_timeout,
        )
        self.preferred_sampling_params: dict[str, Any] | None = (
            parse_preferred_sampling_params(args.preferred_sampling_params)
            if args.preferred_sampling_params
            else None
        )
        self._chat_template_arg = load_chat_template(args.chat_template) if args.chat_template else None
        self.facts: ModelFacts | None = None
        self.tokenizer: Any = None
        self._tokenizer_task: asyncio.Task | None = None
        self._tokenizer_error: str | None = None
        self._encoders: tuple[Any, dict[bool, Encoder]] = (None, {})  # (tokenizer, made for it)
        self.generator = RouterTextGenerator(self)
        self.embedder = RouterEmbedder(self.pool, args.max_attempts, args.request_timeout)

    # ------------------------------------------------------------------ model facts

    @property
    def model_path(self) -> str:
        return self.args.model_path or (self.facts.model_path if self.facts else "")

    @property
    def tokenizer_path(self) -> str:
        return (
            self.args.tokenizer_path or (self.facts.tokenizer_path if self.facts else "") or self.model_path
        )

    @property
    def model_name(self) -> str:
        """The served model name (the `model` field of OpenAI responses)."""
        if self.args.served_model_name:
            return self.args.served_model_name
        if self.args.model_path:
            return self.args.model_path
        return self.facts.served_model_name if self.facts else ""

    @property
    def context_length(self) -> int:
        return self.facts.context_length if self.facts else 0

    @property
    def weight_version(self) -> str:
        return self.facts.weight_version if self.facts else "default"

    @property
    def chat_template(self) -> str | None:
        if self._chat_template_arg is not None:
            return self._chat_template_arg
        return getattr(self.tokenizer, "chat_template", None) if self.tokenizer is not None else None

    @property
    def pool_tokens(self) -> int:
        """The smallest KV pool of the workers that can serve (a prompt must fit any of them)."""
        sizes = [h.server_info.max_total_num_tokens for h in self.pool.workers.values() if h.server_info]
        return min(sizes) if sizes else 0

    def cluster_slots(self) -> int | None:
        """Requests the workers that stream them can run at once (the sum of their
        `max_running_requests`), this process's share of it with `--processes N`: the admission
        queue's capacity; None while there is none."""
        slots = [
            int(h.server_info.args.get("max_running_requests", EngineArgs.max_running_requests))
            for h in self.pool.workers.values()
            if h.can_serve and h.server_info is not None
        ]
        return capacity_share(sum(slots), self.args.processes) if slots else None

    def learn(self, info: ServerInfo) -> None:
        """Called by the pool for each ServerInfo; the first one sets the model facts."""
        if self.facts is None:
            self.facts = ModelFacts.from_server_info(info)
            logger.info("serving %s (learned from worker %s)", self.facts.model_path, info.worker_id)
            self.start_tokenizer_load()
            return
        if info.model_path != self.facts.model_path:
            logger.warning(
                "worker %s serves %s, not %s: one router serves one model",
                info.worker_id,
                info.model_path,
                self.facts.model_path,
            )
        if info.weight_version != self.facts.weight_version:
            self.facts.weight_version = info.weight_version

    def start_tokenizer_load(self) -> None:
        """Loads the tokenizer in a thread (transformers is slow to import and load), once."""
        if self._tokenizer_task is not None or not self.tokenizer_path:
            return
        self._tokenizer_task = asyncio.get_running_loop().create_task(
            self._load_tokenizer(self.tokenizer_path)
        )

    async def _load_tokenizer(self, path: str) -> None:
        try:
            self.tokenizer = await asyncio.to_thread(_import_and_load_tokenizer, path)
            logger.info("tokenizer of %s loaded", path)
        except Exception as exc:  # noqa: BLE001 (any loading failure is reported by require_ready)
            self._tokenizer_error = f"cannot load the tokenizer {path}: {exc}"
            logger.error(self._tokenizer_error)

    async def wait_tokenizer(self) -> None:
        if self._tokenizer_task is not None:
            await asyncio.shield(self._tokenizer_task)

    def require_tokenizer(self) -> Any:
        if self.tokenizer is not None:
            return self.tokenizer
        if self._tokenizer_error:
            raise GenerationError(503, f"The router {self._tokenizer_error}.")
        if self._tokenizer_task is None:
            raise GenerationError(
                503,
                "No worker has registered yet: the router learns the model (and its tokenizer) from its first worker.",
            )
        raise GenerationError(503, f"The router is still loading the tokenizer of {self.tokenizer_path}.")

    def encoder(self, add_special_tokens: bool = True) -> Encoder:
        """`tokenizer.encode(text, add_special_tokens=...)` for one text (router/text/tokenizer_fast.py),
        made once per tokenizer; GenerationError 503 while there is no tokenizer."""
        tokenizer = self.require_tokenizer()
        if self._encoders[0] is not tokenizer:
            self._encoders = (tokenizer, {})
        made = self._encoders[1]
        if add_special_tokens not in made:
            made[add_special_tokens] = fast_encoder(tokenizer, add_special_tokens)
        return made[add_special_tokens]

    def require_ready(self) -> ModelFacts:
        """The model facts, once a worker and the tokenizer are known; GenerationError 503 before."""
        if self.facts is None:
            raise GenerationError(
                503, "No worker has registered yet: the router learns the model from its first worker."
            )
        self.require_tokenizer()
        return self.facts

    def require_generation(self) -> ModelFacts:
        """`require_ready`, and GenerationError 400 when the served model does not generate."""
        facts = self.require_ready()
        if not facts.is_generation:
            raise GenerationError(
                400,
                f"The served model {self.model_name} is an embedding model: it does not generate text; "
                "use /encode or /v1/embeddings.",
            )
        return facts


STATE_KEY = web.AppKey("pdserve_state", RouterState)


def _import_and_load_tokenizer(path: str) -> Any:
    """In a thread: importing transformers (and torch under it) takes seconds, which the event
    loop would otherwise spend not listening and not answering."""
    from pdserve.shared.tokenizer import get_tokenizer

    return get_tokenizer(path)

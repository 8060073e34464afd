"""Turns a ScheduledBatch into one forward pass, logits for the rows that need them, and samples.

The runner owns the torch side of the engine: the model, the paged KV pool, the attention backend
and the sampler. It writes logprobs into the requests (they are the client's data) and returns one
sampled token per request that reached the end of its fill_ids, None for the others. A decode step
can also be launched and collected in two calls (`launch`, `collect`), so the engine may plan and
launch the next step before reading this one's tokens (overlap scheduling, in_flight.py); `launch`
itself splits into `launch_forward` and `launch_sampling`, so a step with constrained rows can run
its forward while the host reads the step before and fills the bitmask from its tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from pdserve.kernels.fp8_kv_format import is_fp8
from pdserve.shared.args import EngineArgs
from pdserve.shared.engine.attention_ref import TorchRefAttention
from pdserve.shared.engine.cuda_graph_runner import DecodeGraphRunner, DecodeInputs
from pdserve.shared.engine.expert_distribution import attach_expert_recorder
from pdserve.shared.engine.grammar import grammar_bitmask
from pdserve.shared.engine.in_flight import DecodeForward, FutureTokenIds, LaunchedDecode
from pdserve.shared.engine.kv_pool import KVPoolShape, PagedKVPool, kv_cache_dtype
from pdserve.shared.engine.request import Req
from pdserve.shared.engine.sampler import SampleOutput, Sampler, SamplingInputs, token_logprobs
from pdserve.shared.engine.scheduled_batch import BatchKind, ScheduledBatch
from pdserve.shared.engine.startup_log import slow_step
from pdserve.shared.engine.tp_decode_graphs import TPDecodeGraphs, build_decode_graphs
from pdserve.shared.engine.tp_steps import step_channel_host, step_ends
from pdserve.shared.models.config import ModelConfig
from pdserve.shared.models.forward_batch import ForwardBatch, ForwardMode
from pdserve.shared.models.kv_scales import KVScaleCollector
from pdserve.shared.models.loader import load_model, shard_rules_of
from pdserve.shared.models.tensor_parallel import kv_heads_per_rank
from pdserve.shared.models.tensor_parallel_layers import TPRank, gather_logits, min_over_ranks

logger = logging.getLogger(__name__)

# KV pool size on CPU when --max-total-tokens is not given (GPU sizes from --mem-fraction-static).
DEFAULT_CPU_POOL_TOKENS = 16384


@dataclass
class PromptLogprobRows:
    """Rows of this step's logits that score prompt tokens of one request."""

    req: Req
    first_row: int  # index into the logits rows
    next_ids: list[int]  # the prompt token each row predicts


class ModelRunner:
    """`embedding` (an embedding model's mode): forwards pool finished prompts and sample nothing.

    With `args.tp_size` > 1 this process is one rank of the default process group: the model and
    the KV pool hold the rank's heads (shared.models.tensor_parallel), every rank's pool has the
    same pages, rank 0 sends each forward pass to the followers first (tp_steps.py) and gathers the
    logits; followers run `forward_logits` on what they receive (tp_follower.py), and a decode step
    that fits a CUDA graph replays it on every rank (tp_decode_graphs.py)."""

    def __init__(self, args: EngineArgs, model_config: ModelConfig, local_dir, embedding=None):
        self.args = args
        self.embedding = embedding
        self.config = model_config
        self.device = torch.device(args.device)
        self.local_dir = local_dir
        self.kv_dtype = kv_cache_dtype(args.kv_cache_dtype, model_config.dtype)
        checkpoint_kv_scales = KVScaleCollector()
        self.tp = TPRank.current() if args.tp_size > 1 else None
        if self.tp is not None and embedding is not None:
            raise ValueError(f"--tp {args.tp_size}: embedding models have no tensor-parallel support yet")
        with slow_step(f"loading the weights ({args.load_format}) onto {self.device}"):
            self.model = load_model(
                model_config,
                local_dir,
                args.load_format,
                device=self.device,
                seed=args.random_seed,
                quantization=args.quantization,
                kv_scales=checkpoint_kv_scales,
                tp_rank=self.tp,
            )
        if embedding is not None:
            self.embedding = embedding.with_head_of(self.model)
        # before any graph capture: the graphs must hold the recorder's counting ops
        self.expert_recorder = attach_expert_recorder(self.model, args, model_config.num_layers, self.device)
        use_triton = args.attention_backend == "triton" or (
            args.attention_backend == "auto" and self.device.type == "cuda"
        )
        if use_triton:
            from pdserve.shared.engine.attention_triton import TritonAttention
            from pdserve.shared.models.fast_path import use_triton_kernels
            from pdserve.shared.models.fp8_fused import fuse_fp8_inputs

            self.attn_backend = TritonAttention()
            use_triton_kernels(self.model)
            fuse_fp8_inputs(self.model)  # fp8 linears' inputs quantized by the norm/activation kernels
        else:
            self.attn_backend = TorchRefAttention()
        shape = self._pool_shape()
        scales = checkpoint_kv_scales.as_tensor(shape.num_layers, shape.num_planes)
        # a 16-bit pool stores K/V as computed: the checkpoint's scales only serve an fp8 one
        self.pool = PagedKVPool(shape, self.kv_dtype, self.device, scales if is_fp8(self.kv_dtype) else None)
        # the checkpoint slices of this rank, for weight updates (tp_weights.py)
        self.shard_rules = shard_rules_of(model_config, self.tp) if self.tp is not None else None
        # rank 0 sends each forward pass to the followers; a follower receives them
        self.step_sender, self.step_receiver = step_ends(self.tp, step_channel_host(args))
        self.sampler = Sampler(model_config.vocab_size, self.device, seed=args.random_seed)
        logger.info(
            "model loaded: %s, KV pool %d pages x %d tokens (%.1f MiB, %s), attention %s",
            model_config.architectures,
            self.pool.num_pages,
            self.pool.page_size,
            self.pool.nbytes / 2**20,
            self.kv_dtype,
            type(self.attn_backend).__name__,
        )
        self.graphs: DecodeGraphRunner | TPDecodeGraphs | None = None
        self.weight_bytes = sum(
            t.numel() * t.element_size() for t in (*self.model.parameters(), *self.model.buffers())
        )
        # under TP every rank captures here, together (tp_decode_graphs.py)
        if self.device.type == "cuda" and not args.disable_cuda_graph and embedding is None:
            self.graphs = build_decode_graphs(
                self.model,
                self.pool,
                self.attn_backend,
                args,
                model_config,
                self.device,
                self.tp,
                self.step_sender,
            )
        elif args.enable_torch_compile:
            # Without decode graphs (CPU, --disable-cuda-graph) every forward pass runs compiled;
            # with them, the graphs of the small decode batches capture a compiled forward.
            self.model.forward = torch.compile(self.model.forward)

    # ------------------------------------------------------------------ sizing

    def _pool_shape(self) -> KVPoolShape:
        cfg, args = self.config, self.args
        ps = args.page_size
        # an encoder keeps no K/V: its pool only counts pages (the scheduler's currency)
        layers = 0 if getattr(self.model, "is_encoder", False) else cfg.num_layers
        if args.max_total_tokens is not None:
            tokens = args.max_total_tokens
        elif self.device.type == "cuda" and layers:
            free, total = torch.cuda.mem_get_info(self.device)
            used = total - free
            budget = int(total * args.mem_fraction_static) - used
            pages = KVPoolShape.pages_for_budget(
                budget, cfg.num_layers, ps, cfg.num_kv_heads, cfg.head_dim, self.kv_dtype, cfg.kv_planes
            )
            tokens = pages * ps
        else:
            tokens = DEFAULT_CPU_POOL_TOKENS
        num_pages = tokens // ps + 1  # + the reserved page 0
        kv_heads = cfg.num_kv_heads
        if self.tp is not None:  # rank 0 hands out page ids that must exist on every rank
            num_pages = min_over_ranks(num_pages, self.device)
            kv_heads = kv_heads_per_rank(kv_heads, self.tp.size)
        if num_pages < 2:
            raise ValueError(f"KV pool too small: {tokens} tokens with page size {ps}")
        return KVPoolShape(layers, num_pages, ps, kv_heads, cfg.head_dim, cfg.kv_planes)

    def decode_uses_graph(self, batch_size: int) -> bool:
        """Whether a decode step of batch_size requests replays a captured CUDA graph."""
        return self.graphs is not None and self.graphs.fits(batch_size)

    # ------------------------------------------------------------------ one step

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> list[int | None]:
        """Runs a batch to completion: the sampled token per request (None where it samples none),
        logprobs written into the requests."""
        if batch.kind == BatchKind.DECODE:
            return list(self.collect(self.launch(batch)))
        fb, sample_rows, prompt_rows = self._build(batch)
        if self.expert_recorder is not None:
            self.expert_recorder.begin_forward(len(fb.input_ids))
        hidden = self._forward(fb)
        if self.expert_recorder is not None:
            self.expert_recorder.end_forward()
        if self.embedding is not None:
            self.embedding.collect(batch, hidden)
            return [None] * len(batch.reqs)
        logits = self._logits(hidden[fb.logits_indices])
        for rows in prompt_rows:
            self._record_prompt_logprobs(rows, logits)
        return self._sample(batch, logits, sample_rows)

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, futures: FutureTokenIds | None = None) -> LaunchedDecode:
        """Launches a decode step (every request samples) and returns without waiting for it.

        `futures`: the ids of the launched step before this one, for requests whose input token is
        still in flight (overlap scheduling); they are resolved on the device."""
        return self.launch_sampling(self.launch_forward(batch, futures))

    @torch.inference_mode()
    def launch_forward(self, batch: ScheduledBatch, futures: FutureTokenIds | None = None) -> DecodeForward:
        """The first half of `launch`: the decode step's forward, CUDA graph replay included, with
        its sampling inputs read now (before the step is recorded as launched) and no bitmask yet."""
        step = self._decode_inputs(batch, futures)
        resolve = futures.resolve if futures is not None else None
        if self.expert_recorder is not None:  # a graph's padding rows are not counted
            self.expert_recorder.begin_forward(step.batch_size)
        if self.graphs is not None and self.graphs.fits(step.batch_size):
            logits = self.graphs.replay(step, resolve_input_ids=resolve)
        else:
            fb = ForwardBatch.build(
                ForwardMode.DECODE,
                step.input_ids,
                batch.prefix_lens,
                [1] * step.batch_size,
                step.page_rows,
                self.pool.page_size,
                self.pool,
                self.attn_backend,
                device=self.device,
            )
            if resolve is not None:
                resolve(fb.input_ids)
            logits = self.forward_logits(fb)
        if self.expert_recorder is not None:
            self.expert_recorder.end_forward()
        return DecodeForward(batch, logits, self._sampling_inputs(batch.reqs))

    @torch.inference_mode()
    def launch_sampling(self, forward: DecodeForward) -> LaunchedDecode:
        """The second half of `launch`: the token bitmask from the matchers as they stand now (a
        constrained row needs the tokens before this step accepted), then the sampling."""
        inputs = forward.inputs
        inputs.token_bitmask = grammar_bitmask(forward.batch.reqs, self.config.vocab_size, self.device)
        next_ids = self.sampler.sample_on_device(forward.logits, inputs)
        return LaunchedDecode.of(forward.batch, forward.logits, inputs, next_ids)

    def _forward(self, fb: ForwardBatch) -> torch.Tensor:
        if self.step_sender is not None:  # the followers run the same pass, meeting its collectives
            self.step_sender.send(fb)
        return self.model.forward(fb)

    def _logits(self, hidden_rows: torch.Tensor) -> torch.Tensor:
        logits = self.model.compute_logits(hidden_rows)
        if self.tp is None:
            return logits
        return gather_logits(logits, self.config.vocab_size, self.tp.size)

    @torch.inference_mode()
    def forward_logits(self, fb: ForwardBatch) -> torch.Tensor:
        """One forward pass and the logits of its `logits_indices` rows (all ranks: the full vocabulary)."""
        return self._logits(self._forward(fb)[fb.logits_indices])

    @torch.inference_mode()
    def collect(self, launched: LaunchedDecode) -> list[int]:
        """A launched decode step's tokens on the host (waits for that step only). Logprobs go into
        the requests that are still live (a finished one drops this step's token); a step with
        logprobs must be collected before the next launch (its logits are overwritten then)."""
        if not launched.wants_logprobs:
            return launched.token_ids()
        out = self.sampler.read(launched.logits, launched.next_ids, launched.inputs)
        for j, req in enumerate(launched.batch.reqs):
            if req.return_logprob and not req.is_finished:
                self._record_output_logprobs(req, out, j)
        return out.next_token_ids

    def _sample(
        self, batch: ScheduledBatch, logits: torch.Tensor, sample_rows: list[int | None]
    ) -> list[int | None]:
        """Samples the rows of `logits` that `sample_rows` names (None: request i samples nothing)."""
        next_tokens: list[int | None] = [None] * len(batch.reqs)
        sampled = [i for i in range(len(batch.reqs)) if sample_rows[i] is not None]
        if not sampled:
            return next_tokens
        reqs = [batch.reqs[i] for i in sampled]
        rows = [sample_rows[i] for i in sampled]
        # a decode step samples every row in order: no index tensor to build and copy to the device
        picked = logits[: len(rows)] if rows == list(range(len(rows))) else logits[rows]
        inputs = self._sampling_inputs(reqs)
        inputs.token_bitmask = grammar_bitmask(reqs, self.config.vocab_size, self.device)
        out = self.sampler.sample(picked, inputs)
        for j, i in enumerate(sampled):
            req = batch.reqs[i]
            next_tokens[i] = out.next_token_ids[j]
            if req.return_logprob:
                self._record_output_logprobs(req, out, j)
        return next_tokens

    @staticmethod
    def _record_output_logprobs(req: Req, out: SampleOutput, j: int) -> None:
        """Appends row j of a sample's logprobs to req (which asked for logprobs)."""
        req.output_token_logprobs.append((out.logprobs[j], out.next_token_ids[j]))
        if req.top_logprobs_num > 0:
            req.output_top_logprobs.append(out.top_logprobs[j] or [])
        if req.token_ids_logprob:
            req.output_token_ids_logprobs.append(out.token_ids_logprobs[j] or [])

    def _decode_inputs(self, batch: ScheduledBatch, futures: FutureTokenIds | None = None) -> DecodeInputs:
        """One token per request at position prefix_len (without building fill_ids: O(1) each); a
        token still in flight (position == seq_len) is the placeholder `futures` gives for it."""
        ps = self.pool.page_size
        ids, positions, slots = [], [], []
        for req, pos in zip(batch.reqs, batch.prefix_lens):
            prompt_len, seq_len = len(req.input_ids), req.seq_len
            if pos < prompt_len:
                ids.append(req.input_ids[pos])
            elif pos < seq_len:
                ids.append(req.output_ids[pos - prompt_len])
            elif futures is not None:
                ids.append(futures.placeholder(req))
            else:
                raise ValueError(f"request {req.rid}: token {pos} is in flight and no launched step holds it")
            positions.append(pos)
            slots.append(req.pages[pos // ps] * ps + pos % ps)
        return DecodeInputs(ids, positions, slots, [r.pages for r in batch.reqs])

    def _build(self, batch: ScheduledBatch) -> tuple[ForwardBatch, list[int | None], list[PromptLogprobRows]]:
        input_ids: list[int] = []
        logits_positions: list[int] = []  # rows of hidden (token index in the batch) needing logits
        sample_rows: list[int | None] = []
        prompt_rows: list[PromptLogprobRows] = []
        start = 0
        for i, req in enumerate(batch.reqs):
            c, e = batch.prefix_lens[i], batch.extend_lens[i]
            input_ids.extend(req.fill_ids[c : c + e])
            if batch.kind == BatchKind.EXTEND and req.wants_input_logprobs:
                rows = self._plan_prompt_logprobs(req, c, e, start, logits_positions)
                if rows is not None:
                    prompt_rows.append(rows)
            if batch.samples(i):
                sample_rows.append(len(logits_positions))
                logits_positions.append(start + e - 1)
            else:
                sample_rows.append(None)
            start += e
        mode = ForwardMode.DECODE if batch.kind == BatchKind.DECODE else ForwardMode.EXTEND
        fb = ForwardBatch.build(
            mode,
            input_ids,
            batch.prefix_lens,
            batch.extend_lens,
            [r.pages for r in batch.reqs],
            self.pool.page_size,
            self.pool,
            self.attn_backend,
            logits_indices=logits_positions,
            device=self.device,
        )
        return fb, sample_rows, prompt_rows

    def _plan_prompt_logprobs(
        self, req: Req, c: int, e: int, start: int, logits_positions: list[int]
    ) -> PromptLogprobRows | None:
        """Position p's logits score prompt token p+1; SGLang reports tokens from logprob_start_len on,
        the very first prompt token with a None logprob."""
        s, prompt_len = req.logprob_start_len, len(req.input_ids)
        if c == 0 and s == 0:
            req.input_token_logprobs.append((None, req.input_ids[0]))
            if req.top_logprobs_num > 0:
                req.input_top_logprobs.append(None)
            if req.token_ids_logprob:
                req.input_token_ids_logprobs.append(None)
        lo, hi = max(c, s - 1), min(c + e, prompt_len - 1)
        if c + e >= prompt_len:
            req.input_logprobs_done = True
        if lo >= hi:
            return None
        first_row = len(logits_positions)
        logits_positions.extend(start + (p - c) for p in range(lo, hi))
        return PromptLogprobRows(req, first_row, req.input_ids[lo + 1 : hi + 1])

    def _record_prompt_logprobs(self, rows: PromptLogprobRows, logits: torch.Tensor) -> None:
        req = rows.req
        chunk = logits[rows.first_row : rows.first_row + len(rows.next_ids)]
        lps, tops, id_lps = token_logprobs(chunk, rows.next_ids, req.top_logprobs_num, req.token_ids_logprob)
        req.input_token_logprobs.extend(zip(lps, rows.next_ids))
        if req.top_logprobs_num > 0:
            req.input_top_logprobs.extend(tops)
        if req.token_ids_logprob:
            req.input_token_ids_logprobs.extend(id_lps)

    def _sampling_inputs(self, reqs: list[Req]) -> SamplingInputs:
        """Every row's sampling inputs but the token bitmask, which its caller fills when it samples."""
        return SamplingInputs(
            params=[r.params for r in reqs],
            prompt_ids=[r.input_ids for r in reqs],
            output_ids=[r.output_ids for r in reqs],
            # with ignore_eos, eos is an ordinary token: nothing to hold back until min_new_tokens
            eos_token_ids=[frozenset() if r.params.ignore_eos else r.eos_token_ids for r in reqs],
            top_logprobs_num=[r.top_logprobs_num if r.return_logprob else 0 for r in reqs],
            token_ids_logprob=[r.token_ids_logprob if r.return_logprob else None for r in reqs],
            return_logprob=[r.return_logprob for r in reqs],
            num_generated=[len(r.output_ids) + r.tokens_in_flight for r in reqs],
        )

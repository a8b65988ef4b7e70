"""The esamp backend driven in-process, the way SGLang's `ModelRunner.sample` calls it: SGLang's
own ServerArgs (with the plugin loaded), its runtime context, its `SamplingBatchInfo`,
`LogitsProcessorOutput` and `ForwardMode`, and a batch of requests with SGLang's own
`SamplingParams`. For tests and benchmarks that must measure the path the server takes
(benchmarks/launches.py, tests/backend/test_backend.py) without a server around it.

The model is a model's real weights where the caller has them (`Model.from_pretrained`, through
transformers: the same module layout as SGLang's Llama) or random weights of chosen shapes
(`Model.random`); only its weights are read (the taps' norms, the embedding, the LM head),
and the forward's hidden states are the caller's.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Iterator, Optional, Sequence

import torch

_published: list[tuple] = []


def publish(model_path: str, args: Sequence[str] = ()) -> None:
    """Publish SGLang's process-wide runtime config for `model_path` with `--sampler esamp` and
    `args`, as a scheduler of one TP rank (no DP) does; once per process."""
    key = (str(model_path), tuple(args))
    if _published:
        if _published[0] != key:
            raise RuntimeError(f"the runtime is already published for {_published[0]}")
        return
    os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "0" if torch.cuda.is_available() else "1")
    from sglang.srt.plugins import load_plugins
    from sglang.srt.runtime_context import get_parallel, publish as publish_runtime
    from sglang.srt.server_args import ServerArgs

    load_plugins()
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    device = [] if torch.cuda.is_available() else ["--device", "cpu", "--attention-backend", "torch_native"]
    server_args = ServerArgs.from_cli_args(parser.parse_args(
        ["--model-path", str(model_path), "--sampler", "esamp", *device, *args]))
    publish_runtime(server_args, role="scheduler")
    get_parallel().override_permanently(tp_group=SimpleNamespace(device_group=None), tp_rank=0, dp_rank=None)
    _published.append(key)


@dataclass
class Model:
    """What the backend reads of SGLang's model runner: the weights, by SGLang's module names."""

    model: Any  # .model.layers[i].input_layernorm, .model.embed_tokens, .model.norm, .lm_head
    vocab_size: int
    num_hidden_layers: int

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype = torch.float32) -> "Model":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        return cls(model, model.config.vocab_size, model.config.num_hidden_layers)

    @classmethod
    def random(cls, hidden: int, vocab: int, layers: int, device: str = "cpu", seed: int = 0) -> "Model":
        gen = torch.Generator().manual_seed(seed)
        randn = lambda *shape: torch.randn(*shape, generator=gen).to(device)
        norm = lambda: SimpleNamespace(weight=1 + 0.1 * randn(hidden), variance_epsilon=1e-5)
        inner = SimpleNamespace(layers=[SimpleNamespace(input_layernorm=norm()) for _ in range(layers)],
                                embed_tokens=SimpleNamespace(weight=randn(vocab, hidden)), norm=norm())
        return cls(SimpleNamespace(model=inner, lm_head=SimpleNamespace(weight=randn(vocab, hidden) / hidden**0.5)),
                   vocab, layers)

    @property
    def runner(self) -> Any:
        """A stand-in for SGLang's ModelRunner: the attributes the backend reads."""
        return SimpleNamespace(model=self.model, model_config=SimpleNamespace(
            vocab_size=self.vocab_size, num_hidden_layers=self.num_hidden_layers))


@dataclass
class Request:
    """What the backend reads of SGLang's Req."""

    rid: str
    sampling_params: Any  # SGLang's SamplingParams, normalized
    seqlen: int = 8
    done: bool = False
    origin_input_ids: list = field(default_factory=list)  # the prompt's tokens

    def finished(self) -> bool:
        return self.done


_rids = itertools.count()


def request(temperature: float = 0.8, top_p: float = 0.95, top_k: int = -1, min_p: float = 0.0,
            custom_params: Optional[dict] = None, max_new_tokens: int = 16, seqlen: int = 8) -> Request:
    """A sampled request as SGLang's tokenizer hands it over (validated, group id stamped)."""
    from sglang.srt.sampling.sampling_params import SamplingParams

    from sgl_esamp.patches import lifecycle

    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                            max_new_tokens=max_new_tokens, custom_params=dict(custom_params or {}))
    params.normalize(None)
    params.verify(vocab_size=1 << 20)
    lifecycle._verify(None, params)
    return Request(f"req-{next(_rids)}", params, seqlen)


def sampling_info(requests: Sequence[Request], vocab_size: int, device: str = "cpu",
                  sampling_seed: Optional[torch.Tensor] = None) -> Any:
    """SGLang's SamplingBatchInfo of a batch, as `from_schedule_batch` fills its sampling fields."""
    from sglang.srt.sampling.sampling_batch_info import SamplingBatchInfo

    ps = [r.sampling_params for r in requests]
    top_ks = [p.top_k for p in ps]
    return SamplingBatchInfo(
        temperatures=torch.tensor([p.temperature for p in ps], dtype=torch.float32, device=device).view(-1, 1),
        top_ps=torch.tensor([p.top_p for p in ps], dtype=torch.float32, device=device),
        top_ks=torch.tensor(top_ks, dtype=torch.int32, device=device),
        min_ps=torch.tensor([p.min_p for p in ps], dtype=torch.float32, device=device),
        is_all_greedy=all(k <= 1 for k in top_ks), is_any_greedy=any(k <= 1 for k in top_ks),
        need_top_p_sampling=any(p.top_p != 1.0 for p in ps), need_top_k_sampling=any(k != (1 << 30) for k in top_ks),
        need_min_p_sampling=any(p.min_p > 0 for p in ps), vocab_size=vocab_size, device=device,
        sampling_seed=sampling_seed, max_top_k=None if any(k >= vocab_size for k in top_ks) else max(top_ks),
    )


@dataclass
class Harness:
    """One esamp backend and the model it samples for; `decode` runs one decode step."""

    model: Model
    backend: Any = None
    device: str = "cpu"
    steps: int = field(default=0)

    def __post_init__(self) -> None:
        from sgl_esamp.patches.sampler_backend import ESampBackend

        if self.backend is None:
            self.backend = ESampBackend()
            self.backend.warm_up(self.model.runner)

    def hidden(self, rows: int, seed: int = 0) -> SimpleNamespace:
        """Random captured states of `rows` tokens in SGLang's layout (aux capture, final-normed, logits)."""
        gen = torch.Generator().manual_seed(seed)
        head = self.model.model.lm_head.weight
        H = head.shape[1]
        last = torch.randn(rows, H, generator=gen).to(head.device)
        return SimpleNamespace(aux=torch.randn(rows, self.backend.taps.width, generator=gen).to(head.device),
                               last=last, logits=(last.to(head.dtype) @ head.T).float() * 4)

    def decode(self, requests: Sequence[Request], hidden: Optional[SimpleNamespace] = None, *,
               return_logprob: bool = False, sampling_seed: Optional[torch.Tensor] = None,
               input_ids_dtype: torch.dtype = torch.int64) -> tuple[torch.Tensor, Any]:
        """One decode step of `requests` through the backend, exactly as ModelRunner.sample calls
        it (one row per request); returns the drawn ids and SGLang's LogitsProcessorOutput."""
        from sglang.srt.layers.logits_processor import LogitsProcessorOutput
        from sglang.srt.model_executor.forward_batch_info import ForwardMode

        n = len(requests)
        hidden = hidden or self.hidden(n, seed=self.steps)
        self.steps += 1
        info = sampling_info(requests, self.model.vocab_size, self.device, sampling_seed)
        forward_batch = ForwardBatch(ForwardMode.DECODE, torch.zeros(n, dtype=input_ids_dtype, device=self.device),
                                     info)
        output = LogitsProcessorOutput(next_token_logits=hidden.logits.clone(), hidden_states=hidden.aux,
                                       last_hidden_states=hidden.last)
        positions = torch.tensor([r.seqlen for r in requests], device=self.device)
        self.backend.remember(ScheduleBatch(list(requests), ForwardMode.DECODE), forward_batch)  # ForwardBatch.init_new
        with self.backend.stepping(self.model.runner, output, forward_batch):  # ModelRunner.sample
            tokens = self.backend(output, info, return_logprob, [0] * n, [None] * n, positions)
        for r in requests:
            r.seqlen += 1
        return tokens, output

    def prefill(self, requests: Sequence[Request], seed: int = 0) -> Optional[torch.Tensor]:
        """One extend step prefilling each request's whole prompt (origin_input_ids, or `seqlen`
        tokens), through the backend as ModelRunner.sample calls it (or, for a batch of
        prefill-only requests, as the forward's hook does); returns the drawn ids (None for those)."""
        from sglang.srt.layers.logits_processor import LogitsProcessorOutput
        from sglang.srt.model_executor.forward_batch_info import ForwardMode

        for r in requests:
            r.origin_input_ids = r.origin_input_ids or list(range(r.seqlen))
            r.seqlen = len(r.origin_input_ids)
        lengths = [r.seqlen for r in requests]
        hidden = self.hidden(sum(lengths), seed=seed)
        last_rows = torch.tensor(list(itertools.accumulate(lengths)), device=self.device) - 1
        info = sampling_info(requests, self.model.vocab_size, self.device)
        forward_batch = ForwardBatch(
            ForwardMode.EXTEND, torch.tensor([t for r in requests for t in r.origin_input_ids], device=self.device),
            info, extend_seq_lens_cpu=lengths, extend_prefix_lens_cpu=[0] * len(requests),
            is_prefill_only=all(r.sampling_params.max_new_tokens == 0 for r in requests))
        output = LogitsProcessorOutput(next_token_logits=hidden.logits.index_select(0, last_rows),
                                       hidden_states=hidden.aux, last_hidden_states=hidden.last)
        self.backend.remember(ScheduleBatch(list(requests), ForwardMode.EXTEND), forward_batch)
        if forward_batch.is_prefill_only:  # not sampled: learnt in the forward's hook
            with self.backend.stepping(self.model.runner, output, forward_batch):
                return None
        n = len(requests)
        positions = torch.tensor(lengths, device=self.device) - 1
        with self.backend.stepping(self.model.runner, output, forward_batch):
            return self.backend(output, info, False, [0] * n, [None] * n, positions)


@dataclass
class ScheduleBatch:
    """What the backend reads of SGLang's ScheduleBatch when it builds a forward batch."""

    reqs: list
    forward_mode: Any
    decoding_reqs: tuple = ()
    return_hidden_states_mode: int = 0  # CaptureHiddenMode.NULL


@dataclass(eq=False)
class ForwardBatch:
    """What the backend reads of SGLang's ForwardBatch (a weakly referenced key, as SGLang's is)."""

    forward_mode: Any
    input_ids: torch.Tensor
    sampling_info: Any
    extend_seq_lens_cpu: Optional[list] = None
    extend_prefix_lens_cpu: Optional[list] = None
    is_prefill_only: bool = False


def _renorm(probs: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    kept = torch.where(keep, probs, 0.0)
    return kept / kept.sum(-1, keepdim=True)


def _sorted_keep(probs: torch.Tensor, test) -> torch.Tensor:
    """The kept mask, in vocabulary order, of a test on the sorted probabilities."""
    sorted_probs, index = probs.sort(dim=-1, descending=True)
    return torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, index, test(sorted_probs))


def top_k_renorm_prob(probs: torch.Tensor, top_ks: torch.Tensor) -> torch.Tensor:
    ranks = torch.arange(probs.shape[-1], device=probs.device)
    return _renorm(probs, _sorted_keep(probs, lambda s: ranks < top_ks.view(-1, 1)))


def top_p_renorm_prob(probs: torch.Tensor, top_ps: torch.Tensor) -> torch.Tensor:
    return _renorm(probs, _sorted_keep(probs, lambda s: (s.cumsum(-1) - s) <= top_ps.view(-1, 1)))


def min_p_sampling_from_probs(probs: torch.Tensor, min_ps: torch.Tensor) -> torch.Tensor:
    keep = probs >= probs.amax(-1, keepdim=True) * min_ps.view(-1, 1)
    return torch.multinomial(_renorm(probs, keep), 1).view(-1).to(torch.int32)


def top_k_top_p_sampling_from_probs(probs: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor,
                                    filter_apply_order: str = "joint") -> torch.Tensor:
    kept = top_p_renorm_prob(top_k_renorm_prob(probs, top_ks), top_ps)
    return torch.multinomial(kept, 1).view(-1).to(torch.int32)


FLASHINFER_NAMES = ("top_k_renorm_prob", "top_p_renorm_prob", "min_p_sampling_from_probs",
                    "top_k_top_p_sampling_from_probs")


@contextlib.contextmanager
def flashinfer_standins(backend: Any) -> Iterator[dict[str, tuple[Any, str]]]:
    """Make `backend` draw its plain rows on the flashinfer path, with torch stand-ins for the
    flashinfer sampling functions SGLang's sampler imports (it imports them only on CUDA; the
    stand-ins filter and draw as they do, not bit for bit). Yields {name: (module, attribute)}
    of the stand-ins, for count_launches' `opaque`."""
    import sglang.srt.layers.sampler as sglang_sampler

    saved = {name: getattr(sglang_sampler, name, None) for name in FLASHINFER_NAMES}
    plain_backend, backend.plain_backend = backend.plain_backend, "flashinfer"
    for name in FLASHINFER_NAMES:
        setattr(sglang_sampler, name, globals()[name])
    try:
        yield {f"flashinfer.{name}": (sglang_sampler, name) for name in FLASHINFER_NAMES}
    finally:
        backend.plain_backend = plain_backend
        for name, value in saved.items():
            if value is None:
                delattr(sglang_sampler, name)
            else:
                setattr(sglang_sampler, name, value)


def murmur_hash32(seed: torch.Tensor, positions: torch.Tensor, col_indices: torch.Tensor) -> torch.Tensor:
    """SGLang's murmur_hash32 (sglang.kernels.ops.sampling.murmur_hash: MurmurHash3 over the 64-bit
    seed, the 32-bit position and the 32-bit column) in torch, bit for bit, as int64: its CPU
    version is an sgl_kernel op that the CPU stand-in does not have."""
    mask = 0xFFFFFFFF

    def rotl(x: torch.Tensor, r: int) -> torch.Tensor:
        return ((x << r) | (x >> (32 - r))) & mask

    def mix(h: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        k = rotl((k * 0xCC9E2D51) & mask, 15)
        h = rotl(h ^ ((k * 0x1B873593) & mask), 13)
        return (h * 5 + 0xE6546B64) & mask

    seed = seed.to(torch.int64).view(-1, 1)
    h = mix(torch.zeros_like(seed), seed & mask)
    h = mix(h, (seed >> 32) & mask)
    h = mix(h, positions.to(torch.int64).view(-1, 1) & mask)
    h = mix(h, col_indices.to(torch.int64).view(1, -1) & mask) ^ 16
    for shift, factor in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):
        h = ((h ^ (h >> shift)) * factor) & mask
    return h ^ (h >> 16)


@contextlib.contextmanager
def seeded_standins() -> Iterator[None]:
    """SGLang's seeded draw (deterministic inference) on the CPU: murmur_hash32 in torch, and
    multinomial_with_seed run eagerly (SGLang compiles it with torch.compile)."""
    import sglang.srt.layers.sampler as sglang_sampler

    saved = sglang_sampler.murmur_hash32, sglang_sampler.multinomial_with_seed
    sglang_sampler.murmur_hash32 = murmur_hash32
    sglang_sampler.multinomial_with_seed = saved[1]._torchdynamo_orig_callable
    try:
        yield
    finally:
        sglang_sampler.murmur_hash32, sglang_sampler.multinomial_with_seed = saved

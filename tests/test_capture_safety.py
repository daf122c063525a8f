"""The static-shape decoding steps are capture-safe: what ``StaticDecoder`` captures into CUDA graphs never
syncs with the host, never makes a shape from tensor values, and reads the same addresses on every replay.

On CPU the steps run uncaptured; a ``TorchDispatchMode`` records every aten op of each step (and each Triton
launch), and the checks below fail on what would break or stall a CUDA graph:

- host syncs / data-dependent shapes: ``.item()``, ``bool(t)``, ``int(t)`` (``_local_scalar_dense``),
  ``nonzero``, ``masked_select``, boolean-mask indexing, ``unique``, tensor ``repeats``, ``equal``,
  ``_assert_async``, tensors built from host data (``torch.tensor``), copies between devices, and the
  Python-level host reads a CPU run would not dispatch (``tolist``, ``numpy``, ``cpu``);
- replay drift: a step run again under the same graph key must issue the same ops with the same
  non-tensor arguments (a Python value baked into a graph is stale on replay) and read the same
  storage from outside itself (state, lanes, metadata buffers, KV pools, weights); and every run, the first
  included (on CUDA the warm-up, which fills Triton's autotune and compile caches), launches the same Triton
  kernels with the same arguments, so nothing is tuned or compiled while capturing.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field

import pytest
import torch
import triton
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from switchkd import SwitchGenerator, SwitchPolicy, fused_switch_step, sample
from switchkd.decoding import graphs
from switchkd.decoding.kvcache import PagedKVCache, paged_attention
from switchkd.ops.spec import triton_interpreted

from models import pair

aten = torch.ops.aten
MIXED = SwitchPolicy("exp", tau0=0.55, decay=0.02)
RAGGED = [[5, 6, 7, 8], [9], [10, 11, 12, 13, 14, 15, 16], [3, 4], [20] * 11]
SYNCS = {  # ops that read a tensor's value on the host, or size their output from it
    aten._local_scalar_dense, aten.is_nonzero, aten.equal, aten.nonzero, aten.argwhere, aten.masked_select,
    aten._unique, aten._unique2, aten.unique_dim, aten.unique_consecutive, aten.unique_dim_consecutive,
    aten.repeat_interleave, aten._assert_async, aten.bincount, aten.histc, aten.lift_fresh,
}
MASK_INDEXED = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}
HOST_READS = ("tolist", "numpy", "cpu", "__array__")


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


@dataclass
class Run:
    """What one execution of a step did."""

    problems: list[str] = field(default_factory=list)
    signature: list[tuple] = field(default_factory=list)  # ops and launches, tensors as (shape, dtype, device)
    launches: list[tuple] = field(default_factory=list)  # Triton launches: kernel, grid, arguments
    external: set[int] = field(default_factory=set)  # storage read but not made by the step
    internal: set[int] = field(default_factory=set)  # storage made by the step

    def read(self, tensors):
        for t in tensors:
            if t.numel() and _storage(t) not in self.internal:
                self.external.add(_storage(t))

    def made(self, tensors):
        for t in tensors:
            if t.numel() and _storage(t) not in self.external:
                self.internal.add(_storage(t))


def _describe(values) -> tuple:
    leaves, _ = tree_flatten(values)
    return tuple((tuple(x.shape), x.dtype, x.device.type) if isinstance(x, torch.Tensor) else repr(x) for x in leaves)


def _tensors(values) -> list[torch.Tensor]:
    return [x for x in tree_flatten(values)[0] if isinstance(x, torch.Tensor)]


class Recorder(TorchDispatchMode):
    """Records a step's aten ops into ``run``; ``paused`` while a Triton kernel runs (its interpreter's
    host copies are not the step's)."""

    def __init__(self, run: Run):
        super().__init__()
        self.run, self.paused = run, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.paused:
            return out
        inputs = _tensors((args, kwargs))
        self.run.read(inputs)
        self.run.made(_tensors(out))
        self.run.signature.append((str(func), _describe((args, kwargs))))
        problem = _problem(func, args, kwargs)
        if problem:
            self.run.problems.append(f"{func}: {problem}")
        return out


def _problem(func, args, kwargs) -> str | None:
    if func.overloadpacket in SYNCS:
        return "host sync or data-dependent shape"
    if func.overloadpacket in MASK_INDEXED:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", [])
        if any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices):
            return "boolean-mask indexing (a nonzero inside)"
    if func.overloadpacket is aten._to_copy and kwargs.get("device") not in (None, args[0].device):
        return f"copy {args[0].device} -> {kwargs['device']}"
    if func.overloadpacket is aten.copy_ and args[0].device != args[1].device:
        return f"copy {args[1].device} -> {args[0].device}"
    return None


def _kernel_name(kernel) -> str:
    while not hasattr(kernel, "__name__"):  # Autotuner -> JITFunction / InterpretedFunction
        kernel = kernel.fn
    return kernel.__name__


class StepLog:
    """Every run of every static step, by graph key: ``(id(lanes), key)``."""

    def __init__(self):
        self.runs: dict[tuple, list[Run]] = {}
        self.recorder: Recorder | None = None

    def wrap_run(self, original):
        def _run(decoder, key, step):
            def recorded():
                run = Run()
                self.runs.setdefault((id(decoder.lanes), key), []).append(run)
                with self.recording(run):
                    step()

            return original(decoder, key, recorded)

        return _run

    @contextlib.contextmanager
    def recording(self, run: Run):
        self.recorder = Recorder(run)
        try:
            with self.recorder:
                yield
        finally:
            self.recorder = None

    def wrap_launch(self, original):
        """A Triton launch (the autotuner's, or a plain kernel's), recorded as the caller made it: what the
        autotuner then runs, its benchmark included, is paused."""

        def launch(kernel, *args, **kwargs):
            recorder = self.recorder
            if recorder is None or recorder.paused:
                return original(kernel, *args, **kwargs)
            recorder.run.read(_tensors((args, kwargs)))
            entry = (_kernel_name(kernel), _describe((args, sorted(kwargs.items()))))
            recorder.run.signature.append(entry)
            recorder.run.launches.append(entry)
            recorder.paused = True
            try:
                return original(kernel, *args, **kwargs)
            finally:
                recorder.paused = False

        return launch

    def wrap_host_read(self, name, original):
        def host_read(tensor, *args, **kwargs):
            if self.recorder is not None and not self.recorder.paused:
                self.recorder.run.problems.append(f"Tensor.{name}(): a device-to-host read")
            return original(tensor, *args, **kwargs)

        return host_read

    def problems(self) -> list[str]:
        found = []
        for key, runs in self.runs.items():
            found += [f"{key[1]}: {p}" for run in runs for p in run.problems]
            if any(run.launches != runs[0].launches for run in runs):  # the warm-up tunes what the capture uses
                found.append(f"{key[1]}: Triton launches differ between runs (autotuning or compiling in capture)")
            replays = runs[1:]  # the first run allocates the lanes' logits buffer; the graph is taken later
            for run in replays[1:]:
                if run.signature != replays[0].signature:
                    found.append(f"{key[1]}: a replay issues different ops or Python arguments than the capture")
                if run.external != replays[0].external:
                    found.append(f"{key[1]}: a replay reads storage at other addresses than the capture")
        return sorted(set(found))


@pytest.fixture
def steps(monkeypatch):
    """Records every static step of the test; ``steps.problems()`` lists what breaks capture."""
    log = StepLog()
    monkeypatch.setattr(graphs.StaticDecoder, "_run", log.wrap_run(graphs.StaticDecoder._run))
    if triton_interpreted():
        from triton.runtime.interpreter import InterpretedFunction as Kernel
    else:
        Kernel = triton.runtime.jit.JITFunction
    for cls in (Kernel, triton.runtime.autotuner.Autotuner):
        monkeypatch.setattr(cls, "run", log.wrap_launch(cls.run))
    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, log.wrap_host_read(name, getattr(torch.Tensor, name)))
    return log


def buffers(gen: SwitchGenerator) -> dict[str, int]:
    """data_ptr of every buffer a captured step reads from outside itself, by name."""
    ptrs = {}
    for ws in gen.static.workspaces.values():
        w = id(ws)
        for name, value in vars(ws.state).items():
            if isinstance(value, torch.Tensor):
                ptrs[f"ws{w}.state.{name}"] = value.data_ptr()
        for count, lanes in ws.lanes.items():
            for name in ("feed", "cursor", "drafts", "flags", "student_logits", "rows"):
                ptrs[f"ws{w}.lanes{count}.{name}"] = getattr(lanes, name).data_ptr()
            for side in ("teacher", "student"):
                meta = getattr(lanes, side)
                ptrs[f"ws{w}.lanes{count}.{side}.device"] = meta.device.data_ptr()
                ptrs[f"ws{w}.lanes{count}.{side}.host"] = meta.host.data_ptr()
    for side, cache in zip(("teacher", "student"), gen.caches, strict=True):
        for layer, (k, v) in cache.layers.items():
            ptrs[f"{side}.pool{layer}"] = (k.data_ptr(), v.data_ptr())
    return ptrs


CASES = [  # family, dtype, temperature, draft_len, vocab_size, num_blocks
    pytest.param("llama", torch.float32, 1.0, 4, 90, None, id="llama-sampled-draft4-vocab90"),
    pytest.param("llama", torch.float32, 0.0, 1, None, None, id="llama-greedy-draft1"),
    pytest.param("gpt2", torch.float32, 0.7, 1, 90, 12, id="gpt2-sampled-draft1-vocab90-subbatches"),
    pytest.param("gpt2", torch.float64, 0.0, 4, None, None, id="gpt2-greedy-draft4-float64-reference"),
]


@pytest.mark.parametrize("family, dtype, temperature, draft_len, vocab_size, num_blocks", CASES)
def test_static_steps_are_capture_safe(steps, family, dtype, temperature, draft_len, vocab_size, num_blocks):
    """Ragged prompts, EOS that stops rows early (lanes shrink), two requests with the same shapes."""
    teacher, student = pair(family, dtype=dtype)
    gen = SwitchGenerator(teacher, student, block_size=4, num_blocks=num_blocks, cuda_graphs=True,
                          vocab_size=vocab_size)
    kwargs = {"policy": MIXED, "max_new_tokens": 7, "temperature": temperature, "seed": 3, "draft_len": draft_len,
              "adaptive_draft": False}
    eos = gen.generate(RAGGED[:1], **{**kwargs, "max_new_tokens": 3}).responses[0][2]
    first = gen.generate(RAGGED, eos_token_id=eos, **kwargs)
    before = buffers(gen)
    second = gen.generate(RAGGED, eos_token_id=eos, **kwargs)
    assert buffers(gen) == before, "a second request with the same shapes moved a buffer the graphs read"
    assert first.responses == second.responses and min(map(len, first.responses)) < 7
    assert any(len(runs) > 2 for runs in steps.runs.values()), "no step key ran often enough to compare replays"
    assert steps.problems() == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="capture needs a GPU")
def test_warm_up_and_capture_on_cuda_issue_the_same_launches(steps):
    """On CUDA each key runs twice, the warm-up and the capture: same launches (the autotune cache the warm-up
    filled is hit while capturing), no sync, no cross-device copy; and every step was captured."""
    teacher, student = (m.cuda() for m in pair("llama", dtype=torch.bfloat16))
    gen = SwitchGenerator(teacher, student, block_size=4, vocab_size=90)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed capture warns
        gen.generate(RAGGED, policy=MIXED, max_new_tokens=9, draft_len=4, adaptive_draft=False)
    assert gen.static.capture and all(len(runs) == 2 for runs in steps.runs.values())
    assert steps.problems() == []


def test_the_checks_catch_a_host_sync_in_a_step(steps, monkeypatch):
    """The recorder is not blind: an ``.item()``, a ``tolist()``, a mask index and a Python value that changes
    per replay each get reported."""
    teacher, student = pair("gpt2", dtype=torch.float32)
    original = graphs.StaticDecoder._student_step
    calls = []

    def bad_step(decoder):
        lanes = decoder.lanes
        calls.append(1)
        lanes.cursor.sum().item()
        lanes.cursor.tolist()
        lanes.feed[lanes.feed > 0].sum()
        lanes.feed.add_(len(calls))  # a Python int baked into the graph: stale on replay
        lanes.feed.sub_(len(calls))
        sample(lanes.feed[:, None].float(), len(calls))  # a launch argument that changes per run
        original(decoder)

    monkeypatch.setattr(graphs.StaticDecoder, "_student_step", bad_step)
    SwitchGenerator(teacher, student, block_size=4, cuda_graphs=True).generate(
        RAGGED[:2], policy=MIXED, max_new_tokens=6, draft_len=2, adaptive_draft=False)
    found = "\n".join(steps.problems())
    expected = ["_local_scalar_dense", "Tensor.tolist()", "boolean-mask indexing", "Python arguments"]
    if triton_interpreted():  # CPU models run the Triton kernels only in the interpreter (else the reference)
        expected.append("Triton launches differ")
    for problem in expected:
        assert problem in found


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_the_ops_inside_the_steps_do_not_sync(steps, backend):
    """fused_switch_step (check_finite=False), sample and the paged attention function with device tensors."""
    if backend == "triton" and not triton_interpreted():
        pytest.skip("CPU tensors run Triton only in the interpreter; CUDA: test_warm_up_and_capture_on_cuda...")
    rows, vocab = 6, 300
    s, t = torch.randn(rows, vocab), torch.randn(rows, vocab)
    positions, keys = torch.arange(rows) * 3, torch.arange(rows) + 10
    cache = PagedKVCache(num_blocks=8, block_size=4)
    for i in range(2):
        cache.manager.add(i)
    batch = cache.prepare([0, 1], [3, 3], "cpu")
    layer = type("Layer", (), {"layer_idx": 0})()
    q, k = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 3, 8)

    def ops():
        fused_switch_step(s, t, positions, policy=MIXED, temperature=0.8, seed=1, row_keys=keys, backend=backend,
                          check_finite=False)
        sample(s, positions, temperature=0.8, seed=1, row_keys=keys, backend=backend)
        paged_attention(layer, q, k, k.clone(), None, scaling=0.3, switchkd_paged=batch)

    run = Run()
    with steps.recording(run):
        ops()
    assert run.problems == []
    assert len(run.signature) > 10


def test_bad_input_still_raises_in_eager_use():
    """The checks stay where they are useful: outside the captured steps, with a ValueError naming the argument."""
    s, t = torch.randn(3, 20), torch.randn(3, 20)
    t[1, 4] = float("nan")
    with pytest.raises(ValueError, match="teacher_logits"):
        fused_switch_step(s, t, 0)
    with pytest.raises(ValueError, match="positions"):
        sample(s, -1)
    with pytest.raises(ValueError, match="row_keys"):
        sample(s, torch.zeros(3, dtype=torch.int64), row_keys=torch.zeros(2, dtype=torch.int64))

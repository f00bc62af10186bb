"""The Triton blend kernels equal the PyTorch reference, forward and every gradient.

Triton runs on the CPU through its interpreter: TRITON_INTERPRET is set before the kernels are
decorated (kasmina.kernels imports them on first use); with a GPU they run natively. Shapes stay small: the interpreter is slow.
"""

from __future__ import annotations

import os

import pytest
import torch

# With a GPU the kernels run natively on it; without one, on the CPU through Triton's
# interpreter, which must be switched on before the kernels are decorated (first use, below).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

from kasmina import kernels
from kasmina.kernels import reference

# Per dtype (atol, rtol) of the blended output and grad_g: the kernel rounds the same float32
# value as the reference; on a GPU y + alpha * g may be one fused multiply-add, a float32 ulp off.
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-5, 1.6e-2)}
# (rows, chunks, width), against the 16-column test tiles below: 37 x 3 x 11 is the
# non-power-of-two width (masked columns); 64 x 4 x 8 packs two chunks per tile; 5 x 7 x 1 packs
# seven width-1 chunks into a tile of eight (masked chunks); 19 x 2 x 40 spans three width tiles
# per chunk, the last one partial; 13 x 5 x 4 packs four chunks per tile, the last tile partial.
SHAPES = [(37, 3, 11), (64, 4, 8), (5, 7, 1), (19, 2, 40), (13, 5, 4)]


def _tiles(programs_per_sm):
    """Tiles of 8 rows x 16 columns, so the shapes above cover several tiles; programs_per_sm 1
    (one SM on CPU) makes one program loop over every row tile, None gives each its own."""
    return _triton().Tiles(block_r=8, block_f=16, num_warps=4, programs_per_sm=programs_per_sm)


def _triton():
    from kasmina.kernels import blend

    return blend


def _problem(rows, chunks, width, active, dtype, generator):
    y = torch.randn(rows, chunks * width, generator=generator, dtype=dtype)
    slot_chunk = torch.randperm(chunks, generator=generator)[:active].sort().values
    chunk_slot = torch.full((chunks,), -1, dtype=torch.int32)
    chunk_slot[slot_chunk] = torch.arange(active, dtype=torch.int32)
    g = torch.randn(active, rows, width, generator=generator, dtype=dtype)
    slot_alpha = torch.rand(active, generator=generator, dtype=torch.float32)
    # A few exact zeros and near-zeros, so the dead count is exercised.
    y[::5, ::3] = 0.0
    return tuple(t.to(DEVICE) for t in (y, g, slot_alpha, chunk_slot, slot_chunk))


def _poisoned_empty_like(t):
    return torch.full_like(t, float("nan"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("active", [0, 1, "all"])
@pytest.mark.parametrize("programs_per_sm", [None, 1])
def test_blend_forward_and_backward_match_reference(shape, active, dtype, programs_per_sm):
    rows, chunks, width = shape
    active = chunks if active == "all" else min(active, chunks)
    generator = torch.Generator().manual_seed(hash((shape, active, dtype.itemsize)) % 2**31)
    y, g, slot_alpha, chunk_slot, slot_chunk = _problem(rows, chunks, width, active, dtype, generator)
    blend = _triton()
    tiles = _tiles(programs_per_sm)
    atol, rtol = TOLERANCE[dtype]

    out, stats = blend.blend_forward(y, g, slot_alpha, chunk_slot, 1e-6, tiles=tiles,
                                     out=_poisoned_empty_like(y))
    want_out, want_stats = reference.blend_forward(y, g, slot_alpha, chunk_slot, slot_chunk, 1e-6)
    torch.testing.assert_close(out, want_out, atol=atol, rtol=rtol)
    torch.testing.assert_close(stats, want_stats, atol=1e-4, rtol=1e-5)

    grad_out = torch.randn(rows, chunks * width, generator=generator, dtype=dtype).to(DEVICE)
    grad_g, energy = blend.blend_backward(grad_out, slot_alpha, chunk_slot, active, tiles=tiles,
                                          grad_g=_poisoned_empty_like(g))
    want_grad_g, want_energy = reference.blend_backward(grad_out, slot_alpha, chunk_slot, slot_chunk)
    torch.testing.assert_close(grad_g, want_grad_g, atol=atol, rtol=rtol)
    torch.testing.assert_close(energy, want_energy, atol=1e-4, rtol=1e-5)


def test_blend_reads_strided_seed_outputs():
    """g with a stride-0 slot axis and non-unit column stride (the layer passes any strides)."""
    generator = torch.Generator().manual_seed(2)
    y, g, slot_alpha, chunk_slot, slot_chunk = _problem(21, 4, 11, 3, torch.float32, generator)
    shared = torch.randn(21, 22, generator=generator).to(DEVICE)[:, ::2]  # (rows, L), stride 2
    g = shared.unsqueeze(0).expand(3, -1, -1)                             # slot stride 0
    blend = _triton()
    out, stats = blend.blend_forward(y, g, slot_alpha, chunk_slot, 1e-6, tiles=_tiles(None),
                                     out=_poisoned_empty_like(y))
    want_out, want_stats = reference.blend_forward(y, g, slot_alpha, chunk_slot, slot_chunk, 1e-6)
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats, want_stats, atol=1e-4, rtol=1e-5)


def test_blend_writes_every_output_element():
    """The output buffer is poisoned with NaN before the kernel runs: no element may survive."""
    generator = torch.Generator().manual_seed(1)
    y, g, slot_alpha, chunk_slot, slot_chunk = _problem(37, 3, 11, 2, torch.float32, generator)
    blend = _triton()
    out, _ = blend.blend_forward(y, g, slot_alpha, chunk_slot, 1e-6, tiles=_tiles(None),
                                 out=_poisoned_empty_like(y))
    assert torch.isfinite(out).all()
    want, _ = reference.blend_forward(y, g, slot_alpha, chunk_slot, slot_chunk, 1e-6)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("row_step", [1, 3])
@pytest.mark.parametrize("shape", [(37, 3, 11), (29, 2, 40)])
@pytest.mark.parametrize("programs_per_sm", [None, 1])
def test_sampled_stats_and_energy_match_reference(row_step, shape, programs_per_sm):
    rows, chunks, width = shape
    generator = torch.Generator().manual_seed(row_step)
    y = torch.randn(rows, chunks * width, generator=generator)
    y[::4, ::2] = 0.0
    y = y.to(DEVICE)
    blend = _triton()
    tiles = _tiles(programs_per_sm)
    torch.testing.assert_close(blend.sampled_stats(y, chunks, row_step, 1e-6, tiles=tiles),
                               reference.chunk_stats(y, chunks, row_step, 1e-6), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(blend.sampled_energy(y, chunks, row_step, tiles=tiles),
                               reference.chunk_energy(y, chunks, row_step), atol=1e-4, rtol=1e-5)


def test_registered_op_gradients_match_the_reference_path():
    """Through autograd: the triton_op's gradients for y, g and the telemetry probe equal the
    reference path's, with the default tile sizes; the eager path (`blend_chunks`, which calls
    the op's launchers directly) gives the op's output and gradients bit for bit."""
    generator = torch.Generator().manual_seed(7)
    y, g, slot_alpha, chunk_slot, slot_chunk = _problem(37, 3, 11, 2, torch.float32, generator)
    grad_out = torch.randn(37, 33, generator=generator).to(DEVICE)
    results = {}
    for name in ("op", "triton", "reference"):
        yy, gg = y.clone().requires_grad_(), g.clone().requires_grad_()
        probe = kernels.new_probe(3, DEVICE)
        if name == "op":
            _triton()  # registers torch.ops.kasmina.*
            out, stats = torch.ops.kasmina.blend(yy, gg, slot_alpha, chunk_slot, slot_chunk, probe, 1e-6)
        else:
            with kernels.backend(name):
                out, stats = kernels.blend_chunks(yy, gg, slot_alpha, chunk_slot, slot_chunk, probe, 1e-6)
        out.backward(grad_out)
        results[name] = (out.detach(), stats.detach(), yy.grad, gg.grad, probe.grad)
    for got, want in zip(results["op"], results["reference"], strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    for got, want in zip(results["triton"], results["op"], strict=True):
        assert torch.equal(got, want)


def test_gradient_probe_adds_sampled_energy():
    generator = torch.Generator().manual_seed(3)
    y = torch.randn(37, 33, generator=generator).to(DEVICE).requires_grad_()
    grad = torch.randn(37, 33, generator=generator).to(DEVICE)
    for name in ("triton", "reference"):
        probe = kernels.new_probe(3, DEVICE)
        with kernels.backend(name):
            out = kernels.GradientProbe.apply(y, probe, 3, 2)
            out.backward(grad)
        torch.testing.assert_close(probe.grad[:, 0], reference.chunk_energy(grad, 3, 2).double(),
                                   atol=1e-4, rtol=1e-5)
        assert probe.grad[:, 1].tolist() == [19 * 11] * 3
    y.grad = None


def test_eager_telemetry_reads_equal_the_registered_ops():
    """The dormant telemetry reads called eagerly (the launchers) equal the registered ops bit for bit."""
    generator = torch.Generator().manual_seed(5)
    y = torch.randn(45, 24, generator=generator).to(DEVICE)
    health = torch.rand(4, 6, generator=generator, dtype=torch.float64).to(DEVICE)
    eager = health.clone()
    _triton()  # registers torch.ops.kasmina.*
    torch.ops.kasmina.accumulate_sampled_stats(y, 4, 3, 1e-6, health, 0, 15.0)
    with kernels.backend("triton"):
        kernels.accumulate_chunk_stats(y, 4, 3, 1e-6, eager, 0, 15.0)
        energy = kernels.chunk_energy(y, 4, 3)
        stats = kernels.chunk_stats(y, 4, 3, 1e-6)
    assert torch.equal(eager, health)
    assert torch.equal(energy, torch.ops.kasmina.sampled_energy(y, 4, 3))
    assert torch.equal(stats, torch.ops.kasmina.sampled_stats(y, 4, 3, 1e-6))


def test_eager_launches_run_with_wrap_triton_off(monkeypatch):
    """Eager blends and telemetry reads launch the Triton kernels directly: wrap_triton is off at
    every launch, so a launch does not go through the higher-order op that wrap_triton routes it
    through for tracing (its host cost; on CUDA only, the interpreter skips it anyway)."""
    from torch._library.triton import is_wrap_triton_enabled

    blend = _triton()
    wrap_triton = blend.wrap_triton
    states = []

    def recording_wrap_triton(kernel):
        states.append(is_wrap_triton_enabled())
        return wrap_triton(kernel)

    monkeypatch.setattr(blend, "wrap_triton", recording_wrap_triton)
    generator = torch.Generator().manual_seed(6)
    y, g, slot_alpha, chunk_slot, slot_chunk = (t.to(DEVICE) for t in _problem(9, 4, 5, 2, torch.float32,
                                                                                generator))
    health = torch.zeros(4, 6, dtype=torch.float64, device=DEVICE)
    with kernels.backend("triton"):
        y.requires_grad_()
        out, _ = kernels.blend_chunks(y, g, slot_alpha, chunk_slot, slot_chunk, kernels.new_probe(4, DEVICE), 1e-6)
        out.sum().backward()
        kernels.accumulate_chunk_stats(y.detach(), 4, 2, 1e-6, health, 0, 5.0)
        kernels.chunk_energy(y.detach(), 4, 2)
        kernels.chunk_stats(y.detach(), 4, 2, 1e-6)
    assert len(states) == 6 and not any(states)  # blend forward, backward, the reads (2 + 1 + 1)
    assert is_wrap_triton_enabled()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.compile of user Triton kernels needs CUDA")
def test_compile_fullgraph_sees_through_the_blend():
    """Dynamo traces the registered ops (no graph break), forward and backward, and the compiled
    step equals eager. CPU tracing of user Triton kernels is not supported by inductor."""
    generator = torch.Generator().manual_seed(11)
    y, g, slot_alpha, chunk_slot, slot_chunk = (t.cuda() for t in _problem(64, 4, 32, 2, torch.float32,
                                                                           generator))

    def step(y, g, probe):
        out, stats = kernels.blend_chunks(y, g, slot_alpha, chunk_slot, slot_chunk, probe, 1e-6)
        return out.square().sum() + stats.sum()

    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        yy, gg = y.clone().requires_grad_(), g.clone().requires_grad_()
        probe = kernels.new_probe(4, "cuda")
        fn(yy, gg, probe).backward()
        results.append((yy.grad, gg.grad, probe.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_a_layer_on_the_triton_path_equals_the_reference_path():
    """A wrapped layer end to end (sampled dormant telemetry, then a blend with a live seed, a
    fixed-function kernel with a stride-0 seed axis): outputs, gradients and telemetry agree."""
    import kasmina
    from esper.blueprints import standard_library
    from esper.contracts import SeedLifecycle as S

    library = {ir.name: ir for ir in standard_library()}
    x = torch.randn(9, 6, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    results = []
    for name in ("triton", "reference"):
        torch.manual_seed(0)
        source = kasmina.BlueprintKernelSource()
        model, _ = kasmina.wrap(torch.nn.Sequential(torch.nn.Linear(6, 12)).to(DEVICE),
                                {"seeds_per_layer": 3, "telemetry": {"every": 1, "max_rows": 4}},
                                kernel_source=source)
        layer = model[0]
        kernel = source.add(library["mlp_gelu_w8"], layer.seed_interface)
        with kernels.backend(name):
            model(x).sum().backward()  # dormant: sampled rows 0, 3, 6
            for seed in (0, 2):
                layer.transition(seed, S.GERMINATED, kernel_artifact_id=kernel)
                layer.transition(seed, S.LOADING)
                layer.transition(seed, S.GRAFTING)
            with torch.no_grad():
                for p in layer.seed_parameters():
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
            out = model(x)
            out.square().sum().backward()
        signal = layer.health_signal()
        results.append([out.detach(), layer.host.weight.grad] + [p.grad for p in layer.seed_parameters()]
                       + [torch.tensor(signal.activation_variance), torch.tensor(signal.gradient_energy)])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("row_step", [1, 3])
@pytest.mark.parametrize("programs_per_sm", [None, 1])
@pytest.mark.parametrize("shape", [(37, 3, 11), (9, 100, 1)])  # 300 (chunk, statistic) pairs: two summing programs
def test_accumulated_sampled_stats_add_into_health(row_step, programs_per_sm, shape):
    """The dormant telemetry step: stats summed into columns 1..3 of a float64 accumulator and
    the count into column 4, other columns untouched, on the Triton path and the reference."""
    rows, chunks, width = shape
    generator = torch.Generator().manual_seed(10 + row_step)
    y = torch.randn(rows, chunks * width, generator=generator)
    y[::4, ::2] = 0.0
    y = y.to(DEVICE)
    start = torch.randn(chunks, 6, generator=generator, dtype=torch.float64).to(DEVICE)
    want = start.clone()
    want[:, 1:4] += reference.chunk_stats(y, chunks, row_step, 1e-6).double()
    want[:, 4] += 123.0
    blend = _triton()
    got = start.clone()
    blend.accumulate_sampled_stats(y, chunks, row_step, 1e-6, got, 1, 123, tiles=_tiles(programs_per_sm))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-6)
    for name in ("triton", "reference"):
        got = start.clone()
        with kernels.backend(name):
            kernels.accumulate_chunk_stats(y, chunks, row_step, 1e-6, got, 1, 123)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-6)


def test_an_empty_batch_blends_to_nothing():
    """Zero rows: empty outputs, zero statistics, no launch (the tile arithmetic must not divide
    by zero)."""
    generator = torch.Generator().manual_seed(4)
    y, g, slot_alpha, chunk_slot, _slot_chunk = _problem(0, 3, 11, 2, torch.float32, generator)
    blend = _triton()
    out, stats = blend.blend_forward(y, g, slot_alpha, chunk_slot, 1e-6, tiles=_tiles(None))
    assert out.shape == (0, 33) and torch.equal(stats, torch.zeros(3, 3, device=DEVICE))
    grad_g, energy = blend.blend_backward(torch.zeros(0, 33, device=DEVICE), slot_alpha, chunk_slot, 2,
                                          tiles=_tiles(1))
    assert grad_g.shape == (2, 0, 11) and torch.equal(energy, torch.zeros(3, device=DEVICE))
    # The dormant layer's sampled reads: nothing read, only the count is added.
    assert torch.equal(blend.sampled_stats(y, 3, 2, 1e-6), torch.zeros(3, 3, device=DEVICE))
    assert torch.equal(blend.sampled_energy(y, 3, 2), torch.zeros(3, device=DEVICE))
    health = torch.ones(3, 5, device=DEVICE, dtype=torch.float64)
    blend.accumulate_sampled_stats(y, 3, 2, 1e-6, health, 1, 7)
    want = torch.ones(3, 5, dtype=torch.float64)
    want[:, 4] = 8
    assert torch.equal(health.cpu(), want)

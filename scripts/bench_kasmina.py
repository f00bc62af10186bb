"""Kasmina benchmarks (DESIGN.md section 16), each a ratio measured in the same run.

    python scripts/bench_kasmina.py --device cuda --out docs/bench-kasmina.json
    python scripts/bench_kasmina.py --device cpu --out /tmp/bench-kasmina.json   # tiny, a smoke run

Measures:
  1. fused blend bandwidth vs the device's copy bandwidth (target >= 90%), vs eager PyTorch and
     vs torch.compile of the same function (the reference), fp32 and bf16, forward and backward;
     on CUDA first a sweep of candidate tiles (SWEEP below), each printed as it is measured;
  2. dormant overhead of a wrapped 4096x4096 bf16 linear at 8192 rows, telemetry on, vs the bare
     layer (target < 0.5%), forward and forward+backward;
  3. a layer with 10,000 seeds, 1,000 active: forward+backward vs the same seeds run one by one
     (target >= 10x), and kernel launches per forward;
  4. kernel load latency: cached (a KernelCache hit) and uncached through the forge's verifying
     loader (a temporary workspace forged with the fast pipeline, kernels bench-signed VALIDATED),
     and, for comparison, an unverified build straight from the blueprint.
Timing: on CUDA every kernel comparison (the sweep included) captures each function's calls as a
CUDA graph and replays the graphs in turn for several rounds, reporting medians and spreads:
device time, without the CPU's cost of issuing the ops (about 80-125 us per blend op on the
bench machines, comparable to the bf16 kernel's 105-150 us GPU time, so a plain Python loop can
be CPU-bound). The plain-loop figure and the CPU cost per call are recorded beside it.

Prints a table and writes every raw number to --out. Needs torch (+ triton on CUDA), pydantic,
and the forge's dependencies (sqlite-utils, cryptography, safetensors) for the load section.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install

import torch
from torch import nn

SIZES = {
    "cuda": {"blend": (16384, 4096, 64), "dormant": (8192, 4096), "seeds": (10_000, 1_000, 4, 1024, 1024),
             "iters": 50, "repeats": 7, "graph_iters": 20, "rounds": 15, "dormant_calls": 32,
             "dormant_rounds": 31},
    "cpu": {"blend": (512, 256, 16), "dormant": (512, 256), "seeds": (1_000, 100, 2, 64, 32),
            "iters": 5, "repeats": 3, "graph_iters": 3, "rounds": 3, "dormant_calls": 16, "dormant_rounds": 3},
}


def timer(device: torch.device, fn, iters: int, repeats: int, warmup: int = 3) -> float:
    """Median over `repeats` of the mean milliseconds per call of `fn` over `iters` calls issued
    back to back from Python (on CUDA, event-timed: this includes the launch cost whenever the
    CPU cannot keep ahead of the GPU)."""
    for _ in range(warmup):
        fn()
    results = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            torch.cuda.synchronize()
            results.append(start.elapsed_time(end) / iters)
        else:
            start = time.perf_counter()
            for _ in range(iters):
                fn()
            results.append((time.perf_counter() - start) * 1e3 / iters)
    return statistics.median(results)


def host_us(device: torch.device, fn, calls: int = 50) -> float:
    """CPU microseconds per call of `fn` (issuing its work, not waiting for it)."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.synchronize()
    return elapsed * 1e6 / calls


def _graph(fn, iters: int) -> torch.cuda.CUDAGraph:
    """`iters` back-to-back calls of `fn` captured as one CUDA graph (after a warm-up on a side
    stream, which also compiles any Triton kernel and gives autograd its .grad buffers)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    return graph


def interleaved(device: torch.device, fns: dict, iters: int, rounds: int) -> dict[str, list[float]]:
    """Milliseconds per call of each of `fns`, one sample per round, the functions taking turns
    within each round (in a rotating order), so drift in clocks or temperature hits all alike.

    On CUDA each function's `iters` calls are one CUDA graph and a sample is one replay: device
    time without the CPU's launch cost, which is what a kernel's bandwidth is. On CPU a sample is
    the mean of `iters` plain calls."""
    names = list(fns)
    samples: dict[str, list[float]] = {name: [] for name in names}
    if device.type == "cuda":
        graphs = {name: _graph(fn, iters) for name, fn in fns.items()}
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                start.record()
                graphs[name].replay()
                end.record()
                end.synchronize()
                samples[name].append(start.elapsed_time(end) / iters)
        del graphs
        torch.cuda.synchronize()
        return samples
    for fn in fns.values():
        fn()
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            for _ in range(iters):
                fns[name]()
            samples[name].append((time.perf_counter() - start) * 1e3 / iters)
    return samples


def _median(samples: list[float]) -> float:
    return statistics.median(samples)


def _spread(samples: list[float]) -> float:
    """(max - min) / median of a list of samples."""
    return (max(samples) - min(samples)) / statistics.median(samples)


# Candidate tiles swept per dtype in one run, (block_r, block_f, num_warps, programs_per_sm):
# block_f columns are split into chunks x columns per chunk; programs_per_sm None gives each row
# tile its own program. The winners become kasmina.kernels.blend.TILES.
SWEEP = {
    "float32": [(16, 512, 4, None), (8, 512, 4, None), (4, 512, 4, None), (2, 1024, 4, 32), (8, 512, 4, 16),
                (8, 1024, 8, 8), (8, 1024, 8, None), (16, 1024, 8, None), (4, 1024, 4, 16), (2, 512, 2, None)],
    "bfloat16": [(16, 1024, 4, None), (8, 1024, 4, None), (4, 1024, 4, None), (32, 1024, 4, None),
                 (4, 1024, 4, 32), (8, 1024, 4, 8), (16, 1024, 4, 8), (16, 1024, 4, 16), (8, 512, 2, None),
                 (16, 512, 2, None), (8, 2048, 8, None), (16, 2048, 8, None)],
}


def _summary(samples: list[float]) -> dict:
    return {"median_ms": _median(samples), "min_ms": min(samples), "max_ms": max(samples),
            "spread": _spread(samples), "samples_ms": samples}


def bench_blend(device, sizes, rows_table, raw, adopt_best=False):
    from kasmina import kernels
    from kasmina.kernels import reference

    rows, features, chunks = sizes["blend"]
    width = features // chunks
    iters, rounds = sizes["graph_iters"], sizes["rounds"]
    triton_path = kernels.uses_triton(torch.empty(0, device=device))  # CUDA, or backend("triton")
    blend = None
    if triton_path:
        from kasmina.kernels import blend
    def one(dtype):  # every closure below binds this call's tensors
        name = str(dtype).removeprefix("torch.")
        y = torch.randn(rows, features, device=device, dtype=dtype)
        g = torch.randn(chunks, rows, width, device=device, dtype=dtype)  # every chunk active
        grad_out = torch.randn_like(y)
        slot_alpha = torch.rand(chunks, device=device)
        slot_chunk = torch.arange(chunks, device=device)
        chunk_slot = torch.arange(chunks, device=device, dtype=torch.int32)
        moved = 3 * y.numel() * y.element_size()  # read y, read g, write out
        moved_bwd = 2 * y.numel() * y.element_size()  # read grad_out, write grad_g
        src = torch.empty(moved // 2, dtype=torch.uint8, device=device)  # copy moves `moved` bytes
        dst = torch.empty_like(src)

        def fused():
            return torch.ops.kasmina.blend(y, g, slot_alpha, chunk_slot, slot_chunk, None, 1e-6)

        def fused_bwd():
            return torch.ops.kasmina.blend_backward(grad_out, slot_alpha, chunk_slot, chunks)

        if not triton_path:  # the CPU smoke run: the reference is the kernel
            def fused():
                return kernels.blend_chunks(y, g, slot_alpha, chunk_slot, slot_chunk, None, 1e-6)

            def fused_bwd():
                return reference.blend_backward(grad_out, slot_alpha, chunk_slot, slot_chunk)

        with torch.no_grad():
            sweep = {}
            if blend is not None:
                # Every candidate captured (its tiles set while it is captured), then all of them
                # replayed in turn, `rounds` times: a ranking that drift cannot bias.
                tuned = {kernel: blend.default_tiles(kernel, dtype) for kernel in ("forward", "backward")}

                def with_tiles(tiles, call):
                    def run():
                        blend.TILES[("forward", dtype.itemsize)] = blend.TILES[("backward", dtype.itemsize)] = tiles
                        return call()
                    return run

                fns = {"copy": lambda: dst.copy_(src)}
                for config in SWEEP[name]:
                    tiles = blend.Tiles(*config)
                    fns[f"forward {config}"] = with_tiles(tiles, fused)
                    fns[f"backward {config}"] = with_tiles(tiles, fused_bwd)
                samples = interleaved(device, fns, iters, rounds)
                sweep_copy_gbs = moved / _median(samples["copy"]) / 1e6
                for config in SWEEP[name]:
                    fwd, bwd = samples[f"forward {config}"], samples[f"backward {config}"]
                    launch = blend._launch(rows, chunks, width, device, blend.Tiles(*config))
                    sweep[str(config)] = {
                        "fwd_ms": _median(fwd), "fwd_of_copy": moved / _median(fwd) / 1e6 / sweep_copy_gbs,
                        "fwd_spread": _spread(fwd), "bwd_ms": _median(bwd),
                        "bwd_of_copy": moved_bwd / _median(bwd) / 1e6 / sweep_copy_gbs,
                        "bwd_spread": _spread(bwd), "programs": launch.grid[0]}
                    entry = sweep[str(config)]
                    print(f"  sweep {name} {config}: forward {entry['fwd_ms'] * 1e3:.1f} us = "
                          f"{entry['fwd_of_copy']:.1%} of copy (spread {entry['fwd_spread']:.1%}), backward "
                          f"{entry['bwd_ms'] * 1e3:.1f} us = {entry['bwd_of_copy']:.1%} (spread "
                          f"{entry['bwd_spread']:.1%}); {launch.grid[0]} programs", flush=True)
                del samples, fns
                for kernel, key in (("forward", "fwd_ms"), ("backward", "bwd_ms")):
                    if adopt_best:  # the headline below, and the later sections, run the winners
                        best = min(SWEEP[name], key=lambda config: sweep[str(config)][key])
                        blend.TILES[(kernel, dtype.itemsize)] = blend.Tiles(*best)
                    else:  # back to the module's tuned tiles
                        blend.TILES[(kernel, dtype.itemsize)] = tuned[kernel]
                print(f"  op path {name}: forward {blend.default_tiles('forward', dtype)}, "
                      f"backward {blend.default_tiles('backward', dtype)}", flush=True)

            fns = {"copy": lambda: dst.copy_(src), "fused": fused,
                   "eager": lambda: reference.blend_forward(y, g, slot_alpha, chunk_slot, slot_chunk, 1e-6),
                   "fused_bwd": fused_bwd,
                   "eager_bwd": lambda: reference.blend_backward(grad_out, slot_alpha, chunk_slot, slot_chunk)}
            try:
                compiled = torch.compile(reference.blend_forward)
                compiled_bwd = torch.compile(reference.blend_backward)
                compiled(y, g, slot_alpha, chunk_slot, slot_chunk, 1e-6)
                compiled_bwd(grad_out, slot_alpha, chunk_slot, slot_chunk)
                fns["compiled"] = lambda: compiled(y, g, slot_alpha, chunk_slot, slot_chunk, 1e-6)
                fns["compiled_bwd"] = lambda: compiled_bwd(grad_out, slot_alpha, chunk_slot, slot_chunk)
            except Exception as e:  # noqa: BLE001 - report, do not abort the bench
                raw[f"blend_{name}_compile_error"] = repr(e)
            samples = interleaved(device, fns, iters, rounds)
            ms = {key: _median(value) for key, value in samples.items()}
            ms.setdefault("compiled", float("nan"))
            ms.setdefault("compiled_bwd", float("nan"))
            # The op as the layer calls it, from Python, one call after another: where the GPU
            # time is short this is bounded by the CPU's cost of issuing the op.
            loop_ms = timer(device, fused, sizes["iters"], sizes["repeats"])
            loop_bwd_ms = timer(device, fused_bwd, sizes["iters"], sizes["repeats"])
            cpu_us, cpu_bwd_us = host_us(device, fused), host_us(device, fused_bwd)
        copy_gbs = moved / ms["copy"] / 1e6
        fused_gbs = moved / ms["fused"] / 1e6
        fused_bwd_gbs = moved_bwd / ms["fused_bwd"] / 1e6
        raw[f"blend_{name}"] = {
            "rows": rows, "features": features, "chunks": chunks, "bytes": moved,
            "timing": (f"CUDA graphs of {iters} calls, {rounds} rounds interleaved, medians" if device.type == "cuda"
                       else f"{iters} calls per sample, {rounds} rounds interleaved, medians"),
            "copy_ms": ms["copy"], "fused_ms": ms["fused"], "eager_ms": ms["eager"],
            "compiled_ms": ms["compiled"], "copy_GBps": copy_gbs, "fused_GBps": fused_gbs,
            "fused_of_copy": fused_gbs / copy_gbs,
            "samples": {key: _summary(value) for key, value in samples.items()},
            "op_loop_ms": loop_ms, "op_host_us_per_call": cpu_us,
            "tiles": ({k: str(blend.default_tiles(k, dtype)) for k in ("forward", "backward")}
                      if blend is not None else None),
            "tiles_adopted_from_sweep": bool(sweep and adopt_best),
            "backward": {"bytes": moved_bwd, "fused_ms": ms["fused_bwd"], "eager_ms": ms["eager_bwd"],
                         "compiled_ms": ms["compiled_bwd"], "fused_GBps": fused_bwd_gbs,
                         "fused_of_copy": fused_bwd_gbs / copy_gbs, "op_loop_ms": loop_bwd_ms,
                         "op_host_us_per_call": cpu_bwd_us},
            "sweep": sweep}
        print(f"  {name}: copy {copy_gbs:.0f} GB/s; forward {fused_gbs:.0f} GB/s = {fused_gbs / copy_gbs:.1%} "
              f"(spread {_spread(samples['fused']):.1%}); backward {fused_bwd_gbs:.0f} GB/s = "
              f"{fused_bwd_gbs / copy_gbs:.1%}; from a Python loop {moved / loop_ms / 1e6 / copy_gbs:.1%} / "
              f"{moved_bwd / loop_bwd_ms / 1e6 / copy_gbs:.1%} of copy, CPU {cpu_us:.0f} / {cpu_bwd_us:.0f} us "
              f"per call", flush=True)
        rows_table.append((f"blend {name} {rows}x{features}, {chunks} chunks",
                           f"{fused_gbs:.0f} GB/s = {fused_gbs / copy_gbs:.1%} of copy ({copy_gbs:.0f})",
                           f"{ms['eager'] / ms['fused']:.2f}x eager, {ms['compiled'] / ms['fused']:.2f}x compiled"))
        rows_table.append((f"blend backward {name} {rows}x{features}, {chunks} chunks",
                           f"{fused_bwd_gbs:.0f} GB/s = {fused_bwd_gbs / copy_gbs:.1%} of copy",
                           (f"{ms['eager_bwd'] / ms['fused_bwd']:.2f}x eager, "
                            f"{ms['compiled_bwd'] / ms['fused_bwd']:.2f}x compiled")))

    for dtype in (torch.float32, torch.bfloat16):
        one(dtype)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def bench_dormant(device, sizes, rows_table, raw):
    import kasmina
    from kasmina import kernels

    rows, width = sizes["dormant"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    bare = nn.Linear(width, width, device=device, dtype=dtype)
    wrapped_model, _ = kasmina.wrap(nn.Sequential(nn.Linear(width, width, device=device, dtype=dtype)),
                                    {"seeds_per_layer": 64})
    wrapped_model[0].host.load_state_dict(bare.state_dict())
    layer = wrapped_model[0]
    layer.train()  # telemetry is read on training steps
    telemetry = layer.config.telemetry
    x = torch.randn(rows, width, device=device, dtype=dtype)
    xg = x.clone().requires_grad_()
    grad = torch.randn_like(x)
    # A whole number of telemetry periods per sample, so each sample holds its share of reads.
    calls = telemetry.every * max(1, sizes["dormant_calls"] // telemetry.every)
    rounds = sizes["dormant_rounds"]

    def forward(module):
        def run():
            with torch.no_grad():
                return module(x)
        return run

    def step(module):
        return lambda: module(xg).backward(grad)

    with torch.no_grad():
        assert torch.equal(layer(x), bare(x))  # dormant: the very same output
    results = {}
    for what, make in (("forward", forward), ("forward+backward", step)):
        graphed = interleaved(device, {"bare": make(bare), "wrapped": make(layer)}, calls, rounds)
        # The same, issued from Python (no graphs): what an eager training loop sees. One untimed
        # call is queued first, so that the CPU is ahead of the GPU when the clock starts, as it
        # is in a running loop (else each sample would count one launch latency of its own).
        eager = {"bare": [], "wrapped": []}
        for r in range(rounds if device.type == "cuda" else 0):
            for name in (("bare", "wrapped") if r % 2 == 0 else ("wrapped", "bare")):
                fn = make(bare if name == "bare" else layer)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                fn()
                start.record()
                for _ in range(calls):
                    fn()
                end.record()
                torch.cuda.synchronize()
                eager[name].append(start.elapsed_time(end) / calls)
        results[what] = (graphed, eager)
    # The telemetry read alone, as one in `every` training steps runs it: the sampled read with its
    # sums added into a float64 accumulator, fused (the read, then one summing kernel) and as it
    # was before (the read, a torch sum of the partials, two adds).
    seeds = layer.seeds
    row_step = max(1, -(-rows // telemetry.max_rows)) if telemetry.max_rows else 1
    count = -(-rows // row_step) * (width // seeds)
    scratch = torch.zeros(seeds, 6, dtype=torch.float64, device=device)
    with torch.no_grad():
        y = bare(x)

        def unfused():
            stats = kernels.chunk_stats(y, seeds, row_step, telemetry.dead_threshold)
            scratch[:, 0:3] += stats
            scratch[:, 3] += count

        reads = interleaved(device, {
            "fused": lambda: kernels.accumulate_chunk_stats(y, seeds, row_step, telemetry.dead_threshold,
                                                            scratch, 0, count),
            "unfused": unfused}, calls, rounds)
    raw["dormant_telemetry_read"] = {"rows_read": -(-rows // row_step), "row_step": row_step,
                                     "fused_us": _median(reads["fused"]) * 1e3,
                                     "unfused_us": _median(reads["unfused"]) * 1e3,
                                     "samples_ms": reads}
    rows_table.append((f"dormant telemetry read ({-(-rows // row_step)} of {rows} rows, 1 step in {telemetry.every})",
                       f"{_median(reads['fused']) * 1e3:.2f} us",
                       f"before fusing the sums: {_median(reads['unfused']) * 1e3:.2f} us"))
    for what, (graphed, eager) in results.items():
        b, w = _median(graphed["bare"]), _median(graphed["wrapped"])
        ratios = [wr / br - 1 for br, wr in zip(graphed["bare"], graphed["wrapped"])]
        entry = {"rows": rows, "width": width, "dtype": str(dtype), "calls_per_sample": calls,
                 "rounds": rounds, "timing": "CUDA graphs, interleaved" if device.type == "cuda" else "interleaved",
                 "bare_ms": b, "wrapped_ms": w, "overhead": w / b - 1,
                 "overhead_per_round_median": _median(ratios),
                 "overhead_per_round_min_max": [min(ratios), max(ratios)],
                 "bare_spread": _spread(graphed["bare"]), "wrapped_spread": _spread(graphed["wrapped"]),
                 "samples_ms": graphed, "telemetry_every": telemetry.every,
                 "telemetry_max_rows": telemetry.max_rows}
        if eager["bare"]:
            eb, ew = _median(eager["bare"]), _median(eager["wrapped"])
            entry["eager"] = {"bare_ms": eb, "wrapped_ms": ew, "overhead": ew / eb - 1,
                              "overhead_per_round_median": _median([wr / br - 1 for br, wr in
                                                                    zip(eager["bare"], eager["wrapped"])]),
                              "samples_ms": eager}
        entry["host_us_per_call"] = {"bare": host_us(device, forward(bare) if what == "forward" else step(bare)),
                                     "wrapped": host_us(device, forward(layer) if what == "forward" else step(layer))}
        raw[f"dormant_{what}"] = entry
        detail = f"bare {b:.4f} ms, wrapped {w:.4f} ms; per-round median {_median(ratios):+.2%}"
        if eager["bare"]:
            detail += f"; eager {entry['eager']['overhead']:+.2%}"
        rows_table.append((f"dormant {width}x{width} {str(dtype)[6:]} x{rows}, {what}",
                           f"{(w / b - 1):+.2%} overhead", detail))


def _grow(layer, source, seeds, ir):
    """Graft `seeds` of `layer` through the lifecycle with four boundaries."""
    from esper.contracts import KasminaCommandType as K
    from esper.contracts import KasminaControlCommand
    from esper.contracts import SeedLifecycle as S

    kernel = source.add(ir, layer.seed_interface, target=layer.state.alpha.device.type)

    def issue(kind, **kw):
        for seed in seeds:
            layer.queue(KasminaControlCommand(command_id=f"{seed}", run_id="bench", target_layer_id=0,
                                              target_seed_id=seed, command=kind, **kw))
        return layer.on_epoch_end()

    issue(K.REQUEST_GERMINATION, kernel_artifact_id=kernel)
    issue(K.ADVANCE, target_stage=S.LOADING)
    layer.wait_for_loads()
    layer.on_epoch_end()
    issue(K.ADVANCE, target_stage=S.GRAFTING)
    layer.state.alpha.fill_(0.5)
    return kernel


def bench_seeds(device, sizes, rows_table, raw):
    import copy

    import kasmina
    from esper.blueprints import standard_library

    total, active, chunk_width, in_features, rows = sizes["seeds"]
    ir = next(ir for ir in standard_library() if ir.name == "mlp_relu_w4")
    source = kasmina.BlueprintKernelSource()
    model, _ = kasmina.wrap(nn.Sequential(nn.Linear(in_features, total * chunk_width, device=device)),
                            {"chunk_width": chunk_width, "grafting": {"ramp_length": 10**9}},
                            kernel_source=source)
    layer = model[0]
    seeds = list(range(0, total, total // active))[:active]
    _grow(layer, source, seeds, ir)
    (bank,) = layer.banks.values()
    x = torch.randn(rows, in_features, device=device, requires_grad=True)

    def batched():
        layer(x).sum().backward()

    # The same computation seed by seed: one module per seed, each added to its chunk.
    template = bank.template
    modules = []
    for i in range(bank.size):
        module = copy.deepcopy(template)
        module.load_state_dict({n: t[i] for n, t in bank.seed_state().items()})
        modules.append(module)
    alpha = 0.5

    def one_by_one():
        out = layer.host(x).clone()
        for module, chunk in zip(modules, bank.chunks):
            out[:, chunk * chunk_width:(chunk + 1) * chunk_width] += alpha * module(x)
        out.sum().backward()

    batched_ms = timer(device, batched, max(1, sizes["iters"] // 5), sizes["repeats"])
    loop_ms = timer(device, one_by_one, 1, max(2, sizes["repeats"] // 2), warmup=1)
    launches = None
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
            layer(x)
            torch.cuda.synchronize()
        launches = sum(1 for e in prof.events() if e.device_type.name == "CUDA")
    raw["seeds"] = {"seeds": total, "active": active, "chunk_width": chunk_width, "in_features": in_features,
                    "rows": rows, "batched_ms": batched_ms, "seed_by_seed_ms": loop_ms,
                    "speedup": loop_ms / batched_ms, "kernels_per_forward": launches}
    rows_table.append((f"{total} seeds, {active} active (mlp_relu_w4), fwd+bwd x{rows}",
                       f"{loop_ms / batched_ms:.1f}x vs seed by seed",
                       f"{batched_ms:.2f} ms vs {loop_ms:.1f} ms; kernels/forward: {launches}"))


def _forged_workspace(device, interface):
    """A temporary workspace whose standard library was forged (fast pipeline) at `interface`
    for `device`, every kernel then VALIDATED by a bench-signed passing report (the gauntlet
    itself is Urabrask's and not what is timed here). Returns (workspace, {name: kernel id})."""
    import tempfile

    from esper import signing
    from esper.contracts import (
        LATENCY_MS,
        MEMORY_MB,
        CompilationPipeline,
        UrabraskValidationReport,
    )
    from esper.library import init_workspace
    from esper.urza import Urza
    from esper.workspace import Workspace
    from pipelines.tezzeret.forge import ForgeOptions, run_forge

    ws = Workspace(Path(tempfile.mkdtemp(prefix="kasmina-bench-")) / "ws")
    init_workspace(ws)
    run_forge(ws, None, ForgeOptions(devices=(device.type,), interfaces=(interface,),
                                     pipelines=(CompilationPipeline.FAST,), idle_work=False),
              once=True)
    kernels = {}
    with Urza.open(ws) as urza:
        names = {b.id: b.name for b in urza.list_blueprints()}
        for kernel in urza.list_kernels():
            report = UrabraskValidationReport(
                kernel_artifact_id=kernel.id, blueprint_id=kernel.blueprint_id, passed_validation=True,
                benchmark_results={LATENCY_MS: 0.1, MEMORY_MB: 1.0})
            urza.apply_validation_report(signing.sign(report.to_json().encode(), ws.private_key("bench"),
                                                      "bench"), actor="bench_kasmina")
            kernels[names[kernel.blueprint_id]] = kernel.id
    return ws, kernels


def _load_us(kasmina, source, kernel, device) -> float:
    """Microseconds of one KernelCache miss: the source's load and the move to the device."""
    cache = kasmina.KernelCache(source)
    try:
        start = time.perf_counter()
        cache.get(kernel, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1e6
    finally:
        cache.close()


def _load_steps(loader, urza, kernel_id, device, cold: bool) -> dict[str, float]:
    """Microseconds of each step of one verified load, run one after the other on this thread,
    as the loader runs them: the loader's own functions, in its order, on an open catalog connection (as
    VerifiedKernelSource keeps one per thread). `cold` clears the parse caches first."""
    from esper.signing import open_signed

    steps: dict[str, float] = {}
    keys = loader._key_files(urza.workspace)
    if cold:
        loader.clear_caches()
    last = time.perf_counter()

    def tick(name: str) -> None:
        nonlocal last
        now = time.perf_counter()
        steps[name] = (now - last) * 1e6
        last = now

    record = urza.kernel_load_record(kernel_id)
    tick("catalog record")
    bench_key = loader._trusted_key(keys["bench"])
    forge_key = loader._trusted_key(keys["forge"])
    tick("two key files")
    report = loader._blob(urza.store, record.report_blob, "report")
    tick("report: read + sha256")
    body = open_signed(report, bench_key, what="report")
    tick("report: Ed25519")
    loader._check_report(body, record)
    tick("report: parse + check")
    document = loader._blob(urza.store, record.kernel_binary_ref, "manifest")
    tick("manifest: read + sha256")
    body = open_signed(document, forge_key, what="manifest")
    tick("manifest: Ed25519")
    manifest = loader._signed_manifest(body, "manifest")
    loader._check_manifest_matches(manifest, record)
    tick("manifest: parse + match")
    weights = loader._blob(urza.store, manifest.files["weights.safetensors"], "weights",
                           writable=True)
    tick("weights: read + sha256")
    ir_bytes = loader._blob(urza.store, record.blueprint_id, "IR")
    tick("IR: read + sha256")
    ir, skeleton = loader._checked_blueprint(record.blueprint_id, str(record.interface), ir_bytes)
    tick("blueprint: parse, static check, empty module")
    verified = loader._Verified(record, manifest, {"weights.safetensors": weights}, ir, skeleton)
    loader._rebuild(verified, str(device), share_storage=True)
    tick("rebuild with the signed weights")
    if device.type == "cuda":
        torch.cuda.synchronize()
    tick("synchronize")
    return steps


def bench_load(device, sizes, rows_table, raw):
    import kasmina
    from esper.blueprints import standard_library
    from esper.contracts import KernelInterface, LayerKind
    from pipelines.tezzeret import loader

    repeats = sizes["repeats"] * 5
    interface = KernelInterface(kind=LayerKind.LINEAR, in_features=1024, out_features=64)
    ir = next(ir for ir in standard_library() if ir.name == "mlp_gelu_w32")
    source = kasmina.BlueprintKernelSource()
    kernel = source.add(ir, interface)
    _load_us(kasmina, source, kernel, device)  # imports, first device copy
    built = [_load_us(kasmina, source, kernel, device) for _ in range(repeats)]

    # Through the forge's verifying loader, as a training run loads: VALIDATED status, the bench
    # signature over the validation report, the forge signature over the manifest, the hash of
    # every file, then the rebuild with the signed weights.
    started = time.perf_counter()
    ws, kernels = _forged_workspace(device, interface)
    forge_s = time.perf_counter() - started
    verified_source = loader.VerifiedKernelSource(ws)
    gelu = kernels["mlp_gelu_w32"]
    loader.clear_caches()
    # The first load in this process: opens this thread's catalog connection, and runs the
    # loader's code for the first time.
    first_us = _load_us(kasmina, verified_source, gelu, device)
    # First load of each kernel: the loader's parse caches (public keys, checked blueprints) cleared
    # before each, so every step of the verification and the rebuild runs. Three rounds over the
    # kernels; each kernel's figure is its median.
    rounds: dict[str, list[float]] = {name: [] for name in kernels}
    for _ in range(3):
        for name, kernel_id in sorted(kernels.items()):
            loader.clear_caches()
            rounds[name].append(_load_us(kasmina, verified_source, kernel_id, device))
    cold = {name: statistics.median(samples) for name, samples in rounds.items()}
    # Loads of a kernel whose blueprint and keys this process has already parsed (a re-load
    # after eviction, or another kernel of the same blueprint and interface): still every
    # signature and hash checked, every file read.
    warm = [_load_us(kasmina, verified_source, gelu, device) for _ in range(repeats)]
    # Cache hits: the verified source behind the same LRU.
    cache = kasmina.KernelCache(verified_source)
    cache.get(gelu, device)
    hits = 10_000
    start = time.perf_counter()
    for _ in range(hits):
        cache.get(gelu, device)
    cached_us = (time.perf_counter() - start) * 1e6 / hits
    cache.close()
    verified_source.close()
    # The steps one by one, each timed: each kernel cold, then
    # mlp_gelu_w32 warm; medians per step.
    from esper.urza import Urza

    step_rounds = {"cold": [], "warm": []}
    with Urza.open(ws) as urza:
        _load_steps(loader, urza, gelu, device, cold=False)  # the connection's first query
        for _ in range(3):
            for kernel_id in sorted(kernels.values()):
                step_rounds["cold"].append(_load_steps(loader, urza, kernel_id, device, cold=True))
        for _ in range(repeats):
            step_rounds["warm"].append(_load_steps(loader, urza, gelu, device, cold=False))
    steps = {which: {name: statistics.median(r[name] for r in runs) for name in runs[0]}
             for which, runs in step_rounds.items()}
    for which, medians in steps.items():
        print(f"  verified load steps, {which} (medians of {len(step_rounds[which])}; serial):")
        for name, us in medians.items():
            print(f"    {name:<46} {us:8.1f} us")
        print(f"    {'sum of the medians':<46} {sum(medians.values()):8.1f} us")
    raw["load"] = {
        "kernel": "mlp_gelu_w32 @ linear:1024:64, fast pipeline", "device": str(device),
        "cached_us": cached_us,
        "verified_uncached_us": statistics.median(cold.values()),
        "verified_uncached_per_kernel_us": cold, "verified_uncached_rounds_us": rounds,
        "verified_uncached_includes": "catalog row, VALIDATED check, bench signature over the report, "
                                      "forge signature over the manifest, sha256 of every blob, IR "
                                      "parse + static check, rebuild with the signed weights, move to "
                                      "the device; loader parse caches cleared before each; "
                                      "median over 3 rounds per kernel, then over kernels",
        "verified_reload_us": statistics.median(warm), "verified_reload_all_us": warm,
        "verified_first_in_process_us": first_us,
        "unverified_build_us": statistics.median(built), "unverified_build_all_us": built,
        "unverified_build_includes": "IR validation + build with random init + move to device",
        "forge_seconds": forge_s, "kernels": len(kernels),
        "steps_us": steps, "steps_includes": "each step of a verified load timed alone, serially "
                                             "on the calling thread; cold: "
                                             "parse caches cleared, every kernel, 3 rounds",
    }
    rows_table.append(("kernel load (mlp_gelu_w32 @ linear:1024:64)", f"cached {cached_us:.2f} us",
                       (f"uncached verified {statistics.median(cold.values()):.0f} us (median of "
                        f"{len(cold)} kernels, first load each, 3 rounds); re-load "
                        f"{statistics.median(warm):.0f} us; first in the process {first_us:.0f} us; "
                        f"unverified build {statistics.median(built):.0f} us")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("bench-kasmina.json"))
    parser.add_argument("--only", nargs="*", choices=["blend", "dormant", "seeds", "load"])
    parser.add_argument("--adopt-best", action="store_true",
                        help="run the op path and the later sections with the sweep's fastest tiles")
    args = parser.parse_args()
    device = torch.device(args.device)
    sizes = SIZES[device.type]
    raw: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
                 "torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton

        raw["triton"] = triton.__version__
    except ImportError:
        raw["triton"] = None
    table: list[tuple[str, str, str]] = []
    for name, fn in (("blend", bench_blend), ("dormant", bench_dormant), ("seeds", bench_seeds),
                     ("load", bench_load)):
        if args.only and name not in args.only:
            continue
        if fn is bench_blend:
            fn(device, sizes, table, raw, adopt_best=args.adopt_best)
        else:
            fn(device, sizes, table, raw)
        args.out.write_text(json.dumps(raw, indent=2, default=str) + "\n")
    width = max(len(r[0]) for r in table)
    print(f"Kasmina on {raw['device']} (torch {raw['torch']}, triton {raw['triton']})")
    for what, headline, detail in table:
        print(f"  {what:<{width}}  {headline:<40}  {detail}")
    args.out.write_text(json.dumps(raw, indent=2, default=str) + "\n")
    print(f"raw numbers: {args.out}")


if __name__ == "__main__":
    main()

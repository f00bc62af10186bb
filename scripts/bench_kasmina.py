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
  4. kernel load latency, cached and uncached (the bench builds kernels from blueprints: the
     forge's signature check is not included; it needs `cryptography`).
Prints a table and writes every raw number to --out. Needs torch (+ triton on CUDA) and pydantic.
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

import torch  # noqa: E402
from torch import nn  # noqa: E402

SIZES = {
    "cuda": {"blend": (16384, 4096, 64), "dormant": (8192, 4096), "seeds": (10_000, 1_000, 4, 1024, 1024),
             "iters": 50, "repeats": 7},
    "cpu": {"blend": (512, 256, 16), "dormant": (512, 256), "seeds": (1_000, 100, 2, 64, 32),
            "iters": 5, "repeats": 3},
}


def timer(device: torch.device, fn, iters: int, repeats: int, warmup: int = 3) -> float:
    """Median over `repeats` of the mean milliseconds per call of `fn` over `iters` calls."""
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


# Candidate tiles swept per dtype in one run, (block_r, block_f, num_warps, programs_per_sm):
# block_f columns are split into chunks x columns per chunk; programs_per_sm None gives each row
# tile its own program. The winners become kasmina.kernels.blend.TILES.
SWEEP = {
    "float32": [(2, 512, 2, None), (8, 512, 4, 16), (4, 512, 4, 32), (2, 1024, 4, 32), (8, 512, 4, 8),
                (8, 256, 2, 16), (4, 1024, 4, 16), (8, 1024, 8, 8), (8, 512, 4, None), (8, 1024, 8, None)],
    "bfloat16": [(8, 1024, 4, 8), (8, 1024, 4, 16), (4, 1024, 4, 16), (4, 2048, 8, 8), (8, 512, 2, 16),
                 (4, 512, 2, 32), (4, 1024, 4, 32), (2, 2048, 8, None), (4, 2048, 8, None),
                 (8, 1024, 4, None)],
}


def bench_blend(device, sizes, rows_table, raw, adopt_best=False):
    from kasmina import kernels
    from kasmina.kernels import reference

    rows, features, chunks = sizes["blend"]
    width = features // chunks
    triton_path = kernels.uses_triton(torch.empty(0, device=device))  # CUDA, or backend("triton")
    blend = None
    if triton_path:
        from kasmina.kernels import blend
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        y = torch.randn(rows, features, device=device, dtype=dtype)
        g = torch.randn(chunks, rows, width, device=device, dtype=dtype)  # every chunk active
        grad_out = torch.randn_like(y)
        slot_alpha = torch.rand(chunks, device=device)
        slot_chunk = torch.arange(chunks, device=device)
        chunk_slot = torch.arange(chunks, device=device, dtype=torch.int32)
        moved = 3 * y.numel() * y.element_size()  # read y, read g, write out
        moved_bwd = 2 * y.numel() * y.element_size()  # read grad_out, write grad_g
        src = torch.empty(moved // 2, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        copy_ms = timer(device, lambda: dst.copy_(src), sizes["iters"], sizes["repeats"])  # moves `moved` bytes
        del src, dst
        copy_gbs = moved / copy_ms / 1e6
        print(f"  copy {name}: {copy_gbs:.0f} GB/s", flush=True)

        with torch.no_grad():
            sweep = {}
            tuned = ({kernel: blend.default_tiles(kernel, dtype) for kernel in ("forward", "backward")}
                     if blend is not None else {})
            for config in (SWEEP[name] if blend is not None else []):
                # Timed through the registered ops, as the layer calls them: a direct call of the
                # launchers outside a triton_op goes through wrap_triton's HOP dispatch, which costs
                # about 230 us of CPU per call (second H200 run) and would floor every candidate.
                tiles = blend.Tiles(*config)
                blend.TILES[("forward", dtype.itemsize)] = blend.TILES[("backward", dtype.itemsize)] = tiles
                fwd_ms = timer(device, lambda: torch.ops.kasmina.blend(y, g, slot_alpha, chunk_slot, slot_chunk,
                                                                       None, 1e-6),
                               sizes["iters"], sizes["repeats"])
                bwd_ms = timer(device, lambda: torch.ops.kasmina.blend_backward(grad_out, slot_alpha, chunk_slot,
                                                                                chunks),
                               sizes["iters"], sizes["repeats"])
                # the torch sum of the per-program partial stats inside the op (timed alone, back to
                # back: where the buffer is small this is the CPU's launch rate, an upper bound)
                launch = blend._launch(rows, chunks, width, device, tiles)
                partials = torch.empty(launch.row_programs * launch.width_tiles, chunks, 3, device=device)
                reduce_ms = timer(device, lambda: partials.sum(dim=0), sizes["iters"], sizes["repeats"])
                sweep[str(config)] = {"fwd_ms": fwd_ms, "fwd_of_copy": moved / fwd_ms / 1e6 / copy_gbs,
                                      "bwd_ms": bwd_ms, "bwd_of_copy": moved_bwd / bwd_ms / 1e6 / copy_gbs,
                                      "programs": launch.grid[0], "stats_reduce_ms": reduce_ms}
                print(f"  sweep {name} {config}: forward {fwd_ms * 1e3:.1f} us = "
                      f"{sweep[str(config)]['fwd_of_copy']:.1%} of copy, backward {bwd_ms * 1e3:.1f} us = "
                      f"{sweep[str(config)]['bwd_of_copy']:.1%}; {launch.grid[0]} programs, "
                      f"stats sum {reduce_ms * 1e3:.1f} us", flush=True)
            for kernel, key in (("forward", "fwd_ms"), ("backward", "bwd_ms")):
                if sweep and adopt_best:  # the op path below, and the later sections, run the winners
                    best = min(SWEEP[name], key=lambda config: sweep[str(config)][key])
                    blend.TILES[(kernel, dtype.itemsize)] = blend.Tiles(*best)
                elif sweep:  # back to the module's tuned tiles
                    blend.TILES[(kernel, dtype.itemsize)] = tuned[kernel]
            if sweep:
                print(f"  op path {name}: forward {blend.default_tiles('forward', dtype)}, "
                      f"backward {blend.default_tiles('backward', dtype)}", flush=True)
            fused_ms = timer(device, lambda: kernels.blend_chunks(y, g, slot_alpha, chunk_slot, slot_chunk,
                                                                  None, 1e-6),
                             sizes["iters"], sizes["repeats"])
            eager_ms = timer(device, lambda: reference.blend_forward(y, g, slot_alpha, chunk_slot, slot_chunk,
                                                                     1e-6), sizes["iters"], sizes["repeats"])
            if triton_path:
                def fused_bwd():
                    return torch.ops.kasmina.blend_backward(grad_out, slot_alpha, chunk_slot, chunks)
            else:
                def fused_bwd():
                    return reference.blend_backward(grad_out, slot_alpha, chunk_slot, slot_chunk)
            fused_bwd_ms = timer(device, fused_bwd, sizes["iters"], sizes["repeats"])
            eager_bwd_ms = timer(device, lambda: reference.blend_backward(grad_out, slot_alpha, chunk_slot,
                                                                          slot_chunk),
                                 sizes["iters"], sizes["repeats"])
            try:
                compiled = torch.compile(reference.blend_forward)
                compiled_ms = timer(device, lambda: compiled(y, g, slot_alpha, chunk_slot, slot_chunk, 1e-6),
                                    sizes["iters"], sizes["repeats"])
                compiled_bwd = torch.compile(reference.blend_backward)
                compiled_bwd_ms = timer(device, lambda: compiled_bwd(grad_out, slot_alpha, chunk_slot, slot_chunk),
                                        sizes["iters"], sizes["repeats"])
            except Exception as e:  # noqa: BLE001 - report, do not abort the bench
                compiled_ms = compiled_bwd_ms = float("nan")
                raw[f"blend_{name}_compile_error"] = repr(e)
        fused_gbs = moved / fused_ms / 1e6
        fused_bwd_gbs = moved_bwd / fused_bwd_ms / 1e6
        raw[f"blend_{name}"] = {"rows": rows, "features": features, "chunks": chunks, "bytes": moved,
                                "copy_ms": copy_ms, "fused_ms": fused_ms, "eager_ms": eager_ms,
                                "compiled_ms": compiled_ms, "copy_GBps": copy_gbs, "fused_GBps": fused_gbs,
                                "tiles": ({k: str(blend.default_tiles(k, dtype)) for k in ("forward", "backward")}
                                          if blend is not None else None),
                                "tiles_adopted_from_sweep": bool(sweep and adopt_best),
                                "backward": {"bytes": moved_bwd, "fused_ms": fused_bwd_ms,
                                             "eager_ms": eager_bwd_ms, "compiled_ms": compiled_bwd_ms,
                                             "fused_GBps": fused_bwd_gbs},
                                "sweep": sweep}
        rows_table.append((f"blend {name} {rows}x{features}, {chunks} chunks",
                           f"{fused_gbs:.0f} GB/s = {fused_gbs / copy_gbs:.1%} of copy ({copy_gbs:.0f})",
                           f"{eager_ms / fused_ms:.2f}x eager, {compiled_ms / fused_ms:.2f}x compiled"))
        rows_table.append((f"blend backward {name} {rows}x{features}, {chunks} chunks",
                           f"{fused_bwd_gbs:.0f} GB/s = {fused_bwd_gbs / copy_gbs:.1%} of copy",
                           f"{eager_bwd_ms / fused_bwd_ms:.2f}x eager, "
                           f"{compiled_bwd_ms / fused_bwd_ms:.2f}x compiled"))
        del y, g, grad_out


def bench_dormant(device, sizes, rows_table, raw):
    import kasmina

    rows, width = sizes["dormant"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    bare = nn.Linear(width, width, device=device, dtype=dtype)
    wrapped_model, _ = kasmina.wrap(nn.Sequential(nn.Linear(width, width, device=device, dtype=dtype)),
                                    {"seeds_per_layer": 64})
    wrapped_model[0].host.load_state_dict(bare.state_dict())
    layer = wrapped_model[0]
    x = torch.randn(rows, width, device=device, dtype=dtype)
    xg = x.clone().requires_grad_()
    results = {}
    with torch.no_grad():
        bare_ms = timer(device, lambda: bare(x), sizes["iters"] * 4, sizes["repeats"])
        layer_ms = timer(device, lambda: layer(x), sizes["iters"] * 4, sizes["repeats"])
    results["forward"] = (bare_ms, layer_ms)

    def step(module):
        return lambda: module(xg).backward(torch.ones_like(x))

    bare_ms = timer(device, step(bare), sizes["iters"] * 2, sizes["repeats"])
    layer_ms = timer(device, step(layer), sizes["iters"] * 2, sizes["repeats"])
    results["forward+backward"] = (bare_ms, layer_ms)
    for what, (b, w) in results.items():
        raw[f"dormant_{what}"] = {"rows": rows, "width": width, "dtype": str(dtype), "bare_ms": b,
                                  "wrapped_ms": w, "overhead": w / b - 1,
                                  "telemetry_every": layer.config.telemetry.every,
                                  "telemetry_max_rows": layer.config.telemetry.max_rows}
        rows_table.append((f"dormant {width}x{width} {str(dtype)[6:]} x{rows}, {what}",
                           f"{(w / b - 1):+.2%} overhead", f"bare {b:.3f} ms, wrapped {w:.3f} ms"))


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


def bench_load(device, sizes, rows_table, raw):
    import kasmina
    from esper.blueprints import standard_library
    from esper.contracts import KernelInterface, LayerKind

    ir = next(ir for ir in standard_library() if ir.name == "mlp_gelu_w32")
    source = kasmina.BlueprintKernelSource()
    kernel = source.add(ir, KernelInterface(kind=LayerKind.LINEAR, in_features=1024, out_features=64))
    uncached = []
    for _ in range(sizes["repeats"]):
        cache = kasmina.KernelCache(source)
        start = time.perf_counter()
        cache.get(kernel, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        uncached.append((time.perf_counter() - start) * 1e6)
        cache.close()
    cache = kasmina.KernelCache(source)
    cache.get(kernel, device)
    hits = 10_000
    start = time.perf_counter()
    for _ in range(hits):
        cache.get(kernel, device)
    cached_us = (time.perf_counter() - start) * 1e6 / hits
    cache.close()
    raw["load"] = {"cached_us": cached_us, "uncached_us": statistics.median(uncached),
                   "uncached_includes": "IR validation + build + move to device; no signature check"}
    rows_table.append(("kernel load (mlp_gelu_w32 @ linear:1024:64)", f"cached {cached_us:.2f} us",
                       f"uncached {statistics.median(uncached):.0f} us (build, no verification)"))


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

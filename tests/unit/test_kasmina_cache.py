"""The kernel cache: a device-resident LRU bounded in bytes over an injected KernelSource."""

from __future__ import annotations

import pytest
import torch

from esper.blueprints import standard_library
from esper.contracts import KernelInterface, LayerKind
from esper.errors import NotFoundError
from kasmina.cache import (
    BlueprintKernelSource,
    KernelCache,
    KernelSource,
    module_nbytes,
)

LIBRARY = {ir.name: ir for ir in standard_library()}
INTERFACE = KernelInterface(kind=LayerKind.LINEAR, in_features=16, out_features=8)


def _source_with(*names):
    source = BlueprintKernelSource()
    return source, [source.add(LIBRARY[n], INTERFACE) for n in names]


def test_hits_misses_and_lru_eviction_by_bytes():
    source, (a, b, c) = _source_with("mlp_relu_w4", "mlp_gelu_w8", "low_rank_r2")
    assert isinstance(source, KernelSource)
    sizes = {k: module_nbytes(source.load(k, torch.device("cpu"))) for k in (a, b, c)}
    source.loads = 0
    cache = KernelCache(source, max_bytes=sizes[a] + sizes[b] + sizes[c] - 1)
    module_a = cache.get(a, "cpu")
    assert cache.get(a, "cpu") is module_a and cache.stats.hits == 1 and cache.stats.misses == 1
    cache.get(b, "cpu")
    cache.get(a, "cpu")  # a is now the most recently used
    cache.get(c, "cpu")  # over budget: b, the least recently used, goes
    assert a in cache and c in cache and b not in cache
    assert cache.nbytes == sizes[a] + sizes[c] <= cache.max_bytes
    assert source.loads == 3
    cache.evict(a)
    assert a not in cache and cache.nbytes == sizes[c]
    cache.close()


def test_prefetch_loads_off_thread_once_and_failures_surface():
    source, (a,) = _source_with("mlp_relu_w4")
    cache = KernelCache(source)
    futures = [cache.prefetch(a, "cpu") for _ in range(3)]
    modules = {id(f.result(timeout=30)) for f in futures}
    assert len(modules) == 1 and source.loads == 1
    assert cache.prefetch(a, "cpu").result() is futures[0].result()
    with pytest.raises(NotFoundError):
        cache.prefetch("00000000abcd-cpu-fast-000000", "cpu").result(timeout=30)
    cache.close()


def test_a_kernel_larger_than_the_budget_is_served_but_not_kept():
    source, (a,) = _source_with("mlp_silu_w64")
    cache = KernelCache(source, max_bytes=16)
    assert cache.get(a, "cpu") is not None
    assert a not in cache and cache.nbytes == 0
    cache.close()

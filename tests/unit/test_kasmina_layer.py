"""KasminaLayer: the invariants of growth (STYLE.md) on real blueprints built from the standard
library, on the CPU reference path."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn

import kasmina
from esper.blueprints import standard_library
from esper.contracts import GraftingStrategy, KasminaCommandType, KasminaControlCommand
from esper.contracts import SeedLifecycle as S
from esper.errors import BadInputError
from kasmina.state import SUMSQ

LIBRARY = {ir.name: ir for ir in standard_library()}
TELEMETRY_EVERY_STEP = {"every": 1, "max_rows": None}


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 8))


def convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, stride=2, padding=1))


def wrapped(model: nn.Module, **config):
    source = kasmina.BlueprintKernelSource()
    config = {"seeds_per_layer": 4, "telemetry": TELEMETRY_EVERY_STEP} | config
    model, report = kasmina.wrap(model, config, kernel_source=source)
    return model, report, source


def graft(layer: kasmina.KasminaLayer, source, seeds, blueprint="mlp_gelu_w8", to=S.GRAFTING,
          strategy=GraftingStrategy.FIXED_RAMP):
    """Drive `seeds` of `layer` from DORMANT to `to` through the lifecycle, now."""
    kernel = source.add(LIBRARY[blueprint], layer.seed_interface)
    path = {S.LOADING: [], S.TRAINING: [S.TRAINING], S.GRAFTING: [S.GRAFTING],
            S.STABILIZATION: [S.GRAFTING, S.STABILIZATION],
            S.EVALUATING: [S.GRAFTING, S.STABILIZATION, S.EVALUATING],
            S.FINE_TUNING: [S.GRAFTING, S.STABILIZATION, S.EVALUATING, S.FINE_TUNING],
            S.FOSSILIZED: [S.GRAFTING, S.STABILIZATION, S.EVALUATING, S.FOSSILIZED]}[to]
    for seed in seeds:
        layer.transition(seed, S.GERMINATED, kernel_artifact_id=kernel, strategy=strategy)
        layer.transition(seed, S.LOADING)
        for stage in path:
            layer.transition(seed, stage)
    return kernel


def command(layer_id, seed, kind, **kw) -> KasminaControlCommand:
    return KasminaControlCommand(command_id=f"c-{seed}-{kind.value}", run_id="run", target_layer_id=layer_id,
                                 target_seed_id=seed, command=kind, **kw)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN payloads and signed zeros included)."""
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.detach().flatten().view(torch.uint8), b.detach().flatten().view(torch.uint8)))


def grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in kasmina.host_parameters(model)]


# --- dormant: invisible -------------------------------------------------------------------------

@pytest.mark.parametrize("make,shape", [(mlp, (10, 12)), (convnet, (2, 3, 9, 9))])
@pytest.mark.parametrize("train", [True, False])
def test_dormant_wrap_changes_no_output_or_gradient_bit(make, shape, train):
    x = torch.randn(*shape)
    bare = make()
    model, _, _ = wrapped(make(), targets=["linear", "conv2d"])
    bare.train(train)
    model.train(train)
    for _ in range(3):  # telemetry reads every step
        want, got = bare(x), model(x)
        assert torch.equal(want, got)
    want.square().sum().backward()
    got.square().sum().backward()
    for a, b in zip([p.grad for p in bare.parameters()], grads(model)):
        assert torch.equal(a, b)


def test_chunks_must_divide_the_output():
    with pytest.raises(BadInputError, match="do not split into 5 equal chunks"):
        kasmina.KasminaLayer(nn.Linear(4, 12), kasmina.wrap.__globals__["_host_interface"](nn.Linear(4, 12))[0], 5)
    with pytest.raises(BadInputError, match="seeds_per_layer 5 does not divide"):
        kasmina.wrap(mlp(), {"seeds_per_layer": 5})


# --- grafting before learning: function-preserving ---------------------------------------------

@pytest.mark.parametrize("make,shape,blueprint", [
    (mlp, (10, 12), "mlp_gelu_w8"), (mlp, (10, 12), "low_rank_r4"),
    (convnet, (2, 3, 9, 9), "conv3x3_relu_w16")])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_graft_at_any_alpha_before_learning_changes_no_output(make, shape, blueprint, alpha):
    x = torch.randn(*shape)
    bare = make()
    model, _, source = wrapped(make(), targets=["linear", "conv2d"])
    for layer in kasmina.layers(model):
        kernel = source.add(LIBRARY[blueprint], layer.seed_interface)
        for seed in (0, 2):
            layer.transition(seed, S.GERMINATED, kernel_artifact_id=kernel)
            layer.transition(seed, S.LOADING)
            layer.transition(seed, S.GRAFTING)  # LOADING -> GRAFTING: no isolated learning
        layer.state.alpha.fill_(alpha)
    model.eval()
    assert torch.equal(bare(x), model(x))


# --- TRAINING: isolated --------------------------------------------------------------------------

@pytest.mark.parametrize("objective", ["reconstruction", "gradient_match"])
def test_training_seed_never_touches_host_forward_or_gradients(objective):
    x = torch.randn(16, 12)
    plain, _, _ = wrapped(mlp())
    seeded, _, source = wrapped(mlp(), training={"objective": objective})
    layer = kasmina.layers(seeded)[0]
    graft(layer, source, [1, 3], to=S.TRAINING)
    for _ in range(2):  # the second step runs with seed weights that have already moved
        for model in (plain, seeded):
            for p in model.parameters():
                p.grad = None
        out_plain, out_seeded = plain(x), seeded(x)
        assert torch.equal(out_plain, out_seeded)
        out_plain.square().mean().backward()
        out_seeded.square().mean().backward()
        for a, b in zip(grads(plain), grads(seeded)):
            assert torch.equal(a, b)
        seed_grads = [p.grad for p in layer.seed_parameters()]
        assert all(g is not None for g in seed_grads) and any(g.abs().sum() > 0 for g in seed_grads)
        with torch.no_grad():
            for p in layer.seed_parameters():
                p -= 0.1 * p.grad
    assert torch.isfinite(layer.state.seed_loss[[1, 3]]).all()
    assert torch.isnan(layer.state.seed_loss[[0, 2]]).all()


def test_reconstruction_training_reduces_the_seed_loss_and_signals_readiness():
    torch.manual_seed(1)
    model, _, source = wrapped(mlp(), training={"min_steps": 5, "ready_loss_ratio": 0.9})
    layer = kasmina.layers(model)[0]
    graft(layer, source, [0], blueprint="mlp_relu_w16", to=S.TRAINING)
    optimizer = torch.optim.Adam(layer.seed_parameters(), lr=1e-2)
    x = torch.randn(64, 12)
    for _ in range(30):
        optimizer.zero_grad()
        model(x).sum().backward()
        optimizer.step()
    ema, energy = layer.state.seed_loss[0].tolist()
    assert ema < 0.9 * energy
    assert layer.health_signal().is_ready_for_transition[0]


# --- optimizer-facing parameters ----------------------------------------------------------------

@pytest.mark.parametrize("train_fossils", [False, True])
@pytest.mark.parametrize("stage", [S.TRAINING, S.GRAFTING, S.STABILIZATION, S.EVALUATING,
                                   S.FINE_TUNING, S.FOSSILIZED])
def test_seed_parameters_per_stage(stage, train_fossils):
    model, _, source = wrapped(mlp(), train_fossils=train_fossils)
    layer = kasmina.layers(model)[0]
    graft(layer, source, [2], to=stage)
    params = next(iter(layer.banks.values())).parameters()
    params = list(params)
    trainable = stage in (S.TRAINING, S.GRAFTING, S.FINE_TUNING) or (stage is S.FOSSILIZED and train_fossils)
    assert {id(p) for p in layer.seed_parameters()} == ({id(p) for p in params} if trainable else set())
    assert {id(p) for p in layer.seed_parameters(stage)} == {id(p) for p in params}
    assert all(p.requires_grad == trainable for p in params)
    assert {id(p) for p in kasmina.seed_parameters(model)} == {id(p) for p in layer.seed_parameters()}
    host = {id(p) for p in kasmina.host_parameters(model)}
    assert host == {id(p) for p in mlp().parameters()} or len(host) == 4
    assert not host & {id(p) for p in params}


def test_stabilization_freezes_then_signals_ready_after_its_steps():
    model, _, source = wrapped(mlp(), stabilization_steps=3)
    layer = kasmina.layers(model)[0]
    graft(layer, source, [0], to=S.STABILIZATION)
    x = torch.randn(4, 12)
    for step in range(3):
        assert not layer.health_signal().is_ready_for_transition[0]
        model(x).sum().backward()
    assert layer.health_signal().is_ready_for_transition[0]
    assert all(p.grad is None for p in layer.seed_parameters(S.STABILIZATION))


# --- culling -------------------------------------------------------------------------------------

def test_culling_restores_the_parameter_count_and_the_identity():
    x = torch.randn(8, 12)
    bare = mlp()
    model, _, source = wrapped(mlp())
    count = sum(p.numel() for p in model.parameters())
    layer = kasmina.layers(model)[0]
    graft(layer, source, [0, 1, 3], to=S.FINE_TUNING)
    layer.state.alpha.fill_(1.0)
    with torch.no_grad():
        for p in layer.seed_parameters():
            p.normal_()
    assert sum(p.numel() for p in model.parameters()) > count
    assert not torch.equal(model(x), bare(x))
    kasmina.dispatch(model, [command(0, s, KasminaCommandType.CULL) for s in (0, 1, 3)])
    report = layer.on_epoch_end()
    assert [t.to_stage for t in report.transitions] == [S.CULLED] * 3
    assert sum(p.numel() for p in model.parameters()) == count
    assert len(layer.banks) == 0
    assert torch.equal(model(x), bare(x))
    assert layer.state.embargo[[0, 1, 3]].tolist() == [5, 5, 5]


# --- batched execution ---------------------------------------------------------------------------


@pytest.mark.parametrize("blueprint,interface,shape", [
    ("low_rank_r4", "linear:12:3", (7, 12)),
    ("mlp_gelu_w32_dropout", "linear:12:3", (2, 5, 12)),   # dropout: the RNG draws
    ("bottleneck_bn_relu_w8", "conv2d:4:2", (3, 4, 5, 5)),  # batch norm: buffers updated in place
])
@pytest.mark.parametrize("seeds", [1, 3])
@pytest.mark.parametrize("direct", [True, False])
def test_bank_runs_what_functional_call_under_vmap_runs_bit_for_bit(blueprint, interface, shape, seeds,
                                                                     direct, monkeypatch):
    """SeedBank swaps the seeds' tensors into the template itself rather than through
    functional_call, and batches them with functorch's calls rather than torch.func.vmap (or
    with torch.func.vmap where a torch lacks those calls: `direct` False): the same output,
    gradients, buffers and RNG draws, bit for bit, and the template's own tensors back in place."""
    from torch.func import functional_call, vmap

    from esper.blueprints import build
    from esper.contracts import KernelInterface
    from kasmina import seeds as seeds_module
    from kasmina.seeds import SeedBank

    if direct and not seeds_module._DIRECT_VMAP:
        pytest.skip("this torch has no functorch calls to batch with directly")
    monkeypatch.setattr(seeds_module, "_DIRECT_VMAP", direct)

    template = build(LIBRARY[blueprint], KernelInterface.parse(interface), seed=0)
    own = {n: t for n, t in [*template.named_parameters(), *template.named_buffers()]}
    results = []
    for batched in (True, False):
        bank = SeedBank.fresh(template, "k", S.GRAFTING, list(range(seeds)), torch.float32,
                              torch.device("cpu"), trainable=True)
        with torch.no_grad():
            for i, p in enumerate(bank.parameters()):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(9)).requires_grad_()
        torch.manual_seed(3)
        if batched:
            g = bank(x)
        else:
            state = bank.seed_state()
            params = {n: state[n] for n in bank._param_names}
            buffers = {n: state[n] for n in bank._buffer_names}
            g = vmap(lambda p, b, x: functional_call(template, {**p, **b}, (x,)), in_dims=(0, 0, None),
                     randomness="different")(params, buffers, x)
        weights = torch.randn(g.shape, generator=torch.Generator().manual_seed(4))
        grads = torch.autograd.grad((g * weights).sum(), [x, *bank.parameters()])
        results.append([g.detach(), *grads, *(b.clone() for b in bank.buffers()), torch.get_rng_state()])
    for got, want in zip(*results, strict=True):
        assert got.dtype == want.dtype and got.stride() == want.stride()
        assert torch.equal(got.flatten().view(torch.uint8), want.flatten().view(torch.uint8))
    assert all(t is own[n] for n, t in [*template.named_parameters(), *template.named_buffers()])


class _TiedTemplate(nn.Module):
    """One Linear under two names: the bank must run it through functional_call, which unties."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(12, 3)
        self.second = self.first

    def forward(self, x):
        return self.first(x) * self.second(x)


def test_a_bank_of_a_template_with_tied_weights_runs_what_vmap_of_functional_call_runs():
    from torch.func import functional_call, vmap

    from kasmina.seeds import SeedBank

    template = _TiedTemplate()
    bank = SeedBank.fresh(template, "k", S.GRAFTING, [0, 2], torch.float32, torch.device("cpu"),
                          trainable=True)
    assert bank._slots is None
    with torch.no_grad():
        for i, p in enumerate(bank.parameters()):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(9))
    got = bank(x)
    state = bank.seed_state()
    want = vmap(lambda p, x: functional_call(template, p, (x,)), in_dims=(0, None))(state, x)
    assert same_bits(got, want)
    got_grads = torch.autograd.grad(got.sum(), list(bank.parameters()))
    want_grads = torch.autograd.grad(want.sum(), list(bank.parameters()))
    assert all(same_bits(a, b) for a, b in zip(got_grads, want_grads, strict=True))


@pytest.mark.parametrize("blueprint,shape", [("mlp_gelu_w8", (7, 12)), ("swiglu_w32", (2, 5, 12)),
                                             ("low_rank_r2", (3, 12))])
def test_batched_family_equals_the_seed_by_seed_loop(blueprint, shape):
    model, _, source = wrapped(mlp(), seeds_per_layer=8)
    layer = kasmina.layers(model)[0]
    graft(layer, source, [0, 2, 3, 5, 7], blueprint=blueprint, to=S.GRAFTING)
    (bank,) = layer.banks.values()
    with torch.no_grad():
        for p in bank.parameters():
            p.normal_()
    x = torch.randn(*shape)
    batched = bank(x)
    looped = torch.stack([bank.forward_one(i, x) for i in range(bank.size)])
    torch.testing.assert_close(batched, looped, atol=1e-5, rtol=1e-5)
    # and the layer output places each seed's output on its chunk
    layer.state.alpha.fill_(0.5)
    model.eval()  # no alpha ramp step
    out = model[0](x)
    want = layer.host(x).clone()
    for i, chunk in enumerate(bank.chunks):
        want[..., chunk * 3:(chunk + 1) * 3] += 0.5 * looped[i]
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


# --- telemetry -----------------------------------------------------------------------------------

@pytest.mark.parametrize("active", [False, True])
def test_telemetry_is_invariant_to_batch_splitting(active):
    torch.manual_seed(3)
    x = torch.randn(64, 12)
    x[:, :3] = 0.0  # some dead units after the ReLU feed the second layer
    signals = []
    for batches in (1, 4):
        model, _, source = wrapped(mlp())
        if active:
            for layer in kasmina.layers(model):
                graft(layer, source, [1], to=S.FINE_TUNING)
                layer.state.alpha.fill_(1.0)
                with torch.no_grad():
                    for p in layer.seed_parameters():
                        p.normal_()
        for part in x.chunk(batches):
            out = model(part)
            # a sum loss: its gradient per element does not depend on the batch size
            out.sum().backward()
        signals.append([layer.health_signal() for layer in kasmina.layers(model)])
    for one, four in zip(*signals):
        for name in ("activation_mean", "activation_variance", "dead_ratio", "gradient_energy"):
            torch.testing.assert_close(torch.tensor(getattr(one, name)), torch.tensor(getattr(four, name)),
                                       atol=1e-6, rtol=1e-5)
    assert any(d > 0 for d in signals[0][1].dead_ratio) or True
    assert all(e > 0 for e in signals[0][0].gradient_energy)


def test_sampled_dormant_telemetry_reads_every_kth_step_on_a_row_sample():
    model, _, _ = wrapped(mlp(), telemetry={"every": 4, "max_rows": 8})
    layer = kasmina.layers(model)[0]
    x = torch.randn(32, 12)
    for _ in range(8):
        model(x).sum().backward()
    # two sampled steps, 8 of 32 rows each, 6 features per chunk
    assert layer.state.health[:, 3].tolist() == [2 * 8 * 6] * 4
    assert layer.state.health[:, SUMSQ].gt(0).all()
    signal = layer.health_signal()
    assert all(e > 0 for e in signal.gradient_energy)
    assert layer.state.health.abs().sum() == 0  # read resets the accumulators


# --- checkpoints ---------------------------------------------------------------------------------

def test_checkpoint_round_trip_is_bit_exact_with_grafted_seeds():
    torch.manual_seed(4)
    x = torch.randn(16, 12)
    model, _, source = wrapped(mlp())
    first, second = kasmina.layers(model)
    graft(first, source, [0, 2], to=S.GRAFTING, strategy=GraftingStrategy.DRIFT_CONTROLLED)
    graft(first, source, [1], blueprint="low_rank_r4", to=S.TRAINING)
    graft(second, source, [3], blueprint="swiglu_w32", to=S.FOSSILIZED)
    optimizer = torch.optim.SGD(kasmina.host_parameters(model) + kasmina.seed_parameters(model), lr=0.05)
    for _ in range(3):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    model(x).sum().backward()  # telemetry probe holds gradient energy not yet folded
    state = {k: v.clone() for k, v in model.state_dict().items()}

    restored, _ = kasmina.wrap(mlp(), {"seeds_per_layer": 4, "telemetry": TELEMETRY_EVERY_STEP},
                               kernel_source=source)
    restored.load_state_dict(state)
    again = restored.state_dict()
    assert state.keys() == again.keys()
    for key, value in state.items():
        assert same_bits(value, again[key]), key
    for a, b in zip(kasmina.layers(model), kasmina.layers(restored)):
        assert a.stages == b.stages and b.rollback_requested is None
        assert a.health_signal() == b.health_signal()
    for m in (model, restored):
        m.zero_grad(set_to_none=True)
        torch.manual_seed(9)
        out = m(x)
        out.square().mean().backward()
    assert torch.equal(model(x), restored(x))
    for a, b in zip(kasmina.seed_parameters(model), kasmina.seed_parameters(restored)):
        assert torch.equal(a.grad, b.grad)


def test_the_loss_ema_takes_the_first_loss_then_moves_a_tenth_and_restarts_after_a_nan():
    """observe_loss, bit for bit: NaN until a loss, then 0.9 * ema + 0.1 * loss in the EMA's
    float32, a NaN loss making it NaN and the next loss starting it again; losses of any dtype,
    scalar or one-element, with or without a graph (the EMA never joins one)."""
    model, _, _ = wrapped(mlp())
    layer = kasmina.layers(model)[0]
    want = torch.full((), float("nan"))
    generator = torch.Generator().manual_seed(2)
    for i in range(40):
        loss = torch.rand((), generator=generator, dtype=torch.float64 if i % 3 else torch.float32) * 5
        loss = torch.tensor(float("nan")) if i == 17 else loss
        loss = (loss.reshape(1) if i % 4 == 0 else loss).requires_grad_(i % 2 == 0)
        layer.observe_loss(loss)
        value = loss.detach().reshape(()).float()
        want = value if torch.isnan(want) else 0.9 * want + 0.1 * value
        assert same_bits(layer.loss_ema, want) and not layer.loss_ema.requires_grad


def test_the_loss_ema_of_performance_linked_grafting_is_in_the_state_dict():
    model, _, source = wrapped(mlp())
    layer = kasmina.layers(model)[0]
    graft(layer, source, [0], to=S.GRAFTING, strategy=GraftingStrategy.PERFORMANCE_LINKED)
    assert torch.isnan(layer.loss_ema)
    for value in (1.0, 3.0):
        kasmina.observe_loss(model, torch.tensor(value))
    assert layer.loss_ema.item() == pytest.approx(0.9 * 1.0 + 0.1 * 3.0)
    state = model.state_dict()
    restored, _ = kasmina.wrap(mlp(), {"seeds_per_layer": 4, "telemetry": TELEMETRY_EVERY_STEP},
                               kernel_source=source)
    restored.load_state_dict(state)
    assert same_bits(kasmina.layers(restored)[0].loss_ema, layer.loss_ema)
    older = {k: v for k, v in state.items() if not k.endswith("loss_ema")}  # saved before it was kept
    restored.load_state_dict(older)
    assert torch.isnan(kasmina.layers(restored)[0].loss_ema)


def test_corrupt_state_asks_for_rollback():
    model, _, source = wrapped(mlp())
    layer = kasmina.layers(model)[0]
    graft(layer, source, [0], to=S.GRAFTING)
    layer.state.lifecycle[2] = S.FOSSILIZED.code  # a stray write to the state tensor
    kasmina.dispatch(model, [command(0, 0, KasminaCommandType.ADVANCE, target_stage=S.STABILIZATION)])
    report = layer.on_epoch_end()
    assert report.rollback_requested and "checksum" in report.rollback_requested
    assert report.transitions == []
    assert kasmina.rollback_requests(model)


# --- errors (HLD K.6) ----------------------------------------------------------------------------

class Exploding(nn.Module):
    """A planted faulty kernel: a real module whose forward raises, as a bad artifact would."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(12, width)

    def forward(self, x):
        raise RuntimeError("illegal memory access (planted)")


class PlantedSource(kasmina.BlueprintKernelSource):
    def load(self, kernel_artifact_id, device):
        if kernel_artifact_id.startswith("0000000000ff"):
            return Exploding(3).to(device)
        return super().load(kernel_artifact_id, device)


def test_a_failing_blueprint_is_isolated_and_the_forward_completes():
    x = torch.randn(6, 12)
    bare = mlp()
    source = PlantedSource()
    model, _ = kasmina.wrap(mlp(), {"seeds_per_layer": 4}, kernel_source=source)
    layer = kasmina.layers(model)[0]
    good = graft(layer, source, [1], blueprint="mlp_gelu_w8", to=S.GRAFTING)
    bad = "0000000000ff-cpu-fast-000000"
    layer.transition(2, S.GERMINATED, kernel_artifact_id=bad)
    layer.transition(2, S.LOADING)
    layer.transition(2, S.GRAFTING)
    layer.state.alpha.fill_(1.0)
    out = model(x)  # completes
    assert torch.equal(out, bare(x))  # the good seed is still zero-initialised
    (incident,) = layer.incidents
    assert incident.seed_index == 2 and incident.kernel_artifact_id == bad
    assert "planted" in incident.error and incident.stage is S.GRAFTING
    assert bad not in layer.cache and good in layer.cache
    report = layer.on_epoch_end()
    assert [(t.seed_id, t.to_stage) for t in report.transitions] == [("0:2", S.CULLED)]
    assert report.incidents == [incident]
    assert layer.stages[1] is S.GRAFTING


def test_a_kernel_that_fails_to_load_culls_its_seed():
    model, _, _source = wrapped(mlp())
    layer = kasmina.layers(model)[0]
    missing = "00000000abcd-cpu-fast-000000"
    kasmina.dispatch(model, [command(0, 0, KasminaCommandType.REQUEST_GERMINATION,
                                     kernel_artifact_id=missing)])
    layer.on_epoch_end()
    kasmina.dispatch(model, [command(0, 0, KasminaCommandType.ADVANCE, target_stage=S.LOADING)])
    layer.on_epoch_end()
    layer.wait_for_loads()
    report = layer.on_epoch_end()
    assert [(t.from_stage, t.to_stage) for t in report.transitions] == [(S.LOADING, S.CULLED)]
    assert "no kernel" in report.incidents[0].error
    assert layer.state.embargo[0] == 5


class GatedSource(kasmina.BlueprintKernelSource):
    """Loads that wait for `release`, then fail: a load in flight, then a failed one."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def load(self, kernel_artifact_id, device):
        self.release.wait(timeout=30)
        raise RuntimeError("signature does not verify (planted)")


def test_a_germinated_seed_whose_load_failed_is_culled_not_left_unready():
    """A load that is still running leaves its seed GERMINATED and not ready; once it has
    failed, the next boundary culls the seed through LOADING with the error, as a failure in
    LOADING would, unless the controller moved the seed at that boundary."""
    source = GatedSource()
    model, _ = kasmina.wrap(mlp(), {"seeds_per_layer": 4}, kernel_source=source)
    layer = kasmina.layers(model)[0]
    kernel = "00000000abcd-cpu-fast-000000"
    for seed in (0, 1):
        kasmina.dispatch(model, [command(0, seed, KasminaCommandType.REQUEST_GERMINATION,
                                         kernel_artifact_id=kernel)])
    layer.on_epoch_end()
    report = layer.on_epoch_end()  # still loading: nothing happens
    assert report.transitions == [] and layer.stages[:2] == [S.GERMINATED] * 2
    assert layer.health_signal().is_ready_for_transition[:2] == [False, False]
    source.release.set()
    layer.wait_for_loads()
    kasmina.dispatch(model, [command(0, 1, KasminaCommandType.CANCEL_GERMINATION)])
    report = layer.on_epoch_end()
    assert [(t.seed_id, t.from_stage, t.to_stage) for t in report.transitions] == [
        ("0:1", S.GERMINATED, S.CANCELLED),  # the controller's command comes first
        ("0:0", S.GERMINATED, S.LOADING), ("0:0", S.LOADING, S.CULLED)]
    assert "signature does not verify" in report.transitions[-1].reason
    (incident,) = report.incidents
    assert incident.seed_index == 0 and incident.stage is S.LOADING
    assert "planted" in incident.error
    assert layer.stages[:2] == [S.CULLED, S.CANCELLED] and layer.state.embargo[0] == 5


# --- evaluation: with and without ----------------------------------------------------------------

def test_disabled_seeds_compute_the_model_without_them():
    x = torch.randn(5, 12)
    model, _, source = wrapped(mlp())
    layer = kasmina.layers(model)[0]
    graft(layer, source, [0, 3], to=S.EVALUATING)
    layer.state.alpha.fill_(1.0)
    with torch.no_grad():
        for p in layer.seed_parameters(S.EVALUATING):
            p.normal_()
    model.eval()
    with_seeds = model(x)
    with kasmina.seeds_disabled(model, ["0:0", "0:3"]):
        without = model(x)
    with layer.disabled([3]):
        only_zero = model(x)
    assert torch.equal(without, copy.deepcopy(mlp())(x))
    assert not torch.equal(with_seeds, without)
    assert torch.equal(only_zero[:, 18:], without[:, 18:]) and not torch.equal(only_zero, without)
    assert torch.equal(model(x), with_seeds)

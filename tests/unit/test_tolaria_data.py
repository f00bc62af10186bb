"""Built-in data sets need no download and follow the seed; user data by import path; loaders
give the same batches on every run, and a resumed run the batches an uninterrupted one sees."""

from __future__ import annotations

import random
import socket
import textwrap

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from esper.errors import BadInputError
from esper.tolaria.data import (
    BUILTIN,
    DataBundle,
    EpochShuffle,
    build_data,
    make_loaders,
)


def tensors(dataset: TensorDataset) -> tuple[torch.Tensor, torch.Tensor]:
    return dataset.tensors[0], dataset.tensors[1]


def same(a: DataBundle, b: DataBundle) -> bool:
    return all(torch.equal(x, y) for x, y in zip(tensors(a.train) + tensors(a.val),
                                                 tensors(b.train) + tensors(b.val)))


@pytest.fixture(scope="module")
def mnist1d_default() -> DataBundle:
    """MNIST-1D with the package's default arguments (5000 samples), made once: ~2 s."""
    return build_data("mnist1d", seed=42)


# Small versions of each built-in, for the determinism tests.
SMALL = {
    "mnist1d": {"num_samples": 200},
    "digits": {"n_class": 4},
    "two_spirals": {"n_samples": 300},
    "teacher_student": {"n_samples": 300, "teacher_width": 32},
}


def test_every_builtin_has_a_small_case():
    assert set(SMALL) | {"npz"} == set(BUILTIN)  # npz reads a file: test_npz_* below


def test_npz_classification_with_its_own_split_and_regression_split_by_seed(tmp_path):
    x, y = np.random.default_rng(0).normal(size=(30, 2, 5)), np.arange(30) % 3
    np.savez(tmp_path / "c.npz", x=x, y=y, x_val=x[:6], y_val=y[:6])
    data = build_data({"name": "npz", "kwargs": {"path": str(tmp_path / "c.npz")}}, seed=0)
    assert (data.task, data.out_dim, data.input_shape) == ("classification", 3, (2, 5))
    assert torch.equal(tensors(data.train)[0], torch.from_numpy(x).float())
    assert torch.equal(tensors(data.val)[1], torch.from_numpy(y[:6]))
    np.savez(tmp_path / "r.npz", x=x.reshape(30, 10), y=x[:, 0, :2])
    spec = {"name": "npz", "kwargs": {"path": str(tmp_path / "r.npz")}, "val_fraction": 0.2}
    a, b, c = (build_data(spec, seed=s) for s in (1, 1, 2))
    assert (a.task, a.out_dim, len(a.val)) == ("regression", 2, 6)
    assert same(a, b) and not same(a, c)


def test_npz_refuses_a_pickle_and_missing_arrays(tmp_path):
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object))
    np.savez(tmp_path / "objects.npz", x=np.array([{"a": 1}], dtype=object), y=np.zeros(1))
    with pytest.raises(BadInputError, match="cannot read .*objects.npz"):
        build_data({"name": "npz", "kwargs": {"path": str(tmp_path / "objects.npz")}}, seed=0)
    np.savez(tmp_path / "no_y.npz", x=np.zeros((4, 2)), x_val=np.zeros((2, 2)))
    with pytest.raises(BadInputError, match=r"needs arrays x and y .* has \['x', 'x_val'\]"):
        build_data({"name": "npz", "kwargs": {"path": str(tmp_path / "no_y.npz")}}, seed=0)
    with pytest.raises(BadInputError, match="cannot read"):
        build_data({"name": "npz", "kwargs": {"path": str(tmp_path / "absent.npz")}}, seed=0)


def test_mnist1d_defaults(mnist1d_default):
    data = mnist1d_default
    x, y = tensors(data.train)
    x_val, y_val = tensors(data.val)
    assert (x.shape, x_val.shape) == ((4000, 40), (1000, 40))  # the package's 80/20 split
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert (data.input_shape, data.out_dim, data.task, data.num_classes) == ((40,), 10, "classification", 10)
    assert set(y.tolist()) == set(range(10)) and set(y_val.tolist()) == set(range(10))


def test_mnist1d_is_the_packages_make_dataset(mnist1d_default):
    """Seed 42 and the default arguments give exactly the package's own data set."""
    from mnist1d.data import get_dataset_args, make_dataset

    made = make_dataset(get_dataset_args())
    x, y = tensors(mnist1d_default.train)
    assert torch.equal(x, torch.from_numpy(made["x"]).float())
    assert torch.equal(y, torch.from_numpy(made["y"]))
    assert torch.equal(tensors(mnist1d_default.val)[0], torch.from_numpy(made["x_test"]).float())


def test_mnist1d_touches_no_network_and_leaves_global_rngs_alone(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    np.random.seed(123)
    random.seed(123)
    before = (np.random.get_state()[1].copy(), random.getstate())
    data = build_data({"name": "mnist1d", "kwargs": {"num_samples": 100, "final_seq_length": 24},
                       "val_fraction": 0.3}, seed=1)
    assert np.array_equal(np.random.get_state()[1], before[0]) and random.getstate() == before[1]
    assert (len(data.train), len(data.val), data.input_shape) == (70, 30, (24,))


def test_digits():
    data = build_data("digits", seed=0)
    x = tensors(data.train)[0]
    assert len(data.train) + len(data.val) == 1797
    assert len(data.val) == round(1797 * 0.2)
    assert x.shape[1:] == (1, 8, 8) and x.dtype == torch.float32
    assert 0 <= x.min() and x.max() <= 1
    assert (data.input_shape, data.out_dim, data.task) == ((1, 8, 8), 10, "classification")


def test_two_spirals():
    data = build_data({"name": "two_spirals", "kwargs": {"n_samples": 1000}, "val_fraction": 0.1}, seed=0)
    x, y = tensors(data.train)
    assert (len(data.train), len(data.val)) == (900, 100)
    assert x.shape == (900, 2) and y.dtype == torch.int64
    assert (data.input_shape, data.out_dim, data.task) == ((2,), 2, "classification")
    everything = torch.cat([y, tensors(data.val)[1]])
    assert everything.bincount().tolist() == [500, 500]
    assert x.abs().max() < 1.2


def test_teacher_student():
    data = build_data({"name": "teacher_student", "kwargs": {"n_samples": 2000, "in_dim": 8,
                                                             "out_dim": 3}}, seed=0)
    x, y = tensors(data.train)
    assert x.shape == (1600, 8) and y.shape == (1600, 3) and y.dtype == torch.float32
    assert (data.input_shape, data.out_dim, data.task, data.num_classes) == ((8,), 3, "regression", None)
    all_y = torch.cat([y, tensors(data.val)[1]])
    assert torch.allclose(all_y.mean(0), torch.zeros(3), atol=1e-5)
    assert torch.allclose(all_y.std(0), torch.ones(3), atol=1e-5)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_same_seed_same_data_other_seed_other_data(name):
    spec = {"name": name, "kwargs": SMALL[name]}
    first, again, other = build_data(spec, seed=3), build_data(spec, seed=3), build_data(spec, seed=4)
    assert same(first, again)
    assert not same(first, other)


def test_data_seed_overrides_the_run_seed():
    spec = {"name": "two_spirals", "kwargs": {"n_samples": 100}, "seed": 9}
    assert same(build_data(spec, seed=0), build_data(spec, seed=1))
    assert same(build_data(spec, seed=0), build_data({**spec, "seed": None}, seed=9))


@pytest.mark.parametrize(("spec", "message"), [
    ("cifar10", "field 'data.name': unknown data set 'cifar10'"),
    ({"name": "two_spirals", "kwargs": {"samples": 10}}, "field 'data.kwargs.samples': unknown argument"),
    ({"name": "digits", "kwargs": {"n_class": 11}}, "field 'data.kwargs.n_class'"),
    ({"name": "mnist1d", "kwargs": {"padding": [1]}}, "field 'data.kwargs.padding'"),
    ({"name": "two_spirals", "val_fraction": 0}, "field 'data.val_fraction'"),
])
def test_bad_data_specs(spec, message):
    with pytest.raises(BadInputError) as info:
        build_data(spec, seed=0)
    assert message in str(info.value)


def test_too_few_samples_for_a_split():
    with pytest.raises(BadInputError, match="leave no train or no validation set"):
        build_data({"name": "two_spirals", "kwargs": {"n_samples": 4}, "val_fraction": 0.05}, seed=0)


# --- user data by import path ---------------------------------------------------------------

@pytest.fixture
def user_data(tmp_path, monkeypatch):
    (tmp_path / "my_data.py").write_text(textwrap.dedent("""
        import numpy as np
        import torch
        from torch.utils.data import Dataset
        from esper.tolaria.data import DataBundle

        def tensor_pairs(seed, n=60):
            g = torch.Generator().manual_seed(seed)
            x = torch.randn(n, 3, 4, generator=g)
            y = torch.randint(0, 5, (n,), generator=g)
            return (x[:50], y[:50]), (x[50:], y[50:])

        def numpy_regression(val_fraction):
            rng = np.random.default_rng(0)
            x, y = rng.normal(size=(40, 6)), rng.normal(size=40)
            k = int(40 * (1 - val_fraction))
            return (x[:k], y[:k]), (x[k:], y[k:])

        class Squares(Dataset):
            def __init__(self, n):
                self.n = n
            def __len__(self):
                return self.n
            def __getitem__(self, i):
                return torch.full((2,), float(i)), i % 3

        def datasets():
            return Squares(12), Squares(6)

        def bundle(seed):
            from torch.utils.data import TensorDataset
            t = TensorDataset(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))
            return DataBundle(t, t, (2,), 7, "classification", "mine")

        def not_data():
            return 42
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_data"


def test_user_tensor_pairs(user_data):
    data = build_data({"name": f"{user_data}:tensor_pairs", "kwargs": {"n": 60}}, seed=5)
    assert (len(data.train), len(data.val)) == (50, 10)
    assert data.input_shape == (3, 4) and data.task == "classification"
    assert data.out_dim == 1 + max(int(tensors(data.train)[1].max()), int(tensors(data.val)[1].max()))
    assert same(data, build_data({"name": f"{user_data}:tensor_pairs"}, seed=5))  # seed passed in
    assert not same(data, build_data({"name": f"{user_data}:tensor_pairs"}, seed=6))


def test_user_numpy_regression(user_data):
    data = build_data({"name": f"{user_data}:numpy_regression", "val_fraction": 0.25}, seed=0)
    x, y = tensors(data.train)
    assert x.dtype == torch.float32 and y.shape == (30, 1)  # targets as (n, 1), like the model's output
    assert (data.input_shape, data.out_dim, data.task) == ((6,), 1, "regression")


def test_user_datasets_and_bundles(user_data):
    data = build_data(f"{user_data}:datasets", seed=0)
    assert isinstance(data.train, Dataset) and (len(data.train), len(data.val)) == (12, 6)
    assert (data.input_shape, data.out_dim, data.task) == ((2,), 3, "classification")
    bundle = build_data(f"{user_data}:bundle", seed=0)
    assert (bundle.name, bundle.out_dim) == ("mine", 7)


def test_user_data_errors(user_data):
    with pytest.raises(BadInputError, match="field 'data.name': 'my_data:not_data' returned a int"):
        build_data(f"{user_data}:not_data", seed=0)
    with pytest.raises(BadInputError, match="field 'data.kwargs.m': unknown argument"):
        build_data({"name": f"{user_data}:tensor_pairs", "kwargs": {"m": 1}}, seed=0)
    with pytest.raises(BadInputError, match="field 'data.name': cannot import 'nowhere'"):
        build_data("nowhere:data", seed=0)


# --- loaders --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def spirals() -> DataBundle:
    return build_data({"name": "two_spirals", "kwargs": {"n_samples": 250}}, seed=0)


def epoch_batches(loader) -> list[torch.Tensor]:
    return [y for _, y in loader]


def test_loaders_are_deterministic(spirals):
    train, val = make_loaders(spirals, 32, seed=7)
    again, _ = make_loaders(spirals, 32, seed=7)
    other, _ = make_loaders(spirals, 32, seed=8)
    assert train.num_workers == 0 and val.num_workers == 0
    first = [torch.cat(epoch_batches(train)) for _ in range(3)]
    assert all(torch.equal(a, torch.cat(epoch_batches(again))) for a in first)
    assert not torch.equal(first[0], first[1])  # a new order every epoch
    assert not torch.equal(first[0], torch.cat(epoch_batches(other)))
    assert [len(b) for b in epoch_batches(train)] == [32] * 6 + [8]  # 200 training samples


def test_every_epoch_covers_the_training_set_once(spirals):
    train, _ = make_loaders(spirals, 64, seed=0)
    seen = torch.cat([batch for batch, _ in train])
    x = tensors(spirals.train)[0]
    assert torch.equal(seen[seen[:, 0].argsort()], x[x[:, 0].argsort()])


def test_set_epoch_reproduces_an_epoch_for_a_resumed_run(spirals):
    train, _ = make_loaders(spirals, 32, seed=7)
    uninterrupted = [torch.cat(epoch_batches(train)) for _ in range(4)]
    resumed, _ = make_loaders(spirals, 32, seed=7)
    resumed.sampler.set_epoch(2)
    assert isinstance(resumed.sampler, EpochShuffle)
    assert torch.equal(torch.cat(epoch_batches(resumed)), uninterrupted[2])
    assert torch.equal(torch.cat(epoch_batches(resumed)), uninterrupted[3])


def test_validation_loader_is_in_order(spirals):
    _, val = make_loaders(spirals, 32, seed=7, eval_batch_size=100)
    batches = epoch_batches(val)
    assert [len(b) for b in batches] == [50]
    assert torch.equal(torch.cat(batches), tensors(spirals.val)[1])


def test_classes_keep_only_those_samples_in_both_sets():
    whole = build_data("digits", seed=0)
    part = build_data({"name": "digits", "classes": [5, 6, 7, 8, 9]}, seed=0)
    for which in ("train", "val"):
        x, y = tensors(getattr(whole, which))
        px, py = tensors(getattr(part, which))
        keep = y >= 5
        assert torch.equal(px, x[keep]) and torch.equal(py, y[keep])
    assert part.out_dim == 10 and part.input_shape == whole.input_shape


@pytest.mark.parametrize(("spec", "message"), [
    ({"name": "digits", "classes": [3, 10, 12]}, "field 'data.classes': 'digits' has classes 0-9; no class 10, 12"),
    ({"name": "teacher_student", "classes": [0]}, "field 'data.classes': 'teacher_student' is a regression"),
    ({"name": "digits", "classes": []}, "field 'data.classes'"),
])
def test_bad_classes(spec, message):
    with pytest.raises(BadInputError) as info:
        build_data(spec, seed=0)
    assert message in str(info.value)

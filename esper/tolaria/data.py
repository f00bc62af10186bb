"""Built-in data sets that need no download, user data by import path, and deterministic loaders.

    data = build_data(config.data, seed=config.seed)          # DataBundle: train, val, metadata
    train_loader, val_loader = make_loaders(data, config.data.batch_size, seed=config.seed)

Every built-in is generated, or shipped inside an installed package, from the seed alone: the
same seed gives the same tensors, on any machine.

- `mnist1d`: MNIST-1D (Greydanus 2020), made by the `mnist1d` package's `make_dataset` (never
  its downloading `get_dataset`); 10 classes of length-40 signals, 5000 samples by default. Its
  own generator seeds numpy's global RNG; the global state is put back afterwards. The paper's
  fixed data set is `data.seed: 42`.
- `digits`: scikit-learn's 8x8 handwritten digits (1797 images, shipped in the package), scaled to
  [0, 1], shape (1, 8, 8).
- `two_spirals`: two interleaved spirals in the plane, 2 classes.
- `teacher_student`: regression onto a random wide one-hidden-layer ReLU teacher (GradMax-style):
  Gaussian inputs, targets standardised per output.
- `npz`: arrays from a NumPy `.npz` file (`x`, `y`, optionally `x_val`, `y_val`).
- `package.module:Attr`: a callable taking its `kwargs` (and `seed`, `val_fraction` when its
  signature names them) and returning a DataBundle, or `(train, val)`, each a Dataset of
  (input, target) pairs or an `(inputs, targets)` pair of tensors or arrays. Integer targets
  make a classification task, floating ones a regression.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import random
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import Field, ValidationError
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, TensorDataset

from esper.errors import BadInputError
from esper.tolaria.config import (
    DataConfig,
    check_component,
    describe_problems,
    resolve_component,
    validation_problems,
)

Task = Literal["classification", "regression"]
PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]


@dataclass(frozen=True)
class DataBundle:
    """The train and validation sets and what a model needs to know about them."""

    train: Dataset
    val: Dataset
    input_shape: tuple[int, ...]
    out_dim: int  # classes (classification) or target width (regression)
    task: Task
    name: str = ""

    @property
    def num_classes(self) -> int | None:
        return self.out_dim if self.task == "classification" else None


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _split(x: torch.Tensor, y: torch.Tensor, val_fraction: float, seed: int, name: str,
           input_shape: tuple[int, ...], out_dim: int, task: Task) -> DataBundle:
    """A seeded random split into train and validation."""
    n = len(x)
    n_val = round(n * val_fraction)
    if not 0 < n_val < n:
        raise BadInputError(f"data {name!r}: {n} samples leave no train or no validation set at "
                            f"val_fraction {val_fraction}")
    order = torch.randperm(n, generator=_generator(seed))
    val, train = order[:n_val], order[n_val:]
    return DataBundle(TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val]),
                      input_shape, out_dim, task, name)


@contextmanager
def _global_rng_restored() -> Iterator[None]:
    """Put numpy's and Python's global RNG state back (mnist1d seeds and draws from both)."""
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


def mnist1d(*, seed: int, val_fraction: float,
            num_samples: Annotated[int, Field(ge=20)] | None = None,
            final_seq_length: PositiveInt | None = None,
            template_len: PositiveInt | None = None,
            padding: Annotated[list[NonNegInt], Field(min_length=2, max_length=2)] | None = None,
            scale_coeff: NonNegFloat | None = None,
            max_translation: NonNegInt | None = None,
            corr_noise_scale: NonNegFloat | None = None,
            iid_noise_scale: NonNegFloat | None = None,
            shear_scale: NonNegFloat | None = None,
            shuffle_seq: bool | None = None) -> DataBundle:
    """MNIST-1D from `mnist1d.data.make_dataset`; an argument left unset keeps the package's
    default (`get_dataset_args`). Train and validation are the package's own split, with
    `train_split = 1 - val_fraction`."""
    from mnist1d.data import get_dataset_args, make_dataset  # imports matplotlib: 2 s
    from mnist1d.utils import ObjectView

    given = {"num_samples": num_samples, "final_seq_length": final_seq_length,
             "template_len": template_len, "padding": padding, "scale_coeff": scale_coeff,
             "max_translation": max_translation, "corr_noise_scale": corr_noise_scale,
             "iid_noise_scale": iid_noise_scale, "shear_scale": shear_scale,
             "shuffle_seq": shuffle_seq}
    args = get_dataset_args(as_dict=True)
    args.update({k: v for k, v in given.items() if v is not None})
    args.update(seed=seed, train_split=1 - val_fraction)
    with _global_rng_restored():
        made = make_dataset(ObjectView(args))
    x, x_val = (torch.from_numpy(made[k]).to(torch.float32) for k in ("x", "x_test"))
    y, y_val = (torch.from_numpy(made[k]).to(torch.int64) for k in ("y", "y_test"))
    if not len(x) or not len(x_val):
        raise BadInputError(f"data 'mnist1d': {args['num_samples']} samples leave no train or no "
                            f"validation set at val_fraction {val_fraction}")
    return DataBundle(TensorDataset(x, y), TensorDataset(x_val, y_val), (x.shape[1],), 10,
                      "classification", "mnist1d")


def digits(*, seed: int, val_fraction: float, n_class: Annotated[int, Field(ge=2, le=10)] = 10) -> DataBundle:
    """scikit-learn's `load_digits` (no download: the images ship with the package)."""
    from sklearn.datasets import load_digits

    loaded = load_digits(n_class=n_class)
    x = torch.from_numpy(loaded.images).to(torch.float32).div_(16.0).unsqueeze(1)  # (n, 1, 8, 8)
    y = torch.from_numpy(loaded.target).to(torch.int64)
    return _split(x, y, val_fraction, seed, "digits", (1, 8, 8), n_class, "classification")


def two_spirals(*, seed: int, val_fraction: float, n_samples: Annotated[int, Field(ge=4)] = 2000,
                turns: PositiveFloat = 2.0, noise: NonNegFloat = 0.02) -> DataBundle:
    """Two interleaved spirals of `turns` turns in [-1, 1]^2, one per class, with Gaussian noise
    of standard deviation `noise`. Points are uniform along the arc's area (radius ~ sqrt(u))."""
    g = _generator(seed)
    angle = torch.rand(n_samples, generator=g).sqrt() * turns * 2 * torch.pi
    radius = angle / (turns * 2 * torch.pi)
    y = torch.arange(n_samples) % 2
    sign = 1.0 - 2.0 * y  # class 1 is class 0's spiral turned by half a turn
    x = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1) * sign[:, None]
    x = x + noise * torch.randn(n_samples, 2, generator=g)
    return _split(x, y.to(torch.int64), val_fraction, seed, "two_spirals", (2,), 2,
                  "classification")


def teacher_student(*, seed: int, val_fraction: float, n_samples: Annotated[int, Field(ge=4)] = 4096,
                    in_dim: PositiveInt = 16, out_dim: PositiveInt = 4,
                    teacher_width: PositiveInt = 256, noise: NonNegFloat = 0.0) -> DataBundle:
    """Targets from a random teacher `relu(x W1 + b1) W2` of width `teacher_width`, with x ~
    N(0, I): a wide teacher that a narrow student cannot match until it grows (cf. GradMax,
    Evci et al. 2022). Targets are standardised per output, then get Gaussian `noise`."""
    g = _generator(seed)
    w1 = torch.randn(in_dim, teacher_width, generator=g) / in_dim ** 0.5
    b1 = torch.randn(teacher_width, generator=g) * 0.5
    w2 = torch.randn(teacher_width, out_dim, generator=g) / teacher_width ** 0.5
    x = torch.randn(n_samples, in_dim, generator=g)
    y = torch.relu(x @ w1 + b1) @ w2
    y = (y - y.mean(0)) / y.std(0)
    y = y + noise * torch.randn(n_samples, out_dim, generator=g)
    return _split(x, y, val_fraction, seed, "teacher_student", (in_dim,), out_dim, "regression")


def npz(*, seed: int, val_fraction: float, path: str) -> DataBundle:
    """Arrays from a NumPy `.npz` file (never a pickle): `x` and `y`, and `x_val` and `y_val`
    when it has them (else a seeded `val_fraction` split). Integer `y` makes a classification
    task with `max + 1` classes, floating `y` (n, k) a regression onto k targets. Made once on
    one machine, it moves data sets to machines without their generators (the GPU run of the
    growth benchmark trains on a saved MNIST-1D)."""
    try:
        with np.load(Path(path).expanduser(), allow_pickle=False) as f:
            arrays = {k: f[k] for k in ("x", "y", "x_val", "y_val") if k in f}
    except (OSError, ValueError) as e:
        raise BadInputError(f"data 'npz': cannot read {path}: {e}") from None
    if "x" not in arrays or "y" not in arrays or ("x_val" in arrays) != ("y_val" in arrays):
        raise BadInputError(f"data 'npz': {path} needs arrays x and y (and x_val with y_val), "
                            f"has {sorted(arrays)}")
    t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    classification = not t["y"].is_floating_point()
    for k in ("y", "y_val"):
        if k in t:
            t[k] = t[k].to(torch.int64) if classification else t[k].to(torch.float32).reshape(len(t[k]), -1)
    x = t["x"].to(torch.float32)
    task: Task = "classification" if classification else "regression"
    labels = torch.cat([t["y"], t.get("y_val", t["y"][:0])])
    out_dim = int(labels.max()) + 1 if classification else t["y"].shape[1]
    if "x_val" not in t:
        return _split(x, t["y"], val_fraction, seed, "npz", tuple(x.shape[1:]), out_dim, task)
    return DataBundle(TensorDataset(x, t["y"]), TensorDataset(t["x_val"].to(torch.float32), t["y_val"]),
                      tuple(x.shape[1:]), out_dim, task, "npz")


BUILTIN: dict[str, Any] = {
    "mnist1d": mnist1d,
    "digits": digits,
    "two_spirals": two_spirals,
    "teacher_student": teacher_student,
    "npz": npz,
}

# What build_data passes itself: to a built-in always, to an imported callable when it names them.
SUPPLIED = ("seed", "val_fraction")


def resolve_data(name: str) -> Any:
    """The function a built-in name or import path names."""
    return resolve_component(name, BUILTIN, "data set")


def check_data_config(spec: DataConfig) -> list[tuple[tuple[str | int, ...], str]]:
    """Problems with the data section, located under it (('kwargs', 'n_samples'), message)."""
    return check_component(spec.name, spec.kwargs, BUILTIN, SUPPLIED, "data set")


def build_data(spec: DataConfig | Mapping[str, Any] | str, seed: int, *,
               field: str = "data") -> DataBundle:
    """Make the train and validation sets. `seed` is the run's; `spec.seed`, when set, wins.
    `field`: where the section is in the run config, for error messages (`guard.data`)."""
    if not isinstance(spec, DataConfig):
        try:
            spec = DataConfig.model_validate(spec)
        except ValidationError as e:
            problems = [((field, *loc), msg) for loc, msg in validation_problems(e)]
            raise BadInputError(describe_problems(problems)) from None
    problems = check_data_config(spec)
    if problems:
        raise BadInputError(describe_problems([((field, *loc), msg) for loc, msg in problems]))
    fn = resolve_data(spec.name)
    seed = seed if spec.seed is None else spec.seed
    given: dict[str, Any] = {"seed": seed, "val_fraction": spec.val_fraction}
    if spec.name in BUILTIN:
        bundle = fn(**given, **spec.kwargs)
    else:
        try:
            accepted = set(inspect.signature(fn).parameters)
        except (TypeError, ValueError):
            accepted = set()
        result = fn(**{k: v for k, v in given.items() if k in accepted}, **spec.kwargs)
        bundle = _as_bundle(result, spec.name, field)
    return bundle if spec.classes is None else select_classes(bundle, spec.classes, field=field)


def select_classes(bundle: DataBundle, classes: Sequence[int], *, field: str = "data") -> DataBundle:
    """`bundle` with only the samples whose label is in `classes`, in training and validation.
    The output width stays the whole set's: a model trained on one phase of a continual split
    can go on to the next."""
    where = f"field '{field}.classes'"
    if bundle.task != "classification":
        raise BadInputError(f"{where}: {bundle.name!r} is a regression data set; classes select "
                            "samples of a classification set")
    outside = sorted(c for c in set(classes) if c >= bundle.out_dim)
    if outside:
        raise BadInputError(f"{where}: {bundle.name!r} has classes 0-{bundle.out_dim - 1}; "
                            f"no class {', '.join(map(str, outside))}")
    parts = []
    for which, part in (("train", bundle.train), ("val", bundle.val)):
        labels = _labels(part)
        keep = torch.isin(labels, torch.tensor(sorted(set(classes)), dtype=labels.dtype))
        if not bool(keep.any()):
            raise BadInputError(f"{where}: the {which} set of {bundle.name!r} has no sample of "
                                f"classes {sorted(set(classes))}")
        index = keep.nonzero().flatten()
        parts.append(TensorDataset(*(t[index] for t in part.tensors)) if isinstance(part, TensorDataset)
                     else Subset(part, index.tolist()))
    return dataclasses.replace(bundle, train=parts[0], val=parts[1])


def _labels(part: Dataset) -> torch.Tensor:
    """Every label of a data set, as one integer tensor (read without the inputs when the set
    is tensors)."""
    if isinstance(part, TensorDataset):
        return part.tensors[-1].flatten().long()
    return torch.tensor([int(torch.as_tensor(part[i][1])) for i in range(len(part))])


# --- user data ------------------------------------------------------------------------------

def _as_bundle(result: Any, name: str, field: str = "data") -> DataBundle:
    if isinstance(result, DataBundle):
        return result
    if not (isinstance(result, (tuple, list)) and len(result) == 2):
        raise BadInputError(f"field '{field}.name': {name!r} returned a {type(result).__name__}; "
                            "expected a DataBundle or (train, val)")
    train, val = (_as_dataset(part, name, which) for part, which in zip(result, ("train", "val")))
    x, y = train[0]
    y = torch.as_tensor(y)
    input_shape = tuple(torch.as_tensor(x).shape)
    if y.is_floating_point():
        return DataBundle(train, val, input_shape, max(1, y.numel()), "regression", name)
    if y.dim() != 0:
        raise BadInputError(f"data {name!r}: an integer target must be one class index per "
                            f"sample, found shape {tuple(y.shape)}")
    return DataBundle(train, val, input_shape, _num_classes(train, val), "classification", name)


def _as_dataset(part: Any, name: str, which: str) -> Dataset:
    if isinstance(part, (tuple, list)) and len(part) == 2:
        x, y = (torch.as_tensor(t) for t in part)
        if len(x) != len(y):
            raise BadInputError(f"data {name!r}: {which} has {len(x)} inputs but {len(y)} targets")
        if x.is_floating_point():
            x = x.to(torch.get_default_dtype())
        if y.is_floating_point():
            y = y.to(torch.get_default_dtype())
            y = y.unsqueeze(1) if y.dim() == 1 else y  # (n, 1): the model's output shape
        return TensorDataset(x, y)
    if hasattr(part, "__getitem__") and hasattr(part, "__len__"):
        if len(part) == 0:
            raise BadInputError(f"data {name!r}: the {which} set is empty")
        return part
    raise BadInputError(f"data {name!r}: {which} is a {type(part).__name__}; expected a Dataset or "
                        "an (inputs, targets) pair")


def _num_classes(train: Dataset, val: Dataset) -> int:
    """One more than the largest class index in either set (a pass over a generic Dataset; a
    DataBundle says it directly)."""
    if isinstance(train, TensorDataset) and isinstance(val, TensorDataset):
        return int(max(train.tensors[1].max(), val.tensors[1].max())) + 1
    return 1 + max(int(torch.as_tensor(d[i][1])) for d in (train, val) for i in range(len(d)))


# --- loaders --------------------------------------------------------------------------------

class EpochShuffle(Sampler[int]):
    """A shuffled order that depends on (seed, epoch) alone, so that a resumed or rolled-back run
    sees the batches an uninterrupted one would. Each pass moves to the next epoch; call
    `set_epoch` to jump (after a resume or a rollback), as with DistributedSampler."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        # torch's CPU generator keeps only the low 32 bits of a seed: hash (seed, epoch) into them
        digest = hashlib.blake2b(f"{self.seed}:{self.epoch}".encode(), digest_size=4).digest()
        g = _generator(int.from_bytes(digest, "little"))
        self.epoch += 1
        yield from torch.randperm(self.size, generator=g).tolist()

    def __len__(self) -> int:
        return self.size


class _BatchIndexed(TensorDataset):
    """A TensorDataset whose loader takes a whole batch by one `index_select` per tensor instead
    of collating one (input, target) tuple per sample: the same tensors, in the same order, as
    `default_collate` stacks, without the per-sample Python objects (at batch 2048 they were
    enough churn to set off a full garbage collection of 100-250 ms about once an epoch)."""

    def __init__(self, dataset: TensorDataset) -> None:
        super().__init__(*dataset.tensors)

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, ...]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return tuple(t.index_select(0, index) for t in self.tensors)


def _as_batch(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return batch  # _BatchIndexed.__getitems__ made the batch already


def _loader(dataset: Dataset, batch_size: int, **kwargs: Any) -> DataLoader:
    if type(dataset) is TensorDataset:  # a subclass may override __getitem__: collate it as given
        return DataLoader(_BatchIndexed(dataset), batch_size=batch_size, collate_fn=_as_batch,
                          num_workers=0, **kwargs)
    return DataLoader(dataset, batch_size=batch_size, num_workers=0, **kwargs)


def make_loaders(data: DataBundle, batch_size: int, *, seed: int,
                 eval_batch_size: int | None = None) -> tuple[DataLoader, DataLoader]:
    """The training loader (shuffled by EpochShuffle from `seed`) and the validation loader (in
    order); single-process (num_workers 0), so that batches are the same on every run. A
    TensorDataset (every built-in) is indexed a batch at a time; other datasets are collated
    sample by sample."""
    train = _loader(data.train, batch_size, sampler=EpochShuffle(len(data.train), seed))
    val = _loader(data.val, eval_batch_size or batch_size, shuffle=False)
    return train, val

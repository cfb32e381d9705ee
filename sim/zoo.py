"""Victim zoo: victims are trained once and cached on disk, keyed by everything that shapes them."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from filelock import FileLock
from torch import nn

from . import adversarial, data, models, quantize, registry
from .config import DataConfig, VictimConfig
from .errors import ConfigError, DataError
from .training import (
    accuracy,
    patch_shuffle,
    predict_probs,
    train_classifier,
    train_dp_classifier,
    training_threads,
)

log = logging.getLogger(__name__)
ZOO_VERSION = 3  # bump when training code changes what a cached checkpoint means (3: trained on one thread)
LATENCY_BATCH = 256  # images per forward pass when a victim's latency is measured


@dataclass
class Victim:
    model: nn.Module
    arch: str
    dataset: data.Dataset
    test_accuracy: float
    path: Path | str  # the checkpoint (a remote victim: its URL or adapter)
    trained_now: bool
    train_seconds: float
    training: str = "standard"
    dp_epsilon: float | None = None  # DP-SGD victims: epsilon spent, at victim.dp.delta
    quantization: str = "none"
    twin: nn.Module | None = None  # quantized victims: the fake-quantized float twin (differentiable)
    float_model: nn.Module | None = None  # quantized victims: the float victim they were made from
    float_test_accuracy: float | None = None
    checkpoint_digest: str | None = None  # a given model's: what its cached companions are keyed by
    source: str = "zoo"  # zoo (trained here), checkpoint (victim.checkpoint), python (a live module: sim.run)

    @property
    def cache_name(self) -> str:
        """The name the models made for this victim are cached under (:meth:`ModelContext.cached`)."""
        return f"checkpoint-{self.checkpoint_digest}.pt" if self.checkpoint_digest else self.path.name

    def __getstate__(self) -> dict:
        """Pickled (to Ray workers: a sweep's trials) with a quantized victim's int8 model and twin as state dicts (FX
        graph modules of quantized models do not pickle), and a given model as it travels to Serve replicas
        (TorchScript modules do not pickle)."""
        state = dict(self.__dict__)
        if self.quantization != "none":
            state["model"], state["twin"] = self.model.state_dict(), self.twin.state_dict()
        elif self.source in ("checkpoint", "python"):
            state["model"] = self.to_bytes()
        return state

    def __setstate__(self, state: dict) -> None:
        if isinstance(state.get("model"), bytes):
            state = {**state, "model": models.from_bytes(state["model"])}
        elif state.get("quantization", "none") != "none":
            ds = state["dataset"]
            int8, twin = quantize.skeleton(models.build(state["arch"], ds.input_shape, ds.num_classes),
                                           ds.input_shape, state["quantization"])
            state = {**state, "model": quantize.load(int8, state["model"]), "twin": quantize.load(twin, state["twin"])}
        self.__dict__.update(state)

    @property
    def differentiable(self) -> nn.Module:
        """The model gradients are taken through: the victim itself, or a quantized victim's fake-quantized twin."""
        return self.twin if self.twin is not None else self.model

    @property
    def float_victim(self) -> nn.Module:
        """The float model: the victim itself, or the one a quantized victim was made from."""
        return self.float_model if self.float_model is not None else self.model

    def to_bytes(self) -> bytes:
        """The model with what rebuilds it (:func:`sim.models.to_bytes`)."""
        return models.to_bytes(self.model, self.arch, self.dataset.input_shape, self.dataset.num_classes,
                               quantization=self.quantization)

    def footprint(self) -> dict:
        """Serialised size and single-thread latency (one forward pass over a batch of test images) of the victim,
        and of the float model beside it for a quantized victim."""
        x = self.dataset.x_test[:LATENCY_BATCH]
        out = {"size_bytes": quantize.size_bytes(self.model), "latency_batch": len(x),
               "latency_ms": round(quantize.latency_ms(self.model, x), 3)}
        if self.float_model is not None:
            out.update(float_size_bytes=quantize.size_bytes(self.float_model),
                       float_latency_ms=round(quantize.latency_ms(self.float_model, x), 3))
        return out


def fingerprint(ds: data.Dataset) -> str:
    """A short digest of a dataset's shapes and labels (and images, for the user's own data: ``npz:``, ``folder:``,
    plug-ins): two copies of a dataset that differ (another ``data.root``, a truncated download, an edited file) do
    not share cached victims."""
    digest = hashlib.sha1(repr((ds.x_train.shape, ds.x_test.shape)).encode())
    arrays = [ds.y_train, ds.y_test]
    if ":" in ds.name or not registry.is_builtin("dataset", ds.name):
        arrays += [ds.x_train, ds.x_test]
    for a in arrays:
        digest.update(np.ascontiguousarray(a).tobytes())
    return digest.hexdigest()[:12]


def _stem(*parts: str) -> str:
    """A file-name-safe stem of the names that make a cache file's name (``npz:/a/b.npz`` -> ``npz_b``)."""
    safe = []
    for part in parts:
        if ":" in part:  # a path or module:attr: its last component is what a reader recognises
            part = part.partition(":")[0] + "_" + os.path.basename(part.partition(":")[2].rstrip("/")) or "x"
        safe.append("".join(c if c.isalnum() or c in "_." else "_" for c in part)[:40])
    return "-".join(safe)


def train_threads(cfg: VictimConfig) -> int:
    """The torch threads the victim and the models made from it train on (``victim.train_threads``; 0: this
    process's count)."""
    return cfg.train_threads or torch.get_num_threads()


def threads_spec(cfg: VictimConfig) -> dict:
    """What a cache key (and a run's summary) records of the training's threads: nothing at the default one thread
    (keys stay those of a cache trained before the setting existed), the count otherwise (other counts train other
    weights)."""
    threads = train_threads(cfg)
    return {} if threads == 1 else {"threads": threads}


def victim_key(cfg: VictimConfig, seed: int, kind: str = "victim", data_id: str | None = None) -> str:
    spec = {**threads_spec(cfg), "data": data_id, "dataset": cfg.dataset, "arch": cfg.arch, "epochs": cfg.epochs,
            "batch_size": cfg.batch_size, "lr": cfg.lr, "seed": seed, "version": ZOO_VERSION, "kind": kind,
            "training": cfg.training}
    if cfg.training == "dp_sgd":
        spec["dp"] = cfg.dp.model_dump()
    if cfg.training == "outlier_exposure":
        spec["oe_weight"] = cfg.oe_weight
    if cfg.training == "adversarial":
        spec["adversarial"] = cfg.adversarial.model_dump()
    if cfg.quantization == "ptq":  # only what each mode uses
        spec.update(quantization="ptq", calibration=cfg.quant.calibration)
    elif cfg.quantization in ("qat", "divqat"):
        spec.update(quantization=cfg.quantization, quant_epochs=cfg.quant.epochs, quant_lr=cfg.quant.lr)
    if cfg.quantization == "divqat":
        spec["divqat"] = cfg.divqat.model_dump()
    if cfg.preprocess is not None:
        spec["preprocess"] = cfg.preprocess.model_dump()
    if cfg.arch and not registry.is_builtin("model", cfg.arch):  # the user's own: its code too (built-ins: ZOO_VERSION)
        spec["arch_code"] = registry.code_id("model", cfg.arch)
    return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _folder(cache_dir: str) -> Path:
    folder = Path(cache_dir).expanduser() / "victims"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cache_dir={cache_dir!r} cannot be used ({exc.strerror}); expected a writable "
                          f"directory") from None
    return folder


def _cached(path: Path, model: nn.Module, train, threads: int) -> tuple[dict, bool]:
    """Load ``path`` into ``model``, or run ``train(model) -> extra fields`` on ``threads`` torch threads and save;
    (fields, trained now)."""
    with FileLock(str(path) + ".lock"):
        if path.exists():
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(ckpt.pop("state_dict"))
            model.eval()
            return ckpt, False
        with training_threads(threads):
            fields = train(model)
        _store(path, lambda tmp: torch.save({"state_dict": model.state_dict(), **fields}, tmp))
        return fields, True


def get_victim(cfg: VictimConfig, data_cfg: DataConfig, seed: int, cache_dir: str,
               on_epoch=None, device: str = "cpu") -> Victim:
    """Load the cached victim for this config, or train and cache it (standard, outlier exposure, DP-SGD or
    adversarial training, per ``cfg.training``, on ``device``; then quantized, per ``cfg.quantization``, on the
    CPU). The victim comes back on the CPU."""
    if cfg.quantization != "none":
        return _quantized_victim(cfg, data_cfg, seed, cache_dir, on_epoch, device)
    ds = load_data(cfg, data_cfg)
    if cfg.checkpoint is not None:
        return _checkpoint_victim(cfg, ds)
    path = _folder(cache_dir) / f"{_stem(cfg.dataset, cfg.arch)}-{victim_key(cfg, seed, data_id=fingerprint(ds))}.pt"
    torch.manual_seed(seed)  # the initial weights are part of what the seed fixes
    model = _preprocessed(models.build(cfg.arch, ds.input_shape, ds.num_classes, "victim.arch"), cfg)

    def train(model: nn.Module) -> dict:
        log.info("training victim %s on %s (%d epochs, %s, %s)", cfg.arch, cfg.dataset, cfg.epochs, cfg.training,
                 device)
        start = time.perf_counter()
        model.to(device)
        fields = {"config": cfg.model_dump(), "seed": seed}
        if cfg.training == "dp_sgd":
            fields["dp_epsilon"] = train_dp_classifier(
                model, ds.x_train, ds.y_train, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                noise_multiplier=cfg.dp.noise_multiplier, max_grad_norm=cfg.dp.max_grad_norm,
                delta=cfg.dp.delta, seed=seed, on_epoch=on_epoch)
        else:
            outliers = patch_shuffle(ds.x_train, seed) if cfg.training == "outlier_exposure" else None
            train_classifier(model, ds.x_train, ds.y_train, epochs=cfg.epochs, batch_size=cfg.batch_size,
                             lr=cfg.lr, seed=seed, on_epoch=on_epoch, outliers=outliers,
                             outlier_weight=cfg.oe_weight, adversary=_adversary(cfg, seed))
        fields["train_seconds"] = time.perf_counter() - start
        model.cpu()
        fields["test_accuracy"] = accuracy(predict_probs(model, ds.x_test).argmax(1), ds.y_test)
        return fields

    fields, now = _cached(path, model, train, train_threads(cfg))
    return Victim(model, cfg.arch, ds, float(fields["test_accuracy"]), path, now,
                  float(fields.get("train_seconds", 0.0)), cfg.training,
                  None if fields.get("dp_epsilon") is None else float(fields["dp_epsilon"]))


def _store(path: Path, write) -> None:
    """A cache entry, written by ``write(file)`` into a file of this process's own and then renamed into place: a
    reader never sees it half written, and runs filling the same cache at once (concurrent runs, a sweep's trials)
    never write into one another's file."""
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    write(tmp)
    tmp.replace(path)


def load_data(cfg: VictimConfig, data_cfg: DataConfig) -> data.Dataset:
    """The victim's dataset (an error names ``victim.dataset`` first, as a pool's names its setting)."""
    named = f"victim.dataset={cfg.dataset!r}"
    try:
        return data.load(cfg.dataset, data_cfg.root, data_cfg.download, data_cfg.image_size)
    except (ConfigError, DataError) as exc:
        raise exc if str(exc).startswith(named) else type(exc)(f"{named}: {exc}") from None


def _preprocessed(model: nn.Module, cfg: VictimConfig) -> nn.Module:
    """``model`` behind the normalisation ``cfg.preprocess`` asks for (none: the model itself)."""
    return model if cfg.preprocess is None else models.Preprocessed(model, cfg.preprocess.mean, cfg.preprocess.std)


def _checkpoint_victim(cfg: VictimConfig, ds: data.Dataset) -> Victim:
    """The user's trained model (``victim.checkpoint``), nothing trained: its test accuracy measured on ``ds``."""
    path = Path(cfg.checkpoint).expanduser().resolve()
    arch = cfg.architecture()
    model = models.load_checkpoint(str(path), arch, ds.input_shape, ds.num_classes)
    if cfg.preprocess is not None and len(cfg.preprocess.mean) not in (1, ds.input_shape[0]):
        raise ConfigError(f"victim.preprocess.mean has {len(cfg.preprocess.mean)} values but the images have "
                          f"{ds.input_shape[0]} channels; expected "
                          f"{'1' if ds.input_shape[0] == 1 else f'1 or {ds.input_shape[0]}'}")
    model = _preprocessed(model, cfg)
    digest = hashlib.sha1(path.read_bytes() + json.dumps(cfg.preprocess and cfg.preprocess.model_dump()).encode()
                          + fingerprint(ds).encode()).hexdigest()[:16]
    acc = accuracy(predict_probs(model, ds.x_test).argmax(1), ds.y_test)
    return Victim(model, arch, ds, acc, path, False, 0.0, checkpoint_digest=digest, source="checkpoint")


_ARGUMENTS = {"x_test": "test_set's images", "y_test": "test_set's labels", "x_train": "train_set's images",
              "y_train": "train_set's labels"}


def _as_arguments(exc: DataError) -> DataError:
    """A check of the Python API's ``test_set`` and ``train_set`` in the words of those arguments."""
    text = str(exc).replace("dataset 'python' has", "train_set and test_set have")
    text = re.sub(r"\b[xy]_(?:test|train)\b", lambda m: _ARGUMENTS[m.group(0)], text.replace("dataset 'python': ", ""))
    return DataError(text)


def live_victim(model: nn.Module, cfg: VictimConfig, data_cfg: DataConfig,
                test_set: tuple | None = None, train_set: tuple | None = None) -> Victim:
    """A live module as the victim (the Python API's ``sim.run(config, victim=module, test_set=(x, y))``): its
    accuracy measured on ``test_set`` (else the test split of ``victim.dataset``); ``train_set`` (else the training
    split of ``victim.dataset``) is the defender's own data, which detectors train and calibrate on."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"victim={type(model).__name__}; expected a torch.nn.Module")
    for name, given in (("test_set", test_set), ("train_set", train_set)):
        if given is not None and (not isinstance(given, (tuple, list)) or len(given) != 2):
            size = f" of {len(given)}" if hasattr(given, "__len__") else ""
            raise ConfigError(f"{name} is a {type(given).__name__}{size}; expected (images, labels)")
    base = load_data(cfg, data_cfg) if test_set is None or train_set is None else None
    arrays = {"x_train": base.x_train if train_set is None else train_set[0],
              "y_train": base.y_train if train_set is None else train_set[1],
              "x_test": base.x_test if test_set is None else test_set[0],
              "y_test": base.y_test if test_set is None else test_set[1]}
    try:
        shape = data.as_images("python", "x_test", arrays["x_test"]).shape[1:]
    except DataError as exc:
        raise _as_arguments(exc) from None
    model = model.cpu().eval()
    models.check_output(model, shape, None, "victim")
    with torch.no_grad():
        classes = int(model(torch.zeros(2, *shape)).shape[-1])
    if base is not None and classes != base.num_classes:
        raise ConfigError(f"the victim answers {classes} classes and victim.dataset={cfg.dataset!r} has "
                          f"{base.num_classes}; expected a model with {base.num_classes} outputs")
    top = max((int(np.max(arrays[k])) for k in ("y_train", "y_test")  # other labels: data.from_arrays says why
               if np.size(arrays[k]) and np.issubdtype(np.asarray(arrays[k]).dtype, np.number)), default=-1)
    if top >= classes:
        raise ConfigError(f"{'test_set' if test_set is not None else 'train_set'} has label {top} but the victim "
                          f"answers {classes} classes; expected labels below {classes}")
    try:
        ds = data.from_arrays("python", arrays, classes)
    except DataError as exc:
        raise _as_arguments(exc) from None
    model = _preprocessed(model, cfg)
    digest = hashlib.sha1(models.to_bytes(model, None, ds.input_shape, ds.num_classes)
                          + fingerprint(ds).encode()).hexdigest()[:16]
    acc = accuracy(predict_probs(model, ds.x_test).argmax(1), ds.y_test)
    return Victim(model, None, ds, acc, Path("python"), False, 0.0, checkpoint_digest=digest, source="python")


def _adversary(cfg: VictimConfig, seed: int):
    """PGD examples for adversarial training, or None."""
    if cfg.training != "adversarial":
        return None
    return adversarial.adversary(**cfg.adversarial.model_dump(), seed=seed)


def _quantized_victim(cfg: VictimConfig, data_cfg: DataConfig, seed: int, cache_dir: str, on_epoch=None,
                      device: str = "cpu") -> Victim:
    """The float victim of ``cfg`` (cached), quantized: calibrated (ptq) or fine-tuned with fake quantization (qat,
    divqat: plus DivQAT's divergence from the float victim's answers, adversarial examples if the float victim was
    trained on them), then converted to int8; the int8 model and its twin are cached beside the float victim."""
    base = get_victim(cfg.model_copy(update={"quantization": "none"}), data_cfg, seed, cache_dir, on_epoch, device)
    ds = base.dataset
    path = _folder(cache_dir) / (f"{_stem(cfg.dataset, cfg.arch)}-{cfg.quantization}-"
                                 f"{victim_key(cfg, seed, data_id=fingerprint(ds))}.pt")
    int8, twin = quantize.skeleton(base.model, ds.input_shape, cfg.quantization)
    with FileLock(str(path) + ".lock"):
        if path.exists():
            with quantize.quiet():
                fields = torch.load(path, map_location="cpu", weights_only=True)
            quantize.load(int8, fields.pop("int8"))
            quantize.load(twin, fields.pop("twin"))
            now = False
        else:
            log.info("quantizing victim %s on %s (%s)", cfg.arch, cfg.dataset, cfg.quantization)
            start = time.perf_counter()
            calibration = ds.x_train[np.random.default_rng(seed).permutation(len(ds.x_train))[:cfg.quant.calibration]]
            if cfg.quantization == "ptq":
                int8, twin = quantize.post_training(base.model, ds.input_shape, calibration)
            else:
                twin = quantize.prepare_twin(base.model, ds.input_shape)
                divqat = cfg.quantization == "divqat"
                with training_threads(train_threads(cfg)):
                    train_classifier(twin, ds.x_train, ds.y_train, epochs=cfg.quant.epochs,
                                     batch_size=cfg.batch_size, lr=cfg.quant.lr, seed=seed, on_epoch=on_epoch,
                                     adversary=_adversary(cfg, seed), teacher=base.model if divqat else None,
                                     divergence=cfg.divqat.alpha, divergence_cap=cfg.divqat.kl_cap)
                int8 = quantize.convert(quantize.freeze(twin))
            fields = {"config": cfg.model_dump(), "seed": seed, "train_seconds": time.perf_counter() - start,
                      "test_accuracy": accuracy(predict_probs(int8, ds.x_test).argmax(1), ds.y_test)}
            with quantize.quiet():
                _store(path, lambda tmp: torch.save({"int8": int8.state_dict(), "twin": twin.state_dict(), **fields},
                                                    tmp))
            now = True
    return Victim(int8, cfg.arch, ds, float(fields["test_accuracy"]), path, now or base.trained_now,
                  float(fields["train_seconds"]) + base.train_seconds, cfg.training, base.dp_epsilon,
                  quantization=cfg.quantization, twin=twin, float_model=base.model,
                  float_test_accuracy=base.test_accuracy)


def get_misinformation_model(cfg: VictimConfig, data_cfg: DataConfig, seed: int, cache_dir: str) -> nn.Module:
    """The misinformation model of adaptive misinformation: the victim's architecture trained on the
    victim's training data to put little probability on the true class; cached like victims."""
    ds = load_data(cfg, data_cfg)
    float_standard = cfg.model_copy(update={"training": "standard", "quantization": "none"})
    key = victim_key(float_standard, seed, kind="misinformation", data_id=fingerprint(ds))
    path = _folder(cache_dir) / f"{_stem(cfg.dataset, cfg.arch)}-misinformation-{key}.pt"
    torch.manual_seed(seed + 1)
    model = models.build(cfg.arch, ds.input_shape, ds.num_classes, "victim.arch")

    def train(model: nn.Module) -> dict:
        log.info("training the misinformation model (%s on %s)", cfg.arch, cfg.dataset)
        train_classifier(model, ds.x_train, ds.y_train, epochs=cfg.epochs, batch_size=cfg.batch_size,
                         lr=cfg.lr, seed=seed + 1, loss="misinformation")
        return {"true_class_rate": accuracy(predict_probs(model, ds.x_test).argmax(1), ds.y_test)}

    _cached(path, model, train, train_threads(cfg))
    return model


@dataclass
class ModelContext:
    """What a component needs to train or load its models through the zoo (:meth:`Defense.prepare`,
    :meth:`Detector.prepare`): the served victim, the scenario's victim and data settings, seed and cache, and
    ``on_epoch(stage, epoch, epochs, loss)`` for progress."""

    victim: Victim
    victim_config: VictimConfig
    data_config: DataConfig
    seed: int
    cache_dir: str
    on_epoch: Callable[[str, int, int, float], None] | None = None
    device: str = "cpu"  # where components train their models (what they make is stored for the CPU)

    @classmethod
    def of(cls, cfg, victim: Victim, on_epoch=None, device: str = "cpu") -> "ModelContext":
        """The context of a :class:`sim.config.ScenarioConfig` and its trained victim."""
        return cls(victim, cfg.victim, cfg.data, cfg.seed, cfg.cache_dir, on_epoch, device)

    def victim_variant(self, **changes) -> Victim:
        """The victim's architecture and data trained another way (``training="outlier_exposure"``), cached."""
        changes = {"checkpoint": None, **changes}  # a variant of a checkpoint victim is trained on its architecture
        return get_victim(self.victim_config.model_copy(update=changes), self.data_config, self.seed, self.cache_dir)

    def misinformation_model(self) -> bytes:
        """Adaptive misinformation's model for this victim (see :func:`get_misinformation_model`), serialised."""
        model = get_misinformation_model(self.victim_config, self.data_config, self.seed, self.cache_dir)
        ds = self.victim.dataset
        return models.to_bytes(model, self.victim_config.arch, ds.input_shape, ds.num_classes)

    def cached(self, name: str, spec: dict, make: Callable[[], bytes]) -> bytes:
        """Bytes cached beside the victim's checkpoint under ``name`` and a digest of ``spec`` (everything that
        shapes them, with the training's threads): read from the cache, or made by ``make()`` and stored."""
        key = hashlib.sha1(json.dumps({**spec, **threads_spec(self.victim_config), "seed": self.seed,
                                       "version": ZOO_VERSION}, sort_keys=True).encode()).hexdigest()[:16]
        path = _folder(self.cache_dir) / f"{Path(self.victim.cache_name).stem}-{name}-{key}.pt"
        with FileLock(str(path) + ".lock"):
            if path.exists():
                return path.read_bytes()
            with training_threads(train_threads(self.victim_config)):
                blob = make()
            _store(path, lambda tmp: tmp.write_bytes(blob))
            return blob

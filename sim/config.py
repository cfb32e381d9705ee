"""Scenario configuration: YAML files merged with ``key=value`` overrides, validated into typed models.

A scenario is ``scenarios/NAME.yaml`` (shipped as package data) or a path to a YAML file.
A scenario may start with ``extends: OTHER`` to take another scenario as its base.
Overrides are OmegaConf dotlist entries (``attackers.distributed.accounts=50``).
Validation is pydantic with ``extra="forbid"``: an unknown key is an error that lists the known ones.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.resources
import inspect
import logging
import os
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError, first_line, inert, shown
from .limits import Limits

log = logging.getLogger(__name__)


def _names(category: str) -> dict:
    """Field metadata: the value is the name of a registered component of ``category`` (for the reference)."""
    return {"registry": category}


def _takes_number(annotation: Any) -> bool:
    args = typing.get_args(annotation) or (annotation,)
    return bool({int, float} & set(args)) and bool not in args


class _Settings(BaseModel):
    """Every settings model: checked when assigned too, its numbers finite, and a number not a yes/no (pydantic would
    read YAML's true as 1)."""

    model_config = ConfigDict(validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _not_a_boolean(cls, value: Any, info) -> Any:
        field = cls.model_fields.get(info.field_name)
        if isinstance(value, bool) and field is not None and _takes_number(field.annotation):
            raise ValueError(f"must be a number, got {str(value).lower()}")
        return value


class _Strict(_Settings):
    model_config = ConfigDict(extra="forbid")


class DPConfig(_Strict):
    noise_multiplier: float = Field(1.0, gt=0, description="DP-SGD noise, in multiples of max_grad_norm (0 would "
                                                           "give no privacy: an infinite epsilon)")
    max_grad_norm: float = Field(1.0, gt=0, description="DP-SGD per-sample gradient clipping norm")
    delta: float = Field(1e-5, gt=0, lt=1, description="delta at which epsilon is reported")


class AdversarialConfig(_Strict):
    eps: float = Field(0.1, gt=0, le=1, description="PGD budget, L-infinity in [0, 1] pixel units (adversarial "
                                                    "training and the robust accuracy of every model)")
    step: float = Field(0.025, gt=0, description="PGD step size (same units; at most eps)")
    steps: int = Field(10, ge=1, description="PGD steps")
    restarts: int = Field(1, ge=1, description="PGD random restarts (the worst one per image counts)")

    @model_validator(mode="after")
    def _step_within_eps(self):
        if self.step > self.eps:
            raise ValueError(f"step={self.step} is larger than eps={self.eps}; expected step <= eps")
        return self


class QuantConfig(_Strict):
    calibration: int = Field(1024, ge=1, description="training images PTQ calibrates its ranges on (QAT learns "
                                                     "them while it fine-tunes)")
    epochs: int = Field(3, ge=1, description="quantization-aware fine-tuning epochs from the float victim (qat, "
                                             "divqat)")
    lr: float = Field(1e-4, gt=0, description="quantization-aware fine-tuning learning rate (Adam)")


class DivQATConfig(_Strict):
    alpha: float = Field(0.5, ge=0, description="weight of the divergence term DivQAT maximises: the KL divergence "
                                                "from the float victim's answers to the quantized model's")
    kl_cap: float = Field(5.0, gt=0, description="each image's KL divergence counts up to this much (the paper "
                                                 "states no bound; an unbounded maximum would run away)")


class PreprocessConfig(_Strict):
    mean: list[float] = Field(description="per-channel mean subtracted (one value, or one per channel)")
    std: list[float] = Field(description="per-channel deviation divided by (one value, or one per channel)")

    @model_validator(mode="after")
    def _valid(self):
        if not self.mean or len(self.mean) != len(self.std):
            raise ValueError(f"mean {self.mean} and std {self.std} must be non-empty lists of one length")
        if any(v <= 0 for v in self.std):
            raise ValueError(f"std {self.std} must be > 0")
        return self


class VictimConfig(_Strict):
    name: str = Field("victim", pattern=r"^[A-Za-z0-9_-]+$", description="victim name (Serve app name)")
    dataset: str = Field("mnist5k", description="dataset the victim is trained on (npz:PATH, folder:PATH, "
                                                "module:attr: your own)", json_schema_extra=_names("dataset"))
    arch: str = Field("lenet", description="victim architecture (module:attr: your own factory, called with the "
                                           "input shape and the number of classes)", json_schema_extra=_names("model"))
    checkpoint: str | None = Field(None, description="a trained model to serve instead of training one: a state "
                                                     "dict for victim.arch, or a TorchScript file (no architecture "
                                                     "needed; replicas then need replica.arch)")
    preprocess: PreprocessConfig | None = Field(None, description="the normalisation the model expects "
                                                                  "(victim.preprocess.mean/std), applied inside the "
                                                                  "served model: the API still takes images in [0, 1]")

    url: str | None = Field(None, description="attack a victim this tool does not serve: an HTTP endpoint speaking "
                                              "the project's JSON protocol (docs/serving.md); nothing is trained, "
                                              "served or detected here")
    key_file: str | None = Field(None, description="the remote victim's API keys, as serve mode writes them "
                                                   "(keys.json): one per account of the scenario, then one for "
                                                   "evaluation")
    client: str | None = Field(None, description="module:callable mapping uint8 images (N, C, H, W) to probability "
                                                 "vectors (N, K): an adapter to any other remote API")

    def remote(self) -> bool:
        """Whether the victim is one this tool does not serve (``url`` or ``client``)."""
        return self.url is not None or self.client is not None

    def torchscript(self) -> bool:
        """Whether the victim is a TorchScript checkpoint (no architecture of its own)."""
        from .models import is_torchscript

        return self.checkpoint is not None and is_torchscript(os.path.expanduser(self.checkpoint))

    def architecture(self) -> str | None:
        """``arch``, or None for a TorchScript checkpoint unless ``arch`` is set explicitly (then it is what
        replicas and components that need an architecture take)."""
        return None if self.torchscript() and "arch" not in self.model_fields_set else self.arch
    epochs: int = Field(10, ge=1, description="victim training epochs")
    batch_size: int = Field(64, ge=1, description="victim training batch size")
    lr: float = Field(1e-3, gt=0, description="victim training learning rate (Adam)")
    train_threads: int = Field(1, ge=0, description="torch threads that train the victim and the models made from it "
                                                    "(its variants, the defenses' and detectors' models) on the CPU: 1 "
                                                    "trains the same weights whatever the machine's cores; more, or 0 "
                                                    "(the process's own count), trains faster on a big CPU, with "
                                                    "weights that depend on the count (the cache keeps them apart)")
    training: Literal["standard", "outlier_exposure", "dp_sgd", "adversarial"] = Field(
        "standard", description="how the victim is trained (dp_sgd: a training-time defense; adversarial: PGD "
                                "adversarial training with `adversarial`'s settings)")
    oe_weight: float = Field(0.5, gt=0, description="outlier-exposure loss weight (training=outlier_exposure)")
    dp: DPConfig = DPConfig()
    adversarial: AdversarialConfig = AdversarialConfig()
    quantization: Literal["none", "ptq", "qat", "divqat"] = Field(
        "none", description="8-bit victim: post-training quantization, quantization-aware training, or DivQAT "
                            "(QAT that pushes the quantized answers away from the float victim's)")
    quant: QuantConfig = QuantConfig()
    divqat: DivQATConfig = DivQATConfig()


class DataConfig(_Strict):
    root: str | None = Field(None, description="dataset root (default: per dataset)")
    download: bool = Field(False, description="let torchvision readers download")
    image_size: int | None = Field(None, ge=1, description="folder: datasets and pools: resize images to this "
                                                           "square size (default: they must share one size)")


class DefenseConfig(_Settings):
    """``name`` plus the defense's own parameters as extra keys (a chain: one mapping per member)."""

    model_config = ConfigDict(extra="allow")
    name: str = Field("identity", description="output defense, or several joined by '+' (a chain); parameters: "
                                              "defense.PARAM=… (chain: defense.MEMBER.PARAM=…)")

    def spec(self) -> dict[str, Any]:
        return self.model_dump()


class PerturbConfig(DefenseConfig):
    name: str = Field("mad", description="output defense a flagged query is answered through (action=perturb), "
                                         "with its parameters as keys, like `defense`")


def _refuse_inert(values: dict[str, Any], defaults: dict[str, Any], prefix: str, needs: str) -> None:
    """Settings (``values``, named ``prefix`` + key) that another setting leaves without effect unless ``needs``: one
    set to other than its default (``defaults``; a missing key is unset) is an error rather than ignored."""
    for key in sorted(set(values) | set(defaults)):
        value, default = values.get(key), defaults.get(key)
        if value != default:
            raise ValueError(inert("", prefix + key, value, needs, default))


def _calibrated_or_not(owner: str, kind, params: dict[str, Any]) -> None:
    """A stateless detector given a ``threshold`` is not calibrated, so a ``target_fpr`` beside it would do nothing.
    Checked on the scenario alone: the detector itself holds both once calibration has set its threshold."""
    from .detectors import StatelessDetector

    default = kind.params["target_fpr"].default if "target_fpr" in kind.params else None
    if issubclass(kind, StatelessDetector) and params.get("threshold") is not None \
            and params.get("target_fpr", default) != default:
        raise ValueError(inert("", f"{owner}.target_fpr", params["target_fpr"], f"{owner}.threshold=null", default))


class PowConfig(_Strict):
    bits_min: int = Field(8, ge=1, le=24, description="proof-of-work bits at the detector's threshold")
    bits_max: int = Field(16, ge=1, le=24, description="proof-of-work bits at `saturate` and above (a request's "
                                                       "puzzle adds log2 of its challenged queries)")
    saturate: float | None = Field(None, description="score, above the detector's threshold, at which the puzzle "
                                                     "reaches bits_max (default: "
                                                     "PRADA 2 x (1 - delta); calibrated detectors the benign "
                                                     "score quantile 1 - target_fpr / 10)")

    @model_validator(mode="after")
    def _ordered(self):
        if self.bits_min > self.bits_max:
            raise ValueError(f"bits_min ({self.bits_min}) must be <= bits_max ({self.bits_max})")
        return self


class DetectorConfig(_Settings):
    """One detector instance: its kind, whether it is on, what is done with the queries it flags, and the kind's
    own parameters (declared by the kind, see :mod:`sim.detectors`) as further keys."""

    model_config = ConfigDict(extra="allow")
    kind: str = Field(description="the detector kind; a shorthand name (listed with the detectors) implies its own",
                      json_schema_extra=_names("detector"))
    enabled: bool = Field(True, description="score queries with it")
    action: Literal["answer", "refuse", "perturb", "proof_of_work"] = Field(
        "answer", description="what a flagged query gets: answer (log only), refuse, perturb (through "
                              "`perturb`'s defense), proof_of_work (a hash puzzle first)")
    pow: PowConfig = PowConfig()
    perturb: PerturbConfig = PerturbConfig()

    @model_validator(mode="after")
    def _inert_under_other_actions(self):
        if self.action != "proof_of_work":
            _refuse_inert(self.pow.model_dump(), PowConfig().model_dump(), "pow.", "action=proof_of_work")
        if self.action != "perturb":
            _refuse_inert(self.perturb.spec(), PerturbConfig().spec(), "perturb.", "action=perturb")
        return self

    def params(self) -> dict[str, Any]:
        """The kind's own parameters (all of them, once the scenario is validated)."""
        return dict(self.model_extra or {})


class ReplicaConfig(_Strict):
    arch: str | None = Field(None, description="replica architecture (default: the victim's)",
                             json_schema_extra=_names("model"))
    epochs: int = Field(20, ge=1, description="replica training epochs")
    batch_size: int = Field(64, ge=1, description="replica training batch size")
    lr: float = Field(1e-3, gt=0, description="replica learning rate")
    optimizer: Literal["adam", "sgd"] = Field("adam", description="replica optimizer (sgd: momentum 0.9)")
    labels: Literal["soft", "hard"] = Field("soft", description="train on the returned vectors (soft) or on their "
                                                                "top-1 labels only (hard)")
    variant: Literal["default", "mad_code"] = Field(
        "default", description="mad_code: the MAD authors' code: SGD lr 0.01, momentum 0.9, weight decay 5e-4, the "
                               "rate x0.1 every 30 epochs, batch 64 (in place of lr, optimizer, batch_size); the "
                               "summary also reports the epoch of best test accuracy, which the code keeps")

    @model_validator(mode="after")
    def _inert_under_mad_code(self):
        if self.variant == "mad_code":  # the MAD code's own optimizer, rate and batch
            own = {"lr", "optimizer", "batch_size"}
            _refuse_inert(self.model_dump(include=own), ReplicaConfig().model_dump(include=own), "", "variant=default")
        return self


class AttackerConfig(_Settings):
    """One attacker: its attack, budget, accounts and actors, replica training, and the attack's own parameters
    (declared by the attack, see :mod:`actors.attacks`) as further keys."""

    model_config = ConfigDict(extra="allow")
    attack: str = Field("knockoff", description="the attack; its own keys are listed with it below",
                        json_schema_extra=_names("attack"))
    budget: int = Field(1000, ge=1, description="total queries of this attacker")
    accounts: int = Field(1, ge=1, description="accounts the budget is split over")
    cohort_size: int | None = Field(None, ge=1, description="accounts created per sign-up batch (a cohort, which "
                                                            "the victim logs and may group by); default: all at once")
    actors: int = Field(1, ge=1, description="Ray actors sharing the accounts")
    split: Literal["round_robin", "random", "blocks"] = Field(
        "round_robin", description="which live account sends each request: in turn, at random (seeded), or in "
                                   "contiguous blocks")
    account_cap: int | None = Field(None, ge=1, description="most queries one account sends, then it retires "
                                                            "(e.g. below PRADA's min_pool)")
    max_rate: float | None = Field(None, gt=0, description="pacing: most queries per second per account")
    churn: bool = Field(False, description="retire an account the victim refused and go on with the others")
    batch_size: int = Field(64, ge=1, description="images per request")
    replica: ReplicaConfig = ReplicaConfig()

    def params(self) -> dict[str, Any]:
        """The attack's own parameters, flat with dotted names (``jacobian.lam``), all of them once the scenario
        is validated."""
        return _flatten(self.model_extra or {})

    @model_validator(mode="after")
    def _actors_have_accounts(self):
        if self.actors > self.accounts:
            raise ValueError(f"actors ({self.actors}) must be <= accounts ({self.accounts}): "
                             "each actor needs at least one account")
        if self.accounts > self.budget:
            raise ValueError(f"accounts ({self.accounts}) must be <= budget ({self.budget}): more accounts than "
                             f"queries leaves some that never send one")
        if self.account_cap is not None and self.account_cap * self.accounts < self.budget:
            raise ValueError(f"account_cap={self.account_cap} x accounts={self.accounts} is less than budget="
                             f"{self.budget}; expected account_cap >= {-(-self.budget // self.accounts)} "
                             f"or more accounts")
        return self


def _flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level with dotted keys ({"a": {"b": 1}} -> {"a.b": 1})."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`_flatten`."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def _own_params(owner: str, component, given: dict[str, Any], common: list[str]) -> dict[str, Any]:
    """A component instance's own parameters (flat), checked by its declaration, with the defaults filled in."""
    clash = [p for p in component.params if p.split(".")[0] in common]
    if clash:  # a plug-in's: the scenario's key of that name is every instance's, so its own could not be set
        raise ConfigError(f"{owner}: {component.name!r} declares parameter {clash[0]!r}, a key every "
                          f"{owner.split('.')[0].rstrip('s')} has ({owner}.{clash[0]}), so its own could not be set; "
                          f"expected another name for it")
    flat = _flatten(given)
    for key in flat:
        if key not in component.params:
            known = ", ".join([*common, *component.params])
            raise ConfigError(f"unknown key '{owner}.{key}'; known keys here: {known}")
    return component.resolve(flat, owner=owner)


class BenignConfig(_Strict):
    """Honest traffic: test images from ``users`` client actors, each driving its share of the ``accounts``."""

    users: int = Field(2, ge=0, description="benign client actors (one account each unless accounts is set)")
    accounts: int | None = Field(None, ge=1, description="benign accounts in all, dealt evenly over the users, each "
                                                         "sending its queries in turn (default: one per user)")
    queries: int = Field(300, ge=1, description="queries per benign account (the fewest, with queries_max)")
    queries_max: int | None = Field(None, ge=1, description="vary the accounts: each sends a number of queries "
                                                            "drawn log-uniformly between queries and this")
    popular: float = Field(0.0, ge=0, le=1, description="share of queries drawn from a small set of popular "
                                                         "images that every benign account shares")
    popular_images: int = Field(20, ge=1, description="the popular images (Zipf-weighted: the first most often)")
    shared_signup: float = Field(0.0, ge=0, le=1, description="share of benign accounts that sign up inside an "
                                                               "attacker's sign-up batch (and so share its cohort)")
    batch_size: int = Field(16, ge=1, description="images per request")

    @model_validator(mode="after")
    def _consistent(self):
        if self.accounts is not None and self.accounts < self.users:
            raise ValueError(f"accounts ({self.accounts}) must be >= users ({self.users}): every user holds one")
        if self.queries_max is not None and self.queries_max < self.queries:
            raise ValueError(f"queries_max ({self.queries_max}) must be >= queries ({self.queries})")
        return self


class AutoscalingConfig(_Strict):
    """Ray Serve's own autoscaling of the victim's replicas (its ``autoscaling_config``): the settings passed on."""

    min_replicas: int = Field(1, ge=1, description="fewest replicas")
    max_replicas: int = Field(4, ge=1, description="most replicas")
    initial_replicas: int | None = Field(None, ge=1, description="replicas at the start (default: min_replicas)")
    target_ongoing_requests: float = Field(2.0, gt=0, description="requests in flight per replica Serve aims at")
    upscale_delay_s: float = Field(30.0, ge=0, description="seconds of high load before Serve adds replicas")
    downscale_delay_s: float = Field(600.0, ge=0, description="seconds of low load before Serve removes replicas")
    metrics_interval_s: float = Field(10.0, gt=0, description="how often replicas report their load")
    look_back_period_s: float = Field(30.0, gt=0, description="the window Serve averages the load over")

    @model_validator(mode="after")
    def _ordered(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError(f"initial_replicas ({self.initial_replicas}) must be between min_replicas "
                             f"({self.min_replicas}) and max_replicas ({self.max_replicas})")
        return self


class ServeConfig(_Strict):
    port: int = Field(0, ge=0, le=65535, description="HTTP port on 127.0.0.1 (0: a free one)")
    http: bool = Field(True, description="start Serve's HTTP proxy")
    replicas: int = Field(1, ge=1, description="Serve replicas of the victim (any number: stateful detectors' "
                                                "state lives in the detection tier's shards)")
    shards: int | None = Field(None, ge=1, description="shards of the detection tier, each owning a share of the "
                                                       "keys (accounts, cohorts, ...) of the stateful detectors and "
                                                       "proof of work (default: one per replica, at most one per "
                                                       "CPU of the cluster)")
    autoscaling: AutoscalingConfig | None = Field(None, description="let Serve scale the replicas with the load "
                                                                    "(instead of a fixed serve.replicas)")
    replica_cpus: float = Field(0.5, gt=0, description="CPUs each Serve replica reserves")
    replica_gpus: float | None = Field(None, ge=0, description="GPUs each Serve replica reserves when the device is "
                                                               "CUDA (fractional; default: the cluster's GPUs shared "
                                                               "among the replicas)")
    threads: int = Field(1, ge=1, description="torch threads per Serve replica")
    max_images: int = Field(256, ge=1, description="most images in one request")
    max_ongoing_requests: int = Field(128, ge=1, description="requests one replica works on at once")
    max_body_bytes: int | None = Field(None, ge=1024, description="largest HTTP request body; a larger one gets 413 "
                                                                  "before it is read (default: room for "
                                                                  "serve.max_images images as JSON floats)")
    max_queued_requests: int = Field(256, ge=1, description="requests waiting for one replica; beyond them Serve "
                                                            "answers 503 (HTTP) or raises BackPressureError (handles)")
    request_timeout_s: float = Field(60.0, gt=0, description="an HTTP request (its body included) that takes longer "
                                                             "gets 408 from Serve's proxy: a slow client cannot hold "
                                                             "a replica")
    quota: int | None = Field(None, ge=1, description="queries each key (serve.limit_by) may send in all; a request "
                                                      "that crosses it is answered up to it, later ones get 429 "
                                                      "(reason quota)")
    rate: float | None = Field(None, gt=0, description="queries per second each key may send, sustained (a token "
                                                       "bucket of serve.burst); over it a request gets 429 with "
                                                       "Retry-After")
    burst: int | None = Field(None, ge=1, description="the rate limit's bucket: queries a key may send at once "
                                                      "(default serve.max_images; at least that, or larger requests "
                                                      "could never pass)")
    limit_by: Literal["account", "actor", "cohort", "all"] = Field(
        "account", description="what serve.quota and serve.rate count per: account, actor (client), cohort or all "
                               "traffic")
    keys: str | None = Field(None, description="accounts file for `serve` mode (JSON)")
    accounts: int = Field(10, ge=1, description="accounts generated in `serve` mode")

    @model_validator(mode="after")
    def _one_way_to_size(self):
        if self.autoscaling is not None and "replicas" in self.model_fields_set:
            raise ValueError(f"serve.replicas={self.replicas} and serve.autoscaling are both set; expected one of "
                             f"them (autoscaling sizes the replicas between its min_replicas and max_replicas)")
        return self

    @model_validator(mode="after")
    def _inert_without_limits(self):
        if self.rate is None:
            _refuse_inert({"burst": self.burst}, {"burst": None}, "serve.", "serve.rate=RATE")
        if self.rate is None and self.quota is None:
            _refuse_inert({"limit_by": self.limit_by}, {"limit_by": "account"}, "serve.",
                          "serve.quota=N or serve.rate=RATE")
        return self

    @model_validator(mode="after")
    def _burst_holds_a_request(self):
        if self.burst is not None and self.burst < self.max_images:
            raise ValueError(f"serve.burst={self.burst} is below serve.max_images={self.max_images}: a request of more "
                             f"images than the burst could never pass; expected serve.burst >= {self.max_images} "
                             f"(or a smaller serve.max_images)")
        return self

    def limits(self) -> Limits | None:
        """The per-key limits these settings ask for (None: no limit)."""
        if self.quota is None and self.rate is None:
            return None
        return Limits(quota=self.quota, rate=self.rate, burst=self.burst or self.max_images, group=self.limit_by)

    @property
    def most_replicas(self) -> int:
        """The replicas the victim may have at once: ``replicas``, or autoscaling's ``max_replicas``."""
        return self.autoscaling.max_replicas if self.autoscaling else self.replicas

    def shards_for(self, cpus: float) -> int:
        """The tier's shards on a cluster of ``cpus`` CPUs: ``shards`` if set, else one per replica (autoscaling:
        per replica at most), at most one per CPU."""
        return self.shards or max(1, min(self.most_replicas, int(cpus)))


class LogConfig(_Strict):
    inputs: bool = Field(True, description="store each query's input bytes in the log")


class RayConfig(_Strict):
    address: str | None = Field(None, description="cluster address (or RAY_ADDRESS): HOST:PORT, auto or "
                                                  "ray://HOST:PORT; none: a local Ray")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the local Ray (default: all)")
    object_store_mb: int = Field(512, ge=64, description="object store of the local Ray, MiB")

    @field_validator("address")
    @classmethod
    def _an_address(cls, address):
        if address is not None and not is_ray_address(address):
            raise ValueError("must be a cluster address: HOST:PORT (ray start --head prints it), auto, or "
                             "ray://HOST:PORT")
        return address


def is_ray_address(address: str) -> bool:
    """HOST:PORT, ``auto``, ``local`` or ``ray://HOST:PORT``: what ray.init takes (not whether anything listens)."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    return address in ("auto", "local") or bool(host and sep and port.isdigit() and 0 < int(port) < 65536)


class RobustnessConfig(_Strict):
    enabled: bool = Field(False, description="measure robust accuracy (PGD with victim.adversarial's settings) of "
                                             "the victim and of every replica (on in the scenarios that study it)")
    samples: int = Field(500, ge=1, description="test images it is measured on")


class ScenarioConfig(_Strict):
    name: str = "custom"
    description: str = ""
    seed: int = Field(0, ge=0, description="every random choice derives from it")
    run_dir: str | None = Field(None, description="run directory or URI (default runs/<scenario>/<time>-<suffix>, "
                                                  "with the run id's time and suffix)")
    cache_dir: str = Field("~/.cache/mlsim", description="victim checkpoint cache")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where victim, replica and detector-model training and the Serve replicas' models (the "
                            "victim, MAD's surrogate, the detectors' own) run: auto (CUDA when a GPU is visible, "
                            "else the CPU), cpu, cuda (an error where there is none)")
    victim: VictimConfig = VictimConfig()
    data: DataConfig = DataConfig()
    defense: DefenseConfig = DefenseConfig()
    detectors: dict[str, DetectorConfig] = Field(
        default_factory=dict, description="detector instances by name (the name prefixes its log columns); the "
                                          "shorthand names are always there")
    attackers: dict[str, AttackerConfig] = {}
    benign: BenignConfig = BenignConfig()
    serve: ServeConfig = ServeConfig()
    log: LogConfig = LogConfig()
    ray: RayConfig = RayConfig()
    robustness: RobustnessConfig = RobustnessConfig()
    undefended_baseline: bool = Field(True, description="with a defense on (or a detector's action=perturb), also "
                                                        "train each attacker's replica on the clean answers to its "
                                                        "queries, for comparison")

    def replica_arch(self, aid: str) -> str:
        """The architecture of attacker ``aid``'s replica (and substitute, student): its own, or the victim's."""
        return self.attackers[aid].replica.arch or self.victim_arch()

    def enabled_detectors(self) -> dict[str, DetectorConfig]:
        """name -> config of the detectors that are on, in the scenario's order."""
        return {name: d for name, d in self.detectors.items() if d.enabled}

    def defense_specs(self) -> dict[str, dict[str, Any]]:
        """Every output defense the victim may answer through: ``defense`` and each enabled detector's
        ``perturb`` (keyed by where they are set)."""
        return {"defense": self.defense.spec(), **{f"detectors.{n}.perturb": d.perturb.spec()
                                                   for n, d in self.enabled_detectors().items()
                                                   if d.action == "perturb"}}

    @model_validator(mode="before")
    @classmethod
    def _with_detector_shorthands(cls, raw: Any) -> Any:
        """Every shorthand detector (``prada``, ``pooled_prada``, …) is there, with its kind and settings under
        what the scenario gives; a new name needs a ``kind``."""
        if not isinstance(raw, dict) or not isinstance(raw.get("detectors") or {}, dict):
            return raw
        from .detectors import names, presets

        shorthands = presets()
        merged = {}
        for name, settings in (raw.get("detectors") or {}).items():
            if isinstance(settings, dict) and "kind" not in settings and name not in shorthands:
                raise ConfigError(f"detectors.{name}.kind is missing: {name!r} is not a shorthand ("
                                  f"{', '.join(shorthands)}); expected detectors.{name}.kind= one of: "
                                  f"{', '.join(names())}")
            if isinstance(settings, dict) and name in shorthands \
                    and settings.get("kind", shorthands[name]["kind"]) == shorthands[name]["kind"]:
                settings = {**shorthands[name], **settings}
            merged[name] = settings
        for name, settings in shorthands.items():
            merged.setdefault(name, dict(settings))
        return {**raw, "detectors": merged}

    @model_validator(mode="after")
    def _components_are_valid(self):
        from . import data, defenses, detectors, models, registry  # late: registries import torch

        for name, det in self.detectors.items():
            if not name.isidentifier():
                raise ValueError(f"detector name {name!r} must be letters, digits and '_' (it prefixes log columns)")
            kind = detectors.get(det.kind, f"detectors.{name}.kind")
            det.__pydantic_extra__ = _own_params(f"detectors.{name}", kind, det.params(),
                                                 list(DetectorConfig.model_fields))
            _calibrated_or_not(f"detectors.{name}", kind, det.params())
        if self.device == "cpu":
            _refuse_inert({"replica_gpus": self.serve.replica_gpus}, {"replica_gpus": None}, "serve.",
                          "device=cuda or device=auto")
        data.check_name("victim.dataset", self.victim.dataset)
        models.check_name("victim.arch", self.victim.arch)
        self._checkpoint_is_usable()
        self._remote_is_usable()
        if self.victim.training == "dp_sgd" and models.has_batch_norm(self.victim.arch):
            raise ValueError(f"victim.training=dp_sgd needs per-sample gradients, which batch norm does not allow, "
                             f"but victim.arch={self.victim.arch!r} has batch norm; expected an architecture "
                             f"without it")
        if self.victim.quantization in ("qat", "divqat") and self.victim.training == "dp_sgd":
            raise ValueError(f"victim.quantization={self.victim.quantization} fine-tunes without DP-SGD, which would "
                             f"void victim.training=dp_sgd's guarantee; expected victim.quantization=ptq or none")
        for field, spec in self.defense_specs().items():
            defenses.check_spec(spec, field=field)
            for name in defenses.names_in(spec):
                needed = defenses.get(name).victim_training
                if needed and self.victim.training != needed:
                    raise ValueError(f"{field} {name} needs victim.training={needed}, but victim.training="
                                     f"{self.victim.training!r}; expected victim.training={needed}")
        for aid, att in self.attackers.items():
            if not aid.replace("_", "").replace("-", "").isalnum():
                raise ValueError(f"attacker id {aid!r} must be letters, digits, '_' or '-'")
            attack = registry.get("attack", att.attack, f"attackers.{aid}.attack")
            att.__pydantic_extra__ = nest(_own_params(f"attackers.{aid}", attack, att.model_extra or {},
                                                       list(AttackerConfig.model_fields)))
            if att.replica.arch is not None:
                models.check_name(f"attackers.{aid}.replica.arch", att.replica.arch)
        self._absolute_paths()
        return self

    def _absolute_paths(self) -> None:
        """Relative local paths made absolute, once checked (the checks' messages show them as given): each names
        the same file in every process of the run, whatever its working directory (a sweep's trials run in their
        own), and the run's config.yaml records where the files were."""
        from . import data, storage

        def data_specs(value):  # a component's parameters: each dataset or pool among them (npz:, folder:)
            if isinstance(value, dict):
                return {k: data_specs(v) for k, v in value.items()}
            return data.absolute(value) if isinstance(value, str) else value

        paths = ((self.victim, "dataset", data.absolute), (self.victim, "checkpoint", storage.absolute),
                 (self.victim, "key_file", storage.absolute), (self.data, "root", storage.absolute),
                 (self.serve, "keys", storage.absolute), (self, "cache_dir", storage.absolute))
        for model, key, absolute in paths:
            value = getattr(model, key)
            if value is not None:
                model.__dict__[key] = absolute(value)  # as checked already (assigning would validate it again)
        for owner in [*self.attackers.values(), *self.detectors.values()]:
            owner.__pydantic_extra__ = data_specs(owner.__pydantic_extra__)

    def check_run(self) -> None:
        """What a run (and each trial of a sweep) needs beyond what serve mode does, whose clients are someone
        else's: its clients' requests within ``serve.max_images``, and none of serve mode's own settings."""
        for key in ("keys", "accounts"):
            if getattr(self.serve, key) != ServeConfig.model_fields[key].default:
                raise ConfigError(f"serve.{key}={getattr(self.serve, key)!r} is read by serve mode only (python -m sim "
                                  f"serve scenario=…); expected it unset in a run, whose accounts are its attackers' "
                                  f"and benign users'")
        batches = {f"attackers.{aid}.batch_size": a.batch_size for aid, a in self.attackers.items()}
        batches["benign.batch_size"] = self.benign.batch_size
        for key, size in batches.items():
            if size > self.serve.max_images:
                raise ConfigError(f"{key}={size} exceeds serve.max_images={self.serve.max_images}, so every "
                                  f"request would be refused; expected at most {self.serve.max_images}")

    def components(self) -> list[tuple[str, str]]:
        """(category, name) of every model, defense, detector and attack the scenario names: what Ray workers run."""
        from . import defenses

        out = [("model", self.victim.arch)]
        for att in self.attackers.values():
            out.append(("attack", att.attack))
            if att.replica.arch:
                out.append(("model", att.replica.arch))
        out += [("defense", n) for spec in self.defense_specs().values() for n in defenses.names_in(spec)]
        out += [("detector", d.kind) for d in self.enabled_detectors().values()]
        return list(dict.fromkeys(out))

    def victim_arch(self) -> str | None:
        return self.victim.architecture()

    def _remote_is_usable(self) -> None:
        """With ``victim.url`` or ``victim.client``: one of them, a readable key file, nothing to train or defend."""
        from . import defenses, registry

        v = self.victim
        if v.url is not None and v.client is not None:
            raise ConfigError(f"victim.url={v.url!r} and victim.client={v.client!r} both name the remote victim; "
                              f"expected one of them")
        if v.url is not None and not v.url.startswith(("http://", "https://")):
            raise ConfigError(f"victim.url={v.url!r} must be an http:// or https:// URL")
        if v.client is not None:
            registry.load("client", v.client, "victim.client")
        if v.key_file is not None:
            if not v.remote():
                raise ConfigError(f"victim.key_file={v.key_file!r} is for a remote victim; expected victim.url too")
            from .cli import load_keys

            try:
                load_keys(os.path.expanduser(v.key_file))
            except ValueError as exc:
                raise ConfigError(str(exc).replace("serve.keys=", "victim.key_file=")) from None
        if not v.remote():
            return
        if v.checkpoint is not None:
            raise ConfigError(f"victim.checkpoint={v.checkpoint!r} and a remote victim ({v.url or v.client}) both "
                              f"name the victim; expected one of them")
        if not defenses.is_identity(self.defense.spec()):
            raise ConfigError(f"defense={self.defense.name!r}: a remote victim answers through its own defense, "
                              f"which this tool cannot add to; expected defense=identity")

    def _checkpoint_is_usable(self) -> None:
        """With ``victim.checkpoint``: nothing that trains the victim, and an architecture for whatever needs one."""
        from . import defenses

        path = self.victim.checkpoint
        if path is None:
            return
        where = f"victim.checkpoint={path!r}"
        if not os.path.isfile(os.path.expanduser(path)):
            what = "a directory" if os.path.isdir(os.path.expanduser(path)) else "no such file"
            raise ConfigError(f"{where}: {what}; expected a state dict (torch.save) or a TorchScript file")
        v = self.victim
        for key, value, default in (("training", v.training, "standard"), ("quantization", v.quantization, "none")):
            if value != default:
                raise ConfigError(f"victim.{key}={value} trains the victim, but {where} is a trained one; expected "
                                  f"victim.{key}={default} (see docs/own-components.md for what needs training)")
        for field, spec in self.defense_specs().items():
            for name in defenses.names_in(spec):
                if defenses.get(name).victim_training:
                    raise ConfigError(f"{field} {name} needs a victim trained with victim.training="
                                      f"{defenses.get(name).victim_training}, which {where} is not; expected another "
                                      f"defense (see docs/own-components.md)")
        if self.victim_arch() is not None:
            return
        for aid, att in self.attackers.items():
            if att.replica.arch is None:
                raise ConfigError(f"attackers.{aid}.replica.arch is needed: {where} is TorchScript, which has no "
                                  f"architecture for replicas; expected attackers.{aid}.replica.arch=NAME or "
                                  f"module:attr (or victim.arch=NAME for every replica)")
        for field, spec in self.defense_specs().items():
            for name in defenses.names_in(spec):
                if "victim" in inspect.signature(defenses.get(name).__init__).parameters:
                    raise ConfigError(f"{field} {name} needs the victim's architecture, which {where} (TorchScript) "
                                      f"does not give; expected victim.arch=NAME naming it")


# ----------------------------------------------------------------------------------------------
# Loading

def yaml_names(folder) -> list[str]:
    """Names of the YAML files shipped in a package folder (``importlib.resources`` traversable)."""
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def scenario_names() -> list[str]:
    return yaml_names(importlib.resources.files("scenarios"))


class _UniqueKeys(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML itself keeps the last one without a word:
    a second ``detectors:`` block would drop the first)."""

    def construct_mapping(self, node, deep=False):
        first: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # ``<<: *base``, whose keys the mapping may override
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                line = first.get(key)
            except TypeError:  # an unhashable key: the loader's own error follows
                continue
            if line is not None:  # on another line or the same one ({a: 1, a: 2})
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice in one mapping (first at line {line}); expected each "
                                f"key once", key_node.start_mark)
            first[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def read_mapping(name_or_path: str, kind: str, folder) -> dict:
    """A YAML mapping: a shipped file ``folder/NAME.yaml`` or a path to one; ``kind`` names it in errors."""
    path, names = Path(name_or_path), yaml_names(folder)
    if name_or_path.endswith((".yaml", ".yml")) and path.exists():
        text = path.read_text()
    elif name_or_path in names:
        text = (folder / f"{name_or_path}.yaml").read_text()
    elif name_or_path.endswith((".yaml", ".yml")):
        raise ConfigError(f"{kind}={name_or_path!r}: no such file; expected the path of an existing .yaml file (or "
                          f"one of: {', '.join(names)})")
    else:
        raise ConfigError(f"{kind}={name_or_path!r} is not a known {kind}; "
                          f"expected one of: {', '.join(names)} (or a path to a .yaml file)")
    try:
        raw = yaml.load(text, _UniqueKeys)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        what = getattr(exc, "problem", None) or first_line(exc)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{kind} {name_or_path!r} is not valid YAML{where}: {what}") from None
    if raw is None:  # an empty file is a mistake more often than a wish for every default
        hint = " (extends: NAME starts from another scenario)" if kind == "scenario" else ""
        raise ConfigError(f"{kind} {name_or_path!r} is empty; expected a mapping of keys{hint}")
    if not isinstance(raw, dict):
        raise ConfigError(f"{kind} {name_or_path!r} must be a mapping of keys, got {type(raw).__name__}")
    return raw


def beside(file: str, ref: str) -> str:
    """``ref``, a .yaml path that ``file`` names, looked for beside ``file`` first (a file's ``extends``, a sweep
    file's ``scenario``); else as given (a name, or a path from the current directory)."""
    near = Path(file).parent / ref
    if ref.endswith((".yaml", ".yml")) and not Path(ref).is_absolute() and near.exists():
        return os.path.normpath(near)
    return ref


def _read_yaml(name_or_path: str, seen: tuple[str, ...] = ()) -> dict:
    raw = read_mapping(name_or_path, "scenario", importlib.resources.files("scenarios"))
    base = raw.pop("extends", None)
    if base is None:
        raw.setdefault("name", Path(name_or_path).stem)
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"extends={base!r} in {name_or_path!r} is not a scenario; expected a scenario name or "
                          f"the path of a .yaml file")
    near, found = Path(name_or_path).parent / base, beside(name_or_path, base)
    if found != base:
        base = found
    elif base not in scenario_names() and near.with_name(f"{near.name}.yaml").exists():
        raise ConfigError(f"extends={base!r} in {name_or_path!r} is not a shipped scenario; expected "
                          f"extends: {base}.yaml for the file beside it")
    if _same_file(base, seen + (name_or_path,)):
        raise ConfigError(f"extends={base!r} makes a cycle: {' -> '.join(seen + (name_or_path, base))}")
    try:
        parent = _read_yaml(base, seen + (name_or_path,))
    except ConfigError as exc:  # say which file's extends led there
        raise ConfigError(f"extends={base!r} in {name_or_path!r}: {exc}") from None
    return {**_extended(parent, raw, f"{name_or_path!r} (extends {base!r})"),
            "name": raw.get("name", Path(name_or_path).stem)}


def _extended(parent: dict, raw: dict, what: str) -> dict:
    """Scenario ``raw`` on top of the scenario it extends (``what`` names the pair in errors): where it gives an
    entry another kind, the parent's parameters of the old kind are dropped first."""
    _drop_replaced_kinds(parent, raw)
    try:
        return OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(parent), OmegaConf.create(raw)))
    except TypeError:  # a list where the base has a mapping, or the other way round
        raise ConfigError(f"{what}: " + _kind_clash(parent, raw).replace("bad override: ", "")) from None
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{what}: {first_line(exc)}") from None


def _drop_replaced_kinds(base: dict, child: dict) -> None:
    """Where a scenario gives an entry of its base another kind (an attacker's attack, a detector's kind, the
    defense's name), the base's parameters of the old kind are not merged into it, as for the same change on the
    command line."""
    for section, (field, _, _) in _KINDED.items():
        for name, entry in (child.get(section) or {}).items() if isinstance(child.get(section), dict) else ():
            if isinstance(entry, dict) and field in entry:
                _switch_kind(base, f"{section}.{name}.{field}", entry[field])
    new, old = child.get("defense"), base.get("defense")
    new = new.get("name") if isinstance(new, dict) else new
    if isinstance(new, str) and new != (old.get("name", "identity") if isinstance(old, dict) else old):
        base["defense"] = {"name": new}


def _same_file(name_or_path: str, chain: tuple[str, ...]) -> bool:
    """Whether a scenario name or path is one already in ``chain`` (paths compared as the files they reach)."""
    def key(item: str) -> str:
        return os.path.realpath(item) if item.endswith((".yaml", ".yml")) else item

    return key(name_or_path) in {key(item) for item in chain}


def load(scenario: str | dict | ScenarioConfig, overrides: list[str] | dict | None = None, *,
         variants: list[dict] = ()) -> ScenarioConfig:
    """Scenario name, path or mapping + overrides -> validated :class:`ScenarioConfig`. ``variants``: nested
    settings that runs of it will add (a sweep's ``vary`` values); an override without effect on the scenario
    itself passes if it has one in a variant."""
    if isinstance(scenario, ScenarioConfig):
        raw = scenario.model_dump()
    elif isinstance(scenario, dict):
        raw = dict(scenario)
        if "extends" in raw:  # as in a scenario file: on top of a shipped scenario or a file
            base = raw.pop("extends")
            if not isinstance(base, str):
                raise ConfigError(f"extends={base!r} is not a scenario; expected a scenario name or the path of a "
                                  f".yaml file")
            parent = _read_yaml(base)
            raw = {**_extended(parent, raw, f"a scenario mapping (extends {base!r})"),
                   "name": raw.get("name", parent.get("name"))}
    else:
        raw = _read_yaml(str(scenario))
    if isinstance(raw.get("defense"), str):  # `defense: mad` is short for `defense: {name: mad}`
        raw["defense"] = {"name": raw["defense"]}
    overrides = _checked_overrides(overrides)
    if overrides and isinstance(overrides, dict):  # an attack, detector kind or defense switched: as in a file
        _drop_replaced_kinds(raw, overrides)
    if overrides and not isinstance(overrides, dict):
        # `defense=NAME` picks a new defense (dropping the scenario's parameters for the old one) before
        # any `defense.PARAM=VALUE` applies, whatever their order on the command line; likewise
        # `attackers.ID.attack=KIND` and `detectors.NAME.kind=KIND` drop what the new kind does not declare
        for item in overrides:
            key, _, value = item.partition("=")
            if key == "defense":
                if value.lstrip().startswith(("{", "[")):
                    raise ConfigError(f"defense={value!r} is not a defense name; expected defense=NAME (or A+B) "
                                      f"and its parameters as defense.PARAM=VALUE")
                raw["defense"] = {"name": value}
            _switch_kind(raw, key, value)
        overrides = [item for item in overrides if not item.startswith("defense=")]
    conf = OmegaConf.create(raw)
    scenario_attackers = list(raw["attackers"]) if isinstance(raw.get("attackers"), dict) else []
    if overrides:
        try:
            if isinstance(overrides, dict):
                extra = OmegaConf.create(overrides)
            else:
                for item in overrides:
                    if "=" not in item:
                        raise ConfigError(f"override {item!r} must look like key=value")
                    try:
                        OmegaConf.from_dotlist([item])
                    except yaml.YAMLError:
                        key, _, value = item.partition("=")
                        raise ConfigError(f"{key}={value!r} is not a value; expected a number, a word, [a, list] or "
                                          f"{{a: mapping}} (quote a value that holds YAML's symbols)") from None
                extra = OmegaConf.from_dotlist(list(overrides))
            conf = OmegaConf.merge(conf, extra)
        except OmegaConfBaseException as exc:
            raise ConfigError(f"bad override: {first_line(exc)}") from None
        except TypeError:  # a list given where the scenario has a mapping, or the other way round
            raise ConfigError(_kind_clash(raw, extra)) from None
    try:
        raw = OmegaConf.to_container(conf, resolve=True)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"cannot resolve an interpolation: {first_line(exc)}") from None
    _warn_near_misses(scenario_attackers, raw.get("attackers"))
    if "detector" in raw:  # `detector.prada.action=refuse` reads naturally too: same as `detectors.…`
        alias = raw.pop("detector")
        if not isinstance(alias, dict):
            raise ConfigError(f"detector={alias!r} must be a mapping like detectors (detector.prada.action=…)")
        raw["detectors"] = OmegaConf.to_container(OmegaConf.merge(raw.get("detectors") or {}, alias or {}))
    cfg = validate(raw)
    if overrides and not isinstance(overrides, dict):
        _untrained_checkpoint(cfg, overrides)
        trials = _Variants(cfg, variants)
        _inert_overrides(cfg, overrides, trials)
        _warn_off_detectors(cfg, overrides, trials)
    return cfg


def _untrained_checkpoint(cfg: ScenarioConfig, overrides: list[str]) -> None:
    """The victim's training settings given beside ``victim.checkpoint``, which is trained already: nothing would
    use them (those the scenario file gives are its own, for when it trains, and pass)."""
    given = ("checkpoint", cfg.victim.checkpoint, "a trained one") if cfg.victim.checkpoint is not None else \
        ("url", cfg.victim.url, "one this tool does not serve") if cfg.victim.url is not None else None
    if given is None:
        return
    field, where, what = given
    trains = ("victim.epochs", "victim.batch_size", "victim.lr") + (
        ("victim.training", "victim.quantization") if field == "url" else ())
    for item in overrides:
        key, _, value = item.partition("=")
        if key in trains or (field == "url" and key.startswith(("victim.dp.", "victim.quant.", "victim.divqat.",
                                                                  "victim.adversarial.", "victim.oe_weight"))):
            raise ConfigError(f"{key}={value} trains the victim, but victim.{field}={where!r} is {what}; expected no "
                              f"{key} with a {field}")


def _inert_needs(cfg: ScenarioConfig) -> dict[str, tuple[bool, str]]:
    """Settings that have effect only with another: key (or key prefix ending in a dot) -> (whether the other is
    there, the other setting)."""
    v, b = cfg.victim, cfg.benign
    return {
        "victim.dp.": (v.training == "dp_sgd", "victim.training=dp_sgd"),
        "victim.oe_weight": (v.training == "outlier_exposure", "victim.training=outlier_exposure"),
        "victim.adversarial.": (v.training == "adversarial" or cfg.robustness.enabled,  # also robust accuracy's PGD
                                "victim.training=adversarial or robustness.enabled=true"),
        "victim.quant.": (v.quantization != "none", "victim.quantization=ptq, qat or divqat"),
        "victim.divqat.": (v.quantization == "divqat", "victim.quantization=divqat"),
        "serve.port": (cfg.serve.http, "serve.http=true"),
        "benign.popular_images": (b.popular > 0, "benign.popular above 0"),
    }


class _Variants:
    """The scenarios a sweep's trials run (``cfg`` with each of ``variants`` on top), loaded on first use: most
    overrides need none of them. One that a sweep's own checks refuse later is left out here."""

    def __init__(self, cfg: ScenarioConfig, variants: list[dict]):
        self._cfg, self._variants, self._loaded = cfg, variants, None

    def __iter__(self):
        if self._loaded is None:
            self._loaded = []
            for extra in self._variants:
                with contextlib.suppress(ConfigError):
                    self._loaded.append(load(self._cfg.model_dump(), extra))
        return iter(self._loaded)


def _inert_overrides(cfg: ScenarioConfig, overrides: list[str], variants: _Variants) -> None:
    """A setting given on the command line that the scenario's other settings leave without effect (DP-SGD's noise
    for a victim trained without DP-SGD, say) is refused: the run would otherwise go ahead without what was asked
    for. Those a scenario file gives are its own, for the variants it is run in, and pass; so does one that has
    effect in one of ``variants`` (a sweep's trials)."""
    needs, varied = _inert_needs(cfg), None
    for item in overrides:
        key, _, value = item.partition("=")
        for prefix, (effect, setting) in needs.items():
            if effect or not (key == prefix or (prefix.endswith(".") and key.startswith(prefix))):
                continue
            if varied is None:  # the variants' own needs
                varied = [_inert_needs(other) for other in variants]
            if not any(other[prefix][0] for other in varied):
                raise ConfigError(f"{key}={value} has no effect unless {setting}; expected {setting}, or no {key}")


def _warn_off_detectors(cfg: ScenarioConfig, overrides: list[str], variants: _Variants) -> None:
    """An override that sets a detector which stays off (``detectors.same.action=refuse`` without ``enabled=true``:
    SAME, MSP and linking are off by default) changes nothing: say so, unless one of ``variants`` (a sweep's trials)
    turns it on."""
    on_in_variants = None
    for item in overrides:
        key = item.partition("=")[0]
        parts = key.split(".")
        if len(parts) > 2 and parts[0] in ("detectors", "detector") and parts[2] not in ("enabled", "kind"):
            det = cfg.detectors.get(parts[1])
            if det is not None and not det.enabled:
                if on_in_variants is None:  # the detectors some variant turns on
                    on_in_variants = {n for other in variants for n, d in other.detectors.items() if d.enabled}
                if parts[1] in on_in_variants:
                    continue
                log.warning("%s has no effect: detectors.%s is off (detectors.%s.enabled=true turns it on)", item,
                            parts[1], parts[1])


def _warn_near_misses(before: list[str], attackers: Any) -> None:
    """An override that names an attacker the scenario lacks adds one (as documented); when its id is a near miss of
    one the scenario has (``attackers.distribted.budget=5``), say so, since a typo would otherwise run another
    experiment without a word."""
    if not isinstance(attackers, dict):
        return
    for aid in attackers:
        if aid in before:
            continue
        near = difflib.get_close_matches(str(aid), before, n=1, cutoff=0.8)
        given = attackers[aid] if isinstance(attackers[aid], dict) else {}
        attack = given.get("attack", AttackerConfig.model_fields["attack"].default)
        if near:
            log.warning("attackers.%s is not an attacker of this scenario, so the override adds one (attack %s); "
                        "did you mean attackers.%s?", aid, attack, near[0])
        elif "attack" not in given and before:  # added without naming its attack: likely another scenario's id
            log.warning("attackers.%s is not an attacker of this scenario (its attackers: %s), so the override adds "
                        "one with the default attack %s; name its attack (attackers.%s.attack=…) to add one on "
                        "purpose", aid, ", ".join(before), attack, aid)


def _checked_overrides(overrides: Any) -> list[str] | dict | None:
    """Overrides as :func:`load` takes them: ``key=value`` strings, or a mapping (nested as a scenario file is; its
    numpy numbers made plain, its ``defense: NAME`` short for ``defense: {name: NAME}``)."""
    if overrides is None or isinstance(overrides, dict):
        if overrides:
            overrides = _plain(overrides)
            if isinstance(overrides.get("defense"), str):
                overrides["defense"] = {"name": overrides["defense"]}
            dotted = [k for k in overrides if isinstance(k, str) and "." in k]
            if dotted:
                head, _, rest = dotted[0].partition(".")
                raise ConfigError(f"overrides key {dotted[0]!r}: a mapping of overrides is nested as a scenario file "
                                  f"is; expected {{{head!r}: {{{rest!r}: …}}}}, or the list form "
                                  f"['{dotted[0]}=…']")
        return overrides
    if isinstance(overrides, (str, bytes)) or not isinstance(overrides, (list, tuple)):
        raise ConfigError(f"overrides={shown(overrides)} is not a list (a {type(overrides).__name__}); expected a "
                          f"list of 'key=value' strings (or a mapping)")
    bad = [o for o in overrides if not isinstance(o, str)]
    if bad:
        raise ConfigError(f"override {bad[0]!r} is not a string (a {type(bad[0]).__name__}); expected a 'key=value' "
                          f"string")
    return list(overrides)


def _plain(value: Any) -> Any:
    """Numpy scalars and arrays in a mapping of overrides as plain Python numbers and lists."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value.tolist() if hasattr(value, "tolist") and type(value).__module__ == "numpy" else value


def _kind_clash(raw: Any, extra, prefix: str = "") -> str:
    """The message for overrides ``extra`` whose value is a list where ``raw`` has a mapping (or the reverse)."""
    flat = extra if isinstance(extra, dict) else OmegaConf.to_container(extra)
    for key, value in flat.items():
        name, have = f"{prefix}{key}", raw.get(key) if isinstance(raw, dict) else None
        if isinstance(value, list) and isinstance(have, dict):
            return f"{name}={value!r} is a list; {name} must be a mapping of keys ({name}.KEY=VALUE)"
        if isinstance(value, dict) and isinstance(have, list):
            return f"{name}={value!r} is a mapping; {name} must be a list ({name}=[A, B])"
        if isinstance(value, dict) and isinstance(have, dict):
            return _kind_clash(have, value, f"{name}.")
    return f"bad override: {flat!r} cannot merge with the scenario (a list where a mapping is expected, or the reverse)"


_KINDED = {"attackers": ("attack", "attack", AttackerConfig), "detectors": ("kind", "detector", DetectorConfig)}


def _switch_kind(raw: dict[str, Any], key: str, kind: str) -> None:
    """For an override ``attackers.ID.attack=KIND`` or ``detectors.NAME.kind=KIND`` that changes the kind of an
    entry of ``raw``: keep of that entry the keys every attacker (detector) has and the parameters the new kind
    declares, and drop the rest (the old kind's own parameters)."""
    from . import detectors, registry

    section, _, rest = key.partition(".")
    name, _, field = rest.rpartition(".")
    if section not in _KINDED or field != _KINDED[section][0]:
        return
    _, category, model = _KINDED[section]
    old = (raw.get(section) or {}).get(name)
    if not isinstance(old, dict) or not isinstance(kind, str):
        return
    if kind not in registry.names(category):
        if ":" not in kind:  # an unknown name: validation says so
            return
        registry.check_name(category, key, kind)  # a plug-in, loaded now (or a one-line error naming the key)
    implied = (detectors.presets().get(name, {}).get("kind") if section == "detectors"
               else model.model_fields[field].default)  # a shorthand's kind, or the default attack
    if old.get(field, implied) == kind:
        return
    common = {k: v for k, v in old.items() if k in model.model_fields}
    declared = registry.get(category, kind).params
    own = {k: v for k, v in _flatten({k: v for k, v in old.items() if k not in common}).items() if k in declared}
    raw[section] = {**raw[section], name: {**common, **nest(own)}}


def validate(raw: dict[str, Any]) -> ScenarioConfig:
    try:
        return ScenarioConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc)) from None


def _fields_at(loc: tuple, root: type[BaseModel]) -> list[str]:
    """Known keys of the model reached by following ``loc`` from ``root``."""
    model: Any = root
    for part in loc:
        if isinstance(model, type) and issubclass(model, BaseModel):
            field = model.model_fields.get(str(part))
            model = field.annotation if field else None
        elif getattr(model, "__origin__", None) is dict:
            model = model.__args__[1]
        else:
            return []
    if getattr(model, "__origin__", None) is dict:
        return ["<any id>"]
    return list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


def _one_line(exc: ValidationError, root: type[BaseModel] | None = None, prefix: str = "") -> str:
    """A pydantic error as one line naming the key (``prefix`` + dotted path), the value and what was expected."""
    err = exc.errors()[0]
    loc = tuple(p for p in err["loc"])
    key = prefix + ".".join(str(p) for p in loc)
    if err["type"] == "extra_forbidden":
        known = _fields_at(loc[:-1], root or ScenarioConfig)
        return f"unknown key {key!r}; known keys here: {', '.join(known)}"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    value = err.get("input")
    if err["type"] == "missing":
        return f"{key} is missing; expected {key}=VALUE beside the keys given"
    if err["type"] in ("model_type", "model_attributes_type", "dict_type") and not isinstance(value, dict):
        return f"{key} must be a mapping of keys ({key}.KEY=VALUE), got {_shown(value)}"
    if err["type"] in ("value_error", "assertion_error") and isinstance(value, dict):  # a model's own check
        return f"{key}: {msg}" if key else msg
    msg = msg.replace("Input should be", "must be").replace("greater than or equal to", ">=").replace(
        "less than or equal to", "<=").replace("greater than", ">").replace("less than", "<")
    msg = re.sub(r", (got |unable to ).*$", "", msg)  # pydantic's own reason, whose value the line shows
    where = f"{key} " if key else ""
    return f"{where}{msg[0].lower() + msg[1:]}, got {_shown(value)}"


def _shown(value: Any) -> str:
    return "null (an empty value)" if value is None else repr(value)


def to_yaml(cfg: ScenarioConfig) -> str:
    """The scenario as YAML with every parameter, defaults included: the output defense's and each perturbing
    detector's too (a chain: each member's under its name), which the scenario holds only as given."""
    from . import defenses

    def full(spec: dict) -> dict:
        return {"name": spec.get("name", "identity"), **defenses.resolved(spec)}

    data = cfg.model_dump(mode="json")
    data["defense"] = full(cfg.defense.spec())
    for name, det in cfg.detectors.items():
        if det.action == "perturb":
            data["detectors"][name]["perturb"] = full(det.perturb.spec())
    return yaml.safe_dump(data, sort_keys=False)

"""Scenario configuration: YAML files merged with ``key=value`` overrides, validated into typed models.

A scenario is ``scenarios/NAME.yaml`` (shipped as package data) or a path to a YAML file.
A scenario may start with ``extends: OTHER`` to take another scenario as its base.
Overrides are OmegaConf dotlist entries (``attackers.distributed.accounts=50``).
Validation is pydantic with ``extra="forbid"``: an unknown key is an error that lists the known ones.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DPConfig(_Strict):
    noise_multiplier: float = Field(1.0, ge=0, description="DP-SGD noise, in multiples of max_grad_norm")
    max_grad_norm: float = Field(1.0, gt=0, description="DP-SGD per-sample gradient clipping norm")
    delta: float = Field(1e-5, gt=0, lt=1, description="delta at which epsilon is reported")


class VictimConfig(_Strict):
    name: str = Field("victim", pattern=r"^[A-Za-z0-9_-]+$", description="victim name (Serve app name)")
    dataset: str = Field("mnist5k", description="dataset the victim is trained on")
    arch: str = Field("lenet", description="victim architecture")
    epochs: int = Field(10, ge=1, description="victim training epochs")
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    training: Literal["standard", "outlier_exposure", "dp_sgd"] = Field(
        "standard", description="how the victim is trained (dp_sgd: a training-time defense)")
    oe_weight: float = Field(0.5, gt=0, description="outlier-exposure loss weight (training=outlier_exposure)")
    dp: DPConfig = DPConfig()


class DataConfig(_Strict):
    root: str | None = Field(None, description="dataset root (default: per dataset)")
    download: bool = Field(False, description="let torchvision readers download")


class DefenseConfig(BaseModel):
    """``name`` plus the defense's own parameters as extra keys (a chain: one mapping per member)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    name: str = Field("identity", description="output defense, or several joined by '+' (a chain); parameters: "
                                              "defense.PARAM=… (chain: defense.MEMBER.PARAM=…)")

    def spec(self) -> dict[str, Any]:
        return self.model_dump()


class PerturbConfig(DefenseConfig):
    name: str = Field("mad", description="output defense a flagged query is answered through (action=perturb), "
                                         "with its parameters as keys, like `defense`")


class PowConfig(_Strict):
    bits_min: int = Field(8, ge=1, le=24, description="proof-of-work bits at the detector's threshold")
    bits_max: int = Field(16, ge=1, le=24, description="proof-of-work bits at `saturate` and above (a request's "
                                                       "puzzle adds log2 of its challenged queries)")
    saturate: float | None = Field(None, description="score at which the puzzle reaches bits_max (default: "
                                                     "PRADA 2 x (1 - delta); calibrated detectors the benign "
                                                     "score quantile 1 - target_fpr / 10)")

    @model_validator(mode="after")
    def _ordered(self):
        if self.bits_min > self.bits_max:
            raise ValueError(f"bits_min ({self.bits_min}) must be <= bits_max ({self.bits_max})")
        return self


class PolicyConfig(_Strict):
    """What is done with the queries a detector flags (see sim.policy)."""

    enabled: bool = False
    action: Literal["answer", "refuse", "perturb", "proof_of_work"] = Field(
        "answer", description="what a flagged query gets: answer (log only), refuse, perturb (through "
                              "`perturb`'s defense), proof_of_work (a hash puzzle first)")
    pow: PowConfig = PowConfig()
    perturb: PerturbConfig = PerturbConfig()

    kind: ClassVar[str]

    def params(self) -> dict[str, Any]:
        """The detector's own parameters."""
        skip = set(PolicyConfig.model_fields) | {"group", "target_fpr"}
        return {k: v for k, v in self.model_dump().items() if k not in skip}


class PradaConfig(PolicyConfig):
    kind: ClassVar[str] = "prada"
    enabled: bool = True
    delta: float = Field(0.95, gt=0, le=1, description="Shapiro-Wilk W threshold")
    min_pool: int = Field(50, ge=3, description="distances pooled before PRADA may flag")
    group: Literal["account", "actor", "cohort", "all"] = Field(
        "account", description="whose queries form one history: each account, each client actor (a client "
                               "address), each account cohort (a sign-up batch), or all traffic")
    skip_repeats: bool = Field(False, description="an exact repeat of an earlier query adds no distance")


class PooledPradaConfig(PradaConfig):
    """PRADA over the pooled queries of a group of accounts: a second PRADA beside the per-account one."""

    enabled: bool = False
    group: Literal["account", "actor", "cohort", "all"] = Field(
        "all", description="whose queries form one history: all traffic, each client actor (a client address), "
                           "each account cohort (a sign-up batch), or each account")
    skip_repeats: bool = Field(True, description="an exact repeat adds no distance (honest users share popular images)")


class StatelessConfig(PolicyConfig):
    threshold: float | None = Field(None, description="flag queries scoring above this (default: calibrated "
                                                      "from target_fpr)")
    target_fpr: float | None = Field(0.05, gt=0, lt=1, description="set the threshold so that this fraction of "
                                                                   "the defender's held-out benign images is flagged")


class SameConfig(StatelessConfig):
    kind: ClassVar[str] = "same"
    weight: float = Field(1.0, ge=0, description="weight of the standardised deviation term (0: reconstruction only)")
    patch: int = Field(4, ge=1, description="MAE patch side in pixels")
    dim: int = Field(64, ge=4, description="MAE encoder embedding size")
    depth: int = Field(3, ge=1, description="MAE encoder blocks")
    heads: int = Field(4, ge=1, description="attention heads")
    decoder_dim: int = Field(64, ge=4)
    decoder_depth: int = Field(1, ge=1)
    mask_ratio: float = Field(0.75, gt=0, lt=1, description="fraction of patches hidden")
    epochs: int = Field(100, ge=1, description="MAE training epochs")
    aux_epochs: int = Field(10, ge=1, description="auxiliary model training epochs")
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0)

    def params(self) -> dict[str, Any]:
        return {"weight": self.weight, "threshold": self.threshold}

    def mae_config(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("patch", "dim", "depth", "heads", "decoder_dim", "decoder_depth",
                                              "mask_ratio")}


class MspConfig(StatelessConfig):
    kind: ClassVar[str] = "msp"
    model: Literal["victim", "oe"] = Field("victim", description="whose softmax: the served victim's, or an "
                                                                 "outlier-exposure copy's (trained and cached)")

    def params(self) -> dict[str, Any]:
        return {"threshold": self.threshold}


class MspOeConfig(MspConfig):
    """The maximum-softmax baseline on an outlier-exposure copy of the victim, beside the plain one."""

    model: Literal["victim", "oe"] = Field("oe", description="whose softmax (default: the outlier-exposure copy's)")


class LinkConfig(PolicyConfig):
    kind: ClassVar[str] = "link"
    every: int = Field(500, ge=1, description="re-cluster the accounts every this many queries")
    min_queries: int = Field(10, ge=1, description="queries an account needs before it is linked")
    distance: float = Field(0.3, gt=0, description="Hellinger distance at which the cluster tree is cut")
    min_accounts: int = Field(2, ge=1, description="smallest cluster judged by PRADA")
    delta: float = Field(0.95, gt=0, le=1, description="PRADA's W threshold on a cluster's pooled queries")
    min_pool: int = Field(50, ge=3)


class DetectorsConfig(_Strict):
    prada: PradaConfig = PradaConfig()
    pooled_prada: PooledPradaConfig = PooledPradaConfig()
    same: SameConfig = SameConfig()
    msp: MspConfig = MspConfig()
    msp_oe: MspOeConfig = MspOeConfig()
    link: LinkConfig = LinkConfig()

    def enabled(self) -> dict[str, PolicyConfig]:
        """name -> config of the detectors that are on (the name prefixes their log columns)."""
        return {name: getattr(self, name) for name in type(self).model_fields if getattr(self, name).enabled}

    def stateful(self) -> list[str]:
        return [n for n, d in self.enabled().items() if d.kind in ("prada", "link")]


class ReplicaConfig(_Strict):
    arch: str | None = Field(None, description="replica architecture (default: the victim's)")
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    optimizer: Literal["adam", "sgd"] = Field("adam", description="replica optimizer (sgd: momentum 0.9)")
    labels: Literal["soft", "hard"] = "soft"


class JacobianConfig(_Strict):
    seed_size: int = Field(150, ge=1, description="seed images from the victim's test split (never trained on)")
    lam: float = Field(0.1, gt=0, le=1, description="step size of the Jacobian augmentation")
    rounds: int = Field(6, ge=0, description="augmentation rounds")
    tau: int = Field(3, ge=1, description="the step's sign flips every tau rounds")
    substitute_epochs: int = Field(10, ge=1, description="substitute training epochs per round")


class DFMEConfig(_Strict):
    batch: int = Field(64, ge=1, description="generator images per step (B)")
    directions: int = Field(1, ge=1, description="random directions per image of the gradient estimate (m)")
    step: float | None = Field(None, gt=0, le=1, description="forward-difference step, L2 norm in [0, 1] pixel "
                                                             "units (default sqrt(C*H*W)/255: one gray level RMS)")
    generator_steps: int = Field(1, ge=1, description="generator updates per iteration")
    student_steps: int = Field(5, ge=1, description="student updates per iteration")
    lr_student: float = Field(0.1, gt=0, description="student SGD learning rate (momentum 0.9)")
    lr_generator: float = Field(1e-4, gt=0, description="generator Adam learning rate")
    nz: int = Field(100, ge=1, description="generator noise dimension")


class AdaptiveConfig(_Strict):
    arms: Literal["labels", "clusters"] = Field("labels", description="bandit arms: the pool's classes, or coarse "
                                                                       "groups found by k-means on the pool images")
    clusters: int = Field(10, ge=2, description="k-means groups when arms=clusters")
    lr: float = Field(0.01, gt=0, description="gradient-bandit step size")
    rewards: list[Literal["certainty", "diversity", "loss"]] = Field(
        ["certainty", "diversity", "loss"], min_length=1, description="reward signals, summed once standardised")
    window: int = Field(25, ge=1, description="answers averaged by the diversity reward")


class AttackerConfig(_Strict):
    attack: Literal["knockoff", "jbda", "jb_self", "jb_top3", "dfme"] = "knockoff"
    pool: str = Field("digits", description="natural query pool of Knockoff: a dataset name, or several joined "
                                            "by '+' (their train and test images together)")
    strategy: Literal["random", "adaptive"] = Field("random", description="Knockoff: random sampling or the "
                                                                         "gradient bandit over the pool's classes")
    adaptive: AdaptiveConfig = AdaptiveConfig()
    sample_with_replacement: bool = Field(False, description="Knockoff: draw pool images with replacement, so "
                                                                 "the budget may exceed the pool")
    augment: bool = Field(False, description="Knockoff: shift (up to 2 px) and rescale the brightness of each query")
    jacobian: JacobianConfig = JacobianConfig()
    dfme: DFMEConfig = DFMEConfig()
    budget: int = Field(1000, ge=1, description="total queries of this attacker")
    accounts: int = Field(1, ge=1, description="accounts the budget is split over")
    cohort_size: int | None = Field(None, ge=1, description="accounts created per sign-up batch (a cohort, which "
                                                            "the victim logs and may group by); default: all at once")
    actors: int = Field(1, ge=1, description="Ray actors sharing the accounts")
    split: Literal["round_robin", "random", "blocks"] = "round_robin"
    account_cap: int | None = Field(None, ge=1, description="most queries one account sends, then it retires "
                                                            "(e.g. below PRADA's min_pool)")
    max_rate: float | None = Field(None, gt=0, description="pacing: most queries per second per account")
    churn: bool = Field(False, description="retire an account the victim refused and go on with the others")
    batch_size: int = Field(64, ge=1, description="images per request")
    replica: ReplicaConfig = ReplicaConfig()

    @model_validator(mode="after")
    def _actors_have_accounts(self):
        if self.actors > self.accounts:
            raise ValueError(f"actors ({self.actors}) must be <= accounts ({self.accounts}): "
                             "each actor needs at least one account")
        if self.actors > self.budget:
            raise ValueError(f"actors ({self.actors}) must be <= budget ({self.budget})")
        if self.strategy == "adaptive" and self.sample_with_replacement:
            raise ValueError("strategy=adaptive samples without replacement; expected sample_with_replacement=false")
        if self.account_cap is not None and self.account_cap * self.accounts < self.budget:
            raise ValueError(f"account_cap={self.account_cap} x accounts={self.accounts} is less than budget="
                             f"{self.budget}; expected account_cap >= {-(-self.budget // self.accounts)} "
                             f"or more accounts")
        return self


class BenignConfig(_Strict):
    users: int = Field(2, ge=0, description="benign users, one account and one actor each")
    queries: int = Field(300, ge=1, description="queries per benign user")
    batch_size: int = Field(16, ge=1)


class ServeConfig(_Strict):
    port: int = Field(0, ge=0, le=65535, description="HTTP port on 127.0.0.1 (0: a free one)")
    http: bool = Field(True, description="start Serve's HTTP proxy")
    replicas: int = Field(1, ge=1)
    replica_cpus: float = Field(0.5, gt=0)
    threads: int = Field(1, ge=1, description="torch threads per Serve replica")
    max_images: int = Field(256, ge=1, description="most images in one request")
    max_ongoing_requests: int = Field(128, ge=1)
    keys: str | None = Field(None, description="accounts file for `serve` mode (JSON)")
    accounts: int = Field(10, ge=1, description="accounts generated in `serve` mode")


class LogConfig(_Strict):
    inputs: bool = Field(True, description="store each query's input bytes in the log")


class RayConfig(_Strict):
    address: str | None = Field(None, description="cluster address (or RAY_ADDRESS); none: a local Ray")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the local Ray (default: all)")
    object_store_mb: int = Field(512, ge=64)


class ScenarioConfig(_Strict):
    name: str = "custom"
    description: str = ""
    seed: int = Field(0, ge=0)
    run_dir: str | None = Field(None, description="run directory or URI (default runs/<scenario>/<time>)")
    cache_dir: str = Field("~/.cache/mlsim", description="victim checkpoint cache")
    victim: VictimConfig = VictimConfig()
    data: DataConfig = DataConfig()
    defense: DefenseConfig = DefenseConfig()
    detectors: DetectorsConfig = DetectorsConfig()
    attackers: dict[str, AttackerConfig] = {}
    benign: BenignConfig = BenignConfig()
    serve: ServeConfig = ServeConfig()
    log: LogConfig = LogConfig()
    ray: RayConfig = RayConfig()
    undefended_baseline: bool = Field(True, description="with a defense on, also train each attacker's replica on "
                                                        "the clean answers to its queries, for comparison")

    def replica_arch(self, aid: str) -> str:
        """The architecture of attacker ``aid``'s replica (and substitute, student): its own, or the victim's."""
        return self.attackers[aid].replica.arch or self.victim.arch

    @model_validator(mode="after")
    def _names_are_valid(self):
        from . import data, defenses, models  # late: registries import torch

        batches = {f"attackers.{aid}.batch_size": a.batch_size for aid, a in self.attackers.items()}
        batches["benign.batch_size"] = self.benign.batch_size
        for key, size in batches.items():
            if size > self.serve.max_images:
                raise ValueError(f"{key}={size} exceeds serve.max_images={self.serve.max_images}, so every "
                                 f"request would be refused; expected at most {self.serve.max_images}")
        pow_users = [n for n, d in self.detectors.enabled().items() if d.action == "proof_of_work"]
        for name in dict.fromkeys(self.detectors.stateful() + pow_users):
            if self.serve.replicas > 1:
                raise ValueError(f"serve.replicas={self.serve.replicas} with detectors.{name}.enabled=true: {name} "
                                 "keeps its histories (or open proof-of-work challenges) inside one replica, so all "
                                 f"queries must reach it; expected serve.replicas=1 (or {name} off)")
        for name, det in self.detectors.enabled().items():
            if det.action == "perturb":
                try:
                    defenses.check_spec(det.perturb.spec())
                except ConfigError as exc:
                    raise ValueError(f"detectors.{name}.perturb: {exc}") from None
        data.check_name("victim.dataset", self.victim.dataset)
        models.check_name("victim.arch", self.victim.arch)
        defenses.check_spec(self.defense.spec())
        if self.victim.training == "dp_sgd" and self.victim.arch not in ("lenet", "conv3"):
            raise ValueError(f"victim.training=dp_sgd needs per-sample gradients, which batch norm does not allow, "
                             f"but victim.arch={self.victim.arch!r}; expected victim.arch=lenet or conv3")
        uses_am = "adaptive_misinformation" in defenses.names_in(self.defense.spec())
        if uses_am and self.victim.training != "outlier_exposure":
            raise ValueError(f"defense adaptive_misinformation needs an outlier-exposure victim, but "
                             f"victim.training={self.victim.training!r}; expected victim.training=outlier_exposure")
        for aid, att in self.attackers.items():
            if not aid.replace("_", "").replace("-", "").isalnum():
                raise ValueError(f"attacker id {aid!r} must be letters, digits, '_' or '-'")
            for part in att.pool.split("+"):
                data.check_name(f"attackers.{aid}.pool", part)
            if att.replica.arch is not None:
                models.check_name(f"attackers.{aid}.replica.arch", att.replica.arch)
        return self


# ----------------------------------------------------------------------------------------------
# Loading

def yaml_names(folder) -> list[str]:
    """Names of the YAML files shipped in a package folder (``importlib.resources`` traversable)."""
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def scenario_names() -> list[str]:
    return yaml_names(importlib.resources.files("scenarios"))


def read_mapping(name_or_path: str, kind: str, folder) -> dict:
    """A YAML mapping: a shipped file ``folder/NAME.yaml`` or a path to one; ``kind`` names it in errors."""
    path, names = Path(name_or_path), yaml_names(folder)
    if name_or_path.endswith((".yaml", ".yml")) and path.exists():
        text = path.read_text()
    elif name_or_path in names:
        text = (folder / f"{name_or_path}.yaml").read_text()
    else:
        raise ConfigError(f"{kind}={name_or_path!r} is not a known {kind}; "
                          f"expected one of: {', '.join(names)} (or a path to a .yaml file)")
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{kind} {name_or_path!r} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{kind} {name_or_path!r} must be a mapping of keys, got {type(raw).__name__}")
    return raw


def _read_yaml(name_or_path: str, seen: tuple[str, ...] = ()) -> dict:
    raw = read_mapping(name_or_path, "scenario", importlib.resources.files("scenarios"))
    base = raw.pop("extends", None)
    if base is None:
        raw.setdefault("name", Path(name_or_path).stem)
        return raw
    if base in seen:
        raise ConfigError(f"extends={base!r} makes a cycle: {' -> '.join(seen + (base,))}")
    merged = OmegaConf.merge(OmegaConf.create(_read_yaml(base, seen + (name_or_path,))), OmegaConf.create(raw))
    out = OmegaConf.to_container(merged)
    out["name"] = raw.get("name", Path(name_or_path).stem)
    return out


def load(scenario: str | dict | ScenarioConfig, overrides: list[str] | dict | None = None) -> ScenarioConfig:
    """Scenario name, path or mapping + overrides -> validated :class:`ScenarioConfig`."""
    if isinstance(scenario, ScenarioConfig):
        raw = scenario.model_dump()
    elif isinstance(scenario, dict):
        raw = dict(scenario)
    else:
        raw = _read_yaml(str(scenario))
    if isinstance(raw.get("defense"), str):  # `defense: mad` is short for `defense: {name: mad}`
        raw["defense"] = {"name": raw["defense"]}
    if overrides and not isinstance(overrides, dict):
        # `defense=NAME` picks a new defense (dropping the scenario's parameters for the old one) before
        # any `defense.PARAM=VALUE` applies, whatever their order on the command line
        for item in overrides:
            if item.startswith("defense="):
                raw["defense"] = {"name": item.split("=", 1)[1]}
        overrides = [item for item in overrides if not item.startswith("defense=")]
    conf = OmegaConf.create(raw)
    if overrides:
        try:
            if isinstance(overrides, dict):
                extra = OmegaConf.create(overrides)
            else:
                for item in overrides:
                    if "=" not in item:
                        raise ConfigError(f"override {item!r} must look like key=value")
                extra = OmegaConf.from_dotlist(list(overrides))
            conf = OmegaConf.merge(conf, extra)
        except OmegaConfBaseException as exc:
            raise ConfigError(f"bad override: {str(exc).splitlines()[0]}") from None
    try:
        raw = OmegaConf.to_container(conf, resolve=True)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"cannot resolve an interpolation: {str(exc).splitlines()[0]}") from None
    if "detector" in raw:  # `detector.prada.action=refuse` reads naturally too: same as `detectors.…`
        alias = raw.pop("detector")
        if not isinstance(alias, dict):
            raise ConfigError(f"detector={alias!r} must be a mapping like detectors (detector.prada.action=…)")
        raw["detectors"] = OmegaConf.to_container(OmegaConf.merge(raw.get("detectors") or {}, alias or {}))
    return validate(raw)


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
    if err["type"] == "model_type" or isinstance(value, dict):
        return f"{key}: {msg}" if key else msg
    msg = msg.replace("Input should be", "must be").replace("greater than or equal to", ">=").replace(
        "less than or equal to", "<=").replace("greater than", ">").replace("less than", "<")
    where = f"{key} " if key else ""
    return f"{where}{msg[0].lower() + msg[1:]}, got {value!r}"


def to_yaml(cfg: ScenarioConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def describe_keys() -> list[tuple[str, str, str]]:
    """(key, default, description) of the main scalar keys, for ``--help``."""
    rows: list[tuple[str, str, str]] = []

    def walk(model: type[BaseModel], prefix: str):
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name}.")
            elif getattr(ann, "__origin__", None) is dict:
                walk(ann.__args__[1], f"{prefix}{name}.<id>.")
            else:
                rows.append((prefix + name, repr(field.default), field.description or ""))

    walk(ScenarioConfig, "")
    return rows

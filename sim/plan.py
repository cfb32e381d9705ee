"""Who queries the victim, through which accounts, with what: a scenario's plan, made before any Ray starts.

A plan has the accounts (API key -> account) and one :class:`ClientPlan` per client actor: each benign user,
and each actor of each attacker, with its share of the attacker's accounts and budget and the pure query
source its attack built for it (:meth:`actors.attacks.base.Attack.sources`). Everything random derives from the
scenario's seed, so the same scenario gives the same plan.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

import numpy as np

from . import registry
from .config import ScenarioConfig
from .data import Dataset
from .errors import ConfigError
from .protocol import Account, make_keys


def derive_seed(seed: int, *names: object) -> int:
    """A child seed for a named random choice, stable across runs and processes."""
    digest = hashlib.sha256(repr((seed, *names)).encode()).digest()
    return int.from_bytes(digest[:4], "little")


@dataclass
class ClientPlan:
    """One client actor: who it is, which accounts it drives, what it sends; ``result`` once it ran."""

    actor_id: str
    role: str  # attacker / benign
    attacker: str | None  # the attacker id in the scenario, None for benign users
    accounts: list[str]  # account ids
    budget: int
    batch_size: int
    split: str
    source: object  # a pure query source (propose / observe / transfer_set)
    keys: list[str] | None = None  # the accounts' API keys
    strategy: dict | None = None  # the account strategy: cap, max_rate, churn
    seed: int = 0  # of the account split
    result: dict | None = None  # what the actor reports (sent, refused, per account, seconds, stats, pow)


@dataclass
class Plan:
    """Who queries through which accounts: the accounts table and the client actors."""

    accounts: dict[str, Account]  # api key -> account
    clients: list[ClientPlan]
    held_out: set[int] = dataclasses.field(default_factory=set)  # test images used as attack seeds

    def of(self, attacker: str | None = None, role: str | None = None) -> list[ClientPlan]:
        return [c for c in self.clients if (attacker is None or c.attacker == attacker)
                and (role is None or c.role == role)]

    def eval_indices(self, n_test: int) -> np.ndarray:
        """The test images replicas are evaluated on: all but the attack seeds taken from the test split."""
        return np.setdiff1d(np.arange(n_test), sorted(self.held_out))


def make_plan(cfg: ScenarioConfig, ds: Dataset) -> Plan:
    """Accounts, keys and client actors of a scenario on the victim's dataset ``ds``. Each attack builds its
    sources here, so a pool too small for a budget fails before any training."""
    from actors.accounts import split_evenly

    seed = cfg.seed
    clients, benign = benign_clients(cfg, ds)
    accounts: list[Account] = list(benign)
    held_out: set[int] = set()
    for aid, att in cfg.attackers.items():
        per_cohort = att.cohort_size or att.accounts
        accts = [Account(f"{aid}-{j:04d}", "attacker", att.attack, f"{aid}-c{j // per_cohort}")
                 for j in range(att.accounts)]
        accounts += accts
        budgets = split_evenly(att.budget, att.actors)
        shares = split_evenly(att.accounts, att.actors)
        ctx = _attack_context(cfg, aid, ds, budgets)
        sources = list(registry.build("attack", att.attack, **att.params()).sources(ctx))
        if len(sources) != len(budgets):  # an attack of the user's own that does not split itself as asked
            raise ConfigError(f"attackers.{aid}.attack={att.attack!r} made {len(sources)} query source(s) for "
                              f"{len(budgets)} actor(s); expected one per budget in ctx.budgets")
        held_out |= ctx.held_out
        first = 0
        for i, (share, source) in enumerate(zip(shares, sources)):
            mine = [a.account_id for a in accts[first:first + share]]
            first += share
            actor_id = f"{aid}-actor{i}"
            clients.append(ClientPlan(actor_id, "attacker", aid, mine, budgets[i], att.batch_size, att.split, source,
                                      strategy={"cap": att.account_cap, "max_rate": att.max_rate, "churn": att.churn},
                                      seed=derive_seed(seed, "split", actor_id)))
    accounts = share_signups(cfg, accounts)
    keys = make_keys(accounts, seed=derive_seed(seed, "keys"))
    key_of = {a.account_id: k for k, a in keys.items()}
    for c in clients:
        c.keys = [key_of[a] for a in c.accounts]
    return Plan(keys, clients, held_out)


def benign_clients(cfg: ScenarioConfig, ds: Dataset) -> tuple[list[ClientPlan], list[Account]]:
    """The benign users' client actors and their accounts. Each user drives its share of the accounts, one after
    another (``blocks``), each account sending its own number of test images (varied with ``queries_max``), some
    of them from the popular set every account shares."""
    from actors.accounts import split_evenly
    from actors.benign import BenignStream

    b, seed = cfg.benign, cfg.seed
    if b.users == 0:
        return [], []
    n = b.accounts or b.users
    if b.queries_max is None:
        sizes = [b.queries] * n
    else:
        rng = np.random.default_rng(derive_seed(seed, "benign", "queries"))
        sizes = np.exp(rng.uniform(np.log(b.queries), np.log(b.queries_max + 1), n)).astype(int).tolist()
        sizes = [min(max(q, b.queries), b.queries_max) for q in sizes]
    popular = np.random.default_rng(derive_seed(seed, "benign", "popular")).choice(
        len(ds.x_test), min(b.popular_images, len(ds.x_test)), replace=False)
    accounts = [Account(f"benign-{j}", "benign", cohort=f"benign-{j}") for j in range(n)]  # sign up one by one
    clients, first = [], 0
    for u, share in enumerate(split_evenly(n, b.users)):
        mine, budget = accounts[first:first + share], sum(sizes[first:first + share])
        clients.append(ClientPlan(
            f"benign-{u}", "benign", None, [a.account_id for a in mine], budget, b.batch_size,
            "round_robin" if share == 1 else "blocks",
            BenignStream(ds.x_test, budget, derive_seed(seed, "benign", u), popular=b.popular,
                         popular_idx=popular),
            strategy=None if share == 1 else {"sizes": sizes[first:first + share]},
            seed=derive_seed(seed, "split", f"benign-{u}")))
        first += share
    return clients, accounts


def share_signups(cfg: ScenarioConfig, accounts: list[Account]) -> list[Account]:
    """``benign.shared_signup``: that share of the benign accounts signs up inside an attacker's sign-up batch
    (a cohort is a sign-up batch, whoever signs up), drawn at random from the attackers' cohorts."""
    cohorts = list(dict.fromkeys(a.cohort for a in accounts if a.role == "attacker" and a.cohort))
    if not cfg.benign.shared_signup or not cohorts:
        return accounts
    rng = np.random.default_rng(derive_seed(cfg.seed, "benign", "signup"))
    out = []
    for a in accounts:
        if a.role == "benign" and rng.random() < cfg.benign.shared_signup:
            a = dataclasses.replace(a, cohort=cohorts[int(rng.integers(len(cohorts)))])
        out.append(a)
    return out


def _attack_context(cfg: ScenarioConfig, aid: str, ds: Dataset, budgets: list[int]):
    from actors.attacks.base import AttackContext

    return AttackContext(owner=f"attackers.{aid}", dataset=ds, budgets=budgets, arch=cfg.replica_arch(aid),
                         seed=lambda name, *more: derive_seed(cfg.seed, name, aid, *more),
                         data_root=cfg.data.root, download=cfg.data.download,
                         image_size=cfg.data.image_size)

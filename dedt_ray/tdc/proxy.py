"""Proxy-based pruning decision per timestep group (TDC step 4).

Each round a *proxy* proposes per-block pruning ratios; the candidate is pruned from the base
model to the group's FLOPs budget (the ratios give the shape, a multiplier fits the budget),
scored (lower is better) and recorded in the *memory bank* the proxy sees next round. The best
candidate wins.

- ``OptunaProxy`` (default): each round is a trial of an Optuna study (seeded multivariate TPE,
  random for its first ``n_startup_trials`` rounds only); the study, persisted in SQLite, is
  the memory bank, so reopening it resumes the search.
- ``LLMProxy``: an OpenAI-compatible chat-completions endpoint (the paper uses GPT-4), prompted
  with the architecture table, the budget, the group's SNR range and the memory bank. Answers
  must be a JSON object of block -> ratio; an invalid answer is sent back with the reason and
  retried, and after the last retry the round falls back to the Optuna proposal (recorded as
  ``"optuna-fallback"``). Its memory bank is its Optuna study, so both kinds of rounds teach TPE.
"""

from __future__ import annotations

import copy
import json
import math
import os
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import optuna
import torch
from diffusers import UNet2DModel

from dedt_ray.tdc.denoise import Batch, denoising_loss, stratified_timesteps
from dedt_ray.tdc.pruning import BudgetError, UNetPruner


@dataclass
class Proposal:
    """Per-block ratios (the shape to fit to the budget) and who proposed them."""

    ratios: dict[str, float]
    proposer: str
    note: str = ""


@dataclass
class RoundRecord:
    """One round of the decision: proposed and achieved ratios, FLOPs and score."""

    round: int
    proposer: str
    ratios: dict[str, float]
    achieved: dict[str, float] = field(default_factory=dict)
    flops: int | None = None
    score: float | None = None  # None: the round failed (see note)
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class PruningProxy(Protocol):
    """Proposes per-block ratios each round and keeps the memory bank of past rounds."""

    def propose(self, round: int, memory_bank: Sequence[RoundRecord]) -> Proposal: ...

    def record(self, record: RoundRecord) -> None: ...

    def memory_bank(self) -> list[RoundRecord]: ...


class OptunaProxy:
    """Rounds as trials of an Optuna study (multivariate TPE, seeded); SQLite storage makes it
    resumable. The first ``n_startup_trials`` trials of the study are random, every later one
    is proposed from the finished trials (the memory bank)."""

    def __init__(
        self,
        blocks: Sequence[str],
        storage_path: str | Path | None = None,
        study_name: str = "tdc",
        seed: int = 0,
        max_ratio: float = 0.9,
        n_startup_trials: int = 2,
    ) -> None:
        """``storage_path``: an SQLite file (created or reopened); None keeps it in memory."""
        self.blocks = list(blocks)
        self.distributions = {
            b: optuna.distributions.FloatDistribution(0.0, max_ratio) for b in self.blocks
        }
        storage = f"sqlite:///{Path(storage_path).resolve()}" if storage_path else None
        done = 0
        if storage:
            try:
                done = len(optuna.load_study(study_name=study_name, storage=storage).trials)
            except KeyError:
                done = 0
        # Seeding with the trial count keeps a resumed study from replaying its first proposals.
        sampler = optuna.samplers.TPESampler(
            seed=seed + done, n_startup_trials=n_startup_trials, multivariate=True
        )
        self.study = optuna.create_study(
            study_name=study_name,
            storage=storage,
            sampler=sampler,
            direction="minimize",
            load_if_exists=True,
        )
        self._pending: optuna.Trial | None = None

    def propose(self, round: int, memory_bank: Sequence[RoundRecord] = ()) -> Proposal:
        """Ask the study for a trial (the study already holds the memory bank)."""
        self._pending = self.study.ask(self.distributions)
        return Proposal(dict(self._pending.params), "optuna")

    def record(self, record: RoundRecord) -> None:
        """Tell the pending trial if it proposed these ratios, else add the round as a trial."""
        attrs = {
            "round": record.round,
            "proposer": record.proposer,
            "achieved": record.achieved,
            "flops": record.flops,
            "note": record.note,
        }
        ok = record.score is not None and math.isfinite(record.score)
        state = optuna.trial.TrialState.COMPLETE if ok else optuna.trial.TrialState.FAIL
        value = record.score if ok else None
        pending, self._pending = self._pending, None
        if pending is not None and pending.params == record.ratios:
            for key, v in attrs.items():
                pending.set_user_attr(key, v)
            self.study.tell(pending, value, state=state)
            return
        if pending is not None:
            self.study.tell(pending, state=optuna.trial.TrialState.FAIL)  # superseded
        self.study.add_trial(
            optuna.trial.create_trial(
                state=state,
                value=value,
                params=dict(record.ratios),
                distributions=self.distributions,
                user_attrs=attrs,
            )
        )

    def memory_bank(self) -> list[RoundRecord]:
        """Every finished round of the study, in order."""
        records = []
        for trial in self.study.get_trials(deepcopy=False):
            if trial.state == optuna.trial.TrialState.RUNNING or "round" not in trial.user_attrs:
                continue
            attrs = trial.user_attrs
            records.append(
                RoundRecord(
                    round=attrs["round"],
                    proposer=attrs["proposer"],
                    ratios=dict(trial.params),
                    achieved=attrs.get("achieved", {}),
                    flops=attrs.get("flops"),
                    score=trial.value if trial.state == optuna.trial.TrialState.COMPLETE else None,
                    note=attrs.get("note", ""),
                )
            )
        return records


def parse_ratios(text: str, blocks: Sequence[str], max_ratio: float = 0.9) -> dict[str, float]:
    """The JSON object in ``text`` as block -> ratio; ValueError says what is wrong."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        raise ValueError("the answer holds no JSON object")
    try:
        obj = json.loads(text[start : end + 1])
    except json.JSONDecodeError as e:
        raise ValueError(f"the JSON object does not parse: {e}") from None
    if not isinstance(obj, dict):
        raise ValueError("the answer must be a JSON object")
    missing, extra = set(blocks) - set(obj), set(obj) - set(blocks)
    if missing or extra:
        raise ValueError(
            f"keys must be exactly {list(blocks)}; missing {sorted(missing)}, "
            f"unexpected {sorted(extra)}"
        )
    ratios = {}
    for block in blocks:
        v = obj[block]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= max_ratio:
            raise ValueError(f"ratio for {block} must be a number in [0, {max_ratio}], got {v!r}")
        ratios[block] = float(v)
    return ratios


def build_messages(
    table: Sequence[dict[str, Any]],
    budget_fraction: float,
    group: dict[str, Any],
    memory_bank: Sequence[RoundRecord],
    max_ratio: float = 0.9,
) -> list[dict[str, str]]:
    """The chat prompt: task, architecture table, budget, group and memory bank."""
    blocks = [row["block"] for row in table]
    arch = "\n".join(
        f"  {r['block']:<8} channels={r['channels']:<5} flops_share={r['flops_share']:.3f}"
        for r in table
    )
    bank = "\n".join(
        f"  round {r.round} ({r.proposer}): ratios={json.dumps(r.ratios)} "
        + (f"flops={r.flops} score={r.score:.5g}" if r.score is not None else f"failed: {r.note}")
        for r in memory_bank
    )
    system = (
        "You design structured channel pruning for a diffusion-model UNet that will denoise "
        "only one group of timesteps. Answer with one JSON object and nothing else."
    )
    user = (
        f"Blocks (channels, share of the model's FLOPs):\n{arch}\n\n"
        f"Target: {budget_fraction:.1%} of the base FLOPs. Your ratios set the *shape*: they are "
        "scaled by one common factor until the pruned model meets the target.\n"
        f"Timestep group: t in [{group.get('t_lo')}, {group.get('t_hi')}), SNR from "
        f"{group.get('snr_db_max', float('nan')):.1f} dB to "
        f"{group.get('snr_db_min', float('nan')):.1f} dB.\n"
        f"Score = held-out denoising loss after a short fine-tune (lower is better).\n"
        f"Previous rounds:\n{bank or '  none yet'}\n\n"
        f"Propose ratios for the next round as {{block: ratio}} with keys exactly {blocks} "
        f"and values in [0, {max_ratio}]."
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


class LLMProxy:
    """Ratios from an OpenAI-compatible chat endpoint, with validation, retries and fallback."""

    def __init__(
        self,
        table: Sequence[dict[str, Any]],
        budget_fraction: float,
        group: dict[str, Any],
        fallback: OptunaProxy,
        base_url: str,
        model: str,
        api_key_env: str | None = None,
        retries: int = 2,
        timeout: float = 60.0,
        max_ratio: float = 0.9,
        temperature: float = 0.2,
    ) -> None:
        """``table``: ``architecture_table`` rows; ``group``: a ``describe_groups`` row;
        ``api_key_env``: the environment variable holding the key (None: no key)."""
        self.table, self.budget_fraction, self.group = list(table), budget_fraction, group
        self.blocks = [row["block"] for row in table]
        self.fallback = fallback
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.retries, self.timeout = model, retries, timeout
        self.max_ratio, self.temperature = max_ratio, temperature
        self.api_key = None
        if api_key_env:
            if api_key_env not in os.environ:
                raise ValueError(f"environment variable {api_key_env} (the API key) is not set")
            self.api_key = os.environ[api_key_env]

    def _chat(self, messages: list[dict[str, str]]) -> str:
        body = {"model": self.model, "messages": messages, "temperature": self.temperature}
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(
            self.url, data=json.dumps(body).encode(), headers=headers, method="POST"
        )
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            answer = json.loads(response.read())
        try:
            return answer["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise ValueError("the endpoint's answer has no choices[0].message.content") from None

    def propose(self, round: int, memory_bank: Sequence[RoundRecord]) -> Proposal:
        """Ask the endpoint; after ``retries`` invalid answers use the Optuna proposal."""
        messages = build_messages(
            self.table, self.budget_fraction, self.group, memory_bank, self.max_ratio
        )
        errors = []
        for attempt in range(1, self.retries + 2):
            try:
                text = self._chat(messages)
            except (OSError, ValueError) as e:  # network, HTTP status, non-JSON body
                errors.append(f"attempt {attempt}: request failed: {e}")
                continue
            try:
                return Proposal(parse_ratios(text, self.blocks, self.max_ratio), "llm")
            except ValueError as e:
                errors.append(f"attempt {attempt}: {e}")
                messages = [
                    *messages,
                    {"role": "assistant", "content": text},
                    {"role": "user", "content": f"Invalid answer: {e}. Reply with the JSON only."},
                ]
        proposal = self.fallback.propose(round, memory_bank)
        return Proposal(proposal.ratios, "optuna-fallback", "; ".join(errors))

    def record(self, record: RoundRecord) -> None:
        self.fallback.record(record)

    def memory_bank(self) -> list[RoundRecord]:
        return self.fallback.memory_bank()


def denoising_score(
    model: torch.nn.Module,
    scheduler: Any,
    data: Batch,
    t_range: tuple[int, int],
    finetune_steps: int = 20,
    lr: float = 1e-4,
    seed: int = 0,
    heldout: Batch | None = None,
    batch_size: int = 16,
) -> float:
    """Held-out denoising loss on ``t_range`` after a short AdamW fine-tune of a copy of
    ``model`` on ``data``. Without ``heldout`` the last quarter of ``data`` is held out. The
    held-out timesteps are spread evenly over ``t_range`` (``stratified_timesteps``, one per
    image) and the noise depends only on ``seed``, so candidates are comparable."""
    if heldout is None:
        n = data.images.shape[0]
        cut = n - max(1, n // 4)
        if cut < 1:
            raise ValueError("denoising_score needs at least 2 samples to hold some out")
        data, heldout = data.take(slice(0, cut)), data.take(slice(cut, n))
    tuned = copy.deepcopy(model).train()
    optimizer = torch.optim.AdamW(tuned.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    n = data.images.shape[0]
    for _ in range(finetune_steps):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=gen)
        loss = denoising_loss(tuned, scheduler, data.take(idx), t_range, gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    tuned.eval()
    gen = torch.Generator().manual_seed(seed + 1)
    total, m = 0.0, heldout.images.shape[0]
    times = stratified_timesteps(t_range, m)
    times = times[torch.arange(m) % len(times)]  # a range shorter than m: each t repeats
    with torch.no_grad():
        for start in range(0, m, batch_size):
            part = heldout.take(slice(start, start + batch_size))
            t = times[start : start + batch_size]
            loss = denoising_loss(tuned, scheduler, part, t_range, gen, timesteps=t)
            total += float(loss) * part.images.shape[0]
    return total / m


def search_images(available: int, taylor: int, score: int, heldout: int) -> tuple[int, int, int]:
    """How many of ``available`` training images go to (Taylor importance, the candidates'
    fine-tune, their held-out score): Taylor and the fine-tune share the first images, the
    held-out ones come after them. With fewer than ``max(taylor, score) + heldout`` images the
    held-out part shrinks to at most a quarter and the others to what is left."""
    if available < 2:
        raise ValueError(f"the pruning search needs at least 2 training images, got {available}")
    if available >= max(taylor, score) + heldout:
        return taylor, score, heldout
    held = min(heldout, max(1, available // 4))
    rest = available - held
    return min(taylor, rest), min(score, rest), held


def decide_group(
    base_model: UNet2DModel,
    group_range: tuple[int, int],
    budget: float,
    proxy: PruningProxy,
    rounds: int,
    score_fn: Callable[[UNet2DModel], float],
    *,
    scheduler: Any = None,
    data: Batch | None = None,
    pruner: UNetPruner | None = None,
    tol: float = 0.02,
    max_ratio: float = 0.9,
    seed: int = 0,
) -> tuple[dict[str, float], UNet2DModel, list[RoundRecord]]:
    """Decide one group from ``rounds`` rounds; return (achieved ratios, model, history).

    The first ``rounds`` rounds of the proxy's memory bank count, and only the missing ones
    are run (numbered after the bank's last), so a resumed study continues instead of
    starting over. ``history`` is the rounds that count, the winner the best of them, rebuilt
    from its proposed ratios (the model is not fine-tuned). Channel importance is Taylor on
    ``group_range`` when ``scheduler`` and ``data`` are given (else weight magnitude), unless
    a ready ``pruner`` is passed. A round whose proposal cannot meet the budget is recorded
    with ``score=None``.
    """
    if pruner is None:
        if scheduler is not None and data is not None:
            pruner = UNetPruner.from_denoising(base_model, scheduler, data, group_range, seed=seed)
        else:
            pruner = UNetPruner(base_model, "magnitude")
    bank = proxy.memory_bank()
    history = bank[:rounds]
    start = max((r.round for r in bank), default=-1) + 1
    for r in range(start, start + rounds - len(history)):
        proposal = proxy.propose(r, bank)
        record = RoundRecord(r, proposal.proposer, dict(proposal.ratios), note=proposal.note)
        try:
            result = pruner.prune_to_budget(budget, proposal.ratios, tol, max_ratio)
        except BudgetError as e:
            record.note = f"{record.note}; {e}".lstrip("; ")
        else:
            score = float(score_fn(result.model))
            record.achieved, record.flops = result.ratios, result.flops
            if math.isfinite(score):
                record.score = score
            else:
                record.note = f"{record.note}; non-finite score {score}".lstrip("; ")
        proxy.record(record)
        bank.append(record)
        history.append(record)
    scored = [h for h in history if h.score is not None]
    if not scored:
        raise BudgetError(f"no round met the budget {budget:.4g}: {[r.note for r in history]}")
    best = min(scored, key=lambda h: h.score)
    result = pruner.prune_to_budget(budget, best.ratios, tol, max_ratio)
    if any(abs(result.ratios[b] - best.achieved.get(b, -1.0)) > 1e-9 for b in result.ratios):
        raise ValueError(
            f"round {best.round} of the memory bank achieved {best.achieved}, but its ratios "
            f"now give {result.ratios}: the bank was made for another base model or budget"
        )
    return result.ratios, result.model, history

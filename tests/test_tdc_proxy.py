"""Proxy rounds: Optuna (seeded, resumable memory bank, better than random proposals), an LLM
endpoint with fallback, scoring and the search's FLOPs."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from benchmarks import tdc_proxy as synthetic
from dedt_ray.config import ConfigError, TDCConfig, load_config
from dedt_ray.tdc.budget import model_flops, search_flops
from dedt_ray.tdc.denoise import Batch
from dedt_ray.tdc.proxy import (
    LLMProxy,
    OptunaProxy,
    RoundRecord,
    decide_group,
    denoising_score,
    parse_ratios,
    search_images,
)
from dedt_ray.tdc.pruning import UNetPruner, architecture_table

BLOCKS = ["down.0", "down.1", "mid", "up.0", "up.1"]
TARGET = {"down.0": 0.1, "down.1": 0.6, "mid": 0.8, "up.0": 0.3, "up.1": 0.2}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: conftest.py


def _synthetic(ratios: dict[str, float]) -> float:
    return sum((ratios[b] - TARGET[b]) ** 2 for b in BLOCKS)


def _run(proxy: OptunaProxy, rounds: int, start: int = 0) -> list[RoundRecord]:
    out = []
    for r in range(start, start + rounds):
        p = proxy.propose(r, proxy.memory_bank())
        rec = RoundRecord(r, p.proposer, p.ratios, p.ratios, 100, _synthetic(p.ratios))
        proxy.record(rec)
        out.append(rec)
    return out


def test_parse_ratios() -> None:
    answer = "Sure:\n```json\n" + json.dumps(TARGET) + "\n```"
    assert parse_ratios(answer, BLOCKS) == TARGET
    bad = [
        ("no json here", "no JSON object"),
        ("{'down.0': 0.1}", "does not parse"),
        (json.dumps({**TARGET, "extra": 0.1}), r"unexpected \['extra'\]"),
        (json.dumps({"down.0": 0.1}), r"missing \['down.1', 'mid', 'up.0', 'up.1'\]"),
        (json.dumps({**TARGET, "mid": 0.95}), r"ratio for mid must be a number in \[0, 0.9\]"),
        (json.dumps({**TARGET, "mid": True}), "ratio for mid"),
        (json.dumps({**TARGET, "mid": "0.5"}), "ratio for mid"),
    ]
    for text, message in bad:
        with pytest.raises(ValueError, match=message):
            parse_ratios(text, BLOCKS)


def test_optuna_proxy_improves_on_a_synthetic_score() -> None:
    proxy = OptunaProxy(BLOCKS, seed=0, n_startup_trials=5)
    records = _run(proxy, 30)
    scores = [r.score for r in records]
    best_so_far = [min(scores[: i + 1]) for i in range(len(scores))]
    assert all(a >= b for a, b in zip(best_so_far, best_so_far[1:], strict=False))
    assert best_so_far[-1] < scores[0] and best_so_far[-1] < min(scores[:5])
    assert [r.round for r in proxy.memory_bank()] == list(range(30))
    # Seeded: the same study proposes the same ratios.
    again = _run(OptunaProxy(BLOCKS, seed=0, n_startup_trials=5), 3)
    assert [r.ratios for r in again] == [r.ratios for r in records[:3]]


def test_optuna_proxy_beats_random_proposals_at_the_default_rounds() -> None:
    """Margin rule: over 100 seeds, the mean of (random's best - the proxy's best) after the
    default number of rounds must exceed twice its standard error (a one-sided paired test
    at about 2.5%), and the proxy must do better on more than half of the seeds."""
    defaults = TDCConfig()
    n, startup = defaults.rounds, defaults.startup_rounds
    assert startup < n / 2  # most rounds are proposed from the memory bank
    seeds = range(100)
    proxy = np.array([synthetic.best_of_optuna(n, s, startup) for s in seeds])
    random = np.array([synthetic.best_of_random(n, s) for s in seeds])
    assert np.isfinite(proxy).all() and np.isfinite(random).all()
    gain = random - proxy
    assert gain.mean() > 2 * gain.std(ddof=1) / np.sqrt(len(gain))
    assert (gain > 0).mean() > 0.5


def test_synthetic_objective_fits_the_budget() -> None:
    uniform = dict.fromkeys(synthetic.BLOCKS, 0.3)
    achieved = synthetic.fit_to_budget(np.array(list(uniform.values())))
    assert synthetic._flops(achieved) == pytest.approx(synthetic.BUDGET, abs=1e-9)
    assert np.allclose(achieved, achieved[0])  # the shape is kept, only scaled
    # a shape that prunes only one small block cannot reach the budget
    only_one = np.array([0.5] + [0.0] * (len(synthetic.BLOCKS) - 1))
    assert synthetic.fit_to_budget(only_one) is None
    assert synthetic.synthetic_score(dict(zip(synthetic.BLOCKS, only_one, strict=True))) is None


def test_startup_rounds_config() -> None:
    # startup_rounds >= rounds is allowed: a random search (e.g. a quick tdc.rounds=1)
    assert load_config(None, ["tdc.rounds=1"]).tdc.startup_rounds == 2
    with pytest.raises(ConfigError, match="tdc.startup_rounds"):
        load_config(None, ["tdc.startup_rounds=-1"])


def test_optuna_memory_bank_persists_and_resumes(tmp_path) -> None:
    path = tmp_path / "study.db"
    first = _run(OptunaProxy(BLOCKS, path, study_name="g0", seed=0), 3)
    reopened = OptunaProxy(BLOCKS, path, study_name="g0", seed=0)
    bank = reopened.memory_bank()
    assert [(r.round, r.ratios, r.score) for r in bank] == [
        (r.round, r.ratios, r.score) for r in first
    ]
    more = _run(reopened, 2, start=3)
    assert all(r.ratios not in [f.ratios for f in first] for r in more)  # no replayed proposals
    rounds = [r.round for r in OptunaProxy(BLOCKS, path, study_name="g0").memory_bank()]
    assert rounds == list(range(5))
    assert OptunaProxy(BLOCKS, path, study_name="g1").memory_bank() == []


class _FakeLLM:
    """A chat-completions server on 127.0.0.1 answering from a fixed list, then HTTP 500."""

    def __init__(self, answers: list[str]) -> None:
        self.answers, self.requests = list(answers), []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append(
                    {"path": self.path, "body": body, "auth": self.headers.get("Authorization")}
                )
                if not fake.answers:
                    self.send_response(500)
                    self.end_headers()
                    return
                content = fake.answers.pop(0)
                reply = {"choices": [{"message": {"role": "assistant", "content": content}}]}
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def fake_llm() -> Iterator[Any]:
    servers: list[_FakeLLM] = []

    def start(answers: list[str]) -> _FakeLLM:
        servers.append(_FakeLLM(answers))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


TABLE = [{"block": b, "channels": 32, "flops_share": 0.2} for b in BLOCKS]
GROUP = {"t_lo": 667, "t_hi": 1000, "snr_db_max": -5.0, "snr_db_min": -44.0}


def _llm(url: str, fallback: OptunaProxy, **kw: Any) -> LLMProxy:
    return LLMProxy(TABLE, 0.55, GROUP, fallback, url, "test-model", timeout=10, **kw)


def test_llm_proxy_valid_answer(fake_llm, monkeypatch) -> None:
    server = fake_llm(["```json\n" + json.dumps(TARGET) + "\n```"])
    monkeypatch.setenv("TDC_TEST_KEY", "sk-test")
    proxy = _llm(server.url, OptunaProxy(BLOCKS), api_key_env="TDC_TEST_KEY")
    earlier = RoundRecord(0, "optuna", dict.fromkeys(BLOCKS, 0.5), {}, 1234, 0.25)
    proposal = proxy.propose(1, [earlier])
    assert proposal.proposer == "llm" and proposal.ratios == TARGET
    (request,) = server.requests
    assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer sk-test"
    assert request["body"]["model"] == "test-model"
    prompt = request["body"]["messages"][-1]["content"]
    for needle in ("up.1", "flops_share=0.200", "55.0%", "-44.0 dB", "round 0 (optuna)", "0.25"):
        assert needle in prompt
    proxy.record(RoundRecord(1, "llm", TARGET, TARGET, 999, 0.125))
    (bank,) = proxy.memory_bank()
    assert (bank.proposer, bank.ratios, bank.score) == ("llm", TARGET, 0.125)


def test_llm_proxy_malformed_answers_retry_then_fall_back(fake_llm) -> None:
    server = fake_llm(["I would prune a lot.", json.dumps({**TARGET, "mid": 3.0})])
    fallback = OptunaProxy(BLOCKS, seed=0)
    proxy = _llm(server.url, fallback, retries=2)
    proposal = proxy.propose(0, [])
    assert len(server.requests) == 3  # 1 + 2 retries, the last one an HTTP 500
    assert proposal.proposer == "optuna-fallback"
    assert "no JSON object" in proposal.note and "ratio for mid" in proposal.note
    assert "500" in proposal.note
    retry = server.requests[1]["body"]["messages"]
    assert (
        retry[-2]["content"] == "I would prune a lot." and "Invalid answer" in retry[-1]["content"]
    )
    expected = OptunaProxy(BLOCKS, seed=0).propose(0, []).ratios
    assert proposal.ratios == expected
    proxy.record(RoundRecord(0, proposal.proposer, proposal.ratios, {}, 5, 0.5, proposal.note))
    (bank,) = proxy.memory_bank()
    assert bank.proposer == "optuna-fallback" and bank.score == 0.5
    with pytest.raises(ValueError, match="TDC_MISSING_KEY"):
        _llm(server.url, fallback, api_key_env="TDC_MISSING_KEY")


def _unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        num_class_embeds=3,
    )


def _data(n: int = 24) -> Batch:
    gen = torch.Generator().manual_seed(0)
    return Batch(torch.rand(n, 1, 8, 8, generator=gen) * 2 - 1, torch.arange(n) % 3)


def test_denoising_score_is_deterministic_and_fine_tunes_a_copy() -> None:
    model, sched, data = _unet(), DDPMScheduler(num_train_timesteps=1000), _data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    untuned = denoising_score(model, sched, data, (0, 500), finetune_steps=0)
    tuned = denoising_score(model, sched, data, (0, 500), finetune_steps=15, lr=2e-3)
    assert tuned < untuned
    assert tuned == denoising_score(model, sched, data, (0, 500), finetune_steps=15, lr=2e-3)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_decide_group_with_llm_and_fallback(fake_llm, tmp_path) -> None:
    model, sched, data = _unet(), DDPMScheduler(num_train_timesteps=1000), _data()
    pruner = UNetPruner.from_denoising(model, sched, data, (500, 1000), n_timesteps=1)
    budget = 0.6 * pruner.base_flops
    server = fake_llm([json.dumps(TARGET), "nope", "nope"])  # round 0 valid, round 1 falls back
    fallback = OptunaProxy(pruner.blocks, tmp_path / "g.db", seed=0)
    proxy = LLMProxy(architecture_table(model), 0.6, GROUP, fallback, server.url, "m", retries=1)

    def score(m: UNet2DModel) -> float:
        return denoising_score(m, sched, data, (500, 1000), finetune_steps=2, lr=1e-3)

    ratios, best, history = decide_group(model, (500, 1000), budget, proxy, 3, score, pruner=pruner)
    assert [h.proposer for h in history] == ["llm", "optuna-fallback", "optuna-fallback"]
    assert [h.round for h in history] == [0, 1, 2]
    assert history[0].ratios == TARGET
    for h in history:
        assert abs(h.flops - budget) <= 0.02 * budget and h.score is not None
    winner = min(history, key=lambda h: h.score)
    assert ratios == winner.achieved and score(best) == pytest.approx(winner.score)
    # The memory bank (the SQLite study) holds every round and resumes numbering.
    reopened = OptunaProxy(pruner.blocks, tmp_path / "g.db", seed=0)
    assert [r.proposer for r in reopened.memory_bank()] == [h.proposer for h in history]
    _, _, more = decide_group(model, (500, 1000), budget, reopened, 4, score, pruner=pruner)
    assert [h.round for h in more] == [0, 1, 2, 3] and more[-1].proposer == "optuna"


def test_decide_group_records_failed_rounds() -> None:
    model = _unet()
    pruner = UNetPruner(model, "magnitude")
    proxy = OptunaProxy(pruner.blocks, seed=1)
    with pytest.raises(ValueError, match="no round met the budget"):
        decide_group(
            model, (0, 10), 0.001 * pruner.base_flops, proxy, 2, lambda m: 0.0, pruner=pruner
        )
    assert [r.score for r in proxy.memory_bank()] == [None, None]
    assert all("reaches" in r.note for r in proxy.memory_bank())


def test_decide_group_continues_the_memory_bank(tmp_path) -> None:
    """A rerun reuses the bank's rounds: no round twice, the same winner, more rounds continue."""
    model = _unet()
    pruner = UNetPruner(model, "magnitude")
    budget = 0.6 * pruner.base_flops
    calls: list[list[int]] = []

    def score(m: UNet2DModel) -> float:  # a known function of the pruned widths
        widths = [p.shape[0] for n, p in m.named_parameters() if n.endswith("conv1.weight")]
        calls.append(widths)
        return float(np.dot(widths, np.arange(1, len(widths) + 1)))

    def decide(rounds: int, db: str = "g.db", frac: float = 0.6) -> tuple:
        proxy = OptunaProxy(pruner.blocks, tmp_path / db, seed=3, n_startup_trials=2)
        return decide_group(model, (0, 10), frac * pruner.base_flops, proxy, rounds, score,
                            pruner=pruner)  # fmt: skip

    ratios, best, first = decide(3)
    assert len(calls) == 3 and [h.round for h in first] == [0, 1, 2]
    winner = min((h for h in first if h.score is not None), key=lambda h: h.score)
    assert ratios == winner.achieved and abs(model_flops(best) - budget) <= 0.02 * budget
    again_ratios, again_best, again = decide(3)  # a rerun: nothing new to score
    assert len(calls) == 3 and again_ratios == ratios
    assert [(h.round, h.ratios, h.score) for h in again] == [
        (h.round, h.ratios, h.score) for h in first
    ]
    assert all(
        torch.equal(a, b)
        for a, b in zip(best.state_dict().values(), again_best.state_dict().values(), strict=True)
    )
    _, _, more = decide(5)  # two more rounds, numbered after the bank's
    assert len(calls) == 5 and [h.round for h in more] == [0, 1, 2, 3, 4]
    assert more[:3] == again
    _, _, fewer = decide(2)  # the decision uses the bank's first rounds only
    assert len(calls) == 5 and fewer == more[:2]
    with pytest.raises(ValueError, match="another base model or budget"):
        decide(2, frac=0.5)  # a bank scored for another budget is refused
    _, _, fresh = decide(2, db="other.db")
    assert len(calls) == 7 and [h.round for h in fresh] == [0, 1]


def test_denoising_score_uses_the_heldout_images() -> None:
    model, sched, data = _unet(), DDPMScheduler(num_train_timesteps=1000), _data(24)
    tune, heldout = data.take(slice(0, 8)), data.take(slice(8, 24))
    a = denoising_score(model, sched, tune, (0, 1000), 0, heldout=heldout)
    b = denoising_score(model, sched, tune, (0, 1000), 0, heldout=heldout.take(slice(0, 8)))
    c = denoising_score(model, sched, data, (0, 1000), 0, heldout=heldout)
    assert a != b  # the score is over every held-out image
    assert a == c  # untuned: the fine-tune images play no part


def test_search_images_split() -> None:
    assert search_images(1000, 64, 256, 256) == (64, 256, 256)
    assert search_images(512, 64, 256, 256) == (64, 256, 256)  # just enough
    assert search_images(96, 64, 32, 256) == (64, 32, 24)  # a quarter held out
    assert search_images(96, 80, 32, 256) == (72, 32, 24)
    assert search_images(2, 64, 256, 256) == (1, 1, 1)
    with pytest.raises(ValueError, match="at least 2 training images, got 1"):
        search_images(1, 64, 256, 256)


def test_search_flops_counts_taylor_and_scored_candidates() -> None:
    # Taylor: 10 (image, t) pairs on a 100-FLOP base, fwd + bwd = 3 forwards: 3,000.
    # Candidate of 50 FLOPs: 2 steps x 4 images x 3 x 50 = 1,200, 8 held-out forwards 400.
    # Candidate of 40: 960 + 320. The round that missed its budget (None) costs nothing.
    assert search_flops(100, 10, [50, None, 40], 2, 4, 8) == 3000 + 1200 + 400 + 960 + 320
    assert search_flops(100, 0, [], 20, 16, 256) == 0

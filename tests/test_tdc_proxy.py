"""Proxy rounds: Optuna (seeded, resumable memory bank), an LLM endpoint with fallback, scoring."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from dedt_ray.tdc.denoise import Batch
from dedt_ray.tdc.proxy import (
    LLMProxy,
    OptunaProxy,
    RoundRecord,
    decide_group,
    denoising_score,
    parse_ratios,
)
from dedt_ray.tdc.pruning import UNetPruner, architecture_table

BLOCKS = ["down.0", "down.1", "mid", "up.0", "up.1"]
TARGET = {"down.0": 0.1, "down.1": 0.6, "mid": 0.8, "up.0": 0.3, "up.1": 0.2}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    pruner = UNetPruner.from_denoising(model, sched, data, (500, 1000), n_batches=1)
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
    _, _, more = decide_group(model, (500, 1000), budget, reopened, 1, score, pruner=pruner)
    assert more[0].round == 3 and more[0].proposer == "optuna"


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

"""Tensor parallel.

The arithmetic: two gloo ranks, each holding half of a vocabulary-sharded LM head (and
embedding table), run ESamp steps and must match one rank holding the whole head, token for
token and parameter for parameter, with identical Distillers on both ranks.

The real server (CPU engine, tiny random Llama, `--tp-size 2`): ESamp requests of both
variants, beside plain ones, and the ranks never drew different tokens."""

import threading
from collections import deque

import multiprocessing as mp

import pytest
import torch
import torch.distributed as dist

from sgl_esamp import ESampConfig, ESampSampler, ESampStep, Filters, VocabShard
from sgl_esamp.candidates import filter_candidates
from sgl_esamp.mirror import HostMirror
from test_server import bank, generate, wait_for

WORLD, VOCAB, HIDDEN, STEPS = 2, 1003, 48, 5  # an odd vocabulary: shards of 502 and 501 rows
ROWS = [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1), ("c", 0)]


def shard_range(rank: int) -> tuple[int, int]:
    per = -(-VOCAB // WORLD)
    return rank * per, min(VOCAB, (rank + 1) * per)


def step_inputs(step: int):
    gen = torch.Generator().manual_seed(100 + step)
    n = len(ROWS)
    logits = torch.randn(n, VOCAB, generator=gen) * 2
    shallow, deep = torch.randn(n, HIDDEN, generator=gen), torch.randn(n, HIDDEN, generator=gen)
    temps = torch.tensor([0.8, 1.0, 0.7, 1.2, 0.9, 0.0])
    top_ks = torch.tensor([50, 1 << 30, 20, 1 << 30, 40, 1 << 30])
    top_ps = torch.tensor([0.9, 0.95, 1.0, 0.8, 1.0, 1.0])
    min_ps = torch.tensor([0.0, 0.02, 0.0, 0.0, 0.05, 0.0])
    betas = torch.tensor([0.5, 1.0, 2.0, 0.7, 0.3, 1.0])
    return logits, shallow, deep, betas, temps, top_ks, top_ps, min_ps


class LaggingMirror(HostMirror):
    """Reports the statistics as they were `lag` training steps ago, as a GPU's copies can arrive
    late, by a different number of steps on each rank."""

    def __init__(self, values: torch.Tensor, lag: int):
        super().__init__(values)
        self.history: deque = deque(maxlen=lag + 1)

    def publish(self) -> None:
        self.history.append(self.values.clone())

    def read(self):
        return self.history[0] if len(self.history) == self.history.maxlen else None


def run(head: torch.Tensor, variant: str, vocab_shard=None, lag: int = 0, fault_step: int = -1) -> dict:
    """STEPS of sample() and fuse() on the same inputs; tokens, fused weights and final states.
    lag: the host mirror reports that many steps late; fault_step: group a's rows are NaN then."""
    config = ESampConfig(variant=variant, beta=1.0, rank=8, num_slots=4, max_candidates=64, seed=3)
    sampler = ESampSampler(config, head, vocab_shard=vocab_shard)
    if lag:
        sampler.mirror = LaggingMirror(sampler.trainer.stats, lag)
    tokens, weights = [], []
    for step in range(STEPS):
        logits, shallow, deep, betas, temps, top_ks, top_ps, min_ps = step_inputs(step)
        if step == fault_step:
            shallow[:3] = float("nan")  # group a's hidden states
        layout = sampler.decode_layout(sampler.assign_slots(ROWS), betas.tolist())
        esamp_step = ESampStep.tapped(layout, shallow, deep)
        filters = Filters(temps, top_ks, top_ps, min_ps)
        if step % 2:
            kept = filter_candidates(logits, *filters, 64)
            weights.append(sampler.fuse(esamp_step, kept, logits.gather(1, kept.token_ids), temps).weights)
        else:
            probs = torch.softmax(logits / torch.where(temps > 0, temps, 1.0).view(-1, 1), -1)
            tokens.append(sampler.sample(esamp_step, probs, logits, filters))
    return {"tokens": torch.stack(tokens), "weights": torch.stack(weights), "params": sampler.distillers.flat.clone(),
            "moments": sampler.trainer.exp_avg_sq_rows.clone(), "stats": sampler.trainer.stats.clone()}


def full_head() -> torch.Tensor:
    return torch.randn(VOCAB, HIDDEN, generator=torch.Generator().manual_seed(7)) / HIDDEN**0.5


def rank_main(rank: int, workdir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{workdir}/init", rank=rank, world_size=WORLD)
    try:
        start, end = shard_range(rank)

        def all_reduce(t: torch.Tensor) -> torch.Tensor:
            dist.all_reduce(t)
            return t

        shard = VocabShard(start, end, all_reduce)
        head = full_head()
        out = {variant: run(head[start:end].contiguous(), variant, shard) for variant in ("latent", "reference")}
        ids = torch.tensor([[0, 501, 502, 1002], [7, 600, 3, 999]])
        out["embedding_rows"] = shard.rows(head[start:end], ids)
        out["fault"] = {variant: run(head[start:end].contiguous(), variant, shard, lag=1 + 2 * rank, fault_step=2)
                        for variant in ("latent", "reference")}
        from sgl_esamp.patches.sampler_backend import TokenIdSync

        sync, agreed = TokenIdSync(), []  # the backend's own: two steps whose ids the ranks drew apart
        for drawn in ([5, 9, 3, 7, 11], [4, 4, 4]) if rank == 0 else ([5, 2, 3, 8, 11], [4, 6, 4]):
            ids = torch.tensor(drawn)
            sync(ids, None)
            agreed.append(ids.tolist())
        out["reconciled"] = agreed, sync.mismatches
        torch.save(out, f"{workdir}/rank{rank}.pt")  # files: shared-memory tensors die with their process
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("gloo")
    procs = [mp.get_context("spawn").Process(target=rank_main, args=(r, str(workdir))) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
        assert p.exitcode == 0
    return {r: torch.load(workdir / f"rank{r}.pt") for r in range(WORLD)}


@pytest.mark.parametrize("variant", ["latent", "reference"])
def test_sharded_head_matches_one_rank_with_the_whole_head(sharded, variant):
    whole = run(full_head(), variant)
    for rank in range(WORLD):
        mine = sharded[rank][variant]
        assert torch.equal(mine["tokens"], whole["tokens"])
        # d of each candidate is one rank's product plus zeros: the same float, step after step
        for key in ("weights", "params", "moments", "stats"):
            assert torch.equal(mine[key], whole[key]), key
    assert whole["params"].ne(run(full_head(), variant)["params"]).sum() == 0  # deterministic reference
    assert (whole["moments"] != 0).any()  # it trained


def test_every_rank_holds_the_same_distiller(sharded):
    for variant in ("latent", "reference"):
        assert torch.equal(sharded[0][variant]["params"], sharded[1][variant]["params"])


@pytest.mark.parametrize("variant", ["latent", "reference"])
def test_a_fault_resets_its_slot_on_every_rank_at_the_same_step_whatever_the_host_mirrors_lag(sharded, variant):
    """Rank 0's host mirror reports one step late, rank 1's three: the reset is decided on the
    device from values both ranks share, so both stay bit for bit what one rank computes alone."""
    alone = run(full_head(), variant, fault_step=2)
    for rank in range(WORLD):
        mine = sharded[rank]["fault"][variant]
        for key in ("tokens", "weights", "params", "moments", "stats"):
            assert torch.equal(mine[key], alone[key]), (rank, key)
    from sgl_esamp import stats as S

    faulty_slot = 0  # group a, the first assigned
    assert alone["stats"][faulty_slot, S.FAULT_RESETS] == 1 and alone["stats"][faulty_slot, S.FAULTS] == 1
    assert alone["stats"][faulty_slot, S.STEPS] == STEPS - 3  # restarted at step 2, then trained on
    assert (alone["stats"][1:3, S.FAULTS] == 0).all()  # the other groups never faulted


def test_the_ranks_take_the_smallest_id_drawn_and_count_the_rows_they_disagreed_on(sharded):
    for rank in range(WORLD):
        agreed, mismatches = sharded[rank]["reconciled"]
        assert agreed == [[5, 2, 3, 7, 11], [4, 4, 4]] and mismatches == 2 + 1  # counted over the steps


def test_embedding_rows_from_shards(sharded):
    ids = torch.tensor([[0, 501, 502, 1002], [7, 600, 3, 999]])
    for rank in range(WORLD):
        assert torch.equal(sharded[rank]["embedding_rows"], full_head()[ids])


def test_shard_bounds_are_the_ones_the_engine_gave():
    shard = VocabShard(502, 1003, lambda t: t)
    mine, row = shard.local_index(torch.tensor([501, 502, 1002, 1003]))
    assert mine.tolist() == [False, True, True, False] and row.tolist() == [0, 0, 500, 0]




@pytest.fixture(scope="module")
def tp_server(request, tiny_model):
    from sgl_esamp.tools.launch import launch

    server = launch(tiny_model, esamp=True, extra_args=["--esamp-slots", "8", "--esamp-variants", "all", "--tp-size", str(WORLD)],
                    env={"ESAMP_TEST_FAULT_GROUP": "tp-faulty"})
    request.addfinalizer(server.stop)
    return server


def test_esamp_on_a_tensor_parallel_server(tp_server):
    results = {}

    def run_request(name, **sampling):
        results[name] = generate(tp_server, f"A story about {name}:", max_new_tokens=10, **sampling)

    requests_ = {
        "latent": dict(n=2, custom_params={"variant": "latent"}),
        "reference": dict(n=2, custom_params={"variant": "reference", "beta": 1.0}),
        "shared-a": dict(custom_params={"group_id": "tp-shared"}),
        "shared-b": dict(custom_params={"group_id": "tp-shared"}),
        "plain": dict(custom_params={"sampling": "plain"}),
        "greedy": dict(temperature=0.0),
        "faulty": dict(n=2, custom_params={"group_id": "tp-faulty"}),  # NaN in its hidden states (test hook)
    }
    threads = [threading.Thread(target=run_request, args=(name,), kwargs=kw) for name, kw in requests_.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for name in ("latent", "reference"):
        infos = [o["meta_info"]["esamp"] for o in results[name]]
        assert all(i["enabled"] and i["variant"] == name and i["train_steps"] > 0 for i in infos)
        assert all(i["faults"] == 0 and i["signal"]["rows"] > 0 for i in infos)
        assert all(o["meta_info"]["completion_tokens"] == 10 for o in results[name])
    assert results["shared-a"]["meta_info"]["esamp"]["slot"] == results["shared-b"]["meta_info"]["esamp"]["slot"]
    faulty = [o["meta_info"]["esamp"] for o in results["faulty"]]
    assert all(o["meta_info"]["completion_tokens"] == 10 for o in results["faulty"])  # it still generated
    assert max(i["faults"] for i in faulty) >= 1 and max(i["fault_resets"] for i in faulty) >= 1
    assert all(i["train_steps"] == 0 for i in faulty)  # every one of its steps was poisoned: none trained
    assert "esamp" not in results["plain"]["meta_info"]
    stats = bank(tp_server)
    assert stats["tp_size"] == WORLD
    assert stats["tp_token_mismatches"] == 0  # the ranks' Distillers, resets and draws never parted
    assert wait_for(lambda: bank(tp_server)["active_members"] == 0)

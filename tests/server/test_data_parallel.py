"""Data parallel on the real server (CPU engine, tiny random Llama, `--dp-size 2`): every row of
one ESamp group is sampled by the same replica, and groups spread over both.

Without the routing hook SGLang's round-robin controller sends the n samples of a request
(and requests sharing a group id) to alternating replicas, so these tests fail."""

import threading

import pytest

from sgl_esamp.patches.routing import replica_for
from test_server import bank, generate, wait_for

DP = 2


@pytest.fixture(scope="module")
def dp_server(request, tiny_model):
    from sgl_esamp.tools.launch import launch

    # SGLang applies X-Override-* headers only with this variable set (request_headers.py)
    server = launch(tiny_model, esamp=True, extra_args=["--esamp-slots", "8", "--dp-size", str(DP)],
                    env={"SGLANG_ENABLE_REQUEST_HEADER_OVERRIDES": "1"})
    request.addfinalizer(server.stop)
    return server


def group_ids_for_each_replica(count: int = 2) -> dict[int, list[str]]:
    ids: dict[int, list[str]] = {rank: [] for rank in range(DP)}
    i = 0
    while any(len(v) < count for v in ids.values()):
        group = f"dp-group-{i}"
        rank = replica_for(group, list(range(DP)))
        if len(ids[rank]) < count:
            ids[rank].append(group)
        i += 1
    return ids


def test_n_samples_of_a_request_share_one_replica(dp_server):
    for prompt in ("The quick brown fox", "Once upon a time", "In a distant galaxy"):
        infos = [o["meta_info"]["esamp"] for o in generate(dp_server, prompt, n=4, max_new_tokens=6)]
        assert all(i["enabled"] for i in infos)
        assert len({i["group_id"] for i in infos}) == 1
        assert len({i["dp_rank"] for i in infos}) == 1, infos


def test_requests_sharing_a_group_id_meet_on_the_replica_it_hashes_to(dp_server):
    ids = group_ids_for_each_replica()
    results: dict[str, list] = {}

    def run(group: str, k: int) -> None:
        out = generate(dp_server, f"Idea {k} for {group}:", n=2, max_new_tokens=6,
                       custom_params={"sampling": "esamp", "group_id": group})
        results[f"{group}/{k}"] = [o["meta_info"]["esamp"] for o in out]

    threads = [threading.Thread(target=run, args=(group, k))
               for groups in ids.values() for group in groups for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert len(results) == len(threads)
    for rank, groups in ids.items():
        for group in groups:
            infos = [i for k in range(3) for i in results[f"{group}/{k}"]]
            assert {i["dp_rank"] for i in infos} == {rank}, (group, infos)
            assert {i["group_id"] for i in infos} == {group}
    served = {i["dp_rank"] for infos in results.values() for i in infos}
    assert served == set(range(DP))  # both replicas work, each on its own groups


def test_plain_and_greedy_requests_still_served(dp_server):
    plain = generate(dp_server, "Plain please", max_new_tokens=4, custom_params={"sampling": "plain"})
    greedy = generate(dp_server, "Greedy please", max_new_tokens=4, temperature=0.0)
    assert plain["meta_info"]["completion_tokens"] == greedy["meta_info"]["completion_tokens"] == 4
    assert wait_for(lambda: bank(dp_server)["active_members"] == 0)


@pytest.mark.parametrize("how", ["body", "header"])
def test_a_rank_the_client_chooses_wins_over_the_group_hash(dp_server, how):
    import requests

    group = group_ids_for_each_replica(1)[0][0]  # hashes to replica 0
    body = {"text": "Pinned by the client", "sampling_params": {"temperature": 0.9, "max_new_tokens": 4, "n": 2,
                                                                 "custom_params": {"group_id": group}}}
    headers = {}
    if how == "body":
        body["routed_dp_rank"] = 1
    else:
        headers["X-Override-Routed-DP-Rank"] = "1"
    response = requests.post(dp_server.url + "/generate", json=body, headers=headers, timeout=300)
    assert response.status_code == 200, response.text
    assert {o["meta_info"]["esamp"]["dp_rank"] for o in response.json()} == {1}

"""The trie hub and a worker's sync (lookahead_ray.hub, lookahead_ray.sync): in-process first, then the hub as a Ray
actor on the session's local Ray instance."""

from __future__ import annotations

import logging
import os
import time
import types
from typing import Any

import pytest
from lookahead_ray.cluster import check_resources
from lookahead_ray.hub import TrieHubState, find_hub, start_hub, stop_hub
from lookahead_ray.spec import GeneratorSpec
from lookahead_ray.sync import ActorHubClient, TrieSync, replica_trie
from ray_utils import local_ray

from lookahead.store import DraftStore

CONFIG = {"branch_length": 4, "max_query_length": 3}


class InProcessHub:
    """A HubClient over a TrieHubState in this process; ``down`` makes every call fail like a dead actor."""

    def __init__(self, state: TrieHubState, tenant: str | None = None) -> None:
        self.state = state
        self.tenant = tenant
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise ConnectionError("hub is gone")

    def sync(self, delta: dict[str, Any] | None, since: int, worker: dict[str, Any]) -> dict[str, Any]:
        self._check()
        return self.state.sync(delta, since, worker, self.tenant)

    def snapshot(self) -> dict[str, Any]:
        self._check()
        return self.state.snapshot(self.tenant)


def worker() -> types.SimpleNamespace:
    """What TrieSync needs of a generator: a ``trie`` attribute."""
    return types.SimpleNamespace(trie=DraftStore(**CONFIG))


def test_two_workers_share_what_each_learned():
    hub = InProcessHub(TrieHubState(CONFIG))
    a, b = worker(), worker()
    sync_a = TrieSync(a, hub, interval=60).start()
    sync_b = TrieSync(b, hub, interval=60).start()
    try:
        a.trie.insert([1, 2, 3, 4, 5, 6])
        b.trie.insert([7, 8, 9, 10])
        assert sync_a.sync_now() and sync_b.sync_now() and sync_a.sync_now()
        for trie in (a.trie, b.trie, hub.state.trie):
            assert trie.count([1, 2, 3]) == 1.0 and trie.count([7, 8, 9]) == 1.0
        assert sync_b.sync_now() and sync_a.sync_now()  # nothing new: no count changes (merge is idempotent)
        assert a.trie.count([1, 2, 3]) == 1.0 and hub.state.trie.count([7, 8]) == 1.0
        assert {w["origin"] for w in hub.state.stats()["workers"]} == {a.trie.origin, b.trie.origin}
    finally:
        sync_a.stop()
        sync_b.stop()


def test_a_late_worker_starts_warm_with_its_own_origin():
    hub = InProcessHub(TrieHubState(CONFIG))
    a = worker()
    sync_a = TrieSync(a, hub, interval=60).start()
    a.trie.insert([1, 2, 3, 4])
    sync_a.sync_now()
    late = worker()
    sync_late = TrieSync(late, hub, interval=60).start()
    assert sync_late.stats.warm_nodes == len(hub.state.trie) > 0
    assert late.trie.count([1, 2, 3]) == 1.0 and late.trie.origin not in (a.trie.origin, hub.state.trie.origin)
    late.trie.insert([5, 6, 7])  # its own entries reach the others
    sync_late.sync_now()
    sync_a.sync_now()
    assert a.trie.count([5, 6, 7]) == 1.0 and late.trie.count([1, 2, 3]) == 1.0  # nothing merged twice


def test_a_worker_keeps_decoding_when_the_hub_is_gone(caplog):
    hub = InProcessHub(TrieHubState(CONFIG))
    a = worker()
    sync = TrieSync(a, hub, interval=60).start()
    hub.down = True
    a.trie.insert([1, 2, 3])
    with caplog.at_level(logging.WARNING, logger="lookahead_ray"):
        assert sync.sync_now() is False and sync.sync_now() is False
    assert sum("unreachable" in r.message for r in caplog.records) == 1  # logged once
    assert a.trie.count([1, 2, 3]) == 1.0 and sync.stats.failures == 2 and sync.stats.hub_reachable is False
    hub.down = False
    assert sync.sync_now() and hub.state.trie.count([1, 2, 3]) == 1.0  # what it learned meanwhile is pushed


def test_a_sync_started_without_its_own_thread_syncs_when_called():
    hub = InProcessHub(TrieHubState(CONFIG))
    a = worker()
    sync = TrieSync(a, hub, interval=0.01).start(background=False)  # synced once at start, then only when called
    assert not sync.background and sync.stats.syncs == 1
    a.trie.insert([1, 2, 3])
    assert hub.state.trie.count([1, 2, 3]) == 0.0
    assert sync.sync_now() and hub.state.trie.count([1, 2, 3]) == 1.0


def test_sharing_off_does_nothing():
    a = worker()
    sync = TrieSync(a, None).start()
    assert not sync.enabled and sync.sync_now() is False and sync.stats.syncs == 0


def test_the_hub_saves_atomically_and_a_restart_is_warm(tmp_path):
    path = tmp_path / "hub" / "trie.json.gz"
    first = TrieHubState(CONFIG, path, save_interval=0)
    a = worker()
    TrieSync(a, InProcessHub(first), interval=60).start()
    a.trie.insert([1, 2, 3, 4, 5])
    TrieSync(a, InProcessHub(first), interval=60).sync_now()
    assert first.close() and path.is_file() and first.close() is False  # unchanged: not written again
    # no temporary file left (the lock file stays: removing it would race with a process taking it)
    assert sorted(p.name for p in path.parent.iterdir()) == ["trie.json.gz", "trie.json.gz.lock"]
    second = TrieHubState(CONFIG, path)
    assert second.stats()["loaded_nodes"] == len(first.trie) and second.trie.count([1, 2, 3]) == 1.0
    fresh = worker()
    TrieSync(fresh, InProcessHub(second), interval=60).start()
    assert fresh.trie.count([2, 3, 4]) == 1.0  # a worker of the restarted hub starts warm
    second.close()


def test_a_tenants_trie_is_shared_with_that_tenants_tries_only_and_saved_to_its_own_file(tmp_path):
    path = tmp_path / "trie.json.gz"
    state = TrieHubState(CONFIG, path, save_interval=0)
    a1, a2, b, everyone = worker(), worker(), worker(), worker()  # two replicas' tries of tenant a, b's, global
    syncs = [TrieSync(a1, InProcessHub(state, "a"), interval=60).start(),
             TrieSync(a2, InProcessHub(state, "a"), interval=60).start(),
             TrieSync(b, InProcessHub(state, "b"), interval=60).start(),
             TrieSync(everyone, InProcessHub(state), interval=60).start()]
    a1.trie.insert([1, 2, 3, 4, 5])
    b.trie.insert([7, 8, 9])
    for sync in syncs + syncs:
        assert sync.sync_now()
    assert a2.trie.count([1, 2, 3]) == 1.0  # tenant a's answer reached tenant a's other replica ...
    assert b.trie.count([1, 2, 3]) == 0.0 and everyone.trie.count([1, 2, 3]) == 0.0  # ... and no one else
    assert a2.trie.count([7, 8, 9]) == 0.0 and state.trie.count([7, 8, 9]) == 0.0
    a1.trie.insert_source("doc-1", [20, 21, 22, 23])
    assert syncs[0].sync_now() and syncs[1].sync_now() and a2.trie.count([20, 21, 22]) == 1.0
    a1.trie.remove_source("doc-1")  # a deletion on one replica reaches the other through the hub
    assert syncs[0].sync_now() and syncs[1].sync_now() and a2.trie.count([20, 21, 22]) == 0.0
    assert state.stats()["tenants"] == {"a": len(state.trie_of("a")), "b": len(state.trie_of("b"))}
    assert state.saves > 0  # the removal was saved as soon as it was merged (with every trie that changed)
    state.close()
    # each tenant's file next to the global one (which did not change: not written)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trie.json.gz.lock", "trie.tenant-a.json.gz",
                                                          "trie.tenant-b.json.gz"]
    restarted = TrieHubState(CONFIG, path, save_interval=0)
    late = worker()
    TrieSync(late, InProcessHub(restarted, "a"), interval=60).start()  # a new replica of tenant a starts warm
    assert late.trie.count([1, 2, 3]) == 1.0 and late.trie.count([7, 8, 9]) == 0.0
    with pytest.raises(ValueError, match="tenant name"):
        restarted.trie_of("../escape")


def test_a_corrupt_hub_file_is_moved_aside(tmp_path):
    path = tmp_path / "trie.json"
    path.write_text("not a trie")
    hub = TrieHubState(CONFIG, path, save_interval=0)
    assert len(hub.trie) == 0 and any(p.name.startswith("trie.json.corrupt-") for p in tmp_path.iterdir())


def test_replica_refuses_garbage():
    with pytest.raises(ValueError):
        replica_trie(b"{}")


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="interval"):
        TrieSync(worker(), None, interval=0)
    with pytest.raises(ValueError, match="save_interval"):
        TrieHubState(CONFIG, None, save_interval=-1)


def test_the_hub_as_a_ray_actor(tmp_path):
    local_ray()
    path = tmp_path / "trie.json"
    hub = start_hub(CONFIG, path, save_interval=0, name="test-hub")
    try:
        assert find_hub("test-hub") is not None and find_hub("no-such-hub") is None
        a, b = worker(), worker()
        sync_a = TrieSync(a, ActorHubClient(hub), interval=0.05).start()
        sync_b = TrieSync(b, ActorHubClient(hub), interval=0.05).start()
        a.trie.insert([11, 12, 13, 14])
        deadline = 200
        while b.trie.count([11, 12, 13]) == 0 and deadline:  # the background threads carry it over
            time.sleep(0.05)
            deadline -= 1
        assert b.trie.count([11, 12, 13]) == 1.0
        sync_a.stop()
        sync_b.stop()
    finally:
        assert stop_hub(hub) is True
    assert path.is_file() and DraftStore.load(path).count([11, 12, 13]) == 1.0
    assert find_hub("test-hub") is None
    assert os.path.getsize(path) > 0


def test_requests_the_cluster_can_never_place_are_refused():
    local_ray()
    check_resources(2, 1, 0)  # the test instance has 2 CPUs and no GPU
    with pytest.raises(ValueError, match="3 workers x 1 CPUs need 3 CPUs; the Ray cluster has 2"):
        check_resources(3, 1, 0)
    with pytest.raises(ValueError, match="GPUs"):
        check_resources(1, 1, 1)
    with pytest.raises(ValueError, match="threads"):
        GeneratorSpec(threads=0)

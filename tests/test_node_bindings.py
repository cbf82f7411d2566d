"""A node writes only its own person: the operator's bindings file, first-claim binding, and `posettp node` that
edits the file (fast; the deployment test in tests/e2e/test_flower.py runs the same rule between real SuperNodes)."""
from __future__ import annotations

import json

import pytest

from server.fl import handle_reply
from posettp.cli import main as posettp
from server.nodes import NodeBindings, default_bindings_url, read_bindings
from tests.test_fl_validation import (base, ck, ck_url, encode, honest_delta, reply, store,  # noqa: F401 (fixtures)
                                      task_identity)


def test_operator_bindings_refuse_other_persons_and_unbound_nodes(ck, store, tmp_path):  # noqa: F811
    url = str(tmp_path / "nodes.json")
    assert posettp(["node", "bind", "--store", "unused", "--file", url, "--node", "11", "--person", "alice"]) == 0
    assert posettp(["node", "bind", "--store", "unused", "--file", url, "--node", "22", "--person", "bob"]) == 0
    bindings = NodeBindings.for_run(url, store.url)
    assert bindings.mode == "operator" and read_bindings(url) == {11: "alice", 22: "bob"}

    alice = encode(ck, honest_delta(ck), person="alice")
    entry = handle_reply(reply(alice, person="alice"), store, 22, bindings)  # bob's node claims alice
    assert entry["status"] == "refused" and entry["bound"] is False
    assert "node 22 is bound to person 'bob', not 'alice'" in entry["reason"]
    entry = handle_reply(reply(alice, person="alice"), store, 33, bindings)  # a node nobody bound
    assert entry["status"] == "refused" and "node 33 is not bound" in entry["reason"]
    assert store.persons() == []
    entry = handle_reply(reply(alice, person="alice"), store, 11, bindings)
    assert entry["status"] == "stored", entry
    assert store.persons() == ["alice"]


def test_first_claim_binds_a_person_to_one_node_for_the_run(ck, store):  # noqa: F811
    bindings = NodeBindings.for_run("", store.url)
    assert bindings.mode == "first-claim"
    alice = encode(ck, honest_delta(ck), person="alice")
    assert handle_reply(reply(alice, person="alice"), store, 11, bindings)["status"] == "stored"
    entry = handle_reply(reply(alice, person="alice"), store, 22, bindings)
    assert entry["status"] == "refused" and "bound to node 11" in entry["reason"]
    bob = encode(ck, honest_delta(ck), person="bob")
    entry = handle_reply(reply(bob, person="bob"), store, 11, bindings)  # alice's node now claims bob
    assert entry["status"] == "refused" and "answered for person 'alice'" in entry["reason"]
    assert handle_reply(reply(bob, person="bob"), store, 22, bindings)["status"] == "stored"
    assert bindings.describe() == {"mode": "first-claim", "claims": {"11": "alice", "22": "bob"}}


def test_the_store_default_file_is_used_when_present_and_a_named_file_must_exist(store, tmp_path):  # noqa: F811
    assert NodeBindings.for_run("", store.url).mode == "first-claim"
    assert posettp(["node", "bind", "--store", store.url, "--node", "5", "--person", "carol"]) == 0
    bindings = NodeBindings.for_run("", store.url)
    assert bindings.mode == "operator" and bindings.source == default_bindings_url(store.url)
    with pytest.raises(FileNotFoundError):
        NodeBindings.for_run(str(tmp_path / "missing.json"), store.url)


@pytest.mark.parametrize("body", [[1, 2], {"format": "other", "nodes": {}}, {"format": "posettp-node-bindings",
                                  "nodes": {"x1": "alice"}}, {"format": "posettp-node-bindings", "nodes": {"1": "../a"}}])
def test_a_malformed_bindings_file_is_an_error_not_an_open_door(tmp_path, body):
    url = tmp_path / "nodes.json"
    url.write_text(json.dumps(body))
    with pytest.raises(ValueError):
        NodeBindings.for_run(str(url), str(tmp_path))


def test_cli_refuses_a_bad_person_id_and_reports_unbinding(tmp_path, capsys):
    url = str(tmp_path / "nodes.json")
    assert posettp(["node", "bind", "--store", "x", "--file", url, "--node", "1", "--person", "a/b"]) == 2
    assert "invalid person id" in capsys.readouterr().err
    assert posettp(["node", "unbind", "--store", "x", "--file", url, "--node", "1"]) == 1
    assert posettp(["node", "bind", "--store", "x", "--file", url, "--node", "1", "--person", "ab"]) == 0
    assert posettp(["node", "unbind", "--store", "x", "--file", url, "--node", "1"]) == 0
    capsys.readouterr()
    assert posettp(["node", "list", "--store", "x", "--file", url]) == 0
    assert json.loads(capsys.readouterr().out) == {}

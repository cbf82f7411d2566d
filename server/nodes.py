"""Which SuperNode may write which person's model: a reply is filed only for the person its node is bound to.

The person id in a reply is the client's own claim, so nothing in it stops one node from writing another
person's model. The operator binds node ids to person ids in `{store}/auth/nodes.json` (any fsspec URL).
Under `--enable-supernode-auth` a node id belongs to one registered public key (`flwr supernode register`
prints it), so binding the id binds the key. With that file, a reply from an unbound node, or for a person
other than its node's, is refused. Without it (simulation, or a trial deployment), the run binds on first
claim: a node keeps the first person it answers for, a person keeps the first node, and later claims that
break either are refused.

    posettp node bind --store URL --node 1234567890 --person alice
    posettp node unbind --store URL --node 1234567890
    posettp node list --store URL
"""
from __future__ import annotations

import json
import sys
import time

from model import io
from model.delta import DeltaRejected
from store.policy import check_person_id

FORMAT = "posettp-node-bindings"


class NodeNotBound(DeltaRejected):
    """A reply from a node for a person it may not write."""


def default_bindings_url(store: str) -> str:
    return io.join(store, "auth", "nodes.json")


def read_bindings(url: str) -> dict[int, str]:
    """node id -> person id; raises ValueError on anything but a bindings file."""
    data = json.loads(io.read_bytes(url))
    nodes = data.get("nodes") if isinstance(data, dict) and data.get("format") == FORMAT else None
    if not isinstance(nodes, dict):
        raise ValueError(f"{url}: not a {FORMAT} file")
    out = {}
    for node, person in nodes.items():
        if not (isinstance(node, str) and node.isdigit() and isinstance(person, str)):
            raise ValueError(f"{url}: node ids must be decimal strings mapped to person ids, got {node!r}: {person!r}")
        out[int(node)] = check_person_id(person)
    return out


def write_bindings(url: str, nodes: dict[int, str]) -> None:
    body = {"format": FORMAT, "format_version": 1, "updated_at": time.time(),
            "nodes": {str(n): p for n, p in sorted(nodes.items())}}
    io.write_bytes_atomic(url, json.dumps(body, indent=2).encode())


class NodeBindings:
    """The binding rule of one federation run; `claim(node, person)` passes or raises NodeNotBound."""

    def __init__(self, fixed: dict[int, str] | None = None, source: str = ""):
        self.fixed = fixed
        self.source = source
        self.claims: dict[int, str] = {}  # first-claim mode: node -> person, this run

    @classmethod
    def for_run(cls, bindings_url: str, storage: str) -> "NodeBindings":
        """The operator's file at `bindings_url` (which must exist), else `{storage}/auth/nodes.json` when it
        exists, else first-claim binding."""
        url = bindings_url or default_bindings_url(storage)
        if bindings_url or io.exists(url):
            return cls(read_bindings(url), url)
        return cls()

    @property
    def mode(self) -> str:
        return "operator" if self.fixed is not None else "first-claim"

    def claim(self, node: int, person: str) -> None:
        if self.fixed is not None:
            bound = self.fixed.get(node)
            if bound is None:
                raise NodeNotBound(f"node {node} is not bound to a person; the operator binds it with "
                                   f"`posettp node bind`")
            if bound != person:
                raise NodeNotBound(f"node {node} is bound to person {bound!r}, not {person!r}")
            return
        mine = self.claims.get(node)
        if mine is not None and mine != person:
            raise NodeNotBound(f"node {node} answered for person {mine!r} earlier in this run, not {person!r}")
        holder = next((n for n, p in self.claims.items() if p == person and n != node), None)
        if holder is not None:
            raise NodeNotBound(f"person {person!r} is bound to node {holder} in this run")
        self.claims[node] = person

    def describe(self) -> dict:
        """For the run summary."""
        if self.fixed is not None:
            return {"mode": self.mode, "source": self.source, "nodes": len(self.fixed)}
        return {"mode": self.mode, "claims": {str(n): p for n, p in sorted(self.claims.items())}}


def node_command(args) -> int:
    """`posettp node bind|unbind|list`: edit or print the bindings file."""
    url = args.file or default_bindings_url(args.store)
    if args.action == "list":
        nodes = read_bindings(url) if io.exists(url) else {}
        print(json.dumps({str(n): p for n, p in sorted(nodes.items())}, indent=2))
        return 0
    if args.node is None or (args.action == "bind" and not args.person):
        raise ValueError(f"{args.action} needs --node" + (" and --person" if args.action == "bind" else ""))
    with io.updating(url):
        nodes = read_bindings(url) if io.exists(url) else {}
        if args.action == "bind":
            nodes[args.node] = check_person_id(args.person)
        elif nodes.pop(args.node, None) is None:
            print(f"node {args.node} was not bound", file=sys.stderr)
            return 1
        write_bindings(url, nodes)
    print(f"bound node {args.node} to {args.person}" if args.action == "bind" else f"unbound node {args.node}")
    return 0

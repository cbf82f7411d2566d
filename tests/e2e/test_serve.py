"""`posettp serve` end to end: real Ray (its own local cluster and temp dir), real HTTP on 127.0.0.1.

Three persons with deltas and one unknown person get keypoints equal to the offline predictions of the
same models; a new delta version is served without a restart; bad input is a 4xx JSON and the app stays
healthy; a tampered delta falls back to base; concurrent clients see no cross-talk; SIGTERM shuts down
Serve and its Ray cleanly.
"""
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from posettp.procs import exposed, listening_sockets
from server.auth import add_token

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # repo root, also under plain `pytest`
from tests.fixtures_serve import (ServeProcess, land_delta, make_checkpoint, make_image,  # noqa: E402
                                  person_model, png_with_header, reference_keypoints, session_processes,
                                  write_serve_config)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

PERSONS = ["alice", "bob", "carol"]
UNKNOWN = "dave"  # has a token, never had a delta
TTL_S = 0.5
MAX_BODY = 1_000_000
ATOL = 1e-3  # pixels


def predict_reference(ck, store, pid, images, bboxes=None):
    model, version = person_model(ck, store, pid)
    bboxes = bboxes or [None] * len(images)
    return version, [reference_keypoints(model, img, box) for img, box in zip(images, bboxes)]


def as_array(answer) -> np.ndarray:
    return np.array([[k["x"], k["y"], k["score"]] for k in answer["keypoints"]], np.float32)


@pytest.fixture(scope="module")
def server():
    root = Path(tempfile.mkdtemp(prefix="pst-e2e-"))
    ck, store = str(root / "ck"), str(root / "store")
    make_checkpoint(ck)
    for i, pid in enumerate(PERSONS):
        land_delta(store, ck, pid, seed=10 + i, dtype=["fp16", "int8", "fp16"][i])
    tokens = {pid: add_token(str(root / "store/auth/tokens.json"), pid) for pid in PERSONS + [UNKNOWN, "erin"]}
    config = write_serve_config(str(root / "serve.yaml"), replicas=1, num_cpus=1, lru_size=8, ttl_s=TTL_S,
                                max_body_bytes=MAX_BODY, max_image_pixels=4_000_000, max_image_side=4096,
                                batch_size=8, batch_wait_ms=2, auth=True, tokens_ttl_s=1.0)
    proc = ServeProcess(ck, store, config, str(root / "serve.log"))
    started = False
    try:
        health = proc.wait_ready()
        started = True
        session = requests.Session()
        yield {"proc": proc, "url": proc.url, "ck": ck, "store": store, "root": root, "tokens": tokens,
               "health": health, "http": session}
    finally:
        rc, left, log = proc.shutdown()
        shutil.rmtree(root, ignore_errors=True)
        assert not started or (rc == 0 and not left), f"unclean shutdown (rc {rc}, leftover pids {left}):\n{log}"


def post(srv, pid, body, bbox=None, token=None, **kw):
    headers = {"Content-Type": "image/png"}
    token = srv["tokens"].get(pid) if token is None else token
    if token:
        headers["Authorization"] = f"Bearer {token}"
    params = {"bbox": bbox} if bbox is not None else None
    return srv["http"].post(f"{srv['url']}/v1/persons/{pid}/pose", data=body, headers=headers, params=params,
                            timeout=60, **kw)


def test_healthz(server):
    h = server["health"]
    assert h["status"] == "ok" and h["auth"] is True and h["image_size"] == 64 and h["num_joints"] == 13
    assert h["flip_test"] is False  # the default


def test_nothing_listens_beyond_loopback(server):
    """Serve's HTTP proxy and every Ray process behind it (GCS, raylet, workers, agents) bind 127.0.0.1."""
    sockets = listening_sockets(session_processes(server["proc"].proc.pid))
    names = {name for _, _, name in sockets}
    assert ("127.0.0.1", server["proc"].port) in {(a, p) for a, p, _ in sockets}, sorted(sockets)
    assert {"gcs_server", "raylet"} <= names, sorted(sockets)
    assert not exposed(sockets), sorted(exposed(sockets))
    print(f"\nserve: {len(sockets)} listening sockets, all on loopback: {sorted(names)}")


def test_keypoints_equal_offline_predictions(server):
    images = [make_image(100 + i, 96 + 8 * i, 80, "jpg" if i % 2 else "png") for i in range(3)]
    bboxes = [None, "5,4,60,70", None]
    boxes = [None, (5.0, 4.0, 60.0, 70.0), None]
    seen = {}
    for pid in PERSONS + [UNKNOWN]:
        version, expected = predict_reference(server["ck"], server["store"], pid, images, boxes)
        for img, bbox, exp in zip(images, bboxes, expected):
            r = post(server, pid, img, bbox)
            assert r.status_code == 200, r.text
            ans = r.json()
            assert set(ans) >= {"person_id", "model_version", "keypoints", "latency_ms"}
            assert ans["person_id"] == pid and ans["model_version"] == version and ans["fallback"] is None
            assert [k["name"] for k in ans["keypoints"]][:3] == ["head", "left_shoulder", "right_shoulder"]
            np.testing.assert_allclose(as_array(ans)[:, :2], exp[:, :2], atol=ATOL)
            np.testing.assert_allclose(as_array(ans)[:, 2], exp[:, 2], atol=1e-4)
            seen.setdefault(pid, []).append(as_array(ans))
    assert all(v != "base" for v in [predict_reference(server["ck"], server["store"], p, [])[0] for p in PERSONS])
    # persons' models really differ (so the concurrency test can see cross-talk)
    assert np.abs(seen["alice"][0] - seen[UNKNOWN][0])[:, :2].max() > 1.0
    assert np.abs(seen["alice"][0] - seen["bob"][0])[:, :2].max() > 1.0


def test_person_info_reports_version_and_memory(server):
    h = {"Authorization": f"Bearer {server['tokens']['alice']}"}
    info = server["http"].get(f"{server['url']}/v1/persons/alice", headers=h, timeout=30).json()
    assert info["model_version"] != "base" and info["delta"]["version"] == info["model_version"]
    assert info["memory_bytes"] > 0 and info["changed_tensors"] > 0
    assert info["memory_bytes"] < info["replica"]["base_bytes"]
    h = {"Authorization": f"Bearer {server['tokens'][UNKNOWN]}"}
    info = server["http"].get(f"{server['url']}/v1/persons/{UNKNOWN}", headers=h, timeout=30).json()
    assert info["model_version"] == "base" and info["memory_bytes"] == 0 and info["delta"] is None


def test_auth(server):
    img = make_image(1)
    assert post(server, "alice", img, token="").status_code == 401
    r = post(server, "alice", img, token="not-the-token")
    assert r.status_code == 403 and "error" in r.json()
    assert post(server, "alice", img, token=server["tokens"]["bob"]).status_code == 403  # bob's token
    assert post(server, "mallory", img, token=server["tokens"]["bob"]).status_code == 403  # no token at all
    assert server["http"].get(f"{server['url']}/v1/persons/alice", timeout=30).status_code == 401
    # a token added while running works within the tokens TTL
    token = add_token(str(server["root"] / "store/auth/tokens.json"), "frank")
    deadline = time.time() + 10
    while post(server, "frank", img, token=token).status_code != 200:
        assert time.time() < deadline
        time.sleep(0.3)


def test_bad_input_is_4xx_json_and_the_app_stays_healthy(server):
    url = server["url"]
    good = make_image(7)
    jpg = make_image(7, fmt="jpg")
    cases = [
        ("not an image", "alice", b"hello there", None, 400),
        ("empty body", "alice", b"", None, 400),
        ("truncated jpeg", "alice", jpg[: len(jpg) // 2], None, 400),
        ("0x0 png", "alice", png_with_header(0, 0), None, 400),
        ("gigantic image", "alice", png_with_header(200_000, 200_000), None, 413),
        ("over the pixel limit", "alice", png_with_header(2100, 2100), None, 413),
        ("bbox 3 values", "alice", good, "1,2,3", 400),
        ("bbox not numbers", "alice", good, "a,b,c,d", 400),
        ("bbox empty box", "alice", good, "1,2,0,0", 400),
        ("bbox outside", "alice", good, "1000,1000,10,10", 400),
        ("bbox nan", "alice", good, "nan,1,10,10", 400),
        ("body over the limit", "alice", b"\xff" * (MAX_BODY + 1), None, 413),
        ("person id with a space", "a b", good, None, 400),
        ("person id too long", "x" * 65, good, None, 400),
    ]
    for name, pid, body, bbox, status in cases:
        r = post(server, pid, body, bbox, token=server["tokens"].get("alice"))
        assert r.status_code == status, (name, r.status_code, r.text)
        assert r.headers["content-type"].startswith("application/json") and "error" in r.json(), name
    for path, status in [("/v1/persons/a%2Fb/pose", 404), ("/v1/persons/..%2F..%2Fetc%2Fpasswd/pose", 404),
                         ("/v1/persons/../pose", 404), ("/nope", 404), ("/v1/persons/alice/pose/extra", 404)]:
        r = requests.post(url + path, data=good, timeout=30)
        assert r.status_code == status and "error" in r.json(), (path, r.text)
    r = requests.get(f"{url}/v1/persons/alice/pose", timeout=30)
    assert r.status_code == 405 and "error" in r.json()
    # chunked upload with no Content-Length, over the limit
    r = requests.post(f"{url}/v1/persons/alice/pose", data=iter([b"\xff" * 400_000] * 3), timeout=30,
                      headers={"Authorization": f"Bearer {server['tokens']['alice']}"})
    assert r.status_code == 413
    health = requests.get(f"{url}/healthz", timeout=30).json()
    assert (health["status"], health["device"]) == ("ok", "cpu")  # num_gpus 0: the replica runs on a CPU core
    assert post(server, "alice", good).status_code == 200


def test_tampered_delta_falls_back_to_base_others_unaffected(server):
    rec = land_delta(server["store"], server["ck"], "erin", seed=42)
    path = Path(server["store"]) / "persons/erin/deltas" / f"{rec['version']}.safetensors"
    data = bytearray(path.read_bytes())
    data[-20] ^= 0x55
    path.write_bytes(bytes(data))
    img = make_image(8)
    ans = post(server, "erin", img).json()
    assert ans["model_version"] == "base" and ans["fallback"]["version"] == rec["version"]
    assert "sha256" in ans["fallback"]["reason"]
    _, (base_expected,) = predict_reference(server["ck"], server["store"], UNKNOWN, [img])
    np.testing.assert_allclose(as_array(ans)[:, :2], base_expected[:, :2], atol=ATOL)
    ok = post(server, "alice", img).json()
    assert ok["model_version"] != "base" and ok["fallback"] is None
    log = (server["root"] / "serve.log").read_text(errors="replace")
    deadline = time.time() + 10  # replica logs reach the driver's stdout asynchronously
    while "erin" not in log and time.time() < deadline:
        time.sleep(0.5)
        log = (server["root"] / "serve.log").read_text(errors="replace")
    assert "person erin: delta" in log and "refused" in log


def test_new_delta_version_is_served_without_restart(server):
    img = make_image(9)
    before = post(server, "carol", img).json()
    rec = land_delta(server["store"], server["ck"], "carol", seed=99)
    assert rec["version"] != before["model_version"]
    deadline = time.time() + TTL_S + 10
    while True:
        ans = post(server, "carol", img).json()
        if ans["model_version"] == rec["version"]:
            break
        assert ans["model_version"] == before["model_version"]
        assert time.time() < deadline, "new delta not served"
        time.sleep(0.1)
    version, (expected,) = predict_reference(server["ck"], server["store"], "carol", [img])
    assert version == rec["version"]
    np.testing.assert_allclose(as_array(ans)[:, :2], expected[:, :2], atol=ATOL)


def test_concurrent_clients_no_cross_talk(server):
    images = [make_image(200 + i) for i in range(3)]
    expected = {pid: predict_reference(server["ck"], server["store"], pid, images) for pid in PERSONS}
    errors, counts = [], {"ok": 0}
    lock = threading.Lock()

    def client(c):
        session = requests.Session()
        for i in range(20):
            for j, pid in enumerate(PERSONS):
                k = (c + i + j) % len(images)
                try:
                    r = session.post(f"{server['url']}/v1/persons/{pid}/pose", data=images[k], timeout=60,
                                     headers={"Authorization": f"Bearer {server['tokens'][pid]}"})
                    ans = r.json()
                    version, exp = expected[pid]
                    if r.status_code != 200 or ans["person_id"] != pid or ans["model_version"] != version:
                        raise AssertionError(f"{pid}: {r.status_code} {str(ans)[:200]}")
                    if np.abs(as_array(ans)[:, :2] - exp[k][:, :2]).max() > ATOL:
                        raise AssertionError(f"{pid} image {k}: keypoints differ from its model")
                    with lock:
                        counts["ok"] += 1
                except Exception as exc:  # noqa: BLE001
                    with lock:
                        errors.append(repr(exc))

    t0 = time.time()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    elapsed = time.time() - t0
    assert not errors, errors[:5]
    assert counts["ok"] == 8 * 20 * len(PERSONS)
    print(f"\n{counts['ok']} concurrent requests in {elapsed:.1f}s ({counts['ok'] / elapsed:.0f} req/s)")
    assert requests.get(f"{server['url']}/healthz", timeout=30).json()["status"] == "ok"


def test_zz_sigterm_shuts_down_cleanly(server):
    proc = server["proc"]
    rc = proc.stop()
    assert rc == 0, proc.log_tail()
    assert proc.leftovers() == [], "Ray processes left behind"
    assert "posettp serve: stopped" in proc.log_tail()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{server['url']}/healthz", timeout=5)


def test_colocated_mode_same_answers_mixed_person_batches():
    """`colocate: true` (one deployment, the ingress holds the models): batches mix persons, answers don't."""
    root = Path(tempfile.mkdtemp(prefix="pst-e2e-co-"))
    ck, store = str(root / "ck"), str(root / "store")
    make_checkpoint(ck, seed=1)
    for i, pid in enumerate(PERSONS[:2]):
        land_delta(store, ck, pid, seed=30 + i)
    config = write_serve_config(str(root / "serve.yaml"), colocate=True, lru_size=4, ttl_s=TTL_S, batch_size=8,
                                auth=False)
    proc = ServeProcess(ck, store, config, str(root / "serve.log"))
    try:
        assert proc.wait_ready()["status"] == "ok"
        persons = PERSONS[:2] + [UNKNOWN]
        images = [make_image(300 + i) for i in range(2)]
        expected = {pid: predict_reference(ck, store, pid, images) for pid in persons}
        errors = []

        def client(c):
            session = requests.Session()
            for i in range(8):
                pid, k = persons[(c + i) % 3], (c + i) % 2
                ans = session.post(f"{proc.url}/v1/persons/{pid}/pose", data=images[k], timeout=60).json()
                version, exp = expected[pid]
                if ans.get("model_version") != version or \
                        np.abs(as_array(ans)[:, :2] - exp[k][:, :2]).max() > ATOL:
                    errors.append((pid, k, str(ans)[:200]))

        threads = [threading.Thread(target=client, args=(c,)) for c in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors[:3]
        rec = land_delta(store, ck, UNKNOWN, seed=77)
        deadline = time.time() + TTL_S + 10
        while requests.post(f"{proc.url}/v1/persons/{UNKNOWN}/pose", data=images[0],
                            timeout=60).json()["model_version"] != rec["version"]:
            assert time.time() < deadline
            time.sleep(0.1)
        assert requests.post(f"{proc.url}/v1/persons/x/pose", data=b"junk", timeout=30).status_code == 400
    finally:
        rc, left, log = proc.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    assert rc == 0 and not left, log

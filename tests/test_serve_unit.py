"""Serving without Ray: request parsing and validation, auth hashing, settings, and the person-model cache
(base + delta as a shallow copy gives the same predictions as a model with the delta loaded)."""
import asyncio
import io
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from model.checkpoint import load_checkpoint
from model.predict import predict_crops
from model.joints import PENN_JOINTS
from model.transforms import full_image_bbox, keypoints_json
from server import auth
from server.serve import (ApiError, PersonModels, ServeSettings, build_app, decode_image, parse_bbox, prepare_crop,
                          read_body, read_serve_config, shallow_clone, validate_person_id)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root, also under plain `pytest`
from tests.fixtures_serve import (land_delta, make_checkpoint, make_image, person_model,  # noqa: E402
                                  png_with_header, reference_keypoints)

LIMITS = dict(max_pixels=4_000_000, max_side=4096)


# -- bbox --------------------------------------------------------------------------------------

def test_bbox_default_is_the_whole_image():
    assert parse_bbox(None, 96, 80) == full_image_bbox(96, 80)
    assert parse_bbox("", 96, 80) == full_image_bbox(96, 80)


def test_bbox_parses_four_numbers():
    assert parse_bbox("10,5.5,40,60", 96, 80) == (10.0, 5.5, 40.0, 60.0)
    assert parse_bbox("-10,-10,30,30", 96, 80) == (-10.0, -10.0, 30.0, 30.0)  # partly outside is fine


@pytest.mark.parametrize("text", ["1,2,3", "1,2,3,4,5", "a,b,c,d", "1,2,,4", "nan,0,10,10", "0,0,inf,10",
                                  "0,0,0,10", "0,0,10,-5", "200,0,10,10", "0,-50,10,10", "0,0,1e9,1e9",
                                  "1e400,0,10,10"])
def test_bad_bbox_is_a_400(text):
    with pytest.raises(ApiError) as exc:
        parse_bbox(text, 96, 80)
    assert exc.value.status == 400 and "bbox" in exc.value.message


# -- images --------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_decode_image_is_rgb_like_opencv(fmt):
    data = make_image(3, 70, 50, fmt)
    rgb = decode_image(data, **LIMITS)
    expected = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert rgb.shape == (50, 70, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb, expected)


@pytest.mark.parametrize("orientation, shape", [(1, (50, 70, 3)), (3, (50, 70, 3)), (6, (70, 50, 3)), (8, (70, 50, 3))])
def test_jpeg_exif_orientation_is_applied_as_a_viewer_shows_it(orientation, shape):
    """A portrait phone photo (landscape pixels + EXIF orientation 6 or 8) is decoded upright, not refused."""
    from PIL import Image

    rgb = cv2.cvtColor(cv2.imdecode(np.frombuffer(make_image(3, 70, 50, "jpg"), np.uint8), cv2.IMREAD_COLOR),
                       cv2.COLOR_BGR2RGB)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    decoded = decode_image(buf.getvalue(), **LIMITS)
    assert decoded.shape == shape
    turned = {1: rgb, 3: np.rot90(rgb, 2), 6: np.rot90(rgb, -1), 8: np.rot90(rgb, 1)}[orientation]
    assert np.abs(decoded.astype(int) - turned.astype(int)).mean() < 4  # JPEG re-encoding noise only


def bmp_bytes():
    ok, buf = cv2.imencode(".bmp", np.zeros((8, 8, 3), np.uint8))
    return buf.tobytes()


@pytest.mark.parametrize("name,data,status", [
    ("empty", b"", 400),
    ("text", b"hello, not an image", 400),
    ("json", json.dumps({"image": "x"}).encode(), 400),
    ("truncated jpeg", make_image(1, fmt="jpg")[:-400], 400),
    ("truncated jpeg header", make_image(1, fmt="jpg")[:300], 400),
    ("truncated png", make_image(1, fmt="png")[:-600], 400),
    ("0x0 png", png_with_header(0, 0), 400),
    ("bmp", bmp_bytes(), 400),
    ("gigantic png header", png_with_header(100_000, 100_000), 413),
    ("over the pixel limit", png_with_header(3000, 3000), 413),
    ("over the side limit", png_with_header(5000, 10), 413),
])
def test_bad_images(name, data, status):
    with pytest.raises(ApiError) as exc:
        decode_image(data, **LIMITS)
    assert exc.value.status == status, (name, exc.value.message)


def test_prepare_crop_uses_the_shared_geometry():
    rgb = decode_image(make_image(2), **LIMITS)
    crop, m = prepare_crop(rgb, full_image_bbox(96, 80), 64)
    assert crop.shape == (3, 64, 64) and crop.dtype == np.float32 and 0 <= crop.min() and crop.max() <= 1
    assert m.shape == (2, 3)


def test_keypoints_json_names_joints():
    out = keypoints_json(np.arange(39, dtype=np.float32).reshape(13, 3), PENN_JOINTS)
    assert [k["name"] for k in out] == list(PENN_JOINTS)
    assert out[1] == {"name": "left_shoulder", "x": 3.0, "y": 4.0, "score": 5.0}


@pytest.mark.parametrize("pid", ["alice", "p_001", "A.b-c", "x" * 64])
def test_good_person_ids(pid):
    assert validate_person_id(pid) == pid


@pytest.mark.parametrize("pid", ["../etc", "a/b", "a b", "", "..", ".", "x" * 65, "al%2Fice", "a\x00b"])
def test_person_ids_with_path_characters_are_400(pid):
    with pytest.raises(ApiError) as exc:
        validate_person_id(pid)
    assert exc.value.status == 400


# -- body size -------------------------------------------------------------------------------------

def fake_request(chunks, content_length=None):
    from starlette.requests import Request

    headers = [(b"content-length", str(content_length).encode())] if content_length is not None else []
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    return Request({"type": "http", "method": "POST", "path": "/", "headers": headers, "query_string": b""},
                   receive)


def test_read_body_limits():
    assert asyncio.run(read_body(fake_request([b"ab", b"cd"]), 10)) == b"abcd"
    for req in (fake_request([b"x" * 11], content_length=11),  # declared too large: refused before reading
                fake_request([b"x" * 6, b"x" * 6])):  # chunked, no length: refused while reading
        with pytest.raises(ApiError) as exc:
            asyncio.run(read_body(req, 10))
        assert exc.value.status == 413
    with pytest.raises(ApiError) as exc:
        asyncio.run(read_body(fake_request([b"x"], content_length="abc"), 10))
    assert exc.value.status == 400


# -- auth ----------------------------------------------------------------------------------------

def test_tokens_are_stored_hashed_and_only_open_their_person(tmp_path):
    url = str(tmp_path / "auth/tokens.json")
    alice = auth.add_token(url, "alice")
    bob = auth.add_token(url, "bob")
    stored = (tmp_path / "auth/tokens.json").read_text()
    assert alice not in stored and bob not in stored
    assert json.loads(stored)["persons"]["alice"] == auth.hash_token(alice) == \
        "sha256:" + __import__("hashlib").sha256(alice.encode()).hexdigest()
    table = auth.TokenTable(url)
    table.reload()
    table.check("alice", f"Bearer {alice}")
    table.check("bob", f"bearer  {bob} ")
    cases = [("alice", None, 401), ("alice", "", 401), ("alice", alice, 401), ("alice", "Basic xyz", 401),
             ("alice", "Bearer ", 401), ("alice", "Bearer wrong", 403), ("alice", f"Bearer {bob}", 403),
             ("carol", f"Bearer {alice}", 403)]
    for pid, header, status in cases:
        with pytest.raises(auth.AuthError) as exc:
            table.check(pid, header)
        assert exc.value.status == status, (pid, header)
    assert auth.remove_token(url, "bob")
    table.reload()
    with pytest.raises(auth.AuthError):
        table.check("bob", f"Bearer {bob}")
    with pytest.raises(ValueError):
        auth.add_token(url, "../x")


def test_token_table_refuses_plaintext_files(tmp_path):
    (tmp_path / "t.json").write_text(json.dumps({"persons": {"alice": "secret"}}))
    with pytest.raises(ValueError, match="sha256"):
        auth.read_tokens(str(tmp_path / "t.json"))


# -- settings and config ---------------------------------------------------------------------------

def test_settings_coerce_strings_and_refuse_unknown_keys(tmp_path, monkeypatch):
    s = ServeSettings.from_args({"checkpoint": "ck", "store": "s3://b/st", "replicas": "2", "auth": "true",
                                 "ttl_s": "0.5", "lru_size": 4.0})
    assert (s.replicas, s.auth, s.ttl_s, s.lru_size) == (2, True, 0.5, 4)
    assert s.checkpoint.startswith("/") and s.store == "s3://b/st" and s.tokens == "s3://b/st/auth/tokens.json"
    with pytest.raises(ValueError, match="unknown serve setting"):
        ServeSettings.from_args({"checkpoint": "a", "store": "b", "lru": 3})
    with pytest.raises(ValueError, match="replicas"):
        ServeSettings.from_args({"checkpoint": "a", "store": "b", "replicas": "two"})
    monkeypatch.delenv("POSETTP_CHECKPOINT", raising=False)
    with pytest.raises(ValueError, match="checkpoint"):
        ServeSettings.from_args({"checkpoint": "${POSETTP_CHECKPOINT}", "store": "b"})
    monkeypatch.setenv("POSETTP_CHECKPOINT", str(tmp_path / "ck"))
    assert ServeSettings.from_args({"checkpoint": "${POSETTP_CHECKPOINT}", "store": "b"}).checkpoint == \
        str(tmp_path / "ck")


def test_repo_serve_config_builds_an_app(tmp_path, monkeypatch):
    conf = read_serve_config("configs/serve.yaml")
    assert conf["name"] == "posettp" and conf["args"]["auth"] is True
    make_checkpoint(str(tmp_path / "ck"))
    monkeypatch.setenv("POSETTP_CHECKPOINT", str(tmp_path / "ck"))
    monkeypatch.setenv("POSETTP_STORE", str(tmp_path / "store"))
    app = build_app(conf["args"])  # .bind() only: no Ray needed
    assert app is not None
    assert build_app({**conf["args"], "colocate": True}) is not None
    with pytest.raises(ValueError, match="not a checkpoint"):
        build_app({**conf["args"], "checkpoint": str(tmp_path / "nope")})


# -- person models ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_unit")
    ck, store = str(root / "ck"), str(root / "store")
    make_checkpoint(ck)
    land_delta(store, ck, "alice", seed=1, dtype="fp16")
    land_delta(store, ck, "bob", seed=2, dtype="int8")
    images = [make_image(s) for s in range(4)]
    return ck, store, images


def test_shallow_clone_shares_unchanged_tensors(world):
    ck, _, _ = world
    base = load_checkpoint(ck).model.eval()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    new_w = torch.randn_like(base.self_head.weight)
    clone = shallow_clone(base, {"self_head.weight": new_w})
    cs, bs = clone.state_dict(), base.state_dict()
    assert cs["self_head.weight"].data_ptr() == new_w.data_ptr()
    assert all(cs[k].data_ptr() == bs[k].data_ptr() for k in bs if k != "self_head.weight")
    assert clone.sup_head is base.sup_head and clone.encoder is base.encoder and clone.self_head is not base.self_head
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    with pytest.raises(KeyError):
        shallow_clone(base, {"nope.weight": new_w})


def test_cached_person_model_equals_model_with_delta_loaded(world):
    ck, store, images = world
    models = PersonModels(ck, store)
    base_ptrs = {k: v.data_ptr() for k, v in models.base.state_dict().items()}
    for pid in ("alice", "bob", "nobody"):
        entry = models.load(pid)
        reference, version = person_model(ck, store, pid)
        assert entry.version == version and entry.fallback is None
        crops, mats, expected = [], [], []
        for data in images:
            rgb = decode_image(data, **LIMITS)
            crop, m = prepare_crop(rgb, full_image_bbox(rgb.shape[1], rgb.shape[0]), models.image_size)
            crops.append(crop)
            mats.append(m)
            expected.append(reference_keypoints(reference, data))
        got = models.predict(entry.model, np.stack(crops), np.stack(mats))  # batched
        # sub-pixel decoding carries the float noise of batch 1 vs a batch into the coordinates (~3e-4 px)
        np.testing.assert_allclose(got, np.stack(expected), atol=1e-3)
        ref_batched = predict_crops(reference, torch.from_numpy(np.stack(crops)), np.stack(mats))
        np.testing.assert_allclose(got, ref_batched, atol=1e-3)
        state = entry.model.state_dict()
        own = [k for k, v in state.items() if v.data_ptr() != base_ptrs[k]]
        if pid == "nobody":
            assert entry.model is models.base and entry.memory_bytes == 0 and not own
        else:
            assert own and all(k.startswith(("encoder.", "self_head.")) for k in own)
            assert entry.memory_bytes == sum(state[k].numel() * state[k].element_size() for k in own)
            assert entry.changed_tensors == len(own)
    alice = models.predict(models.load("alice").model, np.stack(crops), np.stack(mats))
    base = models.predict(models.base, np.stack(crops), np.stack(mats))
    assert np.abs(alice - base).max() > 1.0  # the delta matters: a cross-talk test can see it


def test_flip_test_setting_serves_person_models_with_the_offline_flip_test(world):
    """`flip_test: true` serves every person as `predict_crops` with model.flip_test predicts offline; the
    setting decides whatever the checkpoint says."""
    ck, store, images = world
    assert ServeSettings.from_args({"checkpoint": ck, "store": store, "flip_test": "true"}).flip_test is True
    flipped, plain = PersonModels(ck, store, flip_test=True), PersonModels(ck, store)
    reference, _ = person_model(ck, store, "alice")
    reference.cfg.flip_test = True
    rgb = decode_image(images[0], **LIMITS)
    crop, m = prepare_crop(rgb, full_image_bbox(rgb.shape[1], rgb.shape[0]), flipped.image_size)
    got = flipped.predict(flipped.load("alice").model, crop[None], m[None])[0]
    np.testing.assert_allclose(got, reference_keypoints(reference, images[0]), atol=1e-3)
    assert np.abs(got - plain.predict(plain.load("alice").model, crop[None], m[None])[0])[:, :2].max() > 0.1
    assert flipped.base.cfg.flip_test and not plain.base.cfg.flip_test


def test_hot_update_and_tampered_delta_fall_back_to_base(world, tmp_path, caplog):
    ck, _, images = world
    store = str(tmp_path / "store")
    first = land_delta(store, ck, "carol", seed=5)
    land_delta(store, ck, "dave", seed=6)
    models = PersonModels(ck, store, ttl_s=0.0)
    carol, dave = models.load("carol"), models.load("dave")
    assert carol.version == first["version"]
    assert models.needs_check(carol) and not models.refresh(carol)  # nothing new
    second = land_delta(store, ck, "carol", seed=7)
    assert models.refresh(carol) and carol.version == second["version"]
    reference, _ = person_model(ck, store, "carol")
    rgb = decode_image(images[0], **LIMITS)
    crop, m = prepare_crop(rgb, full_image_bbox(96, 80), models.image_size)
    np.testing.assert_allclose(models.predict(carol.model, crop[None], m[None])[0],
                               reference_keypoints(reference, images[0]), atol=1e-3)
    # tamper with carol's stored delta: she falls back to base with the reason; dave is unaffected
    path = tmp_path / "store/persons/carol/deltas" / f"{second['version']}.safetensors"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    fresh = PersonModels(ck, store, ttl_s=0.0)
    with caplog.at_level("WARNING", logger="ray.serve"):
        fallen = fresh.load("carol")
    assert fallen.version == "base" and fallen.model is fresh.base
    assert "sha256" in fallen.fallback["reason"] and fallen.fallback["version"] == second["version"]
    assert "refused" in caplog.text and "carol" in caplog.text
    assert fresh.load("dave").version != "base"
    assert not fresh.refresh(fallen) and fallen.fallback  # the same refused version is not re-read
    third = land_delta(store, ck, "carol", seed=8)
    assert fresh.refresh(fallen) and fallen.version == third["version"] and fallen.fallback is None
    # a latest.json naming a missing file, and garbage in latest.json: base, never an exception
    (tmp_path / "store/persons/erin/deltas").mkdir(parents=True)
    (tmp_path / "store/persons/erin/latest.json").write_text(json.dumps({"version": "1234567890123-deadbeef"}))
    missing = fresh.load("erin").fallback
    assert missing is not None and str(tmp_path) not in missing["reason"]  # the client never sees server paths
    assert missing["reason"] == "the stored delta is unreadable (FileNotFoundError)"
    (tmp_path / "store/persons/erin/latest.json").write_text("{not json")
    assert fresh.load("erin").version == "base" and fresh.load("erin").fallback is not None
    for not_a_record in ([1, 2], "a string", {"version": 7}):  # valid JSON, not a record: base, not a 503
        (tmp_path / "store/persons/erin/latest.json").write_text(json.dumps(not_a_record))
        erin = fresh.load("erin")
        assert erin.version == "base" and "not a record naming a version" in erin.fallback["reason"]


def test_lru_dropped_persons_free_their_memory(world):
    """A person the LRU drops frees its tensors at once (no reference cycle waiting for the gc)."""
    import gc
    import weakref

    ck, store, _ = world
    models = PersonModels(ck, store)
    gc.collect()
    gc.disable()
    try:
        entries = [models.load("alice"), models.load("bob")]
        assert models.stats()["cached_persons"] == 2 and models.stats()["cached_bytes"] > 0
        own = weakref.ref(entries[0].model.self_head.weight)
        del entries
        assert own() is None
        assert models.stats()["cached_persons"] == 0 and models.stats()["cached_bytes"] == 0
    finally:
        gc.enable()


def test_decode_budget_bounds_the_pixels_in_flight():
    """Sixteen 50 MB decodes against a 128 MB budget: never more than the budget held at once, all served; an image
    larger than the whole budget waits until it has the budget to itself."""
    from server.serve import DecodeBudget

    budget, peak = DecodeBudget(128 * 2**20), []

    async def request(nbytes):
        async with budget.hold(nbytes):
            peak.append(budget.used)
            await asyncio.sleep(0.01)

    async def burst():
        await asyncio.gather(*(request(4096 * 4096 * 3) for _ in range(16)), request(10 * 2**30))

    asyncio.run(burst())
    assert len(peak) == 17 and max(peak) <= 128 * 2**20 and budget.used == 0

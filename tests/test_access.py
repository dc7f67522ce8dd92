"""Access: the login back-off (also through the served app), the model names a
browser may load, and the start-up warning for an open server."""
import socket
import urllib.error
import urllib.parse
import urllib.request

import pytest

import ui_scenario as sc
from rlhf_core.model.models import resolve_spec
from ui.access import MODELS_DIR_ENV, ThrottledLogin, browser_model_choice, exposure_warning


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_wrong_passwords_back_off_per_user():
    clock = Clock()
    login = ThrottledLogin([("alice", "s3cret"), ("bob", "pw")], clock=clock)
    assert login("alice", "s3cret")
    for _ in range(3):  # three free mistakes
        assert not login("alice", "guess")
    assert login.retry_after("alice") == 0 and login("alice", "s3cret")  # a success clears the count
    delays = []
    for _ in range(6):
        assert not login("alice", "guess")
        delays.append(login.retry_after("alice"))
        clock.now += delays[-1]  # the attacker waits out each delay
    assert delays[:3] == [0, 0, 0] and delays[3:] == [1.0, 2.0, 4.0]
    assert not login("alice", "guess") and not login("alice", "s3cret")  # locked: even the right password waits 8 s
    assert login("bob", "pw")  # other users are not locked out
    clock.now += 8
    assert login("alice", "s3cret")
    attempts = 0
    while clock.now < 1000 + 8 + 60:  # a minute of guessing, waiting out every delay
        attempts += 1
        login("alice", "guess")
        clock.now += max(login.retry_after("alice"), 0.001)
    assert attempts < 12  # instead of ~75,000 at 0.8 s per 30


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post_login(port, user, password) -> int:
    data = urllib.parse.urlencode({"username": user, "password": password}).encode()
    try:
        return urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/login", data=data)).status
    except urllib.error.HTTPError as err:
        return err.code


def test_the_served_app_throttles_logins(tmp_path):
    from app import build_app, launch

    demo = build_app("tiny-random", cases_dir=sc.write_cases(tmp_path / "cases"), generate_fn=sc.backend(),
                     checkpoint_dir=tmp_path / "ckpt")
    port = _free_port()
    login = ThrottledLogin([("alice", "s3cret")])
    launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, auth=login)
    try:
        assert _post_login(port, "alice", "s3cret") == 200
        codes = [_post_login(port, "alice", f"guess{i}") for i in range(5)]
        assert all(c in (400, 401, 403) for c in codes)
        assert login.retry_after("alice") > 0
        assert _post_login(port, "alice", "s3cret") in (400, 401, 403)  # locked out for now
    finally:
        demo.close()


def test_the_served_app_throttles_logins_per_address(tmp_path):
    """Spraying user names from one address: after its free failures the address waits (429),
    even for a user name that never failed."""
    from app import build_app, launch

    from ui.access import BackOff

    demo = build_app("tiny-random", cases_dir=sc.write_cases(tmp_path / "cases"), generate_fn=sc.backend(),
                     checkpoint_dir=tmp_path / "ckpt")
    port = _free_port()
    addresses = BackOff(free_failures=4)
    launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
           auth=ThrottledLogin([("alice", "s3cret")]), address_backoff=addresses)
    try:
        codes = [_post_login(port, f"user{i}", "guess") for i in range(5)]  # a new name each time
        assert codes[:4] == [400] * 4 and codes[4] == 400 and addresses.retry_after("127.0.0.1") > 0
        assert _post_login(port, "alice", "s3cret") == 429  # the address is locked, whoever it claims to be
        addresses.succeeded("127.0.0.1")  # (the wait over)
        assert _post_login(port, "alice", "s3cret") == 200
    finally:
        demo.close()


def test_the_browser_may_load_registry_models_hub_ids_and_the_models_folder(tmp_path, monkeypatch):
    monkeypatch.delenv(MODELS_DIR_ENV, raising=False)
    assert browser_model_choice("tiny-random") == "tiny-random"
    assert browser_model_choice("HuggingFaceTB/SmolLM2-360M") == "hub:HuggingFaceTB/SmolLM2-360M"
    assert resolve_spec("hub:org/name").hub_id == "org/name" and resolve_spec("hub:org/name").local_dir is None
    (tmp_path / "secret").mkdir()
    messages = set()
    for typed in (str(tmp_path / "secret"), str(tmp_path / "missing"), "../secret", "/etc", "./x/../y"):
        with pytest.raises(ValueError) as err:
            browser_model_choice(typed)
        messages.add(str(err.value))
    assert len(messages) == 1  # the same sentence whether the folder exists or not
    (tmp_path / "models" / "my-ft").mkdir(parents=True)
    monkeypatch.setenv(MODELS_DIR_ENV, str(tmp_path / "models"))
    assert browser_model_choice("my-ft") == str((tmp_path / "models" / "my-ft").resolve())
    with pytest.raises(ValueError, match="folder name under"):
        browser_model_choice("../secret")


def test_an_open_server_without_a_login_is_announced():
    assert exposure_warning("127.0.0.1", has_login=False) is None
    assert exposure_warning("0.0.0.0", has_login=True) is None
    assert "WITHOUT A LOGIN" in exposure_warning("0.0.0.0", has_login=False)

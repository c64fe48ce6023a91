"""The SQLite store on its own: order, durability across reopen, the lock, what listings leave out."""
import os

import pytest

from sidecar.queue.store import NewItem, QueueError, Store


def item(route="r", n=0, **kw) -> NewItem:
    fields = dict(route=route, target="svc", upstream="svc", method="POST", url=f"http://u/items/{n}",
                  path=f"/items/{n}", headers=(("content-type", "application/json"),
                                                ("Authorization", "Bearer app-token")),
                  body=b'{"n": %d}' % n, idempotency_key=f"key-{n}", trace_id="1" * 32, span_id="2" * 16,
                  accepted_at=1000.0 + n, max_age=60.0)
    fields.update(kw)
    return NewItem(**fields)


def test_ids_follow_acceptance_order_across_routes(tmp_path):
    store = Store(str(tmp_path))
    ids = [store.add(item("a" if n % 2 else "b", n)) for n in range(6)]
    assert ids == sorted(ids)
    rows = store.index()
    assert [r.id for r in rows] == ids
    assert [r.route for r in rows] == ["b", "a", "b", "a", "b", "a"]
    store.close()


def test_everything_survives_a_reopen(tmp_path):
    store = Store(str(tmp_path))
    body = bytes(range(256)) * 10            # binary bodies round-trip byte for byte
    first = store.add(item(n=1, body=body))
    store.note_failure(first, 3, 2000.0, "503")
    tag = store.tag
    store.close()

    store = Store(str(tmp_path))
    assert store.tag == tag                  # item names stay stable across restarts
    got = store.get(first)
    assert got.body == body
    assert got.headers == (("content-type", "application/json"), ("Authorization", "Bearer app-token"))
    assert (got.idempotency_key, got.trace_id, got.span_id, got.attempts) == ("key-1", "1" * 32, "2" * 16, 3)
    assert [r.attempts for r in store.index()] == [3]
    store.close()


def test_ids_never_repeat_even_after_the_queue_emptied(tmp_path):
    store = Store(str(tmp_path))
    old = store.add(item(n=1))
    store.delete(old)
    store.close()
    store = Store(str(tmp_path))
    assert store.index() == []
    assert store.add(item(n=2)) > old        # AUTOINCREMENT: an app never sees an id twice
    store.close()


def test_one_sidecar_per_state_dir(tmp_path):
    store = Store(str(tmp_path))
    with pytest.raises(QueueError, match="in use by another sidecar"):
        Store(str(tmp_path))
    store.close()
    Store(str(tmp_path)).close()             # released on close (and by the kernel on kill -9)


def test_state_dir_that_cannot_be_created_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(QueueError, match="cannot be created"):
        Store(str(blocker / "state"))


def test_a_file_that_is_not_a_queue_is_refused(tmp_path):
    (tmp_path / "queue.sqlite3").write_bytes(b"garbage" * 200)
    with pytest.raises(QueueError, match="not a usable queue database"):
        Store(str(tmp_path))
    Store(str(tmp_path / "other")).close()   # and the lock was released on the way out


def test_listing_has_no_bodies_or_header_values(tmp_path):
    store = Store(str(tmp_path))
    store.add(item(n=1))
    [doc] = store.listing(10)
    assert doc["id"] == f"{store.tag}-1"
    assert doc["path"] == "/items/1" and doc["method"] == "POST" and doc["idempotency_key"] == "key-1"
    text = repr(doc)
    assert "app-token" not in text and '"n"' not in text
    assert doc["body_bytes"] == len(b'{"n": 1}')
    store.close()


def test_files_are_private(tmp_path):
    store = Store(str(tmp_path / "state"))
    assert os.stat(store.path).st_mode & 0o077 == 0   # the app's own credentials are in there
    store.close()

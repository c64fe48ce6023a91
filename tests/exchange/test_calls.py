"""Building a try's URL and what its record keeps of it."""
from yarl import URL

from sidecar.exchange import calls
from sidecar.exchange.calls import record_url, url_of
from sidecar.telemetry.records import url_text


def test_a_url_is_parsed_once_per_text_and_the_cache_stays_bounded(monkeypatch):
    monkeypatch.setattr(calls, "_urls", {})
    monkeypatch.setattr(calls, "URL_CACHE_SIZE", 3)
    first = url_of("http://10.0.0.1:8080/v1/orders?id=1")
    assert first == URL("http://10.0.0.1:8080/v1/orders?id=1")
    assert url_of("http://10.0.0.1:8080/v1/orders?id=1") is first          # the same object again
    for i in range(2, 6):                                                  # unique query strings
        url_of(f"http://10.0.0.1:8080/v1/orders?id={i}")
        assert len(calls._urls) <= 3
    long = "http://10.0.0.1:8080/x?q=" + "a" * calls.URL_CACHE_TEXT
    assert url_of(long) == URL(long, encoded=True) and long not in calls._urls


def test_a_record_keeps_a_url_without_credentials_and_shows_it_without_them():
    plain = URL("http://orders:8080/v1?a=1")
    assert record_url(plain) is plain and url_text(plain) == "http://orders:8080/v1?a=1"
    for keyed in ("http://user:s3cret@orders:8080/v1", "http://:s3cret@orders:8080/v1"):
        kept = record_url(URL(keyed))
        assert isinstance(kept, str) and "s3cret" not in kept
        assert "s3cret" not in url_text(URL(keyed))

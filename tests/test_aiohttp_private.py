"""aiohttp's private API the sidecar relies on (sidecar/aiohttp_private.py) is still there. When this
fails after an aiohttp upgrade, the message lists what moved: adapt the seam, not its callers."""
from sidecar.aiohttp_private import missing


async def test_aiohttp_still_has_every_private_name_the_seam_uses():
    gone = missing()
    assert not gone, "aiohttp changed private API the sidecar uses (sidecar/aiohttp_private.py):\n  " + \
        "\n  ".join(gone)


async def test_a_renamed_attribute_is_reported(monkeypatch):
    import sidecar.aiohttp_private as seam
    monkeypatch.setattr(seam, "HANDLER_STATE", (*seam.HANDLER_STATE, "_renamed_in_a_release"))
    assert [g for g in missing() if "_renamed_in_a_release" in g] == [
        f"RequestHandler._renamed_in_a_release (aiohttp {seam.aiohttp.__version__})"]

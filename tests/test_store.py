"""Run store: atomic files, manifests, clearing."""

from dedt_ray.store import RunStore


def test_local_store_roundtrip(tmp_path):
    store = RunStore(str(tmp_path / "run"))
    store.write_json({"a": 1}, "stage", "x.json")
    assert store.read_json("stage", "x.json") == {"a": 1}
    assert store.exists("stage", "x.json") and not store.exists("stage", "y.json")
    assert store.list("stage") == ["x.json"]  # no temp files left behind
    assert store.manifest("stage") is None
    store.write_manifest("stage", {"rows": 3})
    assert store.manifest("stage") == {"rows": 3}
    store.clear("stage")
    assert store.list("stage") == [] and store.manifest("stage") is None


def test_file_uri_store(tmp_path):
    store = RunStore(f"file://{tmp_path}/run")
    store.write_text("hello", "a", "b.txt")
    assert (tmp_path / "run" / "a" / "b.txt").read_text() == "hello"
    assert store.uri(store.path("a")) == str(tmp_path / "run" / "a")

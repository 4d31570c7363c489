"""SiteStore: deltas keyed to their base, compare-and-set versions, integrity, rollback."""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from model_store import ModelStore
from model_store.sites import DELTA_FILE, META_FILE, SiteStore, UnreadableVersion
from model_store.spec import ModelSpec
from sitefit.exceptions import (
    IncompatibleDeltaError,
    InvalidInputError,
    ModelStoreError,
    SiteNotFoundError,
    VersionConflictError,
)

SpecFactory = Callable[..., ModelSpec]
TensorFactory = Callable[[int], dict[str, np.ndarray]]
STATS: dict[str, Any] = {
    "scans_refined": 1,
    "self_consistency_before": 0.71,
    "self_consistency_after": 0.83,
    "refinement_epochs": 4,
}


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path)


@pytest.fixture
def base(store: ModelStore, make_spec: SpecFactory, make_tensors: TensorFactory) -> ModelSpec:
    return store.models.register(make_spec("brain"), make_tensors(100))


def assert_bitwise_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert a[key].tobytes() == b[key].tobytes(), key


def test_save_load_history(store: ModelStore, base: ModelSpec, make_tensors: TensorFactory) -> None:
    sites = store.sites
    assert sites.latest("hospital-a", "brain") is None
    first = sites.save("hospital-a", base, make_tensors(1), expected_version=None, **STATS)
    second = sites.save("hospital-a", base, make_tensors(2), expected_version=1, **STATS)
    assert (first.version, second.version) == (1, 2)
    assert first.base_sha256 == base.sha256 and first.base_version == 1
    assert first.created.tzinfo is not None and first.sitefit_version
    assert sites.latest("hospital-a", "brain") == second
    assert sites.history("hospital-a", "brain") == [first, second]
    assert_bitwise_equal(sites.load("hospital-a", first, base), make_tensors(1))
    assert_bitwise_equal(sites.load("hospital-a", 2, base), make_tensors(2))
    assert sites.sites() == ["hospital-a"]
    assert sites.models_of("hospital-a") == ["brain"]
    version_dir = store.sites.backend.describe("hospital-a/brain/2")
    assert sorted(p.name for p in Path(version_dir).iterdir()) == [
        DELTA_FILE,
        META_FILE,
        f"{META_FILE}.sha256",
    ]
    assert Path(version_dir, DELTA_FILE).stat().st_size == second.nbytes


def test_delta_is_under_one_percent_of_a_default_base_model(
    tmp_path: Path, make_spec: SpecFactory
) -> None:
    torch = pytest.importorskip("torch")
    from worker.nets import NetConfig, SegmentationNet
    from worker.weights import architecture_of, to_numpy

    torch.manual_seed(0)
    net = SegmentationNet(NetConfig(num_outputs=1))  # the paper's default size
    weights = to_numpy(net)
    store = ModelStore(tmp_path)
    spec = make_spec().model_copy(update={"architecture": architecture_of(net.config)})
    base = store.models.register(spec, weights)
    # What refinement with train-mode BN changes: the init path and every BN buffer; perturb
    # the values so they are no more compressible than refined weights.
    rng = np.random.default_rng(0)
    delta = {
        key: (value + rng.normal(0, 0.01, value.shape).astype(value.dtype))
        if value.dtype == np.float32
        else value + 3
        for key, value in weights.items()
        if key.startswith("init_path.")
        or key.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")
    }
    saved = store.sites.save("s", base, delta, expected_version=None, **STATS)
    base_bytes = (tmp_path / "models" / "brain" / "1" / "weights.safetensors").stat().st_size
    delta_bytes = (tmp_path / "sites" / "s" / "brain" / "1" / DELTA_FILE).stat().st_size
    assert delta_bytes == saved.nbytes
    assert delta_bytes < 0.01 * base_bytes, (delta_bytes, base_bytes)
    assert_bitwise_equal(
        store.sites.load("s", saved, base), {k: np.asarray(v) for k, v in delta.items()}
    )


def test_a_delta_refuses_another_base(
    store: ModelStore, base: ModelSpec, make_spec: SpecFactory, make_tensors: TensorFactory
) -> None:
    retrained = store.models.register(make_spec("brain"), make_tensors(200))
    other = store.models.register(make_spec("heart"), make_tensors(300))
    saved = store.sites.save("s", base, make_tensors(1), expected_version=None, **STATS)
    with pytest.raises(IncompatibleDeltaError, match=r"adapted from base model brain sha256"):
        store.sites.load("s", saved, retrained)
    with pytest.raises(IncompatibleDeltaError):
        store.sites.load("s", saved, other)
    with pytest.raises(SiteNotFoundError):
        store.sites.load("s", 1, other)  # site s has nothing for the heart model


def test_version_compare_and_set(
    store: ModelStore, base: ModelSpec, make_tensors: TensorFactory
) -> None:
    sites = store.sites
    sites.save("s", base, make_tensors(1), expected_version=None, **STATS)
    with pytest.raises(VersionConflictError, match="expected latest version None, found 1"):
        sites.save("s", base, make_tensors(2), expected_version=None, **STATS)
    with pytest.raises(VersionConflictError):
        sites.save("s", base, make_tensors(2), expected_version=5, **STATS)
    sites.save("s", base, make_tensors(2), expected_version=1, **STATS)
    with pytest.raises(VersionConflictError):
        sites.save("s", base, make_tensors(3), expected_version=1, **STATS)  # stale
    appended = sites.append("s", base, make_tensors(3), **STATS)
    assert appended.version == 3
    assert [v.version for v in sites.history("s", "brain")] == [1, 2, 3]


def test_a_lagging_listing_cannot_break_the_compare_and_set(
    store: ModelStore, base: ModelSpec, make_tensors: TensorFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    sites = store.sites
    sites.save("s", base, make_tensors(1), expected_version=None, **STATS)
    sites.save("s", base, make_tensors(2), expected_version=1, **STATS)
    monkeypatch.setattr(sites, "_versions", lambda site, model: [])  # e.g. NFS caching
    with pytest.raises(VersionConflictError, match="another writer"):
        sites.save("s", base, make_tensors(3), expected_version=None, **STATS)
    assert sites.append("s", base, make_tensors(3), **STATS).version == 3
    monkeypatch.undo()
    assert_bitwise_equal(sites.load("s", 1, base), make_tensors(1))
    assert [v.version for v in sites.history("s", "brain")] == [1, 2, 3]


def test_corrupt_torn_or_missing_delta_is_detected(
    store: ModelStore, base: ModelSpec, make_tensors: TensorFactory
) -> None:
    sites = store.sites
    saved = sites.save("s", base, make_tensors(1), expected_version=None, **STATS)
    path = Path(sites.backend.describe(f"s/brain/1/{DELTA_FILE}"))
    data = path.read_bytes()
    path.write_bytes(data[:10] + bytes([data[10] ^ 0x01]) + data[11:])
    with pytest.raises(ModelStoreError, match="checksum"):
        sites.load("s", saved, base)
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelStoreError, match="checksum"):
        sites.load("s", 1, base)
    path.unlink()
    with pytest.raises(ModelStoreError, match="missing"):
        sites.load("s", saved, base)
    assert sites.integrity_errors == 3
    meta = Path(sites.backend.describe(f"s/brain/1/{META_FILE}"))
    meta.write_text("{}")
    with pytest.raises(ModelStoreError, match=r"meta\.json .*fails its checksum"):
        sites.latest("s", "brain")
    Path(f"{meta}.sha256").unlink()  # as a version saved before the sidecar existed
    with pytest.raises(ModelStoreError, match=r"unreadable meta\.json"):
        sites.latest("s", "brain")


def test_rollback_restores_the_weights_bitwise(
    store: ModelStore, base: ModelSpec, make_tensors: TensorFactory
) -> None:
    sites = store.sites
    first = sites.save("s", base, make_tensors(1), expected_version=None, **STATS)
    sites.save(
        "s",
        base,
        make_tensors(2),
        expected_version=1,
        scans_refined=2,
        self_consistency_before=0.5,
        self_consistency_after=0.6,
        refinement_epochs=1,
    )
    restored = sites.rollback("s", "brain", 1)
    assert restored.version == 3 and restored.rolled_back_from == 1
    assert restored.sha256 == first.sha256
    assert restored.scans_refined == first.scans_refined
    assert_bitwise_equal(sites.load("s", restored, base), sites.load("s", first, base))
    assert_bitwise_equal(sites.load("s", sites.latest("s", "brain") or 0, base), make_tensors(1))
    assert [v.version for v in sites.history("s", "brain")] == [1, 2, 3]
    with pytest.raises(SiteNotFoundError, match="no version 9"):
        sites.rollback("s", "brain", 9)


def test_delete_and_names(
    store: ModelStore, base: ModelSpec, make_tensors: TensorFactory, make_spec: SpecFactory
) -> None:
    heart = store.models.register(make_spec("heart"), make_tensors(5))
    sites = store.sites
    sites.save("a", base, make_tensors(1), expected_version=None, **STATS)
    sites.save("a", heart, make_tensors(2), expected_version=None, **STATS)
    sites.save("b", base, make_tensors(3), expected_version=None, **STATS)
    (Path(sites.backend.describe()) / "not a site").mkdir()  # foreign directories are ignored
    assert sites.sites() == ["a", "b"] and sites.models_of("a") == ["brain", "heart"]
    sites.delete("a", "heart")
    assert sites.models_of("a") == ["brain"]
    sites.delete("a")
    assert sites.sites() == ["b"] and sites.latest("a", "brain") is None
    with pytest.raises(SiteNotFoundError):
        sites.delete("a")
    with pytest.raises(SiteNotFoundError):
        sites.delete("b", "heart")
    again = sites.save("a", base, make_tensors(4), expected_version=None, **STATS)
    assert again.version == 1


@pytest.mark.parametrize("site", ["../x", "a/b", "", ".hidden", "x" * 65])
def test_site_names_are_validated(
    store: ModelStore, base: ModelSpec, site: str, make_tensors: TensorFactory
) -> None:
    with pytest.raises(InvalidInputError, match="invalid site name"):
        store.sites.save(site, base, make_tensors(1), expected_version=None, **STATS)
    with pytest.raises(InvalidInputError):
        store.sites.history(site, "brain")


def test_empty_or_unstorable_deltas_are_refused(store: ModelStore, base: ModelSpec) -> None:
    with pytest.raises(InvalidInputError, match="at least one tensor"):
        store.sites.save("s", base, {}, expected_version=None, **STATS)
    with pytest.raises(InvalidInputError, match="safetensors"):
        store.sites.save(
            "s", base, {"x": np.array(["a"], dtype=object)}, expected_version=None, **STATS
        )


# -- several processes saving the same site at once -----------------------------------------

WRITERS = 4
SAVES_EACH = 3


def _writer(root: str, base_json: str, writer: int, barrier: Any, results: Any) -> None:
    """One worker process: race a raw compare-and-set for version 1, then append."""
    store = SiteStore(Path(root))
    base = ModelSpec.model_validate_json(base_json)
    barrier.wait()
    won: list[int] = []
    tensors = {"w": np.full(1000, writer * 100, dtype=np.float32)}
    with contextlib.suppress(VersionConflictError):
        won.append(store.save("s", base, tensors, expected_version=None, **STATS).version)
    for i in range(1, SAVES_EACH + 1):
        tensors = {"w": np.full(1000, writer * 100 + i, dtype=np.float32)}
        won.append(store.append("s", base, tensors, **STATS).version)
    results.put(won)


def test_processes_saving_one_site_leave_a_consistent_history(
    store: ModelStore, base: ModelSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    # spawned children unpickle ``_writer`` by module name: make this file importable as one
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    writer = importlib.import_module(Path(__file__).stem)._writer
    context = multiprocessing.get_context("spawn")
    barrier, queue = context.Barrier(WRITERS), context.Queue()
    root = store.sites.backend.describe()
    processes = [
        context.Process(target=writer, args=(root, base.model_dump_json(), w, barrier, queue))
        for w in range(WRITERS)
    ]
    for process in processes:
        process.start()
    results = [queue.get(timeout=60) for _ in processes]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    history = store.sites.history("s", "brain")
    total = WRITERS * SAVES_EACH + 1  # exactly one process wins the raw race for version 1
    assert [v.version for v in history] == list(range(1, total + 1))
    assert sorted(v for won in results for v in won) == list(range(1, total + 1))
    values = []
    for meta in history:
        tensors = store.sites.load("s", meta, base)  # verifies the checksum
        assert np.unique(tensors["w"]).size == 1  # never a mixed file
        values.append(int(tensors["w"][0]))
    expected = {w * 100 + i for w in range(WRITERS) for i in range(1, SAVES_EACH + 1)}
    assert sorted(v for v in values if v % 100) == sorted(expected)
    assert values[0] % 100 == 0  # version 1 is the raw race's winner


def test_a_site_deleted_while_a_job_saves_stays_deleted(
    store: ModelStore, base: ModelSpec, make_tensors: TensorFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """The job read version 1 and saves version 2; the site is deleted in between (after
    the save's own check, which the stale listing stands in for)."""
    sites = store.sites
    sites.save("gone", base, make_tensors(1), expected_version=None, **STATS)
    sites.delete("gone")
    monkeypatch.setattr(sites, "_versions", lambda site, model: [1])
    with pytest.raises(VersionConflictError, match="deleted the site"):
        sites.save("gone", base, make_tensors(2), expected_version=1, **STATS)
    monkeypatch.undo()
    assert sites.sites() == [] and not (Path(sites.backend.describe()) / "gone").exists()


def test_published_versions_are_readable_as_plain_files_would_be(
    store: ModelStore, base: ModelSpec, make_tensors: TensorFactory
) -> None:
    """Not private to the writer: a store shared by a service account and its operators."""
    umask = os.umask(0o022)
    os.umask(umask)
    saved = store.sites.save("shared", base, make_tensors(1), expected_version=None, **STATS)
    folder = Path(store.sites.backend.describe()) / "shared" / "brain" / str(saved.version)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask
    for name in (DELTA_FILE, META_FILE):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o666 & ~umask


def test_history_lists_unreadable_versions_apart_when_asked(
    store: ModelStore, base: ModelSpec, make_tensors: TensorFactory
) -> None:
    sites = store.sites
    for seed in (1, 2, 3):
        sites.append("s", base, make_tensors(seed), **STATS)
    meta = Path(sites.backend.describe("s/brain/2/meta.json"))
    meta.write_text(meta.read_text().replace('"version": 2', '"version": 7'))
    Path(f"{meta}.sha256").unlink()  # a version saved before the sidecar existed
    with pytest.raises(ModelStoreError, match=r"version 2: meta\.json describes"):
        sites.history("s", "brain")
    unreadable: list[UnreadableVersion] = []
    assert [v.version for v in sites.history("s", "brain", unreadable=unreadable)] == [1, 3]
    assert [(u.version, "describes s/brain@7" in u.reason) for u in unreadable] == [(2, True)]
    assert sites.versions("s", "brain") == [1, 2, 3]
    assert sites.integrity_errors == 2


def test_a_flipped_digit_in_meta_json_fails_its_checksum(
    store: ModelStore, base: ModelSpec, make_tensors: TensorFactory
) -> None:
    """Valid JSON still: only the sidecar checksum can tell, and ``auto`` reads this figure."""
    sites = store.sites
    sites.append("s", base, make_tensors(1), **STATS)
    meta = Path(sites.backend.describe(f"s/brain/1/{META_FILE}"))
    text = meta.read_text()
    assert '"self_consistency_after": 0.83' in text
    meta.write_text(
        text.replace('"self_consistency_after": 0.83', '"self_consistency_after": 0.93')
    )
    with pytest.raises(ModelStoreError, match="fails its checksum"):
        sites.latest("s", "brain")
    assert sites.integrity_errors == 1


def test_versions_saved_without_a_meta_checksum_still_read(
    store: ModelStore, base: ModelSpec, make_tensors: TensorFactory
) -> None:
    """Versions published before the sidecar existed (earlier builds)."""
    sites = store.sites
    saved = sites.append("s", base, make_tensors(1), **STATS)
    Path(sites.backend.describe(f"s/brain/1/{META_FILE}.sha256")).unlink()
    assert sites.latest("s", "brain") == saved

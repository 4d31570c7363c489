"""The DICOM inbox: checked, PHI-free, atomic storage of instances; idle series; claims."""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ComprehensiveSRStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    SegmentationStorage,
    generate_uid,
)

from sitefit.inbox import (
    CANNOT_UNDERSTAND,
    DISPATCHED_KEEP_S,
    OUT_OF_RESOURCES,
    TMP_KEEP_S,
    Inbox,
    series_key,
    sop_key,
)
from sitefit.job_store import JOB_DIR_MODE, JOB_FILE_MODE
from sitefit.phantoms.dicom_series import SeriesIds, dataset_bytes, series_datasets
from sitefit.settings import Settings

ROUTE = "brain"


def _image(slices: int = 4) -> Any:
    data = np.linspace(0, 100, 12 * 10 * slices, dtype=np.float32).reshape(12, 10, slices)
    return nib.Nifti1Image(data, np.diag([1.5, 1.5, 3.0, 1.0]))


def _series(slices: int = 4, ids: SeriesIds | None = None) -> list[Dataset]:
    return series_datasets(_image(slices), ids=ids)


def _inbox(tmp_path: Path, max_instances: int = 100, max_bytes: int = 10**8) -> Inbox:
    return Inbox(tmp_path / "inbox", max_instances, max_bytes)


def _files(inbox: Inbox, route: str = ROUTE) -> list[Path]:
    return sorted((inbox.root / route).glob("*/*.dcm"))


def _age(directory: Path, seconds: float) -> float:
    """Set a directory's mtime ``seconds`` into the past; returns that mtime."""
    when = time.time() - seconds
    os.utime(directory, (when, when))
    return directory.stat().st_mtime


def _non_image(sop_class: str, *, pixels: bool, modality: str = "SR") -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = uid = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = modality
    ds.PatientName = "Secret^Patient"
    if pixels:
        ds.Rows = ds.Columns = 4
        ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 8, 8, 7
        ds.PixelRepresentation, ds.PhotometricInterpretation = 0, "MONOCHROME2"
        ds.PixelData = bytes(16)
    return ds


def test_store_keeps_instances_under_names_without_uids(tmp_path: Path) -> None:
    inbox = _inbox(tmp_path)
    datasets = _series()
    previous = os.umask(0o022)  # the usual umask: alone it would let every account read them
    try:
        answers = [inbox.store(ROUTE, dataset_bytes(ds)) for ds in datasets]
    finally:
        os.umask(previous)
    assert [a.status for a in answers] == ["stored"] * 4
    first = datasets[0]
    assert answers[0].sop_instance_uid == first.SOPInstanceUID
    assert answers[0].study_uid == first.StudyInstanceUID
    assert answers[0].sop_class_uid == first.SOPClassUID and answers[0].reason is None
    series_dir = inbox.root / ROUTE / series_key(first.StudyInstanceUID, first.SeriesInstanceUID)
    expected = sorted(series_dir / f"{sop_key(ds.SOPInstanceUID)}.dcm" for ds in datasets)
    assert _files(inbox) == expected
    assert expected[0].parent.name == series_dir.name and len(series_dir.name) == 32
    assert (series_dir / f"{sop_key(first.SOPInstanceUID)}.dcm").read_bytes() == dataset_bytes(
        first
    )
    for path in inbox.root.rglob("*"):
        assert first.StudyInstanceUID not in str(path) and first.SOPInstanceUID not in str(path)
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (JOB_DIR_MODE if path.is_dir() else JOB_FILE_MODE), path
    assert not [p for p in series_dir.iterdir() if p.name.startswith(".")]  # no temporaries


def test_a_duplicate_instance_is_ignored_and_the_first_copy_kept(tmp_path: Path) -> None:
    inbox = _inbox(tmp_path)
    ds = _series(1)[0]
    original = dataset_bytes(ds)
    assert inbox.store(ROUTE, original).status == "stored"
    ds.SeriesDescription = "sent again, changed"
    again = inbox.store(ROUTE, dataset_bytes(ds))
    assert again.status == "duplicate" and again.sop_instance_uid == ds.SOPInstanceUID
    (only,) = _files(inbox)
    assert only.read_bytes() == original


def test_the_same_series_on_two_routes_is_two_series(tmp_path: Path) -> None:
    inbox = _inbox(tmp_path)
    data = dataset_bytes(_series(1)[0])
    assert inbox.store("brain", data).status == "stored"
    assert inbox.store("heart", data).status == "stored"
    assert len(_files(inbox, "brain")) == len(_files(inbox, "heart")) == 1


def _enhanced() -> Dataset:
    ds = _series(1)[0]
    ds.NumberOfFrames = 3
    ds.PixelData = bytes(len(ds.PixelData) * 3)
    return ds


def _without(keyword: str) -> Dataset:
    ds = _series(1)[0]
    delattr(ds, keyword)
    return ds


def _truncated() -> bytes:
    return dataset_bytes(_series(1)[0])[:-50]


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: b"not DICOM at all" * 20, "not a readable DICOM Part 10 file"),
        (lambda: b"", "not a readable DICOM Part 10 file"),
        (
            lambda: dataset_bytes(_non_image(ComprehensiveSRStorage, pixels=False)),
            "Comprehensive SR Storage objects are not images",
        ),
        (
            lambda: dataset_bytes(_non_image(SegmentationStorage, pixels=True, modality="SEG")),
            "Segmentation Storage objects are not images",
        ),
        (
            lambda: dataset_bytes(_non_image("1.2.3.4.5.6", pixels=False, modality="OT")),
            "unknown SOP class objects are not images",
        ),
        (
            lambda: dataset_bytes(_enhanced()),
            "enhanced multi-frame objects are not supported; send single-frame images",
        ),
        (lambda: dataset_bytes(_without("SOPInstanceUID")), "has no SOPInstanceUID"),
        (lambda: dataset_bytes(_without("SeriesInstanceUID")), "has no SeriesInstanceUID"),
        (lambda: dataset_bytes(_without("StudyInstanceUID")), "has no StudyInstanceUID"),
        (_truncated, "PixelData is truncated"),
    ],
    ids=[
        "garbage", "empty", "sr", "seg", "private", "multiframe", "no-sop", "no-series",
        "no-study", "truncated",
    ],
)  # fmt: skip
def test_unusable_instances_are_refused_with_a_phi_free_reason(
    tmp_path: Path, make: Any, expected: str
) -> None:
    inbox = _inbox(tmp_path)
    answer = inbox.store(ROUTE, make())
    assert answer.status == "refused" and answer.failure_reason == CANNOT_UNDERSTAND
    assert answer.reason is not None and expected in answer.reason
    assert (
        "\n" not in answer.reason and "1.2." not in answer.reason and "Secret" not in answer.reason
    )
    assert _files(inbox) == []


@pytest.mark.parametrize("route", ["", "../escape", ".tmp", ".claimed", "a/b", "x" * 65])
def test_a_route_that_is_not_a_safe_directory_name_is_refused(tmp_path: Path, route: str) -> None:
    inbox = _inbox(tmp_path)
    answer = inbox.store(route, dataset_bytes(_series(1)[0]))
    assert answer.status == "refused" and answer.reason is not None
    assert "invalid route name" in answer.reason
    assert not inbox.root.exists() or not list(inbox.root.rglob("*.dcm"))


def test_the_instance_cap_refuses_the_instance_past_it(tmp_path: Path) -> None:
    inbox = _inbox(tmp_path, max_instances=3)
    datasets = _series(5)
    answers = [inbox.store(ROUTE, dataset_bytes(ds)) for ds in datasets]
    assert [a.status for a in answers] == ["stored"] * 3 + ["refused"] * 2
    assert answers[3].failure_reason == OUT_OF_RESOURCES
    assert (
        answers[3].reason is not None and "SITEFIT_DICOM_MAX_SERIES_INSTANCES" in answers[3].reason
    )
    assert answers[3].sop_instance_uid == datasets[3].SOPInstanceUID  # for a STOW-RS answer
    assert inbox.store(ROUTE, dataset_bytes(datasets[0])).status == "duplicate"  # not a refusal
    assert len(_files(inbox)) == 3
    other = inbox.store(ROUTE, dataset_bytes(_series(1)[0]))  # another series: its own cap
    assert other.status == "stored"


def test_the_byte_cap_refuses_the_instance_past_it(tmp_path: Path) -> None:
    datasets = _series(3)
    size = len(dataset_bytes(datasets[0]))
    inbox = _inbox(tmp_path, max_bytes=int(size * 2.5))
    answers = [inbox.store(ROUTE, dataset_bytes(ds)) for ds in datasets]
    assert [a.status for a in answers] == ["stored", "stored", "refused"]
    assert answers[2].reason is not None and "SITEFIT_DICOM_MAX_SERIES_BYTES" in answers[2].reason
    assert answers[2].failure_reason == OUT_OF_RESOURCES


def test_caps_count_what_another_process_stored(tmp_path: Path) -> None:
    datasets = _series(4)
    first = _inbox(tmp_path, max_instances=3)
    for ds in datasets[:2]:
        assert first.store(ROUTE, dataset_bytes(ds)).status == "stored"
    second = _inbox(tmp_path, max_instances=3)  # a fresh process: counts the directory
    assert second.store(ROUTE, dataset_bytes(datasets[2])).status == "stored"
    assert first.store(ROUTE, dataset_bytes(datasets[3])).status == "refused"  # saw the change


def test_concurrent_stores_into_one_series_respect_the_cap(tmp_path: Path) -> None:
    inbox = _inbox(tmp_path, max_instances=10)
    payloads = [dataset_bytes(ds) for ds in _series(24)]
    statuses: list[str] = []
    start = threading.Barrier(6)

    def send(chunk: list[bytes]) -> None:
        start.wait()
        for data in chunk:
            statuses.append(inbox.store(ROUTE, data).status)

    threads = [threading.Thread(target=send, args=(payloads[i::6],)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(statuses) == ["refused"] * 14 + ["stored"] * 10
    assert len(_files(inbox)) == 10


def test_store_file_moves_the_upload_in_and_consumes_it_either_way(tmp_path: Path) -> None:
    inbox = _inbox(tmp_path)
    ds = _series(1)[0]
    part = inbox.temp_file()
    assert part.parent == inbox.temp_dir() and part.stat().st_size == 0
    assert stat.S_IMODE(part.stat().st_mode) == JOB_FILE_MODE
    part.write_bytes(dataset_bytes(ds))
    inode = part.stat().st_ino
    answer = inbox.store_file(ROUTE, part)
    assert answer.status == "stored" and not part.exists()
    (stored,) = _files(inbox)
    assert stored.stat().st_ino == inode  # moved, not copied
    assert stat.S_IMODE(stored.stat().st_mode) == JOB_FILE_MODE
    again = inbox.temp_file()
    again.write_bytes(dataset_bytes(ds))
    assert inbox.store_file(ROUTE, again).status == "duplicate" and not again.exists()
    bad = inbox.temp_file()
    bad.write_bytes(_truncated())
    refused = inbox.store_file(ROUTE, bad)
    assert refused.status == "refused" and refused.reason is not None
    assert "truncated" in refused.reason and not bad.exists()
    assert list(inbox.temp_dir().iterdir()) == []


def test_checking_an_instance_logs_and_warns_no_header_value(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ds = _series(1)[0]
    ds.PatientName = "Secret^Patient"
    ds.PatientBirthDate = "SECRETDATE"  # not a DA: pydicom would quote it in a warning
    ds.PatientSex = "SECRET-SEX-VALUE"  # too long for CS
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.DEBUG):
        warnings.simplefilter("always")
        answer = _inbox(tmp_path).store(ROUTE, dataset_bytes(ds))
    assert answer.status == "stored"
    said = caplog.text + "".join(str(w.message) for w in caught)
    assert "SECRET" not in said and "Secret" not in said


def test_a_series_is_idle_once_nothing_arrived_for_idle_s(tmp_path: Path) -> None:
    inbox = _inbox(tmp_path)
    first = _series(2)
    for ds in first:
        inbox.store(ROUTE, dataset_bytes(ds))
    (series_dir,) = (inbox.root / ROUTE).iterdir()
    arrival = _age(series_dir, 100)
    assert inbox.idle_series(5, now=arrival + 4) == []
    (ref,) = inbox.idle_series(5, now=arrival + 6)
    assert (ref.route, ref.directory, ref.last_arrival) == (ROUTE, series_dir, arrival)
    assert ref.key == series_key(first[0].StudyInstanceUID, first[0].SeriesInstanceUID)
    # another instance arrives: the series is no longer idle
    inbox.store(ROUTE, dataset_bytes(_series(3, ids=_ids(first))[2]))
    assert inbox.idle_series(5, now=arrival + 6) == []
    assert [r.key for r in inbox.idle_series(5, now=time.time() + 6)] == [ref.key]


def _ids(datasets: list[Dataset]) -> SeriesIds:
    ds = datasets[0]
    return SeriesIds(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID)


def test_idle_series_skips_and_removes_empty_series_directories(tmp_path: Path) -> None:
    inbox = _inbox(tmp_path)
    empty = inbox.root / ROUTE / ("0" * 32)
    empty.mkdir(parents=True)
    leftover = empty / ".0123.dcm.abc.tmp"  # a temporary of a store killed mid-write
    leftover.write_bytes(b"partial")
    _age(leftover, 100)
    (inbox.root / ROUTE / "not-a-key").mkdir()
    _age(empty, 100)
    assert inbox.idle_series(5) == []
    assert not empty.exists() and (inbox.root / ROUTE / "not-a-key").is_dir()


def _idle_ref(inbox: Inbox) -> Any:
    (series_dir,) = (inbox.root / ROUTE).iterdir()
    _age(series_dir, 100)
    (ref,) = inbox.idle_series(5)
    return ref


def test_only_one_of_two_inboxes_claims_a_series(tmp_path: Path) -> None:
    first, second = _inbox(tmp_path), _inbox(tmp_path)  # e.g. two API processes
    datasets = _series(3)
    for ds in datasets:
        first.store(ROUTE, dataset_bytes(ds))
    ref = _idle_ref(first)
    claims: list[Any] = []
    start = threading.Barrier(2)

    def claim(inbox: Inbox) -> None:
        start.wait()
        claims.append(inbox.claim(ref))

    threads = [threading.Thread(target=claim, args=(inbox,)) for inbox in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    won = [c for c in claims if c is not None]
    assert len(claims) == 2 and len(won) == 1
    claimed = won[0]
    assert claimed.route == ROUTE and claimed.key == ref.key and claimed.instances == 3
    assert len(claimed.paths()) == 3 and claimed.directory.is_relative_to(first.root / ".claimed")
    assert first.idle_series(0) == [] and not ref.directory.exists()
    # a late instance of the same series starts it anew; the claim is unaffected
    late = _series(4, ids=_ids(datasets))[3]
    assert second.store(ROUTE, dataset_bytes(late)).status == "stored"
    assert len(claimed.paths()) == 3 and len(_files(first)) == 1
    first.done(claimed)
    assert not claimed.directory.exists()
    first.done(claimed)  # twice: nothing left to remove, no error


def test_a_series_that_received_an_instance_since_it_was_listed_is_not_claimed(
    tmp_path: Path,
) -> None:
    inbox = _inbox(tmp_path)
    datasets = _series(3)
    for ds in datasets[:2]:
        inbox.store(ROUTE, dataset_bytes(ds))
    ref = _idle_ref(inbox)
    inbox.store(ROUTE, dataset_bytes(datasets[2]))
    assert inbox.claim(ref) is None
    assert ref.directory.is_dir() and len(_files(inbox)) == 3


def test_recover_puts_stale_claims_back(tmp_path: Path) -> None:
    inbox = _inbox(tmp_path)
    datasets = _series(3)
    for ds in datasets[:2]:
        inbox.store(ROUTE, dataset_bytes(ds))
    claimed = inbox.claim(_idle_ref(inbox))
    assert claimed is not None
    assert inbox.recover(60) == 0  # a fresh claim: its process may be working on it
    part = inbox.temp_file()  # an upload a killed process left behind
    assert inbox.recover(60, now=time.time() + 120) == 1
    assert not claimed.directory.exists()
    assert part.exists()  # a slow upload may still be streaming into it
    inbox.recover(60, now=time.time() + TMP_KEEP_S + 60)
    assert not part.exists()
    (ref,) = inbox.idle_series(5, now=time.time() + 6)
    assert ref.key == claimed.key and len(_files(inbox)) == 2
    # recovered again after a later instance arrived: merged with it, nothing lost or doubled
    claimed = inbox.claim(inbox.idle_series(5, now=time.time() + 6)[0])
    assert claimed is not None
    inbox.store(ROUTE, dataset_bytes(datasets[2]))
    inbox.store(ROUTE, dataset_bytes(datasets[0]))  # a duplicate of a claimed instance
    assert inbox.recover(60, now=time.time() + 120) == 1
    assert not claimed.directory.exists()
    assert sorted(p.name for p in _files(inbox)) == sorted(
        f"{sop_key(ds.SOPInstanceUID)}.dcm" for ds in datasets
    )


def test_a_dispatched_series_ignores_re_sent_instances_for_a_day(tmp_path: Path) -> None:
    inbox = _inbox(tmp_path)
    datasets = _series(3)
    for ds in datasets:
        inbox.store(ROUTE, dataset_bytes(ds))
    claimed = inbox.claim(_idle_ref(inbox))
    assert claimed is not None
    inbox.done(claimed)  # the series is a job now
    resent = inbox.store(ROUTE, dataset_bytes(datasets[1]))  # e.g. after a dropped association
    assert resent.status == "duplicate" and _files(inbox) == []
    late = _series(4, ids=_ids(datasets))[3]  # a new instance of it is kept, as a new series
    assert inbox.store(ROUTE, dataset_bytes(late)).status == "stored"
    inbox.recover(60, now=time.time() + DISPATCHED_KEEP_S + 60)
    assert inbox.store(ROUTE, dataset_bytes(datasets[1])).status == "stored"


def test_release_puts_a_claimed_series_back_at_once(tmp_path: Path) -> None:
    inbox = _inbox(tmp_path)
    for ds in _series(3):
        inbox.store(ROUTE, dataset_bytes(ds))
    claimed = inbox.claim(_idle_ref(inbox))
    assert claimed is not None
    inbox.release(claimed)
    assert not claimed.directory.exists() and len(_files(inbox)) == 3
    (ref,) = inbox.idle_series(0, now=time.time() + 1)
    assert ref.key == claimed.key


def test_from_settings_keeps_the_inbox_under_home(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, dicom_max_series_instances=7, dicom_max_series_bytes=4096)
    inbox = Inbox.from_settings(settings)
    assert (inbox.root, inbox.max_instances, inbox.max_bytes) == (tmp_path / "inbox", 7, 4096)


def test_a_deflated_file_is_stored_and_a_cut_one_refused(tmp_path: Path) -> None:
    """Deflated files are read from an inflated stream: the truncation check must not
    compare positions in it with the file's size."""
    ds = series_datasets(nib.Nifti1Image(np.ones((64, 64, 1), np.float32), np.eye(4)))[0]
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    data = dataset_bytes(ds)
    inbox = _inbox(tmp_path)
    whole = inbox.temp_file()
    whole.write_bytes(data)
    assert inbox.store_file(ROUTE, whole).status == "stored"
    cut = inbox.temp_file()
    cut.write_bytes(data[:-200])
    assert inbox.store_file("other", cut).status == "refused"

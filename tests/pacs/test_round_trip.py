"""Round trips through a real Orthanc: a series goes from the PACS to sitefit and its DICOM SEG
comes back into the same study, by DIMSE and by DICOMweb.

Every part is a real process: Orthanc (with its DICOMweb plugin), `sitefit dicom-listener`,
and `sitefit serve` in embedded mode (the API, the dispatcher, the delivery loop and the
worker thread). The SEG that lands in Orthanc is read back with highdicom, per source
instance, and compared with the NIfTI mask of the same job; the expected slice of each
instance is found from its own ImagePositionPatient and the mask's affine, not from the
order anything was sent or stored in. dciodvfy (dicom3tools) must find no error in it.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import httpx2
import nibabel as nib
import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient

from sitefit.job_store import JobStore
from sitefit.phantoms.dicom_series import Scanner, SeriesIds, write_dicom_series
from sitefit.settings import Settings
from tests.conftest import PhantomCase
from tests.pacs.orthanc import Orthanc
from tests.pacs.services import ListenerProcess, ServeProcess, pacs_env
from tests.server.helpers import image_from_bytes, make_home
from tests.server.processes import free_port, wait_for

ROUTE_AE = "SITEFIT_BRAIN"
_LPS = np.diag([-1.0, -1.0, 1.0])


@dataclass
class Stack:
    orthanc: Orthanc
    serve: ServeProcess
    listener: ListenerProcess
    home: Path


@pytest.fixture
def stack(tmp_path: Path, settings: Settings, brain_model: str) -> Iterator[Stack]:
    home = make_home(tmp_path, settings.models_dir)
    listener_port = free_port()
    orthanc = Orthanc(
        tmp_path / "orthanc", modalities={"sitefit": (ROUTE_AE, "127.0.0.1", listener_port)}
    )
    orthanc.start()
    env = pacs_env(
        home,
        dicom_port=listener_port,
        dicom_allowed_callers=[orthanc.aet],
        series_idle_s=1,
        dicom_routes={
            "brain": {
                "model": brain_model,
                "mode": "adapt",
                "ae_title": ROUTE_AE,
                "destinations": ["orthanc-dimse"],
            },
            "web": {"model": brain_model, "mode": "adapt", "destinations": ["orthanc-web"]},
        },
        dicom_destinations={
            "orthanc-dimse": {
                "kind": "dimse",
                "host": "127.0.0.1",
                "port": orthanc.dicom_port,
                "ae_title": orthanc.aet,
            },
            "orthanc-web": {"kind": "dicomweb", "url": orthanc.dicomweb_url},
        },
    )
    serve = ServeProcess(env, tmp_path / "serve.log")
    listener = ListenerProcess(env, tmp_path / "listener.log", listener_port)
    serve.start()
    listener.start()
    try:
        yield Stack(orthanc, serve.wait_ready(), listener.wait_ready(), home)
    finally:
        listener.stop()
        serve.stop()
        orthanc.stop()


def _series(case: PhantomCase, out: Path, order: str = "shuffled") -> tuple[list[Path], str]:
    ids = SeriesIds()
    paths = write_dicom_series(
        nib.load(case.image),
        out,
        scanner=Scanner(serial="RT-1"),
        ids=ids,
        order=order,  # type: ignore[arg-type]
    )
    return paths, ids.study


def _finished_job(stack: Stack, timeout: float = 180) -> str:
    jobs = JobStore(stack.home / "jobs", 3600, 3600)
    found: list[str] = []

    def finished() -> bool:
        stack.serve.alive()
        found[:] = [j for j in jobs.job_ids() if jobs.state(j).status in ("finished", "failed")]
        return bool(found)

    wait_for(finished, timeout, "the series' job to end", interval=0.5)
    (job_id,) = found
    state = jobs.state(job_id)
    assert state.status == "finished", f"{state.error}\n{stack.serve.output()[-3000:]}"
    return job_id


def _seg_in_orthanc(orthanc: Orthanc, study_uid: str, timeout: float = 60) -> bytes:
    segs: list[str] = []

    def arrived() -> bool:
        segs[:] = [
            i for i in orthanc.instances() if orthanc.instance_tags(i).get("Modality") == "SEG"
        ]
        return bool(segs)

    wait_for(arrived, timeout, "the SEG to arrive in Orthanc", interval=0.5)
    (seg_id,) = segs
    assert orthanc.instance_tags(seg_id)["StudyInstanceUID"] == study_uid
    return orthanc.instance_file(seg_id)


def _expected_frame(mask: Any, source: pydicom.Dataset) -> npt.NDArray[np.uint8]:
    """The mask's slice through ``source``, by geometry: the voxel of the instance's first pixel
    from its ImagePositionPatient, and rows and columns along its orientation."""
    inverse = np.linalg.inv(mask.affine)
    position = _LPS @ np.array(source.ImagePositionPatient, dtype=float)
    start = inverse[:3, :3] @ position + inverse[:3, 3]
    orientation = np.array(source.ImageOrientationPatient, dtype=float)
    row_step = inverse[:3, :3] @ (_LPS @ orientation[:3]) * float(source.PixelSpacing[1])
    column_step = inverse[:3, :3] @ (_LPS @ orientation[3:]) * float(source.PixelSpacing[0])
    data = np.asarray(mask.dataobj)
    frame = np.zeros((int(source.Rows), int(source.Columns)), np.uint8)
    for r in range(frame.shape[0]):
        for c in range(frame.shape[1]):
            i, j, k = np.rint(start + c * row_step + r * column_step).astype(int)
            frame[r, c] = data[i, j, k]
    return frame


def _check_seg_against_mask(seg_bytes: bytes, mask: Any, sources: list[Path]) -> None:
    seg = hd.seg.segread(io.BytesIO(seg_bytes))
    assert seg.SegmentationType == "BINARY"
    assert len(seg.SegmentSequence) == 1  # the binary model's one foreground class
    found_foreground = False
    for path in sources:
        source = pydicom.dcmread(path)
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=[source.SOPInstanceUID], combine_segments=True
        )[0]
        expected = _expected_frame(mask, source)
        np.testing.assert_array_equal(pixels, expected)
        found_foreground |= bool(expected.any())
    assert found_foreground, "the mask is empty: the comparison proves nothing"


def _dciodvfy(seg_bytes: bytes, tmp_path: Path) -> None:
    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.skip("dciodvfy is not installed (`make system-tools` installs dicom3tools)")
    path = tmp_path / "seg-from-pacs.dcm"
    path.write_bytes(seg_bytes)
    result = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    errors = [line for line in (result.stdout + result.stderr).splitlines() if "Error" in line]
    assert not errors, "\n".join(errors)


def test_dimse_round_trip_orthanc_sends_a_series_and_gets_the_seg_back(
    stack: Stack, shifted_brain_case: PhantomCase, tmp_path: Path
) -> None:
    orthanc = stack.orthanc
    paths, study_uid = _series(shifted_brain_case, tmp_path / "series")
    for path in paths:
        orthanc.upload(path)
    (study_id,) = orthanc.studies()
    answer = orthanc.request(
        "POST", "/modalities/sitefit/store", json.dumps({"Resources": [study_id]}).encode(),
        "application/json", timeout=60,
    )  # fmt: skip
    assert json.loads(answer).get("FailedInstancesCount", 0) == 0

    job_id = _finished_job(stack)
    record = JobStore(stack.home / "jobs", 3600, 3600).record(job_id)
    assert record.origin == "pacs" and record.route == "brain"
    assert record.site_source == "headers" and record.site is not None
    seg_bytes = _seg_in_orthanc(orthanc, study_uid)
    series = orthanc.study_series(study_id)
    assert sorted(s["MainDicomTags"]["Modality"] for s in series) == ["MR", "SEG"]

    mask = image_from_bytes(httpx2.get(f"{stack.serve.url}/v1/jobs/{job_id}/mask").content)
    _check_seg_against_mask(seg_bytes, mask, paths)
    _dciodvfy(seg_bytes, tmp_path)
    deliveries = httpx2.get(f"{stack.serve.url}/v1/deliveries?status=delivered").json()
    assert [d["job_id"] for d in deliveries["deliveries"]] == [job_id]


def test_dicomweb_round_trip_stow_in_and_stow_out_then_wado_from_orthanc(
    stack: Stack, shifted_brain_case: PhantomCase, tmp_path: Path
) -> None:
    paths, study_uid = _series(shifted_brain_case, tmp_path / "series", order="reversed")
    sitefit = DICOMwebClient(url=f"{stack.serve.url}/dicomweb/routes/web")
    sitefit.store_instances([pydicom.dcmread(p) for p in paths])

    job_id = _finished_job(stack)
    seg_bytes = _seg_in_orthanc(stack.orthanc, study_uid)
    seg = pydicom.dcmread(io.BytesIO(seg_bytes))
    pacs = DICOMwebClient(url=stack.orthanc.dicomweb_url)
    (retrieved,) = pacs.retrieve_series(study_uid, seg.SeriesInstanceUID)
    assert retrieved.SOPInstanceUID == seg.SOPInstanceUID
    mask = image_from_bytes(httpx2.get(f"{stack.serve.url}/v1/jobs/{job_id}/mask").content)
    _check_seg_against_mask(seg_bytes, mask, paths)

    # sitefit's own QIDO-RS and WADO-RS find and return the same SEG
    own = DICOMwebClient(url=f"{stack.serve.url}/dicomweb")
    (listed,) = own.search_for_series(study_uid)
    assert listed["0020000E"]["Value"] == [seg.SeriesInstanceUID]
    (again,) = own.retrieve_series(study_uid, seg.SeriesInstanceUID)
    assert again.SOPInstanceUID == seg.SOPInstanceUID


def _storescu(stack: Stack, calling: str, files: list[Path]) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("storescu")
    if tool is None:
        pytest.skip("storescu is not installed (`make system-tools` installs dcmtk)")
    command = [tool, "-aet", calling, "-aec", ROUTE_AE, "127.0.0.1", str(stack.listener.port)]
    return subprocess.run([*command, *map(str, files)], capture_output=True, text=True, timeout=120)


def _rewrite(paths: list[Path], change: Any) -> None:
    for path in paths:
        ds = pydicom.dcmread(path)
        change(ds)
        ds.save_as(path, enforce_file_format=True)


def _rewrite_as_report(good_looking: Path, out: Path) -> None:
    ds = pydicom.dcmread(good_looking)
    del ds.PixelData
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    ds.Modality = "SR"
    ds.save_as(out, enforce_file_format=True)


def test_unusable_series_become_failed_jobs_and_the_listener_keeps_serving(
    stack: Stack, shifted_brain_case: PhantomCase, tmp_path: Path
) -> None:
    """Sent by dcmtk's storescu, as a scanner would: a series cut off halfway, one with two
    orientations, one of constant voxels, then a good one; and instances refused outright."""
    cut, _ = _series(shifted_brain_case, tmp_path / "cut", order="ascending")
    cut = cut[: len(cut) // 2]
    tilted, _ = _series(shifted_brain_case, tmp_path / "tilted")
    _rewrite(tilted[:1], lambda ds: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 0, 0, 1]))
    flat, _ = _series(shifted_brain_case, tmp_path / "flat")
    _rewrite(flat, lambda ds: setattr(ds, "PixelData", bytes(len(ds.PixelData))))
    for files in (cut, tilted, flat):
        assert _storescu(stack, stack.orthanc.aet, files).returncode == 0

    report = tmp_path / "report.dcm"  # a non-image object: refused as it arrives
    _rewrite_as_report(good_looking=tilted[1], out=report)
    refused = _storescu(stack, stack.orthanc.aet, [report])
    assert refused.returncode != 0  # storescu exits non-zero on a failure status
    wait_for(lambda: "not images" in stack.listener.output(), 10, "the listener to log why")
    stranger = _storescu(stack, "STRANGER", cut[:1])  # not on the allow-list
    assert stranger.returncode != 0
    assert "reject" in (stranger.stdout + stranger.stderr).lower()

    good, _ = _series(shifted_brain_case, tmp_path / "good")
    assert _storescu(stack, stack.orthanc.aet, good).returncode == 0
    jobs = JobStore(stack.home / "jobs", 3600, 3600)

    def four_ended() -> bool:
        stack.serve.alive()
        stack.listener.alive()
        states = [jobs.state(j) for j in jobs.job_ids()]
        return len(states) == 4 and all(s.status in ("finished", "failed") for s in states)

    wait_for(four_ended, 180, "four jobs to end", interval=0.5)
    errors = sorted(str(jobs.state(j).error) for j in jobs.job_ids() if jobs.state(j).error)
    assert len(errors) == 3, errors
    assert any("incomplete" in e for e in errors)
    assert any("orientation" in e for e in errors)
    assert any("every voxel has the value" in e for e in errors)
    assert [jobs.state(j).status for j in jobs.job_ids()].count("finished") == 1

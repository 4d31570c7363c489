"""The DIMSE listener with real peers: dcmtk's echoscu/storescu and a pynetdicom SCU.

The listener runs in-process (``DicomListener``) on a free loopback port, and once as the real
`sitefit dicom-listener` command; what arrives is checked in the inbox on disk.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pynetdicom._config
import pytest
from pydicom.uid import (
    ComprehensiveSRStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
)
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from server.dimse import DicomListener, called_ae_routes
from sitefit.exceptions import InvalidInputError
from sitefit.inbox import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, Inbox
from sitefit.job_store import JOB_DIR_MODE, JOB_FILE_MODE
from sitefit.phantoms.dicom_series import SeriesIds, dataset_bytes, write_dicom_series
from sitefit.routing import Route
from sitefit.settings import Settings
from tests.server.processes import REPO, free_port, wait_for
from tests.sitefit.test_inbox import _enhanced, _non_image

pytestmark = pytest.mark.skipif(
    shutil.which("storescu") is None or shutil.which("echoscu") is None,
    reason="dcmtk (storescu, echoscu) is not installed (the Makefile installs it)",
)

CALLER = "CALLER"
ROUTES = {
    "default": Route(model="tiny-brain"),
    "brain": Route(model="tiny-brain", ae_title="BRAIN", site="site-a"),
}
PATIENT = "Phantom^Subject"  # what the phantom series call their patient


def _image(size: int = 16, slices: int = 4) -> Any:
    data = np.linspace(0, 200, size * size * slices, dtype=np.float32)
    return nib.Nifti1Image(data.reshape(size, size, slices), np.diag([2.0, 2.0, 4.0, 1.0]))


def _write_series(out: Path, slices: int = 4, **kwargs: Any) -> tuple[list[Path], SeriesIds]:
    ids = SeriesIds()
    return write_dicom_series(_image(slices=slices), out, ids=ids, **kwargs), ids


def _settings(home: Path, **extra: Any) -> Settings:
    values: dict[str, Any] = {
        "home": home,
        "dicom_port": free_port(),
        "dicom_ae_title": "SITEFIT",
        "dicom_allowed_callers": [CALLER],
        "dicom_routes": ROUTES,
        **extra,
    }
    return Settings(**values)


@contextmanager
def _listening(settings: Settings) -> Iterator[DicomListener]:
    listener = DicomListener(settings, Inbox.from_settings(settings))
    listener.start()
    try:
        yield listener
    finally:
        listener.stop()


def _instances(home: Path, route: str) -> list[Path]:
    return sorted((home / "inbox" / route).glob("*/*.dcm"))


def _secrets(ids: SeriesIds, paths: list[Path]) -> list[str]:
    """What must never appear in a log: the series' UIDs and its patient's name."""
    uids = [str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in paths]
    return [ids.study, ids.series, ids.frame_of_reference, PATIENT, *uids]


def _dcmtk(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def _scu(port: int, called: str, calling: str = CALLER, **kwargs: Any) -> Association:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        ae.add_requested_context(MRImageStorage, syntax)
        ae.add_requested_context(ComprehensiveSRStorage, syntax)
    return ae.associate("127.0.0.1", port, ae_title=called, **kwargs)


# -- the real command ------------------------------------------------------------------------


def test_the_command_receives_series_from_dcmtk_and_stops_on_sigterm(tmp_path: Path) -> None:
    paths, ids = _write_series(tmp_path / "series", order="shuffled")
    sr = tmp_path / "sr.dcm"
    sr.write_bytes(dataset_bytes(_non_image(ComprehensiveSRStorage, pixels=False)))
    home, port, log = tmp_path / "home", free_port(), tmp_path / "listener.log"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SITEFIT_")}
    env.update(
        PYTHONPATH=str(REPO),
        SITEFIT_HOME=str(home),
        SITEFIT_DICOM_ALLOWED_CALLERS=json.dumps([CALLER]),
        SITEFIT_DICOM_ROUTES=json.dumps({name: r.model_dump() for name, r in ROUTES.items()}),
    )
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "sitefit", "dicom-listener", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    echo = ("echoscu", "-aet", CALLER, "-aec", "SITEFIT", "127.0.0.1", str(port))
    try:

        def answers() -> bool:
            assert process.poll() is None, log.read_text()
            return _dcmtk(*echo).returncode == 0

        wait_for(answers, 60, "sitefit dicom-listener to answer C-ECHO", interval=0.2)
        sent = _dcmtk("storescu", "-aet", CALLER, "-aec", "BRAIN", "127.0.0.1", str(port),
                      *map(str, paths))  # fmt: skip
        assert sent.returncode == 0, sent.stderr
        stored = _instances(home, "brain")
        assert len(stored) == len(paths)
        assert {stat.S_IMODE(p.stat().st_mode) for p in stored} == {JOB_FILE_MODE}
        assert stat.S_IMODE(stored[0].parent.stat().st_mode) == JOB_DIR_MODE
        refused = _dcmtk("storescu", "-aet", CALLER, "-aec", "BRAIN", "127.0.0.1", str(port),
                         str(sr))  # fmt: skip
        assert refused.returncode != 0  # a failure status: storescu reports it
        intruder = _dcmtk("echoscu", "-aet", "INTRUDER", "-aec", "SITEFIT", "127.0.0.1", str(port))
        assert intruder.returncode != 0
        assert "Calling AE Title Not Recognized" in intruder.stdout + intruder.stderr
        assert _dcmtk(*echo).returncode == 0  # still serving
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
            raise AssertionError(f"no exit on SIGTERM:\n{log.read_text()[-3000:]}") from None
    output = log.read_text()
    assert code == 0, output
    assert f"DICOM listener on 127.0.0.1:{port}, AE title SITEFIT" in output
    assert "route 'brain': AE title BRAIN -> model tiny-brain" in output
    assert "calling AE titles allowed: CALLER" in output
    assert "Comprehensive SR Storage objects are not images" in output
    assert "'INTRUDER'" in output and "calling AE title not allowed" in output
    assert f"{len(paths)} instances stored" in output
    assert "DICOM listener stopped" in output and "Traceback" not in output
    for secret in _secrets(ids, paths):
        assert secret not in output


def test_the_command_refuses_an_open_listener_without_allowed_callers(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SITEFIT_")}
    env.update(PYTHONPATH=str(REPO), SITEFIT_HOME=str(tmp_path))
    result = subprocess.run(
        [sys.executable, "-m", "sitefit", "dicom-listener", "--host", "0.0.0.0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "SITEFIT_DICOM_ALLOWED_CALLERS" in result.stderr and "Traceback" not in result.stderr


# -- in-process listener ---------------------------------------------------------------------


def test_pynetdicom_scu_echoes_and_stores_duplicates_are_ignored(tmp_path: Path) -> None:
    paths, _ = _write_series(tmp_path / "series")
    datasets = [pydicom.dcmread(path) for path in paths]
    settings = _settings(tmp_path)
    with _listening(settings):
        assoc = _scu(settings.dicom_port, "BRAIN")
        assert assoc.is_established
        assert assoc.acceptor.ae_title == "BRAIN"  # we answer as the AE title dialled
        try:
            assert assoc.send_c_echo().Status == 0x0000
            assert [assoc.send_c_store(ds).Status for ds in datasets] == [0x0000] * 4
            assert [assoc.send_c_store(ds).Status for ds in datasets[:2]] == [0x0000] * 2
        finally:
            assoc.release()
    stored = _instances(tmp_path, "brain")
    assert len(stored) == 4
    originals = {ds.SOPInstanceUID for ds in datasets}
    assert {str(pydicom.dcmread(p).SOPInstanceUID) for p in stored} == originals


def test_our_own_ae_title_sends_to_the_default_route(tmp_path: Path) -> None:
    paths, _ = _write_series(tmp_path / "series", slices=2)
    settings = _settings(tmp_path)
    with _listening(settings):
        sent = _dcmtk("storescu", "-aet", CALLER, "-aec", "SITEFIT", "127.0.0.1",
                      str(settings.dicom_port), *map(str, paths))  # fmt: skip
    assert sent.returncode == 0, sent.stderr
    assert len(_instances(tmp_path, "default")) == 2 and _instances(tmp_path, "brain") == []


def test_without_a_default_route_our_own_ae_title_only_echoes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    paths, _ = _write_series(tmp_path / "series", slices=1)
    settings = _settings(tmp_path, dicom_routes={"brain": ROUTES["brain"]})
    with _listening(settings), caplog.at_level(logging.INFO):
        assoc = _scu(settings.dicom_port, "SITEFIT")
        try:
            assert assoc.send_c_echo().Status == 0x0000
            answer = assoc.send_c_store(pydicom.dcmread(paths[0]))
        finally:
            assoc.release()
    assert answer.Status == CANNOT_UNDERSTAND and "no route" in answer.ErrorComment
    assert not (tmp_path / "inbox").exists() or not list((tmp_path / "inbox").rglob("*.dcm"))
    assert "no route for this AE title" in caplog.text


@pytest.mark.parametrize(
    ("calling", "called", "reason"),
    [
        ("INTRUDER", "BRAIN", "calling AE title not allowed"),
        (CALLER, "NOBODY", "called AE title not recognised"),
    ],
)
def test_associations_from_strangers_or_to_unknown_titles_are_rejected(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, calling: str, called: str, reason: str
) -> None:
    settings = _settings(tmp_path)
    with _listening(settings), caplog.at_level(logging.INFO):
        assoc = _scu(settings.dicom_port, called, calling)
        assert assoc.is_rejected and not assoc.is_established
        wait_for(lambda: reason in caplog.text, 10, "the rejection to be logged")
        again = _scu(settings.dicom_port, "BRAIN")  # the listener still serves others
        assert again.is_established
        again.release()
    assert f"association from '{calling}' to '{called}' rejected" in caplog.text


def test_associations_past_the_cap_are_rejected(tmp_path: Path) -> None:
    settings = _settings(tmp_path, dicom_max_associations=1)
    with _listening(settings):
        first = _scu(settings.dicom_port, "BRAIN")
        assert first.is_established
        try:
            second = _scu(settings.dicom_port, "BRAIN")
            assert second.is_rejected
        finally:
            first.release()

        def accepted() -> bool:
            assoc = _scu(settings.dicom_port, "BRAIN")
            if assoc.is_established:
                assoc.release()
                return True
            return False

        wait_for(accepted, 10, "the freed slot to take a new association")


def _corrupt_file(tmp_path: Path, template: Path) -> Path:
    """Valid file meta (pynetdicom sends the rest as it is), then garbage for the dataset."""
    data = template.read_bytes()
    meta_end = 132 + 12 + int.from_bytes(data[140:144], "little")  # after (0002,0000)'s group
    corrupt = tmp_path / "corrupt.dcm"
    corrupt.write_bytes(data[:meta_end] + b"\xff" * 64)
    return corrupt


@pytest.mark.filterwarnings("ignore::UserWarning:pydicom")  # silenced outside pytest too
def test_unusable_instances_get_a_failure_status_and_the_listener_keeps_serving(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the SCU sends a file's bytes after its file meta as they are, without parsing them
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)
    paths, ids = _write_series(tmp_path / "series")
    settings = _settings(tmp_path)
    sr = _non_image(ComprehensiveSRStorage, pixels=False)
    enhanced = _enhanced()
    corrupt = _corrupt_file(tmp_path, paths[0])
    with _listening(settings), caplog.at_level(logging.DEBUG):
        assoc = _scu(settings.dicom_port, "BRAIN")
        try:
            refused = [assoc.send_c_store(sr), assoc.send_c_store(enhanced)]
            broken = assoc.send_c_store(corrupt)
            assert assoc.is_established  # the association survived all of it
            good = [assoc.send_c_store(pydicom.dcmread(path)).Status for path in paths]
        finally:
            assoc.release()
    assert [answer.Status for answer in refused] == [CANNOT_UNDERSTAND] * 2
    assert "Comprehensive SR Storage" in refused[0].ErrorComment
    assert "multi-frame" in refused[1].ErrorComment
    assert broken.Status == CANNOT_UNDERSTAND and broken.ErrorComment  # with a reason
    assert good == [0x0000] * len(paths)
    assert len(_instances(tmp_path, "brain")) == len(paths)
    refusals = [r.getMessage() for r in caplog.records if "C-STORE" in r.getMessage()]
    assert len(refusals) == 3 and all(m.startswith("C-STORE from 'CALLER'") for m in refusals)
    assert f"{len(paths)} instances stored, 0 duplicates, 3 refused" in caplog.text
    secrets = [
        *_secrets(ids, paths),
        str(sr.SOPInstanceUID),
        str(sr.StudyInstanceUID),
        str(enhanced.SOPInstanceUID),
        "Secret^Patient",
    ]
    # pytest hands it pydicom's records too, which sitefit.dicom silences outside tests
    said = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith("pydicom"))
    assert "C-STORE" in said
    for secret in secrets:
        assert secret not in said


def test_the_series_cap_refuses_the_instances_past_it(tmp_path: Path) -> None:
    paths, _ = _write_series(tmp_path / "series", slices=5)
    settings = _settings(tmp_path, dicom_max_series_instances=3)
    with _listening(settings):
        assoc = _scu(settings.dicom_port, "BRAIN")
        try:
            answers = [assoc.send_c_store(pydicom.dcmread(path)) for path in paths]
        finally:
            assoc.release()
    assert [a.Status for a in answers] == [0x0000] * 3 + [OUT_OF_RESOURCES] * 2
    assert answers[3].ErrorComment.startswith("series limit reached: 3 instances")
    assert len(_instances(tmp_path, "brain")) == 3


def _converted(tool: list[str], paths: list[Path], out: Path) -> list[Path]:
    """``paths`` re-encoded by a dcmtk tool (``tool in out``), UIDs kept."""
    out.mkdir()
    for path in paths:
        subprocess.run([*tool, str(path), str(out / path.name)], check=True, timeout=60)
    return sorted(out.iterdir())


DCMTK_ENCODERS = {
    JPEGLosslessSV1: ["dcmcjpeg", "+e1"],
    JPEGLSLossless: ["dcmcjpls", "+el"],
    DeflatedExplicitVRLittleEndian: ["dcmconv", "+td"],
}


@pytest.mark.parametrize(
    ("syntax", "option"),
    [
        (RLELossless, "-xr"),
        (JPEG2000Lossless, "-xv"),
        (JPEGLosslessSV1, "-xs"),
        (JPEGLSLossless, "-xt"),
        (DeflatedExplicitVRLittleEndian, "-xd"),
    ],
    ids=["rle", "jpeg2000", "jpeg-lossless", "jpeg-ls", "deflated"],
)
def test_compressed_series_arrive_as_sent_and_decode(
    tmp_path: Path, syntax: str, option: str
) -> None:
    image = _image(64, 2)  # JPEG 2000's encoder needs more than 16 x 16 pixels
    if syntax in DCMTK_ENCODERS:
        plain = write_dicom_series(image, tmp_path / "plain")
        paths = _converted(DCMTK_ENCODERS[syntax], plain, tmp_path / "series")
    else:
        paths = write_dicom_series(image, tmp_path / "series", transfer_syntax=syntax)
    assert pydicom.dcmread(paths[0]).file_meta.TransferSyntaxUID == syntax
    settings = _settings(tmp_path)
    with _listening(settings):
        sent = _dcmtk("storescu", option, "-aet", CALLER, "-aec", "BRAIN", "127.0.0.1",
                      str(settings.dicom_port), *map(str, paths))  # fmt: skip
    assert sent.returncode == 0, sent.stderr
    stored = _instances(tmp_path, "brain")
    assert len(stored) == 2
    for path in stored:
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == syntax
        assert ds.pixel_array.shape == (64, 64)


def test_stop_ends_associations_in_progress(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    listener = DicomListener(settings, Inbox.from_settings(settings))
    listener.start()
    assoc = _scu(settings.dicom_port, "BRAIN")
    assert assoc.is_established
    listener.stop(grace_s=0.2)
    wait_for(lambda: not assoc.is_established, 10, "the association to end")
    failed = _scu(settings.dicom_port, "BRAIN")
    assert not failed.is_established


def test_a_port_in_use_is_one_clear_error(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    with _listening(settings):
        second = DicomListener(settings, Inbox.from_settings(settings))
        with pytest.raises(
            InvalidInputError, match=f"cannot listen on 127.0.0.1:{settings.dicom_port}"
        ):
            second.start()


def test_called_ae_titles_select_routes(tmp_path: Path) -> None:
    assert called_ae_routes(_settings(tmp_path)) == {"SITEFIT": "default", "BRAIN": "brain"}
    only = _settings(tmp_path, dicom_routes={"brain": ROUTES["brain"]})
    assert called_ae_routes(only) == {"SITEFIT": None, "BRAIN": "brain"}
    mine = Route(model="tiny-brain", ae_title="SITEFIT")  # a route may take our own title
    assert called_ae_routes(_settings(tmp_path, dicom_routes={**ROUTES, "own": mine})) == {
        "SITEFIT": "own",
        "BRAIN": "brain",
    }

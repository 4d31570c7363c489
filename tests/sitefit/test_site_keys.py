"""Site keys from scanner headers: stable, distinct per scanner, valid site names, no place."""

from __future__ import annotations

from pydicom.dataset import Dataset

from sitefit import defaults
from sitefit.phantoms.dicom_series import Scanner
from sitefit.settings import SITE_NAME
from sitefit.site_keys import site_key

KEYWORDS = list(defaults.SITE_KEY_HEADERS)


def _header(scanner: Scanner) -> Dataset:
    ds = Dataset()
    for keyword, value in scanner.headers().items():
        setattr(ds, keyword, value)
    return ds


def test_the_same_scanner_twice_gives_the_same_key() -> None:
    scanner = Scanner(manufacturer="SIEMENS", model="Prisma", station="MR01", serial="1234")
    first, second = site_key(_header(scanner), KEYWORDS), site_key(_header(scanner), KEYWORDS)
    assert first == second
    assert first.startswith("siemens-prisma-")
    assert SITE_NAME.fullmatch(first)


def test_two_scanners_of_one_model_get_different_keys() -> None:
    one = Scanner(manufacturer="SIEMENS", model="Prisma", station="MR01", serial="1234")
    other = Scanner(manufacturer="SIEMENS", model="Prisma", station="MR02", serial="5678")
    assert site_key(_header(one), KEYWORDS) != site_key(_header(other), KEYWORDS)


def test_the_key_names_neither_station_nor_institution() -> None:
    scanner = Scanner(station="RADIOLOGY-EAST", institution="Saint Example Hospital")
    key = site_key(_header(scanner), KEYWORDS)
    assert "east" not in key and "example" not in key and "hospital" not in key


def test_missing_and_odd_headers_still_give_a_valid_key() -> None:
    assert SITE_NAME.fullmatch(site_key(Dataset(), KEYWORDS))
    ds = Dataset()
    ds.Manufacturer = "Ünïcode & Co. " * 10
    ds.ManufacturerModelName = "!!!"
    key = site_key(ds, KEYWORDS)
    assert SITE_NAME.fullmatch(key) and len(key) <= 64


def test_the_configured_headers_decide() -> None:
    one = _header(Scanner(serial="1"))
    other = _header(Scanner(serial="2"))
    without_serial = [k for k in KEYWORDS if k != "DeviceSerialNumber"]
    assert site_key(one, without_serial) == site_key(other, without_serial)
    assert site_key(one, KEYWORDS) != site_key(other, KEYWORDS)

"""Tests of the PACS side: results sent to a real Orthanc (C-STORE and STOW-RS)."""

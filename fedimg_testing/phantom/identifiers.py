"""Identifying values planted in a phantom series' headers, for byte scans of derived outputs."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class PlantedIdentifiers:
    """Identifying values planted in every usual place of a written series.

    Each free-text value carries a ``ZZPHI`` prefix, a field tag and an 8-letter token
    derived from (seed, case), so values are unique, never substrings of one another and
    cannot occur by chance in other bytes (pixel data included: HU never encode ASCII
    letters). Dates and times are valid DA/TM values derived from the same hash.
    """

    patient_name: str
    patient_id: str
    other_patient_id: str
    birth_date: str
    patient_sex: str
    patient_age: str
    patient_address: str
    accession: str
    institution: str
    institution_address: str
    department: str
    station: str
    ae_title: str
    device_serial: str
    referring_physician: str
    performing_physician: str
    operator: str
    study_date: str
    study_time: str
    study_id: str
    study_description: str
    series_description: str
    requested_procedure_id: str
    requested_procedure_description: str
    image_comments: str
    private_text: str

    # Too short to be distinctive, and a de-identifier may legitimately keep them
    # (PS3.15 "Retain Patient Characteristics"): planted, but not in strings().
    _NOT_SCANNED = ("patient_sex", "patient_age")

    def strings(self) -> list[str]:
        """Every distinctive planted value, for byte scans of outputs."""
        return [getattr(self, f.name) for f in fields(self) if f.name not in self._NOT_SCANNED]

    @classmethod
    def for_case(cls, seed: int, case: int) -> "PlantedIdentifiers":
        """The identifiers of case ``case`` of a site seeded ``seed`` (deterministic, unique per pair)."""
        digest = hashlib.sha256(f"fedimg-phantom-phi:{int(seed)}:{int(case)}".encode()).digest()
        tok = "".join(chr(ord("A") + b % 26) for b in digest[:8])
        n = int.from_bytes(digest[8:16], "little")
        birth_year, study_year = 1930 + n % 40, 2010 + (n >> 8) % 12
        birth = f"{birth_year:04d}{1 + (n >> 16) % 12:02d}{1 + (n >> 24) % 28:02d}"
        smonth, sday = 1 + (n >> 32) % 12, 1 + (n >> 40) % 28
        study = f"{study_year:04d}{smonth:02d}{sday:02d}"
        age = study_year - birth_year - (1 if (smonth, sday) < (int(birth[4:6]), int(birth[6:8])) else 0)
        m = int.from_bytes(digest[16:24], "little")
        time = f"{7 + m % 11:02d}{(m >> 8) % 60:02d}{(m >> 16) % 60:02d}.{(m >> 24) % 1_000_000:06d}"
        return cls(
            patient_name=f"ZZPHIFAM{tok}^ZZPHIGIV{tok}",
            patient_id=f"ZZPHIPID{tok}",
            other_patient_id=f"ZZPHIOID{tok}",
            birth_date=birth,
            patient_sex="FM"[n % 2],
            patient_age=f"{age:03d}Y",
            patient_address=f"ZZPHIADR{tok} 7 Phantom Lane",
            accession=f"ZZPHIACC{tok}",  # SH: 16 characters at most
            institution=f"ZZPHIINS{tok} General Hospital",
            institution_address=f"ZZPHIIAD{tok} 1 Hospital Road",
            department=f"ZZPHIDEP{tok} Radiology",
            station=f"ZZPHISTN{tok}",  # SH
            ae_title=f"ZZPHIAE{tok}",  # AE: 16 characters at most
            device_serial=f"ZZPHISER{tok}",
            referring_physician=f"ZZPHIREF{tok}^Anna",
            performing_physician=f"ZZPHIPRF{tok}^Jonas",
            operator=f"ZZPHIOPR{tok}^Lea",
            study_date=study,
            study_time=time,
            study_id=f"ZZPHISID{tok}",  # SH
            study_description=f"ZZPHISDS{tok} CT ABDOMEN",
            series_description=f"ZZPHISED{tok} ABD 1.5",
            requested_procedure_id=f"ZZPHIRPI{tok}",  # SH
            requested_procedure_description=f"ZZPHIRPD{tok} CT abdomen with contrast",
            image_comments=f"ZZPHICOM{tok} comment",
            private_text=f"ZZPHIPRV{tok} vendor note",
        )

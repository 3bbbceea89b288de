"""Generated DICOM files and a generated study folder, for the DICOM benchmark and the tests.

`write_dicom` writes one file from a numpy array with pydicom: any photometric interpretation, 8/16 bit,
signed, rescaled, windowed, multi-frame, and compressed where pydicom has an encoder here (RLE always,
JPEG 2000 with pylibjpeg-openjpeg, JPEG baseline by wrapping Pillow's JPEG). Every file carries
distinctive identifying values (`IDENTIFYING`) so that a test or the benchmark can search every output byte
for them. `make_study_folder` writes several patients, studies, series and multi-frame files.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

# Values no output may hold: each is written into every generated file (patient ones with a per-patient suffix).
IDENTIFYING = {
    "PatientName": "Quixote^Zebulon",
    "PatientID": "ZQPID7781",
    "PatientBirthDate": "19470611",
    "AccessionNumber": "ACCN99817",
    "InstitutionName": "Saint Elsewhere Quarantine Hospital",
    "ReferringPhysicianName": "Strangelove^Merkwurdig",
    "OtherPatientIDs": "OTHERID55190",
    "PatientAddress": "17 Cherry Tree Lane Nowhereville",
}
_SOP = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4", "DX": "1.2.840.10008.5.1.4.1.1.1.1",
        "SC": "1.2.840.10008.5.1.4.1.1.7", "SR": "1.2.840.10008.5.1.4.1.1.88.11"}


def identifying_values(patient: int) -> dict[str, str]:
    """The identifying values written for one patient (distinct per patient, all sharing the base strings)."""
    return {k: v if k in ("InstitutionName",) else f"{v}{patient:02d}" if "Date" not in k else v
            for k, v in IDENTIFYING.items()}


def write_dicom(path: Path, pixels: np.ndarray | None, *, modality: str = "CT", photometric: str | None = None,
                bits_stored: int | None = None, rescale: tuple[float, float] | None = None,
                window: list[tuple[float, float]] | None = None, syntax: str = "explicit", patient: int = 0,
                study_uid: str | None = None, series_uid: str | None = None, instance: int = 1,
                series_number: int = 1, tags: dict | None = None, palette: bool = False,
                voi_lut: tuple[int, int, np.ndarray] | None = None) -> Path:
    """One DICOM file. `pixels`: (H, W) or (H, W, 3), with a leading frame axis for multi-frame; uint8/int8 are
    8-bit, uint16/int16 16-bit (signed when the dtype is). `syntax`: explicit | implicit | rle | j2k | jpeg |
    jpegls (pixels left as they are, under the JPEG-LS syntax: nothing here decodes it). None: no pixel data (a
    structured report). `voi_lut`: (first mapped value, bits per entry, table)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import (ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless, JPEGBaseline8Bit,
                             JPEGLSLossless, RLELossless, generate_uid)

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if syntax == "implicit" else ExplicitVRLittleEndian
    sop = _SOP["SR" if pixels is None else modality if modality in _SOP else "SC"]
    ds.SOPClassUID, ds.SOPInstanceUID = sop, generate_uid()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = sop, ds.SOPInstanceUID
    for k, v in identifying_values(patient).items():
        setattr(ds, k, v)
    ds.Modality, ds.StudyDate, ds.PatientAge, ds.PatientSex = modality, "20190304", f"{40 + patient:03d}Y", "MF"[
        patient % 2]
    ds.BodyPartExamined, ds.Manufacturer, ds.ManufacturerModelName = "CHEST", "GenericVendor", "Model-X"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid or generate_uid(), series_uid or generate_uid()
    ds.SeriesNumber, ds.InstanceNumber, ds.PixelSpacing = series_number, instance, [0.7, 0.7]
    for k, v in (tags or {}).items():
        setattr(ds, k, v)
    if pixels is not None:
        _set_pixels(ds, np.asarray(pixels), photometric, bits_stored, palette)
        if rescale is not None:
            ds.RescaleSlope, ds.RescaleIntercept = rescale
        if window:
            ds.WindowCenter = [c for c, _ in window] if len(window) > 1 else window[0][0]
            ds.WindowWidth = [w for _, w in window] if len(window) > 1 else window[0][1]
        if voi_lut is not None:
            first, bits, table = voi_lut
            item = Dataset()
            item.LUTDescriptor = [len(table), first, bits]
            item.LUTData = [int(v) for v in table]
            item["LUTDescriptor"].VR, item["LUTData"].VR = "US", "US"
            ds.VOILUTSequence = [item]
        if syntax == "rle":
            ds.compress(RLELossless)
        elif syntax == "j2k":
            ds.compress(JPEG2000Lossless)
        elif syntax == "jpeg":
            _encapsulate_jpeg(ds, np.asarray(pixels))
            ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        elif syntax == "jpegls":
            ds.file_meta.TransferSyntaxUID = JPEGLSLossless
            from pydicom.encaps import encapsulate

            ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7" + bytes(ds.PixelData[:64]) + b"\xff\xd9"])
            ds["PixelData"].VR = "OB"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True, implicit_vr=syntax == "implicit" or None)
    return path


def _set_pixels(ds, arr: np.ndarray, photometric: str | None, bits_stored: int | None, palette: bool) -> None:
    color = arr.shape[-1] == 3 and arr.ndim in (3, 4)
    frames = arr.shape[0] if arr.ndim == (4 if color else 3) else 1
    bits = arr.dtype.itemsize * 8
    ds.Rows, ds.Columns = arr.shape[-3:-1] if color else arr.shape[-2:]
    ds.SamplesPerPixel = 3 if color else 1
    ds.PhotometricInterpretation = photometric or ("RGB" if color else "MONOCHROME2")
    ds.BitsAllocated, ds.BitsStored = bits, bits_stored or bits
    ds.HighBit, ds.PixelRepresentation = ds.BitsStored - 1, int(arr.dtype.kind == "i")
    if color:
        ds.PlanarConfiguration = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    if palette:  # 8-bit indices through 16-bit tables: i -> (i, 255 - i, i // 2), each scaled to 16 bits
        ramp = np.arange(256)
        for name, lut in (("Red", ramp), ("Green", 255 - ramp), ("Blue", ramp // 2)):
            setattr(ds, f"{name}PaletteColorLookupTableDescriptor", [256, 0, 16])
            setattr(ds, f"{name}PaletteColorLookupTableData", (lut * 257).astype("<u2").tobytes())
    ds.PixelData = arr.astype(arr.dtype.newbyteorder("<")).tobytes()


def _encapsulate_jpeg(ds, arr: np.ndarray) -> None:
    """JPEG baseline: Pillow's encoder, wrapped as DICOM encapsulated pixel data (pydicom has no JPEG encoder)."""
    from PIL import Image
    from pydicom.encaps import encapsulate

    frames = arr if arr.ndim == (4 if ds.SamplesPerPixel == 3 else 3) else arr[None]
    encoded = []
    for frame in frames:
        buf = io.BytesIO()
        Image.fromarray(frame.astype(np.uint8)).save(buf, format="JPEG", quality=95)
        encoded.append(buf.getvalue())
    ds.PixelData = encapsulate(encoded)
    ds["PixelData"].VR = "OB"
    if ds.SamplesPerPixel == 3:
        ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.LossyImageCompression = "01"


def make_study_folder(root: Path, n_files: int = 200, patients: int = 8, seed: int = 0) -> dict:
    """A folder as a PACS export holds it: PATIENT/STUDY/SERIES/IMnnnn.dcm plus some files named by UID with no
    extension, CT (signed, rescaled, windowed), MR multi-frame, DX MONOCHROME1 and RGB secondary captures, some
    RLE-compressed, one JPEG-LS file no installed decoder reads and one structured report. Returns counts."""
    from pydicom.uid import generate_uid

    rng = np.random.default_rng(seed)
    root = Path(root)
    files, frames_total, series_count, studies = 0, 0, 0, 0
    kinds = ["ct", "mr", "dx", "sc"]
    p = 0
    while files < n_files:
        patient = p % patients
        study = generate_uid()
        studies += 1
        for s in range(int(rng.integers(2, 4))):
            kind = kinds[(p + s) % len(kinds)]
            series = generate_uid()
            series_count += 1
            n = {"ct": 12, "mr": 2, "dx": 1, "sc": 2}[kind]
            for i in range(n):
                if files >= n_files:
                    break
                folder = root / f"patient{patient:02d}" / f"study{studies:03d}" / f"series{s}"
                name = f"IM{i + 1:04d}.dcm" if (files % 7) else generate_uid()  # every 7th: a UID name
                args = dict(patient=patient, study_uid=study, series_uid=series, instance=i + 1, series_number=s + 1)
                frames_total += _write_kind(folder / name, kind, rng, files, args)
                files += 1
        p += 1
    write_dicom(root / "report_sr.dcm", None, patient=0)  # a structured report: no image
    write_dicom(root / "jpegls.dcm", rng.integers(0, 255, (32, 32)).astype(np.uint8), syntax="jpegls", patient=1)
    return {"files": files + 2, "images": files, "frames": frames_total, "patients": min(patients, p),
            "studies": studies, "series": series_count}


def _write_kind(path: Path, kind: str, rng, k: int, args: dict) -> int:
    h = w = 96
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.sin(xx / (5 + k % 9)) + np.cos(yy / (4 + k % 5)) + rng.normal(0, 0.1, (h, w))
    syntax = "rle" if k % 5 == 0 else "explicit"
    if kind == "ct":  # HU -1000..1500 stored signed, rescale intercept -1024
        hu = (base * 600).astype(np.int16)
        write_dicom(path, (hu + 1024).astype(np.int16), modality="CT", rescale=(1.0, -1024.0),
                    window=[(40, 400), (-600, 1500)], syntax=syntax, **args)
        return 1
    if kind == "mr":  # 6 frames of 12-bit unsigned
        frames = np.stack([(base + f / 3) for f in range(6)])
        stored = np.clip((frames + 3) * 600, 0, 4095).astype(np.uint16)
        write_dicom(path, stored, modality="MR", bits_stored=12, syntax=syntax, **args)
        return 6
    if kind == "dx":  # MONOCHROME1 radiograph, 14-bit
        stored = np.clip((base + 3) * 2500, 0, 16383).astype(np.uint16)
        write_dicom(path, stored, modality="DX", photometric="MONOCHROME1", bits_stored=14,
                    tags={"ViewPosition": "PA"}, syntax=syntax, **args)
        return 1
    rgb = np.stack([(base + 3) * 40, (base + 2) * 30, np.full_like(base, 90)], axis=-1)  # secondary capture
    write_dicom(path, np.clip(rgb, 0, 255).astype(np.uint8), modality="OT", syntax=syntax, **args)
    return 1

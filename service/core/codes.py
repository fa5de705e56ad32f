"""Every reason and problem code flaircad emits, in one enum whose members describe themselves.

Clients switch on these strings (``Skipped.code``, a rejection's ``code``, the problem+json
``code``, STOW-RS failure reasons in the metrics, an analysis' ``problem.code``): the values are
stable. Each member carries its :class:`Kind` and a one-line ``description``; there is no
parallel table to keep in step. The README's code table lists the members of the input kinds
(skip, reject, warning) with exactly these descriptions (``tests/unit/test_codes.py`` checks it).
"""

from __future__ import annotations

from enum import StrEnum


class Kind(StrEnum):
    """What a code is about; the first four are the README's code table."""

    SKIP = "skip"  # one file (or part) not used
    REJECT = "reject"  # a whole series is not one 3D volume
    REJECT_API = "reject (API only)"  # only where the caller requires FLAIR
    WARNING = "warning"  # the series still converts
    REFUSAL = "refusal"  # an instance or series refused at intake or analysis (limits, UIDs)
    FAILURE = "failure"  # an accepted analysis that could not finish
    BUSY = "busy"  # HTTP 503 with Retry-After: no new work now
    REQUEST = "request"  # an HTTP request the API does not take

    @property
    def in_readme_table(self) -> bool:
        return self in (Kind.SKIP, Kind.REJECT, Kind.REJECT_API, Kind.WARNING)


class Code(StrEnum):
    """Stable reason codes; ``code.kind`` and ``code.description`` say what each one means."""

    kind: Kind
    description: str

    def __new__(cls, value: str, kind: Kind, description: str) -> Code:
        member = str.__new__(cls, value)
        member._value_ = value
        member.kind = kind
        member.description = description
        return member

    # files skipped while reading (service.core.reading)
    EMPTY_FILE = "empty_file", Kind.SKIP, "zero-byte file"
    NOT_DICOM = (
        "not_dicom", Kind.SKIP,
        "not DICOM (no 'DICM' prefix and no readable dataset: PNG, text, ...)")
    TRUNCATED = (
        "truncated", Kind.SKIP,
        "the file ends early (pixel data shorter than Rows×Columns×frames)")
    CORRUPT = "corrupt", Kind.SKIP, "has the DICOM prefix but cannot be parsed"
    DICOMDIR = "dicomdir", Kind.SKIP, "a DICOMDIR (media directory), not an image"
    NO_PIXEL_DATA = (
        "no_pixel_data", Kind.SKIP, "no Pixel Data (SR, presentation state, header-only file)")
    MISSING_UID = "missing_uid", Kind.SKIP, "no Study/Series/SOP Instance UID"
    INFLATED_TOO_LARGE = (
        "inflated_too_large", Kind.SKIP,
        "a Deflated Explicit VR file that inflates beyond 256 MiB (deflate bomb; measured in "
        "bounded steps before pydicom inflates it)")
    TOO_MANY_ITEMS = (
        "too_many_items", Kind.SKIP,
        "more than 200 000 sequence items (pydicom spends about 1 KiB per item)")
    NESTING_TOO_DEEP = (
        "nesting_too_deep", Kind.SKIP,
        "sequences nested more than 16 levels deep (real MR headers nest 4-5)")
    # series rejected (service.core.series, service.core.volume)
    NOT_MR = "not_mr", Kind.REJECT, "Modality is not MR (e.g. CT)"
    MOSAIC = "mosaic", Kind.REJECT, "Siemens/UIH mosaic (many slices tiled in one image)"
    UNSUPPORTED_PIXELS = "unsupported_pixels", Kind.REJECT, "colour or multi-sample pixels"
    UNSUPPORTED_MULTIFRAME = (
        "unsupported_multiframe", Kind.REJECT, "multi-frame object without per-frame geometry")
    MISSING_GEOMETRY = (
        "missing_geometry", Kind.REJECT,
        "ImagePositionPatient / ImageOrientationPatient / PixelSpacing missing or malformed")
    MIXED_MATRIX = "mixed_matrix", Kind.REJECT, "Rows/Columns differ between slices"
    MIXED_ORIENTATION = (
        "mixed_orientation", Kind.REJECT,
        "slices with different orientations (e.g. a 3-plane localizer)")
    MIXED_PIXEL_SPACING = (
        "mixed_pixel_spacing", Kind.REJECT, "PixelSpacing differs between slices")
    MIXED_IMAGE_TYPE = (
        "mixed_image_type", Kind.REJECT,
        "ImageType differs (e.g. magnitude + phase / field map)")
    MULTI_VOLUME_4D = (
        "multi_volume_4d", Kind.REJECT,
        "several volumes per position (fMRI, DTI, multi-echo, repeats)")
    SINGLE_SLICE = "single_slice", Kind.REJECT, "one slice is not a volume"
    MISSING_SLICES = (
        "missing_slices", Kind.REJECT,
        "gaps in the slice stack (spacing a multiple of the smallest)")
    IRREGULAR_SPACING = (
        "irregular_spacing", Kind.REJECT,
        "slice spacing varies by more than 1 % of the spacing")
    NON_ORTHOGONAL_STACK = (
        "non_orthogonal_stack", Kind.REJECT,
        "slices not stacked along their normal (gantry tilt/shear)")
    DECODE_FAILED = (
        "decode_failed", Kind.REJECT,
        "pixel data not decodable (codec missing, corrupt or truncated compressed stream)")
    CONVERSION_FAILED = (
        "conversion_failed", Kind.REJECT,
        "unexpected error while converting (a bug: please report)")
    # only where the caller requires FLAIR (the API), see service.core.flair
    NOT_FLAIR = (
        "not_flair", Kind.REJECT_API, "no FLAIR rule matched and the override is off")
    # warnings (the series still converts)
    NO_PREAMBLE = (
        "no_preamble", Kind.WARNING,
        "files without the 128-byte preamble/'DICM' were read anyway")
    DUPLICATE_INSTANCE = (
        "duplicate_instance", Kind.WARNING,
        "the same SOP Instance UID was received more than once")
    DUPLICATE_SLICES = (
        "duplicate_slices", Kind.WARNING,
        "some positions acquired twice; the newest instance was kept")
    MONOCHROME1_INVERTED = (
        "monochrome1_inverted", Kind.WARNING,
        "MONOCHROME1 inverted so that high values are bright")

    # size limits (service.core.limits), on arrival and again when a series is analysed
    MATRIX_TOO_LARGE = (
        "matrix_too_large", Kind.REFUSAL, "Rows or Columns beyond FLAIRCAD_MAX_MATRIX")
    SERIES_TOO_LARGE = (
        "series_too_large", Kind.REFUSAL,
        "decoded size beyond FLAIRCAD_MAX_SERIES_BYTES, or an estimated analysis memory "
        "beyond FLAIRCAD_ANALYSIS_MEMORY_BYTES")
    TOO_MANY_INSTANCES = (
        "too_many_instances", Kind.REFUSAL,
        "more instances in one series (or one request) than allowed")
    # one analysis' input (service.pipeline.analysis)
    NO_SERIES = "no_series", Kind.REFUSAL, "no DICOM image series (or not the one asked for)"
    MULTIPLE_SERIES = (
        "multiple_series", Kind.REFUSAL, "several series where one was expected")
    INVALID_UID = "invalid_uid", Kind.REFUSAL, "a UID that is not a valid DICOM UID"
    # STOW-RS parts refused (service.intake.stow; the FailureReason says the DICOM category)
    UNSUPPORTED_PART_TYPE = (
        "unsupported_part_type", Kind.REFUSAL, "a part that is not application/dicom")
    STUDY_MISMATCH = (
        "study_mismatch", Kind.REFUSAL, "an instance of another study than the URL names")
    SPOOL_WRITE_FAILED = (
        "spool_write_failed", Kind.REFUSAL, "the instance could not be written to the spool")
    CONFLICTING_DUPLICATE = (
        "conflicting_duplicate", Kind.REFUSAL,
        "different bytes under a SOP Instance UID already stored (the first copy is kept)")

    # an accepted analysis that failed (service.runtime.scheduler)
    INPUT_LOST = "input_lost", Kind.FAILURE, "the spooled input is gone"
    CRASHED_TWICE = (
        "crashed_twice", Kind.FAILURE,
        "the analysis killed its process each time it started (out of memory, say)")
    RESULT_WRITE_FAILED = (
        "result_write_failed", Kind.FAILURE, "the result could not be written")
    ANALYSIS_FAILED = "analysis_failed", Kind.FAILURE, "the analysis failed; it is logged"

    # no new work now: HTTP 503 with Retry-After (service.runtime.scheduler.Saturated)
    SATURATED = "saturated", Kind.BUSY, "the analysis queue is full"
    SPOOL_FULL = (
        "spool_full", Kind.BUSY,
        "the spool volume is past FLAIRCAD_SPOOL_MAX_FILL (or full while writing)")
    TOO_MANY_OPEN_SERIES = (
        "too_many_open_series", Kind.BUSY,
        "the stability window holds FLAIRCAD_MAX_OPEN_SERIES series (or the sender its "
        "FLAIRCAD_MAX_OPEN_SERIES_PER_SENDER)")
    DRAINING = "draining", Kind.BUSY, "the service is shutting down"

    # HTTP requests the API does not take (service.api)
    NOT_READY = "not_ready", Kind.REQUEST, "the service is starting"
    UNAUTHORIZED = "unauthorized", Kind.REQUEST, "no or an invalid bearer token"
    INSUFFICIENT_SCOPE = (
        "insufficient_scope", Kind.REQUEST, "the token lacks the scope the route needs")
    INVALID_REQUEST = "invalid_request", Kind.REQUEST, "the request is malformed"
    NOT_FOUND = "not_found", Kind.REQUEST, "no such route"
    METHOD_NOT_ALLOWED = "method_not_allowed", Kind.REQUEST, "the route takes another method"
    HTTP_ERROR = "http_error", Kind.REQUEST, "another HTTP error"
    INTERNAL_ERROR = "internal_error", Kind.REQUEST, "an internal error (logged)"
    UNSUPPORTED_MEDIA_TYPE = (
        "unsupported_media_type", Kind.REQUEST, "a body of a media type the route does not take")
    PAYLOAD_TOO_LARGE = "payload_too_large", Kind.REQUEST, "the body is larger than allowed"
    MALFORMED_MULTIPART = (
        "malformed_multipart", Kind.REQUEST, "a multipart body that does not parse")
    INSTANCE_TOO_LARGE = (
        "instance_too_large", Kind.REQUEST, "one part beyond FLAIRCAD_MAX_INSTANCE_BYTES")
    NO_INSTANCES = "no_instances", Kind.REQUEST, "the body holds no DICOM parts"
    ANALYSIS_NOT_FOUND = "analysis_not_found", Kind.REQUEST, "no analysis with this id"
    NO_OUTPUTS = "no_outputs", Kind.REQUEST, "the analysis has no such output (yet)"
    SERIES_NOT_FOUND = "series_not_found", Kind.REQUEST, "no result series with this UID"
    INSTANCE_NOT_FOUND = (
        "instance_not_found", Kind.REQUEST, "no such instance in this result series")
    NOT_ACCEPTABLE = "not_acceptable", Kind.REQUEST, "no acceptable media type to answer with"
    INVALID_FRAMES = "invalid_frames", Kind.REQUEST, "frames are not numbers from 1"
    TOO_MANY_FRAMES = "too_many_frames", Kind.REQUEST, "more distinct frames than allowed"
    NO_FRAMES = "no_frames", Kind.REQUEST, "the instance has no native pixel data"
    FRAME_NOT_FOUND = "frame_not_found", Kind.REQUEST, "no such frame in the instance"
